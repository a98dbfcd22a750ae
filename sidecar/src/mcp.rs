//! The MCP envelope: just enough of a POST body to route, check and (later) decide
//! policy on it, read without copying, and the per-generation rules on headers.
//!
//! Parsing borrows from the request bytes: the `id` stays a [`RawValue`] slice, names
//! are borrowed unless they contain escapes, and `params.arguments` and everything
//! else are skipped. The original bytes are what is forwarded; nothing here
//! re-serializes a message.
//!
//! Generations (see DESIGN.md): a request is *modern* (2026-07-28 or later, stateless)
//! when its `MCP-Protocol-Version` header or its `_meta` protocol version says so.
//! Modern requests must carry `Mcp-Method`, and `Mcp-Name` where the method names a
//! target; in every generation a header that is present must agree with the body,
//! because the upstream executes the body while an intermediary may trust the header.
//!
//! What policy is decided on must be what the upstream reads: a key of the message,
//! of `params` or of `params.ref` that differs from a protocol key only by case or
//! look-alike letters is refused (case-insensitive servers might read it instead),
//! and resource URIs are judged in the form servers resolve them to ([`crate::uri`]).
//!
//! This module does not know servers, sessions or policy.

use std::borrow::Cow;

pub mod method;

pub use method::Method;

use base64::Engine as _;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The first protocol revision without sessions, with `Mcp-Method`/`Mcp-Name` headers.
pub const MODERN_VERSION: &str = "2026-07-28";
/// The only revision that allowed JSON-RPC batches.
pub const BATCH_VERSION: &str = "2025-03-26";
/// `_meta` key carrying the protocol version of a modern request.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

pub const HEADER_PROTOCOL_VERSION: &str = "mcp-protocol-version";
pub const HEADER_METHOD: &str = "mcp-method";
pub const HEADER_NAME: &str = "mcp-name";
pub const HEADER_SESSION: &str = "mcp-session-id";

/// Header values that are not plain ASCII travel as `=?base64?…?=`.
const B64_PREFIX: &str = "=?base64?";
const B64_SUFFIX: &str = "?=";

/// Is `version` a stateless (2026-07-28 or later) revision? Revisions are dates, so
/// they order as strings.
pub fn is_modern(version: &str) -> bool {
    version >= MODERN_VERSION
}

/// Which JSON-RPC message a body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    /// A response the client sends back (to sampling, elicitation, roots, ping).
    Response,
}

/// What a gated call acts on, as policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Tool,
    Resource,
    Prompt,
}

/// The tool, resource or prompt a gated request acts on: the name the upstream will
/// execute, read from the body (a resource URI in the form servers resolve it to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: TargetKind,
    pub name: Cow<'a, str>,
}

/// One JSON-RPC message as far as the sidecar reads it.
#[derive(Debug)]
pub struct Message<'a> {
    pub kind: Kind,
    pub id: Option<&'a RawValue>,
    /// The method as sent (for the audit line).
    pub method: Option<Cow<'a, str>>,
    /// The method as the sidecar treats it ([`Method::Other`] when unknown); `None`
    /// for a response.
    pub rpc: Option<Method>,
    /// What `Mcp-Name` must equal: `params.name`, `params.uri` or `params.taskId`,
    /// depending on the method. `None` when the method names no target.
    pub target: Option<Cow<'a, str>>,
    /// The `_meta` protocol version, if the message carries one.
    pub meta_version: Option<Cow<'a, str>>,
    /// `_meta.traceparent` and `_meta.tracestate` (SEP-414), unparsed.
    pub trace: Option<(&'a RawValue, Option<&'a RawValue>)>,
    /// For gated methods: what the call acts on (`None` if the body does not say,
    /// which policy treats as a denial).
    pub acts_on: Option<Target<'a>>,
    /// `params.arguments`, unparsed (for argument conditions and audit).
    pub arguments: Option<&'a RawValue>,
    /// `params`, unparsed (what else a response filter needs to know of the request).
    pub params: Option<&'a RawValue>,
}

/// A POST body: one message, or a batch (2025-03-26 only).
#[derive(Debug)]
pub enum Envelope<'a> {
    Single(Message<'a>),
    Batch(Vec<Message<'a>>),
}

impl Message<'_> {
    /// The W3C trace context in `params._meta`, when `traceparent` is a string (whether
    /// it is a valid one is for the tracer to say).
    pub fn trace_context(&self) -> Option<(Cow<'_, str>, Option<Cow<'_, str>>)> {
        let (parent, state) = self.trace?;
        Some((json_str(parent)?, state.and_then(json_str)))
    }
}

