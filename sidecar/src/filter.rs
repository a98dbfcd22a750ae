//! Filtering list results so an agent sees only what it may use.
//!
//! Applies to the responses of `tools/list`, `prompts/list`, `resources/list` and
//! `resources/templates/list`, whether the upstream answers with JSON or with an SSE
//! stream, page by page (`nextCursor` passes through). JSON bodies are read whole
//! (bounded by [`MAX_FILTERED_BODY`]) and rewritten with only the visible items: the
//! items themselves, and every other member, are copied as raw text. SSE streams are
//! filtered event by event as they arrive: an event carrying the list result is
//! rewritten, every other event (progress, logging, server requests) is relayed as is.
//! Only these responses are ever rewritten; everything else is relayed untouched.
//!
//! What the filter cannot read does not pass: agents' JSON readers are more lenient
//! than serde_json (a batch array, lone surrogates, `NaN`), so a list response that is
//! not a JSON object the filter can parse is refused (JSON) or loses its data (an SSE
//! event). Bytes are read as agents read them: UTF-8 with replacement, a BOM skipped.
//!
//! This module does not decide what is visible (see [`crate::policy`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;

mod scan;

use crate::body::{Body, BodyError};
use crate::mcp::TargetKind;
use crate::snapshot::Route;

/// Largest list response (JSON body, or one SSE event) the sidecar will filter.
pub const MAX_FILTERED_BODY: usize = 16 * 1024 * 1024;

/// Which list a request asks for, and where its items and their names are (the
/// method table says: [`crate::mcp::method::List`]).
pub use crate::mcp::method::List as ListKind;

/// What a filter looks for in a response (a JSON body, or each SSE event).
#[derive(Debug, Clone)]
pub enum Lists {
    /// The answer to a list request of this kind (a POST's stream).
    One(ListKind),
    /// The answer to a `completion/complete` on a resource template: its values
    /// name resources, and those the agent may not see are dropped.
    Completion(Arc<Completion>),
    /// Any list result, whatever request it answers: on the GET stream, a resumed
    /// stream replays answers to earlier POSTs (a `tools/list` among them) and an
    /// upstream may send anything. Also refuses legacy `endpoint` events there.
    Any,
}

impl Lists {
    /// The JSON-RPC message `text` filtered; `None` when it cannot be read (it must
    /// not pass then).
    pub(crate) fn filter_text(&self, route: &Route, text: &str) -> Option<String> {
        match self.filter(route, text) {
            Filtered::Unchanged => Some(text.to_owned()),
            Filtered::Rewritten(out) => Some(out),
            Filtered::Unreadable => None,
        }
    }

    fn filter(&self, route: &Route, text: &str) -> Filtered {
        match self {
            Lists::One(list) => list.filter(route, text),
            Lists::Completion(completion) => completion.filter(route, text),
            Lists::Any => {
                if let Some(unread) = unread(text) {
                    return unread;
                }
                rewrite_each(text, "result", |result| {
                    let mut current = Cow::Borrowed(result);
                    let mut changed = false;
                    let lists = crate::mcp::method::ALL_LISTS
                        .iter()
                        .filter_map(|m| m.list());
                    for list in lists.filter(|l| route.filters(l.kind)) {
                        match list.filter_result(route, &current) {
                            Filtered::Unchanged => {}
                            Filtered::Rewritten(out) => {
                                current = Cow::Owned(out);
                                changed = true;
                            }
                            Filtered::Unreadable => return Filtered::Unreadable,
                        }
                    }
                    match current {
                        Cow::Owned(out) if changed => Filtered::Rewritten(out),
                        _ => Filtered::Unchanged,
                    }
                })
            }
        }
    }
}

/// A `completion/complete` request on a resource template, as far as its answer's
/// values are judged: each value, put into the template (with the request's
/// `context.arguments` for the other variables), names a resource.
#[derive(Debug)]
pub struct Completion {
    template: String,
    argument: String,
    context: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct CompletionParams {
    argument: Option<CompletionArgument>,
    context: Option<CompletionContext>,
}

#[derive(Deserialize)]
struct CompletionArgument {
    name: String,
}

#[derive(Deserialize)]
struct CompletionContext {
    arguments: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

impl Completion {
    /// For `template` (as judged) and the request's raw `params`; `None` when the
    /// request names no argument (the server then has nothing to complete).
    pub fn new(template: &str, params: &RawValue) -> Option<Completion> {
        let params: CompletionParams = serde_json::from_str(params.get()).ok()?;
        let context = params
            .context
            .and_then(|c| c.arguments)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
            .collect();
        Some(Completion {
            template: template.to_owned(),
            argument: params.argument?.name,
            context,
        })
    }

