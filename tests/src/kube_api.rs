//! A stand-in Kubernetes API server for end-to-end tests (no real one can run on these
//! machines: none is packaged, and there is no container engine). It speaks just
//! enough of the API, over plain HTTP on loopback, for the control plane started with
//! a kubeconfig pointing here: list and watch of `mcpservers`, `accesspolicies` and
//! `secrets` in one namespace, status patches, Secret create/get, one Lease (with
//! resourceVersion conflicts), one MutatingWebhookConfiguration, and TokenReview from a
//! table of tokens the test sets. Every request is recorded for the test to assert on.
//!
//! What it does not check: authentication of the control plane itself, RBAC, schema
//! validation (the CRD schemas are checked elsewhere), field selectors, pagination.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    namespace: String,
    version: u64,
    /// plural → objects
    objects: HashMap<String, Vec<Value>>,
    watchers: HashMap<String, Vec<mpsc::UnboundedSender<Value>>>,
    /// token → (username, audiences)
    tokens: HashMap<String, (String, Vec<String>)>,
    lease: Option<Value>,
    webhook: Option<Value>,
    requests: Vec<Request>,
}

/// The fake API server; cheap to clone.
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn status(code: u16, reason: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    axum::Json(body).into_response()
}

impl FakeApiServer {
    /// Serve on a loopback port; objects live in `namespace`.
    pub async fn start(namespace: &str) -> Result<FakeApiServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = FakeApiServer {
            state: Arc::new(Mutex::new(State {
                namespace: namespace.to_owned(),
                version: 100,
                ..State::default()
            })),
            addr,
        };
        let app = axum::Router::new().fallback({
            let server = server.clone();
            move |method: Method, uri: Uri, body: Bytes| {
                let server = server.clone();
                async move { server.handle(method, uri, body) }
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(server)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kubeconfig pointing here, written to `path`.
    pub fn kubeconfig(&self, path: &std::path::Path) -> Result<()> {
        let namespace = self.lock().namespace.clone();
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: cp\n  user: {{token: control-plane-token}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: cp, namespace: {namespace}}}\ncurrent-context: fake\n",
                self.addr
            ),
        )?;
        Ok(())
    }

    /// TokenReview will say `token` belongs to `username`, valid for `audiences`.
    pub fn token(&self, token: &str, username: &str, audiences: &[&str]) {
        self.lock().tokens.insert(
            token.to_owned(),
            (
                username.to_owned(),
                audiences.iter().map(|a| (*a).to_owned()).collect(),
            ),
        );
    }

    /// The MutatingWebhookConfiguration the control plane may update.
    pub fn set_webhook(&self, config: Value) {
        self.lock().webhook = Some(config);
    }

    pub fn webhook(&self) -> Option<Value> {
        self.lock().webhook.clone()
    }

    pub fn lease(&self) -> Option<Value> {
        self.lock().lease.clone()
    }

    /// Create or replace an object of `plural` (by name), as `kubectl apply` would;
    /// watchers are told.
    pub fn apply(&self, plural: &str, mut object: Value) {
        let mut state = self.lock();
        state.version += 1;
        let version = state.version.to_string();
        let name = object["metadata"]["name"].clone();
        let list = state.objects.entry(plural.to_owned()).or_default();
        let old = list.iter().position(|o| o["metadata"]["name"] == name);
        let generation = old.map_or(1, |i| {
            list[i]["metadata"]["generation"].as_i64().unwrap_or(1) + 1
        });
        object["metadata"]["resourceVersion"] = json!(version);
        object["metadata"]["generation"] = json!(generation);
        if let Some(i) = old {
            if let Some(status) = list[i].get("status").cloned() {
                object["status"] = status;
            }
            list[i] = object.clone();
        } else {
            list.push(object.clone());
        }
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        Self::notify(&mut state, plural, kind, object);
    }

    /// Delete an object; watchers are told.
    pub fn delete(&self, plural: &str, name: &str) {
        let mut state = self.lock();
        state.version += 1;
        let list = state.objects.entry(plural.to_owned()).or_default();
        if let Some(i) = list.iter().position(|o| o["metadata"]["name"] == name) {
            let object = list.remove(i);
            Self::notify(&mut state, plural, "DELETED", object);
        }
    }

