//! Notifications fanned in from every server to one stream of the aggregate.
//!
//! A 2025 agent's `GET /mcp` opens (or reuses) its upstream session with every
//! server and listens on each server's GET stream; a 2026-07-28 agent's
//! `subscriptions/listen` is acknowledged at once (list changes of the kinds it asked
//! for, and updates of the resources it subscribed to that servers read as sent and
//! policy shows; tasks are not honoured through the aggregate) and listens with
//! `subscriptions/listen` on 2026 servers (asking each for its resources), and on the
//! GET stream of the session the sidecar holds with 2025 ones (sending that session
//! `resources/subscribe`). Each server's stream is re-opened, with backoff from 250 ms
//! to 30 s, when it ends or fails (its session too, when the server lost it), until the
//! agent goes away; a server that offers no stream (405) is left out.
//!
//! What passes: to a 2025 agent every notification, and server requests with ids of
//! the aggregate (as on a call's stream); to a 2026 agent the list changes it asked
//! for and the updates of its resources, tagged with its subscription's id, while
//! server requests get an error answer at once. Nothing here is buffered beyond one
//! event per server and a bounded channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method as HttpMethod, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{Agent, LEGACY_VERSION, MAX_REPLY, Owned, Rewrite, Shape, modern_headers, modern_meta};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::filter;
use crate::mcp::{self, Method};
use crate::proxy::Proxy;
use crate::snapshot::Route;
use crate::stdio::{json_string, sse_event};

/// `_meta` key naming the subscription a 2026-07-28 notification belongs to.
const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// Which notifications a stream carries.
#[derive(Debug, Clone)]
pub(super) struct Wanted {
    tools: bool,
    prompts: bool,
    resources: bool,
    /// A 2025 agent's GET stream: every notification.
    all: bool,
    /// Resources whose `notifications/resources/updated` pass (one server's, on the
    /// way to it; every server's in the acknowledgement).
    uris: Option<Arc<[String]>>,
}

/// Resource subscriptions one `subscriptions/listen` may ask for.
pub(super) const MAX_SUBSCRIPTIONS: usize = 256;

impl Wanted {
    pub(super) const ALL: Wanted = Wanted {
        tools: true,
        prompts: true,
        resources: true,
        all: true,
        uris: None,
    };