    /// The template with `value` for the completed variable and the context's values
    /// for the others. Single-variable expressions (`{x}`, `{+x}`, `{/x}`, …) are
    /// filled; any other expression stays as written.
    fn expand(&self, value: &str) -> String {
        let mut out = String::with_capacity(self.template.len() + value.len());
        let mut rest = self.template.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let expression = &rest[open + 1..open + close];
            let (operator, name) = match expression.chars().next() {
                Some(c @ ('+' | '#' | '.' | '/' | ';' | '?' | '&')) => (Some(c), &expression[1..]),
                _ => (None, expression),
            };
            let name = name.trim_end_matches('*');
            let filled = if name == self.argument {
                Some(value)
            } else {
                self.context
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            match filled.filter(|_| !name.contains(',')) {
                Some(v) => {
                    match operator {
                        Some('#') => out.push('#'),
                        Some('.') => out.push('.'),
                        Some('/') => out.push('/'),
                        Some(';') => out.push_str(&format!(";{name}=")),
                        Some('?') => out.push_str(&format!("?{name}=")),
                        Some('&') => out.push_str(&format!("&{name}=")),
                        _ => {}
                    }
                    out.push_str(v);
                }
                None => out.push_str(&rest[open..=open + close]),
            }
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        out
    }

    /// Is the resource `value` names one the agent may see? A value that makes a URI
    /// servers read differently is not shown.
    fn visible(&self, route: &Route, value: &str) -> bool {
        let uri = self.expand(value);
        crate::uri::canonical(&uri)
            .is_ok_and(|uri| route.policy.visible(TargetKind::Resource, &uri))
    }

    fn filter(&self, route: &Route, text: &str) -> Filtered {
        if let Some(unread) = unread(text) {
            return unread;
        }
        rewrite_each(text, "result", |result| {
            if !result.starts_with('{') {
                return Filtered::Unchanged;
            }
            rewrite_each(result, "completion", |completion| {
                if !completion.starts_with('{') {
                    return Filtered::Unchanged;
                }
                rewrite_each(completion, "values", |values| {
                    if !values.starts_with('[') {
                        return Filtered::Unchanged;
                    }
                    let Some(items) = scan::elements(values) else {
                        return Filtered::Unreadable;
                    };
                    let kept: Vec<&str> = items
                        .filter(|item| {
                            serde_json::from_str::<Cow<'_, str>>(item)
                                .is_ok_and(|v| self.visible(route, &v))
                        })
                        .collect();
                    Filtered::Rewritten(format!("[{}]", kept.join(",")))
                })
            })
        })
    }
}

impl ListKind {
    /// The list the method named `method` answers with, if any.
    pub fn of(method: &str) -> Option<ListKind> {
        crate::mcp::Method::parse(method).list()
    }

    /// The JSON-RPC message `text` with invisible items removed from its list.
    ///
    /// Only the structure is parsed: members and items stay raw text and are copied
    /// through, each item is read just far enough to find its name. Every `result`
    /// member and every list member in it is filtered, so duplicate keys cannot carry
    /// an unfiltered copy past the sidecar.
    fn filter(&self, route: &Route, text: &str) -> Filtered {
        if let Some(unread) = unread(text) {
            return unread;
        }
        rewrite_message(text, "result", |result| self.walk_result(route, result))
    }

    /// [`ListKind::filter`] for a `result` member's value alone (valid JSON).
    fn filter_result(&self, route: &Route, text: &str) -> Filtered {
        filtered(self.walk_result(route, text))
    }

    /// The `result` whose value opens `rest`: its list filtered, and its length.
    fn walk_result(&self, route: &Route, rest: &str) -> scan::Walked {
        // A result that is not an object holds no list an agent could take.
        if !rest.starts_with('{') {
            return Ok((None, scan::value_end(rest.as_bytes(), 0)));
        }
        scan::replace_values(rest, self.field, |items| self.walk_items(route, items))
    }

    /// The items of the list result `result` the policy shows, raw, and its
    /// `nextCursor`; `None` when the result (or its list, given twice or not as an
    /// array) cannot be read. The aggregated `/mcp` merges lists with it.
    pub(crate) fn visible_items<'t>(
        &self,
        route: &Route,
        result: &'t str,
    ) -> Option<(Vec<&'t RawValue>, Option<&'t RawValue>)> {
        let object: RawObject<'t> = serde_json::from_str(result).ok()?;
        let mut items = None;
        let mut cursor = None;
        for (key, value) in object.0 {
            if key == self.field {
                if items.is_some() {
                    return None;
                }
                let all: Vec<&RawValue> = serde_json::from_str(value.get()).ok()?;
                items = Some(
                    all.into_iter()
                        .filter(|i| self.visible(route, i.get()))
                        .collect(),
                );
            } else if key == "nextCursor" {
                cursor = Some(value);
            }
        }
        Some((items.unwrap_or_default(), cursor))
    }

    /// The list array that opens `rest` (valid JSON) with only the visible items, and
    /// its length. One pass: each item is walked once, for its name and for where it
    /// ends.
    fn walk_items(&self, route: &Route, rest: &str) -> scan::Walked {
        let b = rest.as_bytes();
        if b.first() != Some(&b'[') {
            return Ok((None, scan::value_end(b, 0)));
        }
        let mut out = String::with_capacity(rest.len());
        out.push('[');
        let mut at = 1;
        loop {
            at = scan::skip_ws(b, at);
            if b.get(at) == Some(&b',') {
                at = scan::skip_ws(b, at + 1);
            }
            match b.get(at) {
                None => return Err(()),
                Some(b']') => break,
                Some(_) => {}
            }
            let item_text = rest.get(at..).ok_or(())?;
            let (name, len) = match scan::object_at(item_text) {
                Some(mut members) => {
                    let name = self.name(members.by_ref());
                    members.by_ref().for_each(drop);
                    (name, members.end().ok_or(())?)
                }
                // Not an object: hidden.
                None => (None, scan::value_end(b, at) - at),
            };
            let item = item_text.get(..len).ok_or(())?;
            if name.is_some_and(|name| self.shows(route, &name, item)) {
                if out.len() > 1 {
                    out.push(',');
                }
                out.push_str(item);
            }
            at += len.max(1);
        }
        out.push(']');
        Ok((Some(out), at + 1))
    }

