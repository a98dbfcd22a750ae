//! The sidecar's spans, when tracing is on (`--otlp-endpoint`; set up by
//! [`toolmesh_proto::otel`]): one SERVER span per MCP request, named and attributed
//! per the OpenTelemetry MCP semantic conventions, and one CLIENT span per request to
//! an upstream, whose context the upstream receives in `traceparent`/`tracestate`
//! and in `params._meta` (SEP-414).
//!
//! The SERVER span's parent is the agent's: `params._meta.traceparent` when the body
//! carries a valid one (the MCP-level context), else the `traceparent` header. It
//! starts once the body is read (its start time is the request's arrival) and ends
//! when the response has been relayed to its end, an SSE stream's included.
//!
//! While a request is served, its task knows the SERVER span ([`scope`]), so every
//! upstream request it makes, on `/mcp/<server>` or the aggregate alike, is a child of
//! it without the request path passing it around; work it hands to another task (a
//! bridged call's rounds, a parked call's stream) takes it along ([`carry`]).
//! Notification streams, which outlive the request that opened them, are not traced.
//!
//! A request that is not sampled costs as little as it can: its SERVER span is the
//! SDK's non-recording one (no attributes are built), it gets no CLIENT span, and its
//! body is not rewritten; the upstream gets the agent's context as sent, or, when the
//! agent sent none, a `traceparent` header saying "not sampled".
//!
//! When tracing is off none of this runs: the request path holds `None` and relays
//! the agent's trace context untouched, body bytes included.
//!
//! Not here: the exporter and sampling ([`toolmesh_proto::otel`]), audit lines
//! ([`crate::audit`], which carry the ids this module gives them).

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderMap;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::mcp::RawMessage;

tokio::task_local! {
    /// The SERVER span of the request this task serves, once it has started.
    static CURRENT: RefCell<Option<SpanContext>>;
}

/// Run `fut` (one request) with room for its SERVER span's context.
pub async fn scope<F: std::future::Future>(fut: F) -> F::Output {
    CURRENT.scope(RefCell::new(None), fut).await
}

/// `fut`, for work a request hands to another task (a bridged call's rounds): its
/// upstream requests are children of the request's SERVER span too.
pub fn carry<F: std::future::Future>(fut: F) -> impl std::future::Future<Output = F::Output> {
    CURRENT.scope(RefCell::new(current()), fut)
}

fn current() -> Option<SpanContext> {
    CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
}

/// A span shared by whoever may end it last (the request path and the relayed body):
/// it ends when the last holder drops it.
#[derive(Debug, Clone)]
pub struct Held(Arc<Mutex<Span>>);

impl Held {
    fn new(span: Span) -> Held {
        Held(Arc::new(Mutex::new(span)))
    }

    fn with(&self, f: impl FnOnce(&mut Span)) {
        if let Ok(mut span) = self.0.lock() {
            f(&mut span);
        }
    }
}

/// What a finished request says about itself, for its SERVER span.
#[derive(Debug)]
pub struct Finish<'a> {
    pub method: &'a str,
    pub kind: Option<&'static str>,
    pub name: Option<&'a str>,
    pub request_id: Option<&'a RawValue>,
    pub session: Option<&'a str>,
    pub server: &'a str,
    pub subject: &'a str,
    pub decision: &'static str,
    pub rule: Option<&'a str>,
    pub outcome: &'static str,
    pub status: u16,
    pub error_code: Option<i64>,
}