    /// The object as stored now.
    pub fn get(&self, plural: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(plural)?
            .iter()
            .find(|o| o["metadata"]["name"] == name)
            .cloned()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    fn notify(state: &mut State, plural: &str, kind: &str, object: Value) {
        if let Some(watchers) = state.watchers.get_mut(plural) {
            let event = json!({"type": kind, "object": object});
            watchers.retain(|w| w.send(event.clone()).is_ok());
        }
    }

    fn handle(&self, method: Method, uri: Uri, body: Bytes) -> Response {
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = uri.path().to_owned();
        let query = uri.query().unwrap_or_default().to_owned();
        self.lock().requests.push(Request {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        let namespace = self.lock().namespace.clone();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            ["apis", "authentication.k8s.io", "v1", "tokenreviews"] if method == Method::POST => {
                self.review(body)
            }
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
                rest @ ..,
            ] if *ns == namespace => self.leases(&method, rest.first().copied(), body),
            [
                "apis",
                "admissionregistration.k8s.io",
                "v1",
                "mutatingwebhookconfigurations",
                name,
            ] => self.webhook_configuration(&method, name, body),
            ["api", "v1", "namespaces", ns, "secrets", rest @ ..]
            | [
                "apis",
                "toolmesh.dev",
                "v1alpha1",
                "namespaces",
                ns,
                rest @ ..,
            ] if *ns == namespace => {
                let (plural, rest) = if segments[0] == "api" {
                    ("secrets", rest)
                } else {
                    match rest.split_first() {
                        Some((plural, rest)) => (*plural, rest),
                        None => return status(404, "NotFound"),
                    }
                };
                self.objects(&method, plural, rest, &query, body)
            }
            _ => status(404, "NotFound"),
        }
    }

    fn review(&self, body: Value) -> Response {
        let token = body["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = body["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut review = body.clone();
        review["status"] = match self.lock().tokens.get(token) {
            Some((user, audiences)) => {
                let common: Vec<&String> =
                    audiences.iter().filter(|a| wanted.contains(a)).collect();
                if common.is_empty() {
                    json!({"authenticated": false, "error": "token audiences do not match"})
                } else {
                    json!({"authenticated": true, "user": {"username": user}, "audiences": common})
                }
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        (StatusCode::CREATED, axum::Json(review)).into_response()
    }

    fn leases(&self, method: &Method, name: Option<&str>, body: Value) -> Response {
        let mut state = self.lock();
        let current = state
            .lease
            .as_ref()
            .map(|l| l["metadata"]["resourceVersion"].clone());
        match (method.as_str(), name) {
            ("GET", Some(_)) => match &state.lease {
                Some(l) => ok(l.clone()),
                None => status(404, "NotFound"),
            },
            ("POST", None) if state.lease.is_none() => {
                state.version += 1;
                let mut lease = body;
                lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
                state.lease = Some(lease.clone());
                (StatusCode::CREATED, axum::Json(lease)).into_response()
            }
            ("PUT", Some(_)) if current == Some(body["metadata"]["resourceVersion"].clone()) => {
                state.version += 1;
                let mut lease = body;
                lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
                state.lease = Some(lease.clone());
                ok(lease)
            }
            ("POST" | "PUT", _) => status(409, "Conflict"),
            _ => status(405, "MethodNotAllowed"),
        }
    }

    fn webhook_configuration(&self, method: &Method, name: &str, body: Value) -> Response {
        let mut state = self.lock();
        let Some(config) = state
            .webhook
            .clone()
            .filter(|w| w["metadata"]["name"] == name)
        else {
            return status(404, "NotFound");
        };
        match method.as_str() {
            "GET" => ok(config),
            "PUT"
                if body["metadata"]["resourceVersion"] == config["metadata"]["resourceVersion"] =>
            {
                state.version += 1;
                let mut next = body;
                next["metadata"]["resourceVersion"] = json!(state.version.to_string());
                state.webhook = Some(next.clone());
                ok(next)
            }
            "PUT" => status(409, "Conflict"),
            _ => status(405, "MethodNotAllowed"),
        }
    }

    fn objects(
        &self,
        method: &Method,
        plural: &str,
        rest: &[&str],
        query: &str,
        body: Value,
    ) -> Response {
        match (method.as_str(), rest) {
            ("GET", []) if query.contains("watch=true") || query.contains("watch=1") => {
                let (tx, rx) = mpsc::unbounded_channel::<Value>();
                self.lock()
                    .watchers
                    .entry(plural.to_owned())
                    .or_default()
                    .push(tx);
                let lines = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
                let lines = futures::StreamExt::map(lines, |event: Value| {
                    let mut line = serde_json::to_vec(&event).unwrap_or_default();
                    line.push(b'\n');
                    Ok::<_, std::convert::Infallible>(Bytes::from(line))
                });
                Response::new(Body::from_stream(lines))
            }
            ("GET", []) => {
                let state = self.lock();
                let items = state.objects.get(plural).cloned().unwrap_or_default();
                ok(
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": state.version.to_string()}, "items": items}),
                )
            }
            ("GET", [name]) => match self.get(plural, name) {
                Some(o) => ok(o),
                None => status(404, "NotFound"),
            },
            ("POST", []) => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if self.get(plural, &name).is_some() {
                    return status(409, "AlreadyExists");
                }
                self.apply(plural, body);
                match self.get(plural, &name) {
                    Some(o) => (StatusCode::CREATED, axum::Json(o)).into_response(),
                    None => status(500, "InternalError"),
                }
            }
            ("PATCH", [name, "status"]) => {
                let mut state = self.lock();
                state.version += 1;
                let version = state.version.to_string();
                let Some(object) = state
                    .objects
                    .get_mut(plural)
                    .and_then(|l| l.iter_mut().find(|o| o["metadata"]["name"] == *name))
                else {
                    return status(404, "NotFound");
                };
                object["status"] = body["status"].clone();
                object["metadata"]["resourceVersion"] = json!(version);
                let object = object.clone();
                Self::notify(&mut state, plural, "MODIFIED", object.clone());
                ok(object)
            }
            _ => status(405, "MethodNotAllowed"),
        }
    }
}