    /// An item is visible when it is an object whose name is a string the policy
    /// shows (anything else, a missing or repeated name included, is hidden). `item`
    /// is valid JSON.
    fn visible(&self, route: &Route, item: &str) -> bool {
        scan::members(item)
            .and_then(|members| self.name(members))
            .is_some_and(|name| self.shows(route, &name, item))
    }

    /// Whether the policy shows the item `name`, and (for a server with pins) its
    /// definition `item` matches its pin ([`crate::pin`]).
    fn shows(&self, route: &Route, name: &str, item: &str) -> bool {
        route.policy.visible(self.kind, name)
            && route
                .pins
                .as_ref()
                .is_none_or(|p| p.admit(self.kind, name, item))
    }

    /// An item's name (`name`, `uri` or `uriTemplate`, as the list keys it) from its
    /// members. Read strictly: none when any of those three members is given twice, or
    /// is neither a string nor null, or a key does not decode.
    fn name<'t>(
        &self,
        members: impl Iterator<Item = (scan::Key<'t>, &'t str)>,
    ) -> Option<Cow<'t, str>> {
        const NAMES: [&str; 3] = ["name", "uri", "uriTemplate"];
        let mut seen = [false; 3];
        let mut found = None;
        for (key, value) in members {
            let key = key.decoded()?;
            let Some(slot) = NAMES.iter().position(|n| *n == key) else {
                continue;
            };
            if std::mem::replace(&mut seen[slot], true) {
                return None;
            }
            if value == "null" {
                continue;
            }
            let text = serde_json::from_str::<Cow<'t, str>>(value).ok()?;
            if NAMES[slot] == self.key {
                found = Some(text);
            }
        }
        found
    }
}

/// What filtering one JSON-RPC message came to.
#[derive(Debug, PartialEq, Eq)]
enum Filtered {
    /// It carries no list (or is blank): relay it as it came.
    Unchanged,
    /// The message with the invisible items removed.
    Rewritten(String),
    /// Not a JSON object the sidecar can read. An agent's parser may read it all the
    /// same (a batch array, a lone surrogate in a key, `NaN`), so it must not pass.
    Unreadable,
}

/// A JSON object's members in order, values left as raw text.
struct RawObject<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(RawObject(members))
            }
        }
        d.deserialize_map(Members)
    }
}

/// What a message that is not to be walked comes to: unchanged when blank, unreadable
/// when serde_json (strict RFC 8259) refuses it; `None` for valid JSON, which from then
/// on is walked rather than parsed again ([`scan`]).
fn unread(text: &str) -> Option<Filtered> {
    if text.trim_ascii().is_empty() {
        return Some(Filtered::Unchanged);
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .is_err()
        .then_some(Filtered::Unreadable)
}

/// What a walk came to, as a [`Filtered`].
fn filtered(walked: scan::Walked) -> Filtered {
    match walked {
        Err(()) => Filtered::Unreadable,
        Ok((Some(out), _)) => Filtered::Rewritten(out),
        Ok((None, _)) => Filtered::Unchanged,
    }
}

/// The JSON object `text` (valid JSON: see [`unread`]; whitespace around it is
/// dropped when it is rewritten) with every member named `key` replaced by what
/// `inner` walks of its value ([`scan::replace_values`]). Unreadable when `text` is not
/// an object, or a key or any such member is unreadable.
fn rewrite_message(text: &str, key: &str, inner: impl FnMut(&str) -> scan::Walked) -> Filtered {
    let at = scan::skip_ws(text.as_bytes(), 0);
    filtered(scan::replace_values(
        text.get(at..).unwrap_or_default(),
        key,
        inner,
    ))
}

/// [`rewrite_message`] with an `inner` given each value's exact text.
fn rewrite_each(text: &str, key: &str, mut inner: impl FnMut(&str) -> Filtered) -> Filtered {
    rewrite_message(
        text,
        key,
        scan::value_walk(|value| match inner(value) {
            Filtered::Rewritten(new) => Ok(Some(new)),
            Filtered::Unchanged => Ok(None),
            Filtered::Unreadable => Err(()),
        }),
    )
}

/// The JSON object `text` without its members named in `drop` (the others copied as
/// raw text, in order); `None` when `text` is not an object.
pub(crate) fn remove_members(text: &str, drop: &[&str]) -> Option<String> {
    let object: RawObject<'_> = serde_json::from_str(text).ok()?;
    let mut out = String::with_capacity(text.len());
    out.push('{');
    for (key, value) in object.0.iter().filter(|(k, _)| !drop.contains(&k.as_str())) {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).ok()?);
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    Some(out)
}

/// The JSON object `text` with the members `set` (name, raw JSON value) in place of
/// any it had of those names; the others copied as raw text, in order. `None` when
/// `text` is not an object.
pub(crate) fn upsert_members(text: &str, set: &[(&str, &str)]) -> Option<String> {
    let names: Vec<&str> = set.iter().map(|(k, _)| *k).collect();
    let mut out = remove_members(text, &names)?;
    out.pop();
    for (key, value) in set {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).ok()?);
        out.push(':');
        out.push_str(value);
    }
    out.push('}');
    Some(out)
}