    /// What a `subscriptions/listen` asks for: the list kinds, and the resource URIs
    /// to decide (at most [`MAX_SUBSCRIPTIONS`]; beyond, not honoured).
    pub(super) fn requested(params: Option<&RawValue>) -> (Wanted, Vec<String>) {
        #[derive(Deserialize, Default)]
        struct Params {
            #[serde(default)]
            notifications: Filter,
        }
        #[derive(Deserialize, Default)]
        struct Filter {
            #[serde(default, rename = "toolsListChanged")]
            tools: bool,
            #[serde(default, rename = "promptsListChanged")]
            prompts: bool,
            #[serde(default, rename = "resourcesListChanged")]
            resources: bool,
            #[serde(default, rename = "resourceSubscriptions")]
            uris: Vec<serde_json::Value>,
        }
        let filter = params
            .and_then(|p| serde_json::from_str::<Params>(p.get()).ok())
            .unwrap_or_default()
            .notifications;
        let wanted = Wanted {
            tools: filter.tools,
            prompts: filter.prompts,
            resources: filter.resources,
            all: false,
            uris: None,
        };
        let uris = filter
            .uris
            .into_iter()
            .filter_map(|u| match u {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .take(MAX_SUBSCRIPTIONS)
            .collect();
        (wanted, uris)
    }

    /// These kinds, with `uris` subscribed.
    pub(super) fn with_uris(&self, uris: Vec<String>) -> Wanted {
        Wanted {
            uris: (!uris.is_empty()).then(|| Arc::from(uris)),
            ..self.clone()
        }
    }

    fn uris(&self) -> &[String] {
        self.uris.as_deref().unwrap_or_default()
    }

    /// The filter as `subscriptions/listen` params (and its acknowledgement) carry it.
    pub(super) fn filter(&self) -> String {
        let mut members = Vec::new();
        for (on, key) in [
            (self.tools, "toolsListChanged"),
            (self.prompts, "promptsListChanged"),
            (self.resources, "resourcesListChanged"),
        ] {
            if on {
                members.push(format!("\"{key}\":true"));
            }
        }
        if !self.uris().is_empty() {
            members.push(format!(
                "\"resourceSubscriptions\":{}",
                serde_json::Value::from(self.uris())
            ));
        }
        format!("{{{}}}", members.join(","))
    }

    /// Does a notification named `method` (about resource `uri`) go to the agent?
    fn passes(&self, method: &str, uri: Option<&str>) -> bool {
        match method {
            "notifications/subscriptions/acknowledged" => false,
            "notifications/tools/list_changed" => self.tools,
            "notifications/prompts/list_changed" => self.prompts,
            "notifications/resources/list_changed" => self.resources,
            "notifications/resources/updated" if !self.all => {
                uri.is_some_and(|u| self.uris().iter().any(|s| s == u))
            }
            _ => self.all,
        }
    }
}

/// An SSE answer carrying `body`.
pub(super) fn stream(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

impl Proxy {
    /// Listen on every server for `agent`; `subscription` is a 2026 agent's request id
    /// and the acknowledgement's `notifications`, sent first; `subscribed` the resource
    /// URIs it subscribed to, by server.
    pub(super) fn listen(
        self: &Arc<Self>,
        agent: Owned,
        wanted: Wanted,
        subscription: Option<(Box<RawValue>, String)>,
        mut subscribed: HashMap<String, Vec<String>>,
    ) -> Body {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let tag: Option<Arc<RawValue>> = subscription.as_ref().map(|(id, _)| Arc::from(id.clone()));
        if let Some((id, honored)) = &subscription {
            let ack = format!(
                "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/subscriptions/acknowledged\",\"params\":{{\"_meta\":{{\"{SUBSCRIPTION_ID}\":{}}},\"notifications\":{honored}}}}}",
                id.get()
            );
            // The channel is empty: this cannot fail for want of room.
            let _ = tx.try_send(sse_event(&ack));
        }
        let routes: Vec<Arc<Route>> = agent.agent().routes().into_iter().cloned().collect();
        for route in routes {
            let wanted = wanted.with_uris(subscribed.remove(&route.name).unwrap_or_default());
            let (proxy, route, tx, agent, tag) = (
                self.clone(),
                route.clone(),
                tx.clone(),
                agent.clone(),
                tag.clone(),
            );
            tokio::spawn(async move { proxy.listen_to(agent, route, wanted, tag, tx).await });
        }
        body::Channel { rx }.boxed()
    }

    async fn listen_to(
        self: Arc<Self>,
        owned: Owned,
        route: Arc<Route>,
        wanted: Wanted,
        tag: Option<Arc<RawValue>>,
        tx: mpsc::Sender<Bytes>,
    ) {
        let agent = owned.agent();
        let mut retry = FIRST_RETRY;
        loop {
            let opened = tokio::select! {
                opened = self.open_stream(&agent, &route, &wanted) => opened,
                () = tx.closed() => return,
            };
            match opened {
                Ok(Some(resp)) => {
                    if self
                        .pump(&agent, &route, resp, &wanted, tag.as_deref(), &tx)
                        .await
                    {
                        retry = FIRST_RETRY;
                    }
                }
                Ok(None) => {
                    tracing::debug!(server = %route.name, "no notification stream offered");
                    return;
                }
                Err(e) => {
                    tracing::debug!(server = %route.name, error = %e, "notification stream failed");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                () = tx.closed() => return,
            }
            retry = (retry * 2).min(LAST_RETRY);
        }
    }

    /// Open `route`'s notification stream for `agent`: `None` when the server has none.
    async fn open_stream(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
        wanted: &Wanted,
    ) -> Result<Option<Response<Body>>, ProxyError> {
        let accept = HeaderValue::from_static("text/event-stream");
        if self.stateless(agent, route).await {
            let id = self
                .aggregate
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let text = format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"subscriptions/listen\",\"params\":{{\"notifications\":{},\"_meta\":{}}}}}",
                wanted.filter(),
                modern_meta()
            );
            let mut headers = modern_headers(Method::SubscriptionsListen, None);
            // A POST accepts both (Streamable HTTP): a server may refuse one that does not.
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static("application/json, text/event-stream"),
            );
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let uri = route.endpoints[route.pick()].uri.clone();
            let resp = self
                .upstream
                .send(route, uri, HttpMethod::POST, headers, Bytes::from(text))
                .await?;
            return Ok(resp.status().is_success().then(|| resp.map(body::incoming)));
        }
        let (upstreams, init) = self.upstreams_of(agent);
        let session = upstreams
            .cell(&route.name)
            .get_or_try_init(|| self.open_upstream(agent, route, init))
            .await?
            .clone();
        if let Some(channel) = &session.legacy {
            return match channel.listen() {
                Some(resp) => {
                    self.subscribe(agent, route, wanted).await;
                    Ok(Some(resp))
                }
                None => {
                    upstreams.forget(&route.name);
                    Err(ProxyError::UpstreamFailed {
                        server: route.name.clone(),
                        reason: "its SSE stream ended".to_owned(),
                    })
                }
            };
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, accept);
        headers.insert(
            mcp::HEADER_PROTOCOL_VERSION,
            HeaderValue::from_static(LEGACY_VERSION),
        );
        if let Some(id) = &session.id {
            headers.insert(mcp::HEADER_SESSION, id.clone());
        }
        let uri = route.endpoints[session.endpoint.min(route.endpoints.len() - 1)]
            .uri
            .clone();
        let resp = self
            .upstream
            .send(route, uri, HttpMethod::GET, headers, Bytes::new())
            .await?;
        match resp.status() {
            StatusCode::METHOD_NOT_ALLOWED => Ok(None),
            // The server lost the session: the next try opens another.
            StatusCode::NOT_FOUND => {
                upstreams.forget(&route.name);
                Err(ProxyError::UpstreamFailed {
                    server: route.name.clone(),
                    reason: "its session is gone".to_owned(),
                })
            }
            status if status.is_success() => {
                self.subscribe(agent, route, wanted).await;
                Ok(Some(resp.map(body::incoming)))
            }
            status => Err(ProxyError::UpstreamFailed {
                server: route.name.clone(),
                reason: format!("its stream answered HTTP {status}"),
            }),
        }
    }

    /// Subscribe the session the sidecar holds with a 2025 server to the resources a
    /// 2026 agent's `subscriptions/listen` asked for (its stream is open). Kept until
    /// that session ends: another listener may want the same resource.
    async fn subscribe(&self, agent: &Agent<'_>, route: &Arc<Route>, wanted: &Wanted) {
        for uri in wanted.uris() {
            let params = format!("{{\"uri\":{}}}", json_string(uri));
            match self
                .ask(agent, route, Method::ResourcesSubscribe, &params)
                .await
            {
                Ok(super::Reply::Result(_)) => {}
                Ok(super::Reply::Error(e)) => {
                    tracing::debug!(server = %route.name, %uri, error = %e.get(), "resources/subscribe refused");
                }
                Err(e) => {
                    tracing::debug!(server = %route.name, %uri, error = %e, "resources/subscribe failed");
                }
            }
        }
    }

    /// Relay one server's stream until it ends or the agent goes away; whether any
    /// event came through.
    async fn pump(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
        resp: Response<Body>,
        wanted: &Wanted,
        tag: Option<&RawValue>,
        tx: &mpsc::Sender<Bytes>,
    ) -> bool {
        let rewrite = Rewrite {
            server: route.name.clone(),
            agent_id: None,
            modern: None,
            prefix_requests: !agent.modern,
            refuse_server_requests: agent.modern.then(|| {
                (
                    self.upstream.clone(),
                    route.clone(),
                    self.shared_session(agent.subject, route),
                )
            }),
        };
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        let mut any = false;
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                () = tx.closed() => return any,
            };
            let Some(Ok(frame)) = frame else {
                return any;
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            any = true;
            buf.extend_from_slice(&data);
            if buf.len() > MAX_REPLY {
                tracing::warn!(server = %route.name, "a notification over the size limit; stream re-opened");
                return any;
            }
            while let Some(end) = filter::event_end(&buf) {
                let data = super::next_event(&mut buf, end);
                if data.contains("list_changed") {
                    self.aggregate.invalidate(&route.name);
                } else if data.contains("notifications/resources/updated") {
                    self.aggregate.reads.forget(&route.name);
                }
                let Some(out) = forwarded(&rewrite, &data, wanted, tag) else {
                    continue;
                };
                if tx.send(sse_event(&out)).await.is_err() {
                    return any;
                }
            }
        }
    }
}

/// What of one message from a server's stream reaches the agent.
fn forwarded(
    rewrite: &Rewrite,
    text: &str,
    wanted: &Wanted,
    tag: Option<&RawValue>,
) -> Option<String> {
    #[derive(Deserialize)]
    struct About<'a> {
        #[serde(borrow, default)]
        params: Option<Uri<'a>>,
    }
    #[derive(Deserialize)]
    struct Uri<'a> {
        #[serde(borrow, default)]
        uri: Option<std::borrow::Cow<'a, str>>,
    }
    let shape: Shape<'_> = serde_json::from_str(text).ok()?;
    let method = shape.method.as_deref()?;
    if shape.id.is_some() {
        // A server request.
        if rewrite.drops(text) {
            return None;
        }
        return Some(rewrite.message(text).unwrap_or_else(|| text.to_owned()));
    }
    let about = (method == "notifications/resources/updated")
        .then(|| serde_json::from_str::<About<'_>>(text).ok())
        .flatten()
        .and_then(|a| a.params?.uri);
    if !wanted.passes(method, about.as_deref()) {
        return None;
    }
    match tag {
        None => Some(text.to_owned()),
        Some(id) => Some(format!(
            "{{\"jsonrpc\":\"2.0\",\"method\":{},\"params\":{{{}\"_meta\":{{\"{SUBSCRIPTION_ID}\":{}}}}}}}",
            json_string(method),
            about.map_or_else(String::new, |u| format!("\"uri\":{},", json_string(&u))),
            id.get()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(prefix_requests: bool) -> Rewrite {
        Rewrite {
            server: "ts".into(),
            agent_id: None,
            modern: None,
            prefix_requests,
            refuse_server_requests: None,
        }
    }

    #[test]
    fn a_subscription_gets_the_list_changes_it_asked_for_tagged_with_its_id() {
        let params = RawValue::from_string(
            r#"{"notifications":{"toolsListChanged":true,"resourceSubscriptions":["x://y"]}}"#
                .to_owned(),
        )
        .expect("JSON");
        let (wanted, asked) = Wanted::requested(Some(&params));
        assert_eq!(wanted.filter(), r#"{"toolsListChanged":true}"#);
        assert_eq!(asked, ["x://y"]);
        let id = RawValue::from_string("\"sub-1\"".to_owned()).expect("JSON");
        let tools = r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed","params":{"_meta":{"io.modelcontextprotocol/subscriptionId":99}}}"#;
        assert_eq!(
            forwarded(&rewrite(false), tools, &wanted, Some(&id)).as_deref(),
            Some(
                r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed","params":{"_meta":{"io.modelcontextprotocol/subscriptionId":"sub-1"}}}"#
            )
        );
        for other in [
            r#"{"jsonrpc":"2.0","method":"notifications/prompts/list_changed"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/subscriptions/acknowledged","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":5,"result":{}}"#,
        ] {
            assert_eq!(
                forwarded(&rewrite(false), other, &wanted, Some(&id)),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn a_subscription_gets_updates_of_the_resources_it_subscribed_to_only() {
        let (wanted, _) = Wanted::requested(None);
        let wanted = wanted.with_uris(vec!["docs://a".to_owned()]);
        assert_eq!(wanted.filter(), r#"{"resourceSubscriptions":["docs://a"]}"#);
        let id = RawValue::from_string("7".to_owned()).expect("JSON");
        let update = |uri: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{{"uri":"{uri}","_meta":{{"io.modelcontextprotocol/subscriptionId":1}}}}}}"#
            )
        };
        assert_eq!(
            forwarded(&rewrite(false), &update("docs://a"), &wanted, Some(&id)).as_deref(),
            Some(
                r#"{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"docs://a","_meta":{"io.modelcontextprotocol/subscriptionId":7}}}"#
            )
        );
        for other in ["docs://b", "docs://a/", "DOCS://a"] {
            assert_eq!(
                forwarded(&rewrite(false), &update(other), &wanted, Some(&id)),
                None,
                "{other}"
            );
        }
        // A 2025 agent's GET stream carries every update its own subscriptions cause.
        assert!(forwarded(&rewrite(true), &update("docs://b"), &Wanted::ALL, None).is_some());
    }

    #[test]
    fn a_2025_stream_gets_every_notification_and_server_requests_with_our_ids() {
        let log = r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}}"#;
        assert_eq!(
            forwarded(&rewrite(true), log, &Wanted::ALL, None).as_deref(),
            Some(log)
        );
        let ask = r#"{"jsonrpc":"2.0","id":0,"method":"roots/list"}"#;
        assert_eq!(
            forwarded(&rewrite(true), ask, &Wanted::ALL, None).as_deref(),
            Some(r#"{"jsonrpc":"2.0","id":"toolmesh:ts:0","method":"roots/list"}"#)
        );
    }
}