impl<'a> Envelope<'a> {
    /// The id to answer an error with: the single request's id.
    pub fn id(&self) -> Option<&'a RawValue> {
        match self {
            Envelope::Single(m) => m.id,
            Envelope::Batch(_) => None,
        }
    }
}

/// Why a body or its headers were refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Not JSON at all (JSON-RPC parse error).
    Parse(String),
    /// JSON, but not an acceptable JSON-RPC message.
    Invalid(String),
    /// A header disagrees with the body, or a required header is missing.
    Header(String),
}

/// One JSON-RPC message's members, borrowed from its text; what is inside them is
/// left raw. (The stdio bridge reads its child's lines with it too.)
#[derive(Deserialize)]
pub(crate) struct RawMessage<'a> {
    #[serde(borrow, default)]
    pub(crate) jsonrpc: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawParams<'a> {
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    uri: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "taskId")]
    task_id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "_meta")]
    meta: Option<RawMeta<'a>>,
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "ref")]
    reference: Option<&'a RawValue>,
}

/// `completion/complete`'s `params.ref`: a prompt or a resource (template).
#[derive(Deserialize)]
struct RawRef<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    uri: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawMeta<'a> {
    #[serde(borrow, default, rename = "io.modelcontextprotocol/protocolVersion")]
    protocol_version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    traceparent: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tracestate: Option<&'a RawValue>,
}

/// Deepest nesting of arrays and objects accepted in a body. serde_json (and so rmcp)
/// refuses deeper input; other upstreams may overflow their stack on it.
pub const MAX_DEPTH: usize = 128;

