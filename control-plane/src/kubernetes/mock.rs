//! A scripted stand-in for the Kubernetes API server, for unit tests (there is no API
//! server on the machines that run them). It is a tower service handed to
//! `kube::Client::new`, so the real kube-rs client builds and sends every request; the
//! mock records each one (method, path and query, JSON body) for the test to assert on,
//! and answers with whatever the test's handler says: a JSON body, or for watches a
//! stream of events the test feeds while the request stays open.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::Value;
use tokio::sync::mpsc;

/// One request as the API server would have seen it.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// Path and query, e.g. `/api/v1/namespaces/x/secrets?watch=true&...`.
    pub path: String,
    /// The JSON body (`Value::Null` when there was none).
    pub body: Value,
    /// The `content-type` header (patches say which kind they are here).
    pub content_type: String,
}

/// What the handler answers.
#[derive(Debug)]
pub enum Reply {
    /// A status and a JSON body.
    Json(u16, Value),
    /// 200 and a watch stream: one JSON event per line, as the test sends them; the
    /// stream ends when the sender is dropped.
    Watch(mpsc::UnboundedReceiver<Value>),
}

impl From<(u16, Value)> for Reply {
    fn from((status, body): (u16, Value)) -> Reply {
        Reply::Json(status, body)
    }
}

type Handler = dyn Fn(&Call) -> Reply + Send + Sync;

/// The mock API server: clone it freely, every clone shares the record.
#[derive(Clone)]
pub struct ApiServer {
    calls: Arc<Mutex<Vec<Call>>>,
    handler: Arc<Handler>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").finish_non_exhaustive()
    }
}

impl ApiServer {
    pub fn new<R: Into<Reply>>(handler: impl Fn(&Call) -> R + Send + Sync + 'static) -> Self {
        ApiServer {
            calls: Arc::default(),
            handler: Arc::new(move |call: &Call| handler(call).into()),
        }
    }

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A kube client (default namespace `toolmesh-system`) whose requests come here.
    pub fn client(&self) -> kube::Client {
        let server = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.answer(req).await) }
        });
        kube::Client::new(service, "toolmesh-system")
    }

    async fn answer(
        &self,
        req: Request<kube::client::Body>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let call = Call {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        };
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call.clone());
        match (self.handler)(&call) {
            Reply::Json(status, body) => {
                let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
                let mut resp = Response::new(Full::new(bytes).boxed());
                *resp.status_mut() = http::StatusCode::from_u16(status)
                    .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                resp
            }
            Reply::Watch(rx) => {
                let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
                let frames = futures_util::StreamExt::map(events, |event: Value| {
                    let mut line = serde_json::to_vec(&event).unwrap_or_default();
                    line.push(b'\n');
                    Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
                });
                Response::new(StreamBody::new(frames).boxed())
            }
        }
    }
}

/// A namespace's worth of watched kinds behind the mock: lists answer from what the test
/// `put`, watches stay open and deliver what the test `send`s.
#[derive(Clone, Default)]
pub struct Cluster {
    objects: Arc<Mutex<std::collections::HashMap<&'static str, Vec<Value>>>>,
    watches: Arc<Mutex<std::collections::HashMap<&'static str, mpsc::UnboundedSender<Value>>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

/// The kinds the CRD store watches, by their URL plural.
pub const PLURALS: [&str; 3] = ["mcpservers", "accesspolicies", "secrets"];

impl Cluster {
    /// The watched kind a path is about (`"unknown"` for anything else).
    pub fn plural(path: &str) -> &'static str {
        let path = path.split('?').next().unwrap_or_default();
        PLURALS
            .into_iter()
            .find(|p| path.ends_with(p))
            .unwrap_or("unknown")
    }

    /// What a list of `plural` returns (resourceVersion 10).
    pub fn put(&self, plural: &'static str, items: Vec<Value>) {
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(plural, items);
    }

    pub fn answer(&self, call: &Call) -> Reply {
        if call.method == "PATCH" {
            // A status patch: answer with the object as patched (the watch cache is
            // updated only by what the test sends, as with a real API server's watch).
            let path = call.path.split('?').next().unwrap_or_default();
            let name = path
                .trim_end_matches("/status")
                .rsplit('/')
                .next()
                .unwrap_or_default();
            let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
            let found = objects
                .values()
                .flatten()
                .find(|o| o["metadata"]["name"] == name)
                .cloned();
            return match found {
                Some(mut object) => {
                    object["status"] = call.body["status"].clone();
                    Reply::Json(200, object)
                }
                None => Reply::Json(
                    404,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "code": 404, "reason": "NotFound"}),
                ),
            };
        }
        let plural = Cluster::plural(&call.path);
        if call.path.contains("watch=true") {
            let (tx, rx) = mpsc::unbounded_channel();
            self.watches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(plural, tx);
            return Reply::Watch(rx);
        }
        let items = self
            .objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(plural)
            .cloned();
        match items {
            Some(items) => Reply::Json(
                200,
                serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "10"}, "items": items}),
            ),
            None => Reply::Json(
                404,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
            ),
        }
    }

    /// Deliver a watch event for `plural`, once its watch is open (waits up to 5 s).
    pub async fn send(&self, plural: &str, event: Value) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let sent = self
                .watches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(plural)
                .is_some_and(|tx| tx.send(event.clone()).is_ok());
            if sent {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no open watch for {plural}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