/// Re-write the JSON object `text` member by member: `replace(key, raw value, out)`
/// either writes a new value into `out` and returns true, or returns false to keep
/// the raw one. `None` when `text` is not an object.
pub(crate) fn rewrite_members(
    text: &str,
    mut replace: impl FnMut(&str, &str, &mut String) -> bool,
) -> Option<String> {
    let object: RawObject<'_> = serde_json::from_str(text).ok()?;
    let mut out = String::with_capacity(text.len());
    out.push('{');
    for (i, (key, value)) in object.0.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).ok()?);
        out.push(':');
        if !replace(key, value.get(), &mut out) {
            out.push_str(value.get());
        }
    }
    out.push('}');
    Some(out)
}

/// How a list response is framed, told from its `Content-Type` the way agents' clients
/// tell it: by prefix, ignoring case (the Python SDK's rule, which takes everything the
/// TypeScript SDK takes). `None` is neither, which no client reads as a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Json,
    Sse,
}

impl Framing {
    pub fn of(content_type: &[u8]) -> Option<Framing> {
        let value = content_type.trim_ascii_start();
        let starts = |prefix: &[u8]| {
            value
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        };
        if starts(b"text/event-stream") {
            Some(Framing::Sse)
        } else if starts(b"application/json") {
            Some(Framing::Json)
        } else {
            None
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("list response larger than {MAX_FILTERED_BODY} bytes cannot be filtered")]
struct TooLarge;

#[derive(Debug, thiserror::Error)]
#[error("list response is not a JSON-RPC object the sidecar can read, so it cannot be filtered")]
struct Unreadable;

/// Filter a JSON response body. A body that is not a JSON-RPC list result is returned
/// unchanged; one the sidecar cannot read is an error. The body is read as the agent's
/// client reads it: UTF-8 with replacement, a byte order mark skipped.
pub async fn json(body: Body, route: &Route, lists: &Lists) -> Result<Bytes, BodyError> {
    // Collected by hand: `Limited` would need the boxed error converted through a
    // bound that makes the request future lose `Send`.
    let mut body = body;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return Err(e),
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_FILTERED_BODY {
                return Err(Box::new(TooLarge));
            }
            buf.extend_from_slice(&data);
        }
    }
    let bytes = buf.freeze();
    // Valid UTF-8 (the usual case) is checked at memory speed; only text that is not
    // goes through the slower replacing decoder.
    let text = match std::str::from_utf8(&bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(&bytes),
    };
    match lists.filter(route, text.strip_prefix('\u{feff}').unwrap_or(&text)) {
        Filtered::Unchanged => Ok(bytes),
        Filtered::Rewritten(out) => Ok(Bytes::from(out)),
        Filtered::Unreadable => Err(Box::new(Unreadable)),
    }
}

/// Filter an SSE response body event by event.
pub fn sse(body: Body, route: Arc<Route>, lists: Lists) -> Body {
    SseFilter {
        inner: body,
        route,
        lists,
        buf: BytesMut::new(),
        scanned: 0,
        first: true,
        lf_after_cr: None,
        finished: false,
    }
    .boxed()
}

struct SseFilter {
    inner: Body,
    route: Arc<Route>,
    lists: Lists,
    buf: BytesMut,
    /// How much of `buf` is known to hold no event end (so a long event arriving in
    /// many frames is scanned once, not once per frame).
    scanned: usize,
    /// No event has been taken yet (a byte order mark may open the stream).
    first: bool,
    /// The last event taken ended with a CR whose LF, if any, comes next: that LF is
    /// relayed (`Some(true)`, the event went as it came) or dropped (`Some(false)`, it
    /// was rewritten with line ends of its own).
    lf_after_cr: Option<bool>,
    finished: bool,
}

// Events are read with the rules of the agent's own SSE parser (WHATWG HTML, "Parsing
// an event stream"): a line ends with CRLF, LF or a lone CR, and a blank line ends an
// event. Reading them any other way would let an upstream frame a list the sidecar
// does not see as one but the agent does.

/// Length of the line ending at the start of `buf`, if one starts there. A CR last in
/// `buf` counts alone: were an LF to follow, it would belong to it (see `lf_after_cr`).
fn line_end(buf: &[u8]) -> Option<usize> {
    match buf {
        [b'\r', b'\n', ..] => Some(2),
        [b'\r' | b'\n', ..] => Some(1),
        _ => None,
    }
}

/// The longest ending ("\r\n\r\n") `event_end` looks for, less one: how far a resumed
/// scan backs up.
const END_OVERLAP: usize = 3;

/// End of the first complete event in `buf` (after its blank line), if any.
pub(crate) fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if let Some(first) = line_end(&buf[i..]) {
            if let Some(second) = line_end(&buf[i + first..]) {
                return Some(i + first + second);
            }
            i += first;
        } else {
            i += 1;
        }
    }
    None
}

/// The lines of one event, as the agent's SSE parser splits them.
pub(crate) fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let line = &rest[..end];
        let ending = line_end(&rest.as_bytes()[end..]).unwrap_or(0);
        rest = &rest[end + ending..];
        Some(line)
    })
}