/// Whether `body` nests arrays/objects deeper than [`MAX_DEPTH`]. One pass over the
/// bytes, outside strings; the envelope parse below skips over values without
/// counting depth, so without this an agent could hand any depth to the upstream.
fn too_deep(body: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parse a POST body into its envelope.
pub fn parse(body: &[u8]) -> Result<Envelope<'_>, Rejection> {
    if too_deep(body) {
        return Err(Rejection::Parse(format!(
            "JSON nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => Err(Rejection::Parse("empty body".to_owned())),
        Some(b'[') => {
            let raw: Vec<&RawValue> =
                serde_json::from_slice(body).map_err(|e| Rejection::Parse(e.to_string()))?;
            if raw.is_empty() {
                return Err(Rejection::Invalid("empty batch".to_owned()));
            }
            raw.into_iter()
                .map(|m| message(m.get()))
                .collect::<Result<Vec<_>, _>>()
                .map(Envelope::Batch)
        }
        Some(_) => {
            let text = std::str::from_utf8(body)
                .map_err(|_| Rejection::Parse("body is not UTF-8".to_owned()))?;
            message(text).map(Envelope::Single)
        }
    }
}

/// The members of a message that decide what runs, as spelled in the protocol.
const MESSAGE_KEYS: &[&str] = &["jsonrpc", "id", "method", "params", "result", "error"];
/// The members of `params` that policy reads, or that name what runs.
const PARAMS_KEYS: &[&str] = &["name", "uri", "arguments", "_meta", "ref", "taskId"];
/// The members of `completion/complete`'s `params.ref`.
const REF_KEYS: &[&str] = &["type", "name", "uri"];

/// Do two keys differ only by case, as servers that match keys case-insensitively
/// fold them (Go's `encoding/json` and .NET fold `ſ` to `s` and the Kelvin sign to
/// `k`)? Upper-casing then lower-casing each character folds those look-alikes too.
pub fn keys_fold_equal(a: &str, b: &str) -> bool {
    let fold = |s: &str| {
        s.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .collect::<Vec<char>>()
    };
    // Cheap first: different ASCII lengths with ASCII text cannot fold together.
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    fold(a) == fold(b)
}

/// Refuse an object (`text`) with a key that is not one of `known` but folds to one:
/// the sidecar reads the exact key, a case-insensitive server may read the other.
fn check_keys(text: &str, known: &[&str], what: &str) -> Result<(), Rejection> {
    struct Keys<'k>(&'k [&'k str]);
    impl<'de> serde::de::Visitor<'de> for Keys<'_> {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if found.is_none()
                    && !self.0.contains(&key.as_ref())
                    && self.0.iter().any(|k| keys_fold_equal(&key, k))
                {
                    found = Some(key.into_owned());
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let clash = serde::Deserializer::deserialize_map(&mut de, Keys(known))
        .ok()
        .flatten();
    match clash {
        None => Ok(()),
        Some(key) => {
            let like = known
                .iter()
                .find(|k| keys_fold_equal(&key, k))
                .copied()
                .unwrap_or_default();
            Err(Rejection::Invalid(format!(
                "{what} key {:?} differs from {like:?} only by case or look-alike letters; servers may read either",
                truncate_key(&key)
            )))
        }
    }
}

fn truncate_key(key: &str) -> &str {
    match key.char_indices().nth(64) {
        Some((cut, _)) => &key[..cut],
        None => key,
    }
}

fn message<'a>(text: &'a str) -> Result<Message<'a>, Rejection> {
    // Distinguish "not JSON" from "JSON but not a message object".
    let raw: RawMessage<'a> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            Rejection::Invalid(format!("not a JSON-RPC message object: {e}"))
        } else {
            Rejection::Parse(e.to_string())
        }
    })?;
    check_keys(text, MESSAGE_KEYS, "message")?;
    if raw.jsonrpc.as_deref() != Some("2.0") {
        return Err(Rejection::Invalid("\"jsonrpc\" must be \"2.0\"".to_owned()));
    }
    let kind = match (
        &raw.method,
        raw.id,
        raw.result.is_some() || raw.error.is_some(),
    ) {
        (Some(_), Some(_), false) => Kind::Request,
        (Some(_), None, false) => Kind::Notification,
        // `"id": null` reads as no id: allowed on an error response only.
        (None, _, true) => Kind::Response,
        _ => {
            return Err(Rejection::Invalid(
                "a message needs \"method\" (request or notification) or \"result\"/\"error\" (response)"
                    .to_owned(),
            ));
        }
    };
    if let Some(id) = raw.id {
        if !matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9')) {
            return Err(Rejection::Invalid(
                "\"id\" must be a string or a number".to_owned(),
            ));
        }
    }
    let mut target = None;
    let mut meta_version = None;
    let mut trace = None;
    let mut acts_on = None;
    let mut arguments = None;
    let raw_params = raw.params;
    let rpc = raw.method.as_deref().map(Method::parse);
    if let Some(params) = raw.params {
        if !params.get().starts_with('{') {
            return Err(Rejection::Invalid(
                "\"params\" must be an object".to_owned(),
            ));
        }
        let params_text = params.get();
        let params: RawParams<'a> = serde_json::from_str(params_text)
            .map_err(|e| Rejection::Invalid(format!("\"params\" must be an object: {e}")))?;
        check_keys(params_text, PARAMS_KEYS, "params")?;
        let reference = match params.reference {
            Some(r) => {
                check_keys(r.get(), REF_KEYS, "params.ref")?;
                serde_json::from_str::<RawRef<'a>>(r.get()).ok()
            }
            None => None,
        };
        if let Some(meta) = params.meta {
            meta_version = meta.protocol_version;
            trace = meta.traceparent.map(|parent| (parent, meta.tracestate));
        }
        arguments = params.arguments;
        let string =
            |v: Option<&'a RawValue>, field: &str| -> Result<Option<Cow<'a, str>>, Rejection> {
                v.map(|v| {
                    json_str(v).ok_or_else(|| {
                        Rejection::Invalid(format!("\"params.{field}\" must be a string"))
                    })
                })
                .transpose()
            };
        let found = match rpc {
            Some(m) if m.gate() == Some(TargetKind::Tool) => {
                string(params.name, "name")?.map(|n| (TargetKind::Tool, n))
            }
            Some(m) if m.gate() == Some(TargetKind::Prompt) => {
                string(params.name, "name")?.map(|n| (TargetKind::Prompt, n))
            }
            Some(m) if m.gate() == Some(TargetKind::Resource) => string(params.uri, "uri")?
                .map(resource)
                .transpose()?
                .map(|n| (TargetKind::Resource, n)),
            Some(Method::CompletionComplete) => match &reference {
                Some(r) if r.kind.as_deref() == Some("ref/prompt") => {
                    string(r.name, "ref.name")?.map(|n| (TargetKind::Prompt, n))
                }
                Some(r) if r.kind.as_deref() == Some("ref/resource") => string(r.uri, "ref.uri")?
                    .map(resource)
                    .transpose()?
                    .map(|n| (TargetKind::Resource, n)),
                _ => None,
            },
            _ => None,
        };
        acts_on = found.map(|(kind, name)| Target { kind, name });
        if let Some(field) = rpc.and_then(Method::target_field) {
            let value = match field {
                "name" => params.name,
                "uri" => params.uri,
                _ => params.task_id,
            };
            target = match value {
                None => None,
                Some(v) => Some(json_str(v).ok_or_else(|| {
                    Rejection::Invalid(format!("\"params.{field}\" must be a string"))
                })?),
            };
        }
    }
    Ok(Message {
        kind,
        id: raw.id,
        method: raw.method,
        rpc,
        target,
        meta_version,
        trace,
        acts_on,
        arguments,
        params: raw_params,
    })
}