/// One request's SERVER span: its parent as learnt, then the span.
#[derive(Debug)]
pub struct Server {
    tracer: SdkTracer,
    start: SystemTime,
    parent: Option<SpanContext>,
    /// `MCP-Protocol-Version`, and the listener's host and port (the `Host` header):
    /// copied only when a recorded span starts (an unsampled request copies nothing).
    version: Option<String>,
    host: Option<String>,
    /// Why the sidecar refused the request or could not serve it, if it did.
    reason: Option<String>,
    /// Once started: the span's context, and the span itself if it is recorded (an
    /// unsampled span is dropped at once: there is nothing to end).
    started: Option<SpanContext>,
    span: Option<Held>,
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Server {
    pub fn new(tracer: &SdkTracer, headers: &HeaderMap, start: SystemTime) -> Server {
        // (`headers` are read here for the parent only.)
        let parent = header(headers, "traceparent").and_then(|traceparent| {
            toolmesh_proto::otel::parent(traceparent, header(headers, "tracestate"))
        });
        Server {
            tracer: tracer.clone(),
            start,
            parent,
            version: None,
            host: None,
            reason: None,
            started: None,
            span: None,
        }
    }

    /// The sidecar answered the request itself, with this error.
    pub fn refused(&mut self, reason: String) {
        self.reason = Some(reason);
    }

    /// The body's `params._meta` trace context, which takes precedence over the
    /// header's (before the span starts; ignored when not valid).
    pub fn meta(&mut self, traceparent: &str, tracestate: Option<&str>) {
        if self.started.is_none()
            && let Some(parent) = toolmesh_proto::otel::parent(traceparent, tracestate)
        {
            self.parent = Some(parent);
        }
    }

    /// Start the span (once), reading what it says of the request from `headers`:
    /// upstream requests made from now on are its children. (A request refused before
    /// its body is read starts its span when it finishes, without these.)
    pub fn start(&mut self, headers: &HeaderMap) {
        if self.started.is_some() {
            return;
        }
        self.begin();
        if self.span.is_some() {
            self.version = header(headers, crate::mcp::HEADER_PROTOCOL_VERSION).map(str::to_owned);
            self.host = header(headers, "host").map(str::to_owned);
        }
    }

    fn begin(&mut self) -> &SpanContext {
        self.started.get_or_insert_with(|| {
            let parent = match &self.parent {
                Some(p) => Context::new().with_remote_span_context(p.clone()),
                None => Context::new(),
            };
            let span = self
                .tracer
                .span_builder("mcp")
                .with_kind(SpanKind::Server)
                .with_start_time(self.start)
                .start_with_context(&self.tracer, &parent);
            let cx = span.span_context().clone();
            let _ = CURRENT.try_with(|c| *c.borrow_mut() = Some(cx.clone()));
            if span.is_recording() {
                self.span = Some(Held::new(span));
            }
            cx
        })
    }

    /// The span if it is recorded, for a relayed body to hold until it ends.
    pub fn hold(&mut self) -> Option<Held> {
        self.begin();
        self.span.clone()
    }

    /// The trace and span ids, as audit lines write them (sampled or not).
    pub fn ids(&mut self) -> Ids {
        let cx = self.begin();
        let mut ids = Ids::default();
        hex(&cx.trace_id().to_bytes(), &mut ids.trace);
        hex(&cx.span_id().to_bytes(), &mut ids.span);
        ids
    }

    /// Name and attribute the span for how the request ended (only if it is recorded:
    /// an unsampled request costs no attributes).
    pub fn finish(&mut self, f: Finish<'_>) {
        let (version, host, reason) = (self.version.take(), self.host.take(), self.reason.take());
        self.begin();
        let Some(span) = &self.span else {
            return;
        };
        span.with(|span| {
            let host = host
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .map(|a| (a.host().to_owned(), a.port_u16()));
            let target = match f.kind {
                Some("tool" | "prompt") => f.name,
                _ => None,
            };
            span.update_name(match target {
                Some(t) => format!("{} {t}", f.method),
                None => f.method.to_owned(),
            });
            let mut attributes = vec![
                KeyValue::new("mcp.method.name", f.method.to_owned()),
                KeyValue::new("network.transport", "tcp"),
                KeyValue::new("network.protocol.name", "http"),
                KeyValue::new("http.response.status_code", i64::from(f.status)),
                KeyValue::new("toolmesh.server", f.server.to_owned()),
                KeyValue::new("toolmesh.subject", f.subject.to_owned()),
                KeyValue::new("toolmesh.decision", f.decision),
                KeyValue::new("toolmesh.outcome", f.outcome),
            ];
            match (f.kind, f.name) {
                (Some("tool"), Some(n)) => {
                    attributes.push(KeyValue::new("gen_ai.tool.name", n.to_owned()));
                    attributes.push(KeyValue::new("gen_ai.operation.name", "execute_tool"));
                }
                (Some("prompt"), Some(n)) => {
                    attributes.push(KeyValue::new("gen_ai.prompt.name", n.to_owned()));
                }
                (Some("resource"), Some(n)) => {
                    attributes.push(KeyValue::new("mcp.resource.uri", n.to_owned()));
                }
                _ => {}
            }
            if let Some(id) = f.request_id {
                attributes.push(KeyValue::new("jsonrpc.request.id", request_id(id)));
            }
            if let Some(session) = f.session {
                attributes.push(KeyValue::new("mcp.session.id", session.to_owned()));
            }
            if let Some(version) = version {
                attributes.push(KeyValue::new("mcp.protocol.version", version));
            }
            if let Some((host, port)) = host {
                attributes.push(KeyValue::new("server.address", host));
                if let Some(port) = port {
                    attributes.push(KeyValue::new("server.port", i64::from(port)));
                }
            }
            if let Some(rule) = f.rule {
                attributes.push(KeyValue::new("toolmesh.rule", rule.to_owned()));
            }
            if let Some(code) = f.error_code {
                attributes.push(KeyValue::new("rpc.response.status_code", code.to_string()));
                attributes.push(KeyValue::new("error.type", code.to_string()));
            } else if f.status >= 500 {
                attributes.push(KeyValue::new("error.type", f.status.to_string()));
            }
            span.set_attributes(attributes);
            if f.outcome != "ok" {
                span.set_status(Status::error(
                    reason.unwrap_or_else(|| f.outcome.to_owned()),
                ));
            }
        });
    }
}

/// Hex trace and span ids for an audit line, without allocating.
#[derive(Debug, Default)]
pub struct Ids {
    trace: [u8; 32],
    span: [u8; 16],
}

impl Ids {
    pub fn trace(&self) -> &str {
        std::str::from_utf8(&self.trace).unwrap_or_default()
    }