/// The value of a `data` field line (`data` alone is one with an empty value).
pub(crate) fn data_value(line: &str) -> Option<&str> {
    let value = line.strip_prefix("data")?;
    if value.is_empty() {
        return Some(value);
    }
    let value = value.strip_prefix(':')?;
    Some(value.strip_prefix(' ').unwrap_or(value))
}

impl SseFilter {
    /// One complete event rewritten, if it carries the list result or data the filter
    /// cannot read (then dropped). Its bytes are read as the agent's parser reads them:
    /// UTF-8 with replacement, and without the byte order mark that may open the stream.
    /// A legacy `endpoint` event on a stream filtered for any list is an error.
    fn event(&self, raw: &[u8], first: bool) -> Result<Option<Bytes>, BodyError> {
        let text = String::from_utf8_lossy(raw);
        let text = if first {
            text.strip_prefix('\u{feff}').unwrap_or(&text)
        } else {
            &text
        };
        let mut data = String::new();
        let mut data_lines = 0;
        for value in lines(text).filter_map(data_value) {
            if data_lines > 0 {
                data.push('\n');
            }
            data.push_str(value);
            data_lines += 1;
        }
        if matches!(self.lists, Lists::Any)
            && lines(text).any(|l| event_type(l) == Some("endpoint"))
        {
            tracing::warn!(server = %self.route.name, "refused an upstream's legacy HTTP+SSE endpoint event");
            return Err(Box::new(LegacyEndpoint));
        }
        if data_lines == 0 {
            return Ok(None);
        }
        let message = match self.lists.filter(&self.route, &data) {
            Filtered::Unchanged => return Ok(None),
            Filtered::Rewritten(message) => Some(message),
            // Its data goes; the rest (an `id` the agent resumes from) still counts.
            Filtered::Unreadable => {
                tracing::warn!(server = %self.route.name, "dropped the data of an SSE event the list filter cannot read");
                None
            }
        };
        let mut out = String::with_capacity(raw.len());
        let mut wrote_data = false;
        for line in lines(text) {
            if data_value(line).is_some() {
                if let Some(message) = message.as_deref().filter(|_| !wrote_data) {
                    // The data held line breaks (a message sent over several `data`
                    // lines): one `data` line per line keeps them.
                    for part in message.split('\n') {
                        out.push_str("data: ");
                        out.push_str(part);
                        out.push('\n');
                    }
                    wrote_data = true;
                }
            } else if !line.is_empty() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push('\n');
        Ok(Some(Bytes::from(out)))
    }
}

/// The value of an `event` field line.
pub(crate) fn event_type(line: &str) -> Option<&str> {
    let value = line.strip_prefix("event")?;
    let value = value.strip_prefix(':')?;
    Some(value.strip_prefix(' ').unwrap_or(value))
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the upstream speaks the legacy HTTP+SSE transport (2024-11-05): its endpoint event would send the agent's requests around the sidecar, so the stream is refused; declare the server with spec.transport: sse"
)]
struct LegacyEndpoint;

impl HttpBody for SseFilter {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            // The event before ended with a CR that a frame boundary cut from its LF:
            // the LF follows the event (relayed, the agent reads one CRLF) or goes with
            // it (rewritten, its own line ends replaced the CRLF).
            if let Some(relay) = self.lf_after_cr.filter(|_| !self.buf.is_empty()) {
                self.lf_after_cr = None;
                if self.buf[0] == b'\n' {
                    let lf = self.buf.split_to(1).freeze();
                    if relay {
                        return Poll::Ready(Some(Ok(Frame::data(lf))));
                    }
                }
            }
            // An end may straddle the scanned part: back up.
            let from = self.scanned.min(self.buf.len()).saturating_sub(END_OVERLAP);
            if let Some(end) = event_end(&self.buf[from..]) {
                let raw = self.buf.split_to(from + end).freeze();
                self.scanned = 0;
                let first = std::mem::take(&mut self.first);
                let rewritten = match self.event(&raw, first) {
                    Ok(rewritten) => rewritten,
                    Err(e) => {
                        self.finished = true;
                        self.buf.clear();
                        return Poll::Ready(Some(Err(e)));
                    }
                };
                self.lf_after_cr = (raw.last() == Some(&b'\r')).then_some(rewritten.is_none());
                let out = rewritten.unwrap_or(raw);
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            self.scanned = self.buf.len();
            if self.finished {
                if self.buf.is_empty() {
                    return Poll::Ready(None);
                }
                // An unterminated last event: relay what there is.
                let rest = self.buf.split().freeze();
                self.scanned = 0;
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            }
            if self.buf.len() > MAX_FILTERED_BODY {
                return Poll::Ready(Some(Err(Box::new(TooLarge))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.finished = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.buf.extend_from_slice(&data),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use toolmesh_proto::v1alpha1 as pb;

    /// A route whose policy shows tools `a*` and resources `file:///ok/*`.
    fn route() -> Arc<Route> {
        crate::snapshot::test_route(
            None,
            pb::Rule {
                tools: vec!["a*".into()],
                resources: vec!["file:///ok/*".into()],
                ..Default::default()
            },
        )
    }

    fn filtered(method: &str, text: &str) -> Option<serde_json::Value> {
        let list = ListKind::of(method).expect("a list method");
        match list.filter(&route(), text) {
            Filtered::Rewritten(out) => Some(serde_json::from_str(&out).expect("valid JSON out")),
            Filtered::Unchanged => None,
            Filtered::Unreadable => panic!("unreadable: {text}"),
        }
    }

    #[test]
    fn keeps_visible_items_and_every_other_member_as_sent() {
        let out = filtered(
            "tools/list",
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"alpha","inputSchema":{"type":"object"}},{"name":"beta"},{"name":"a\u0062c"}],"nextCursor":"c2","_meta":{"k":[1,2]}}}"#,
        )
        .expect("a list");
        assert_eq!(
            out,
            serde_json::json!({"jsonrpc":"2.0","id":7,"result":{
                "tools":[{"name":"alpha","inputSchema":{"type":"object"}},{"name":"abc"}],
                "nextCursor":"c2","_meta":{"k":[1,2]}}})
        );
    }