/// A resource URI (or template) as policy judges it: what servers read it as, or
/// refused when servers may read it in different ways (see [`crate::uri`]).
fn resource(uri: Cow<'_, str>) -> Result<Cow<'_, str>, Rejection> {
    match crate::uri::canonical(&uri) {
        Ok(Cow::Borrowed(_)) => Ok(uri),
        Ok(Cow::Owned(meaning)) => Ok(Cow::Owned(meaning)),
        Err(e) => Err(Rejection::Invalid(e.to_string())),
    }
}

/// A JSON string, borrowed unless it contains escapes.
fn json_str(value: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<&str>(value.get())
        .map(Cow::Borrowed)
        .or_else(|_| serde_json::from_str::<String>(value.get()).map(Cow::Owned))
        .ok()
}

/// The one value of a singleton header, as text.
fn single_header<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, Rejection> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Rejection::Header(format!(
            "{name} header appears more than once"
        )));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| Rejection::Header(format!("{name} header is not visible ASCII")))
}

/// Decode a header value that may be `=?base64?…?=`-wrapped.
fn decode_header<'h>(name: &str, raw: &'h str) -> Result<Cow<'h, str>, Rejection> {
    let Some(inner) = raw
        .strip_prefix(B64_PREFIX)
        .and_then(|r| r.strip_suffix(B64_SUFFIX))
    else {
        return Ok(Cow::Borrowed(raw));
    };
    base64::engine::general_purpose::STANDARD
        .decode(inner)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(Cow::Owned)
        .ok_or_else(|| Rejection::Header(format!("{name} header is not valid base64 UTF-8")))
}

/// Check that a request's headers agree with its body, and tell its generation.
///
/// Returns whether the request is modern (stateless, 2026-07-28 or later), judged by
/// the `MCP-Protocol-Version` header or else the `_meta` protocol version.
pub fn check_headers(headers: &HeaderMap, envelope: &Envelope<'_>) -> Result<bool, Rejection> {
    let header_version = single_header(headers, HEADER_PROTOCOL_VERSION)?;
    let method_header = single_header(headers, HEADER_METHOD)?;
    let name_header = single_header(headers, HEADER_NAME)?;

    let message = match envelope {
        Envelope::Batch(_) => {
            if let Some(v) = header_version.filter(|v| *v != BATCH_VERSION) {
                return Err(Rejection::Invalid(format!(
                    "JSON-RPC batches are not allowed in protocol version {v} (only {BATCH_VERSION})"
                )));
            }
            if method_header.is_some() || name_header.is_some() {
                return Err(Rejection::Header(
                    "Mcp-Method/Mcp-Name headers cannot describe a batch".to_owned(),
                ));
            }
            return Ok(false);
        }
        Envelope::Single(m) => m,
    };

    if let (Some(h), Some(m)) = (header_version, message.meta_version.as_deref())
        && h != m
    {
        return Err(Rejection::Header(format!(
            "MCP-Protocol-Version header {h:?} does not match _meta protocol version {m:?}"
        )));
    }
    let modern = header_version
        .or(message.meta_version.as_deref())
        .is_some_and(is_modern);
    if modern && header_version.is_none() && message.kind == Kind::Request {
        return Err(Rejection::Header(format!(
            "missing required MCP-Protocol-Version header (protocol {MODERN_VERSION} and later)"
        )));
    }

    let (Some(method), Some(rpc)) = (message.method.as_deref(), message.rpc) else {
        // A response carries no method; there is nothing for the headers to describe.
        return Ok(modern);
    };
    match method_header {
        Some(h) if h != method => {
            return Err(Rejection::Header(format!(
                "Mcp-Method header {h:?} does not match the body's method {method:?}"
            )));
        }
        None if modern && message.kind == Kind::Request => {
            return Err(Rejection::Header(format!(
                "missing required Mcp-Method header (protocol {MODERN_VERSION} and later)"
            )));
        }
        _ => {}
    }
    if rpc.target_field().is_some() {
        let body = message.target.as_deref();
        match (name_header, body) {
            (Some(raw), _) => {
                let h = decode_header("Mcp-Name", raw)?;
                if Some(h.as_ref()) != body {
                    return Err(Rejection::Header(format!(
                        "Mcp-Name header {h:?} does not match the body's {:?} for {method}",
                        body.unwrap_or("(missing)")
                    )));
                }
            }
            (None, _) if modern && message.kind == Kind::Request && rpc.name_required() => {
                return Err(Rejection::Header(format!(
                    "missing required Mcp-Name header for {method}"
                )));
            }
            (None, _) => {}
        }
    }
    Ok(modern)
}

#[cfg(test)]
mod tests;