    pub fn span(&self) -> &str {
        std::str::from_utf8(&self.span).unwrap_or_default()
    }
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// A JSON-RPC id as the attribute holds it: a string's value, a number's text.
fn request_id(id: &RawValue) -> String {
    serde_json::from_str::<String>(id.get()).unwrap_or_else(|_| id.get().to_owned())
}

/// Start the CLIENT span of a request to `server` at `uri`, when tracing is on and
/// this task serves a traced request: its context replaces the agent's in the
/// headers and in the body's `params._meta` (the body is rewritten only then).
pub fn client(
    tracer: Option<&SdkTracer>,
    server: &str,
    uri: &http::Uri,
    headers: &mut HeaderMap,
    body: &mut Bytes,
) -> Option<Held> {
    let tracer = tracer?;
    let parent = current()?;
    if !parent.is_sampled() {
        // Nobody records this trace: no span, the body untouched. An agent's context
        // goes on as it was sent; without one, the header says "not sampled" so the
        // upstream follows the decision.
        if !headers.contains_key("traceparent")
            && let Some((traceparent, _)) = toolmesh_proto::otel::header(&parent)
            && let Ok(v) = http::HeaderValue::from_str(&traceparent)
        {
            headers.insert("traceparent", v);
        }
        return None;
    }
    // One reading of the body for the span's name and attributes and the rewrite.
    let text = std::str::from_utf8(body)
        .ok()
        .filter(|t| t.trim_start().starts_with('{'));
    let message = text.and_then(|t| serde_json::from_str::<RawMessage<'_>>(t).ok());
    let (name, attributes) = describe(server, uri, message.as_ref());
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Client)
        .with_attributes(attributes)
        .start_with_context(tracer, &Context::new().with_remote_span_context(parent));
    let written = toolmesh_proto::otel::header(span.span_context());
    if let Some((traceparent, tracestate)) = written {
        headers.remove("tracestate");
        if let Ok(v) = http::HeaderValue::from_str(&traceparent) {
            headers.insert("traceparent", v);
        }
        if let Some(v) = tracestate
            .as_deref()
            .and_then(|t| http::HeaderValue::from_str(t).ok())
        {
            headers.insert("tracestate", v);
        }
        let rewritten = match (text, &message) {
            (Some(text), Some(message)) => {
                rewrite(text, message, &traceparent, tracestate.as_deref())
            }
            _ => None,
        };
        drop(message);
        if let Some(rewritten) = rewritten {
            *body = rewritten;
        }
    }
    Some(Held::new(span))
}

/// A CLIENT span's name and attributes, from the request it stands for.
fn describe(
    server: &str,
    uri: &http::Uri,
    message: Option<&RawMessage<'_>>,
) -> (String, Vec<KeyValue>) {
    let method = message.and_then(|m| m.method.as_deref());
    let target = message
        .and_then(|m| m.params)
        .and_then(|p| serde_json::from_str::<Target<'_>>(p.get()).ok())
        .and_then(|t| t.name);
    let name = match (method, &target) {
        (Some(m), Some(t)) if matches!(m, "tools/call" | "prompts/get") => format!("{m} {t}"),
        (Some(m), _) => m.to_owned(),
        (None, _) => "http".to_owned(),
    };
    let mut attributes = vec![
        KeyValue::new("network.protocol.name", "http"),
        KeyValue::new("toolmesh.server", server.to_owned()),
    ];
    if let Some(m) = method {
        attributes.push(KeyValue::new("mcp.method.name", m.to_owned()));
    }
    if let (Some("tools/call"), Some(t)) = (method, &target) {
        attributes.push(KeyValue::new("gen_ai.tool.name", t.to_string()));
        attributes.push(KeyValue::new("gen_ai.operation.name", "execute_tool"));
    }
    if let Some(id) = message.and_then(|m| m.id) {
        attributes.push(KeyValue::new("jsonrpc.request.id", request_id(id)));
    }
    if let Some(host) = uri.host() {
        attributes.push(KeyValue::new("server.address", host.to_owned()));
    }
    if let Some(port) = uri.port_u16() {
        attributes.push(KeyValue::new("server.port", i64::from(port)));
    }
    (name, attributes)
}

/// The upstream answered with `status` (its span ends when its body does).
pub fn answered(span: &Held, status: u16) {
    span.with(|s| {
        s.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            s.set_attribute(KeyValue::new("error.type", status.to_string()));
            s.set_status(Status::error(format!("upstream answered {status}")));
        }
    });
}

/// The upstream request failed (`kind`: connect, failed, timeout).
pub fn failed(span: Held, kind: &'static str, reason: String) {
    span.with(|s| {
        s.set_attribute(KeyValue::new("error.type", kind));
        s.set_status(Status::error(reason));
    });
}

#[derive(serde::Deserialize)]
struct Target<'a> {
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Params<'a> {
    #[serde(borrow, default, rename = "_meta")]
    meta: Option<&'a RawValue>,
}

/// An object's members in order, duplicates kept, values unparsed.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'a>, A::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Where `inner` (a slice of `outer`) starts in it.
fn offset(outer: &str, inner: &str) -> Option<usize> {
    let at = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    (at + inner.len() <= outer.len()).then_some(at)
}

/// Whether `key` is one a server may read as `traceparent` or `tracestate`: servers
/// that match keys case-insensitively (Go's `encoding/json`, .NET) would take an
/// agent's `TraceParent`, or `traceſtate`, sent after ours, in place of ours.
fn is_trace_key(key: &str) -> bool {
    crate::mcp::keys_fold_equal(key, "traceparent")
        || crate::mcp::keys_fold_equal(key, "tracestate")
}

/// Whether a `_meta` object's text may hold a key [`is_trace_key`] matches: any escape,
/// any non-ASCII text, or `trace` in any case.
fn may_hold_trace_key(meta: &str) -> bool {
    !meta.is_ascii()
        || meta.contains('\\')
        || meta
            .as_bytes()
            .windows(5)
            .any(|w| w.eq_ignore_ascii_case(b"trace"))
}

/// `body` (one request or notification) with `params._meta` carrying this trace
/// context in place of any it carried (under any spelling a server may read as one):
/// only the `_meta` object is rewritten (its other
/// members' values copied as sent, in order), or one is added; every other byte stays.
/// `None` when the body is not one message with a `method` and object `params`.
pub fn with_meta(body: &[u8], traceparent: &str, tracestate: Option<&str>) -> Option<Bytes> {
    let text = std::str::from_utf8(body).ok()?;
    // An object (serde would also read a struct from an array).
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let message: RawMessage<'_> = serde_json::from_str(text).ok()?;
    rewrite(text, &message, traceparent, tracestate)
}

/// [`with_meta`] for a body already read as `message`.
fn rewrite(
    text: &str,
    message: &RawMessage<'_>,
    traceparent: &str,
    tracestate: Option<&str>,
) -> Option<Bytes> {
    message.method.as_ref()?;
    let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut ours = String::with_capacity(96 + tracestate.map_or(0, str::len));
    ours.push_str("\"traceparent\":");
    ours.push_str(&json(traceparent));
    if let Some(state) = tracestate {
        ours.push_str(",\"tracestate\":");
        ours.push_str(&json(state));
    }
    let mut out = String::with_capacity(text.len() + ours.len() + 32);
    match message.params {
        Some(params) => {
            let ptext = params.get();
            let pat = offset(text, ptext)?;
            let inner = ptext.strip_prefix('{')?;
            let parsed: Params<'_> = serde_json::from_str(ptext).ok()?;
            match parsed.meta {
                // No key that could be a trace key, however spelled or cased: ours go
                // first, the members stay as they are.
                Some(meta) if !may_hold_trace_key(meta.get()) => {
                    let at = offset(text, meta.get())?;
                    let members = meta.get().strip_prefix('{')?;
                    out.push_str(&text[..=at]);
                    out.push_str(&ours);
                    if !members.trim_start().starts_with('}') {
                        out.push(',');
                    }
                    out.push_str(members);
                    out.push_str(&text[at + meta.get().len()..]);
                }
                Some(meta) => {
                    let members: Members<'_> = serde_json::from_str(meta.get()).ok()?;
                    let at = offset(text, meta.get())?;
                    out.push_str(&text[..at]);
                    out.push('{');
                    out.push_str(&ours);
                    for (key, value) in &members.0 {
                        if !is_trace_key(key) {
                            out.push(',');
                            out.push_str(&json(key));
                            out.push(':');
                            out.push_str(value.get());
                        }
                    }
                    out.push('}');
                    out.push_str(&text[at + meta.get().len()..]);
                }
                None => {
                    let empty = inner.trim_start().starts_with('}');
                    out.push_str(&text[..=pat]);
                    out.push_str("\"_meta\":{");
                    out.push_str(&ours);
                    out.push('}');
                    if !empty {
                        out.push(',');
                    }
                    out.push_str(inner);
                    out.push_str(&text[pat + ptext.len()..]);
                }
            }
        }
        None => {
            let open = text.find('{')?;
            out.push_str(&text[..=open]);
            out.push_str("\"params\":{\"_meta\":{");
            out.push_str(&ours);
            out.push_str("}},");
            out.push_str(&text[open + 1..]);
        }
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn meta(body: &str) -> serde_json::Value {
        let out = with_meta(body.as_bytes(), TP, Some("k=v")).expect("rewritten");
        let value: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        value["params"]["_meta"].clone()
    }

    #[test]
    fn meta_is_added_replaced_or_created_and_the_rest_kept_as_sent() {
        let added = meta(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}}"#);
        assert_eq!(added["traceparent"], TP);
        assert_eq!(added["tracestate"], "k=v");
        let created = meta(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
        assert_eq!(created["traceparent"], TP);
        let empty = meta(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{}}"#);
        assert_eq!(empty["traceparent"], TP);

        // The agent's context is replaced; other members keep their bytes and order.
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","_meta":{"traceparent":"00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01","big":123456789012345678901234567890,"tracestate":"x=y","progressToken":7}}}"#;
        let out = with_meta(body.as_bytes(), TP, None).expect("rewritten");
        let text = std::str::from_utf8(&out).expect("utf-8");
        assert_eq!(
            text,
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","_meta":{{"traceparent":"{TP}","big":123456789012345678901234567890,"progressToken":7}}}}}}"#
            )
        );
    }

    #[test]
    fn trace_keys_a_case_insensitive_server_would_read_are_replaced_too() {
        for key in [
            "TraceParent",
            "TRACESTATE",
            "trace\\u017Ftate",
            "traceſtate",
        ] {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"_meta":{{"{key}":"00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01","k":1}}}}}}"#
            );
            let out = with_meta(body.as_bytes(), TP, None).expect("rewritten");
            let text = std::str::from_utf8(&out).expect("utf-8");
            assert_eq!(
                text,
                format!(
                    r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"_meta":{{"traceparent":"{TP}","k":1}}}}}}"#
                ),
                "{key}"
            );
        }
        // Keys that only look alike stay.
        let kept = meta(
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"_meta":{"traceparents":1,"x-trace":2}}}"#,
        );
        assert_eq!(
            (kept["traceparents"].clone(), kept["x-trace"].clone()),
            (1.into(), 2.into())
        );
    }

    #[test]
    fn what_is_not_one_request_with_object_params_is_left_alone() {
        for body in [
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":[]}}"#,
            r#"["2.0",1,"tools/call",{"name":"t"}]"#,
            "not json",
        ] {
            assert!(with_meta(body.as_bytes(), TP, None).is_none(), "{body}");
        }
    }
}