    #[test]
    fn hides_items_without_a_string_name_and_filters_duplicate_members() {
        let out = filtered(
            "tools/list",
            r#"{"id":1,"result":{"tools":[{"name":5},{"title":"x"},{"name":"a","name":"zzz"}],"tools":[{"name":"b"}]},"result":{"tools":[{"name":"c"}]}}"#,
        );
        // Re-parsed, the last duplicate wins; every copy was filtered, so nothing shows.
        assert_eq!(out, Some(serde_json::json!({"id":1,"result":{"tools":[]}})));
    }

    #[test]
    fn items_that_are_not_objects_are_hidden_and_kept_items_are_copied_byte_for_byte() {
        let list = ListKind::of("tools/list").expect("list");
        let text = "{\"id\":1,\"result\":{\"tools\": [ 1 , \"a0\",[{\"name\":\"a1\"}] ,null,\n {\"name\" : \"a2\", \"x\":\"]}\"} ,{\"name\":\"b\"}, {\"uri\":null,\"name\":\"a3\"} ] }}";
        assert_eq!(
            list.filter(&route(), text),
            Filtered::Rewritten(
                "{\"id\":1,\"result\":{\"tools\": [{\"name\" : \"a2\", \"x\":\"]}\"},{\"uri\":null,\"name\":\"a3\"}] }}"
                    .to_owned()
            )
        );
    }

    #[test]
    fn resources_are_matched_on_their_uri() {
        let out = filtered(
            "resources/list",
            r#"{"id":1,"result":{"resources":[{"uri":"file:///ok/1","name":"one"},{"uri":"file:///no/2","name":"a-two"}]}}"#,
        )
        .expect("a list");
        assert_eq!(out["result"]["resources"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn messages_without_a_list_are_left_alone() {
        for text in [
            r#"{"id":1,"error":{"code":-1,"message":"x"}}"#,
            r#"{"id":1,"result":{"tools":"not an array"}}"#,
            r#"{"id":1,"result":[]}"#,
            r#"{"id":1,"result":{"tools":{"name":"b1"}}}"#,
            " \r\n",
        ] {
            assert_eq!(filtered("tools/list", text), None, "{text}");
        }
    }

    #[test]
    fn messages_the_filter_cannot_read_do_not_pass() {
        // Relayed as they came, each showed its list to an agent whose JSON reader is
        // more lenient than serde_json: a batch answering a single request (the
        // TypeScript SDK takes it), a lone surrogate in a key (JavaScript and Python
        // read it), `NaN` (Python reads it).
        let list = ListKind::of("tools/list").expect("list");
        for text in [
            r#"[1,2]"#,
            r#"{"id":1,"result":{"tools":[1,2"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"b1"}]}}]"#,
            r#"{"\ud800":0,"id":1,"result":{"tools":[{"name":"b1"}]}}"#,
            r#"{"id":1,"result":{"\udead":0,"tools":[{"name":"b1"}]}}"#,
            r#"{"id":1,"x":NaN,"result":{"tools":[{"name":"b1"}]}}"#,
        ] {
            assert_eq!(list.filter(&route(), text), Filtered::Unreadable, "{text}");
        }
    }

    async fn through_json(method: &str, body: &[u8]) -> Result<Vec<u8>, String> {
        let list = ListKind::of(method).expect("list");
        json(
            crate::body::full(body.to_vec()),
            &route(),
            &Lists::One(list),
        )
        .await
        .map(|b| b.to_vec())
        .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_json_body_is_read_as_the_agent_reads_it() {
        // Found by the `sse` fuzz target: a byte that is not UTF-8 made the filter
        // relay the whole body, which the agent decodes with replacement and reads.
        let mut body = br#"{"id":1,"result":{"tools":[{"name":"a1","title":"x"#.to_vec();
        body.push(0xdc);
        body.extend_from_slice(br#""},{"name":"b1"}]}}"#);
        let out = through_json("tools/list", &body).await.expect("filtered");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "{\"id\":1,\"result\":{\"tools\":[{\"name\":\"a1\",\"title\":\"x\u{fffd}\"}]}}"
        );
        // A BOM (skipped by a browser's and by Python's JSON decoding) is skipped too.
        let out = through_json(
            "tools/list",
            "\u{feff}{\"id\":1,\"result\":{\"tools\":[{\"name\":\"b1\"}]}}".as_bytes(),
        )
        .await
        .expect("filtered");
        assert_eq!(out, br#"{"id":1,"result":{"tools":[]}}"#);
        // What it cannot read is refused, not relayed; a body without a list is relayed.
        let batch = br#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"b1"}]}}]"#;
        let err = through_json("tools/list", batch)
            .await
            .expect_err("refused");
        assert!(err.contains("cannot be filtered"), "{err}");
        let mut error = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"x"#.to_vec();
        error.push(0xff);
        error.extend_from_slice(br#""}}"#);
        assert_eq!(through_json("tools/list", &error).await, Ok(error));
    }

    #[tokio::test]
    async fn an_sse_event_the_filter_cannot_read_loses_its_data_not_its_id() {
        let stream = b"id: 7\ndata: [{\"id\":1,\"result\":{\"tools\":[{\"name\":\"b1\"}]}}]\n\n\
                       id: 8\ndata:\n\n";
        let out = through_sse("tools/list", stream, 4).await;
        assert_eq!(String::from_utf8_lossy(&out), "id: 7\n\nid: 8\ndata:\n\n");
    }

    #[tokio::test]
    async fn an_sse_list_split_into_one_byte_frames_is_filtered_and_other_events_kept() {
        let stream = "event: message\r\ndata: {\"method\":\"notifications/progress\"}\r\n\r\n\
                      data: {\"id\":2,\"result\":{\"tools\":[{\"name\":\"a1\"},{\"name\":\"b1\"}]}}\n\n";
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = stream
            .bytes()
            .map(|b| Ok(Frame::data(Bytes::copy_from_slice(&[b]))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let list = ListKind::of("tools/list").expect("list");
        let out = sse(body, route(), Lists::One(list))
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let out = String::from_utf8(out.to_vec()).expect("utf-8");
        assert!(
            out.starts_with(
                "event: message\r\ndata: {\"method\":\"notifications/progress\"}\r\n\r\n"
            ),
            "{out}"
        );
        assert!(
            out.ends_with("data: {\"id\":2,\"result\":{\"tools\":[{\"name\":\"a1\"}]}}\n\n"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn an_unterminated_last_event_is_relayed_and_the_stream_ends() {
        // Found by the `sse` fuzz target: the scan position outlived the buffer.
        let stream = "data: {\"id\":1,\"result\":{\"prompts\":[{\"name\":\"p\"}]}}";
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = stream
            .as_bytes()
            .chunks(7)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let list = ListKind::of("prompts/list").expect("list");
        let out = sse(body, route(), Lists::One(list))
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(out, Bytes::from_static(stream.as_bytes()));
    }

    #[test]
    fn framing_is_told_as_agents_tell_it() {
        // Matched case-sensitively, `Application/JSON` went through unfiltered, and the
        // Python SDK (which lowercases) read the list from it.
        for (content_type, framing) in [
            (&b"application/json"[..], Some(Framing::Json)),
            (b"Application/JSON; charset=utf-8", Some(Framing::Json)),
            (b"application/json-seq", Some(Framing::Json)),
            (b"TEXT/Event-Stream", Some(Framing::Sse)),
            (b" text/event-stream;x=1", Some(Framing::Sse)),
            (b"text/event", None),
            (b"text/plain", None),
            (b"", None),
        ] {
            assert_eq!(
                Framing::of(content_type),
                framing,
                "{}",
                String::from_utf8_lossy(content_type)
            );
        }
    }

    #[test]
    fn finds_event_ends() {
        assert_eq!(event_end(b"data: x\n\nrest"), Some(9));
        assert_eq!(event_end(b"\n\n"), Some(2));
        assert_eq!(event_end(b"data: x\r\n\r\n"), Some(11));
        assert_eq!(event_end(b"data: x\n"), None);
        // A lone CR ends a line too (WHATWG), alone or mixed with the others.
        assert_eq!(event_end(b"data: x\r\rrest"), Some(9));
        assert_eq!(event_end(b"data: x\r\n\rrest"), Some(10));
        assert_eq!(event_end(b"data: x\n\r\nrest"), Some(10));
        assert_eq!(event_end(b"data: x\r\r\nrest"), Some(10));
        assert_eq!(event_end(b"data: x\r\ndata: y\r"), None);
        // A blank line ending in a CR last in the buffer ends the event there.
        assert_eq!(event_end(b"data: x\r\n\r"), Some(10));
    }

    /// `stream` through the SSE filter for `method`, `chunk` bytes per frame.
    async fn through_sse(method: &str, stream: &[u8], chunk: usize) -> Vec<u8> {
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = stream
            .chunks(chunk)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let list = ListKind::of(method).expect("list");
        let out = sse(body, route(), Lists::One(list))
            .collect()
            .await
            .expect("body");
        out.to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_lone_cr_ends_a_line_for_the_filter_as_for_the_agent() {
        // Found by the `sse` fuzz target: the agent's parser ends a line at a lone CR,
        // so this event's data is the whole list; the filter read the second line as
        // running on to "x-junk" and relayed the event unfiltered.
        let stream = b"data: {\"id\":1,\r\ndata: \"result\":{\"tools\":[{\"name\":\"a1\"},{\"name\":\"b1\"}]}}\rx-junk\r\n\r\n";
        for chunk in [1, 7, stream.len()] {
            let out = through_sse("tools/list", stream, chunk).await;
            assert_eq!(
                String::from_utf8_lossy(&out),
                // The message's own line break stays (as a second data line).
                "data: {\"id\":1,\ndata: \"result\":{\"tools\":[{\"name\":\"a1\"}]}}\nx-junk\n\n"
            );
        }
    }

    #[tokio::test]
    async fn events_ended_by_lone_crs_are_filtered_one_by_one() {
        let stream = b"data: {\"method\":\"notifications/progress\"}\r\r\
                       data: {\"id\":2,\"result\":{\"tools\":[{\"name\":\"b1\"}]}}\r\r";
        let out = through_sse("tools/list", stream, 5).await;
        assert_eq!(
            String::from_utf8_lossy(&out),
            "data: {\"method\":\"notifications/progress\"}\r\r\
             data: {\"id\":2,\"result\":{\"tools\":[]}}\n\n"
        );
    }

    #[tokio::test]
    async fn a_message_over_several_data_lines_keeps_them_once_filtered() {
        // Items are copied as sent, line breaks included; written back on one `data`
        // line, the message ended at the first of them and the agent could not parse it.
        let stream = "data: {\"id\":3,\"result\":{\"tools\":[{\"name\":\"a1\",\ndata: \"title\":\"A\"},{\"name\":\"b1\"}]}}\n\n";
        let out = through_sse("tools/list", stream.as_bytes(), 3).await;
        let out = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            out,
            "data: {\"id\":3,\"result\":{\"tools\":[{\"name\":\"a1\",\ndata: \"title\":\"A\"}]}}\n\n"
        );
        let data: Vec<&str> = out.lines().filter_map(data_value).collect();
        let message: serde_json::Value =
            serde_json::from_str(&data.join("\n")).expect("the agent reads JSON");
        assert_eq!(
            message["result"]["tools"],
            serde_json::json!([{"name": "a1", "title": "A"}])
        );
    }

    #[tokio::test]
    async fn a_byte_order_mark_or_a_bare_data_field_does_not_hide_the_list() {
        // The agent's parser drops a BOM opening the stream and reads `data` without a
        // colon as an empty data line.
        let stream =
            "\u{feff}data: {\"id\":1,\"result\":{\"tools\":[{\"name\":\"b1\"}]}}\ndata\n\n";
        let out = through_sse("tools/list", stream.as_bytes(), 2).await;
        assert_eq!(
            String::from_utf8_lossy(&out),
            "data: {\"id\":1,\"result\":{\"tools\":[]}}\n\n"
        );
    }

    fn completion(template: &str, params: &str) -> Completion {
        let params = RawValue::from_string(params.to_owned()).expect("json");
        Completion::new(template, &params).expect("an argument")
    }

    #[test]
    fn completion_values_naming_hidden_resources_are_dropped() {
        let c = completion(
            "file:///{area}/{name}",
            r#"{"argument":{"name":"area","value":""},"context":{"arguments":{"name":"x"}}}"#,
        );
        assert_eq!(c.expand("ok"), "file:///ok/x");
        let text = r#"{"jsonrpc":"2.0","id":1,"result":{"completion":{"values":["ok","secret","../ok",7],"hasMore":false}}}"#;
        let Filtered::Rewritten(out) = c.filter(&route(), text) else {
            panic!("not rewritten")
        };
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            v["result"]["completion"]["values"],
            serde_json::json!(["ok"])
        );
        assert_eq!(v["result"]["completion"]["hasMore"], false);

        // Operators and variables the request did not give.
        let c = completion(
            "file:///ok{/path}{?q}",
            r#"{"argument":{"name":"path","value":""}}"#,
        );
        assert_eq!(c.expand("a"), "file:///ok/a{?q}");
        assert!(
            Completion::new(
                "file:///{x}",
                &RawValue::from_string("{}".into()).expect("json")
            )
            .is_none()
        );
    }

    async fn through_get_stream(stream: &str) -> Result<String, String> {
        let frames: Vec<Result<Frame<Bytes>, BodyError>> =
            vec![Ok(Frame::data(Bytes::from(stream.to_owned())))];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        sse(body, route(), Lists::Any)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_get_stream_is_filtered_for_every_list_and_refuses_legacy_endpoints() {
        let stream = concat!(
            "id: 1\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"tools\":[{\"name\":\"ab\"},{\"name\":\"zz\"}]}}\n\n",
            "id: 2\ndata: {\"jsonrpc\":\"2.0\",\"id\":4,\"result\":{\"resources\":[{\"uri\":\"file:///ok/a\"},{\"uri\":\"file:///no\"}]}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n",
        );
        let out = through_get_stream(stream).await.expect("stream");
        assert!(out.contains("\"ab\"") && !out.contains("zz"), "{out}");
        assert!(
            out.contains("file:///ok/a") && !out.contains("file:///no"),
            "{out}"
        );
        assert!(
            out.contains("notifications/progress") && out.contains("id: 2"),
            "{out}"
        );

        for legacy in [
            "event: endpoint\ndata: /messages?sessionId=1\n\n",
            "event:endpoint\ndata: http://10.0.0.1/messages\n\n",
        ] {
            let err = through_get_stream(legacy).await.expect_err("refused");
            assert!(err.contains("legacy HTTP+SSE"), "{err}");
        }
    }
}
