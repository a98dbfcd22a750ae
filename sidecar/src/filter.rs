//! Filtering list results so an agent sees only what it may use.
//!
//! Applies to the responses of `tools/list`, `prompts/list`, `resources/list` and
//! `resources/templates/list`, whether the upstream answers with JSON or with an SSE
//! stream, page by page (`nextCursor` passes through). JSON bodies are read whole
//! (bounded by [`MAX_FILTERED_BODY`]), filtered and re-encoded. SSE streams are
//! filtered event by event as they arrive: an event carrying the list result is
//! rewritten, every other event (progress, logging, server requests) is relayed as is.
//! Only these responses are ever re-encoded; everything else is relayed untouched.
//!
//! This module does not decide what is visible (see [`crate::policy`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::body::{Body, BodyError};
use crate::mcp::TargetKind;
use crate::snapshot::Route;

/// Largest list response (JSON body, or one SSE event) the sidecar will filter.
pub const MAX_FILTERED_BODY: usize = 16 * 1024 * 1024;

/// Which list a request asks for, and where its items and their names are.
#[derive(Debug, Clone, Copy)]
pub struct ListKind {
    pub kind: TargetKind,
    field: &'static str,
    key: &'static str,
}

impl ListKind {
    pub fn of(method: &str) -> Option<ListKind> {
        let (kind, field, key) = match method {
            "tools/list" => (TargetKind::Tool, "tools", "name"),
            "prompts/list" => (TargetKind::Prompt, "prompts", "name"),
            "resources/list" => (TargetKind::Resource, "resources", "uri"),
            "resources/templates/list" => {
                (TargetKind::Resource, "resourceTemplates", "uriTemplate")
            }
            _ => return None,
        };
        Some(ListKind { kind, field, key })
    }

    /// Remove invisible items from a JSON-RPC message; returns whether it had a list.
    fn filter(&self, route: &Route, message: &mut Value) -> bool {
        let Some(items) = message
            .get_mut("result")
            .and_then(|r| r.get_mut(self.field))
            .and_then(Value::as_array_mut)
        else {
            return false;
        };
        items.retain(|item| {
            item.get(self.key)
                .and_then(Value::as_str)
                .is_some_and(|name| route.policy.visible(self.kind, name))
        });
        true
    }
}

#[derive(Debug, thiserror::Error)]
#[error("list response larger than {MAX_FILTERED_BODY} bytes cannot be filtered")]
struct TooLarge;

/// Filter a JSON response body. A body that is not a JSON-RPC list result is returned
/// unchanged.
pub async fn json(body: Body, route: &Route, list: ListKind) -> Result<Bytes, BodyError> {
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
    let Ok(mut message) = serde_json::from_slice::<Value>(&bytes) else {
        return Ok(bytes);
    };
    if list.filter(route, &mut message) {
        Ok(Bytes::from(message.to_string()))
    } else {
        Ok(bytes)
    }
}

/// Filter an SSE response body event by event.
pub fn sse(body: Body, route: Arc<Route>, list: ListKind) -> Body {
    SseFilter {
        inner: body,
        route,
        list,
        buf: BytesMut::new(),
        finished: false,
    }
    .boxed()
}

struct SseFilter {
    inner: Body,
    route: Arc<Route>,
    list: ListKind,
    buf: BytesMut,
    finished: bool,
}

/// End of the first complete event in `buf` (after its blank line), if any.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

impl SseFilter {
    /// Rewrite one complete event if it carries the list result.
    fn event(&self, raw: Bytes) -> Bytes {
        let Ok(text) = std::str::from_utf8(&raw) else {
            return raw;
        };
        let mut data = String::new();
        let mut data_lines = 0;
        for line in text.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                if data_lines > 0 {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
                data_lines += 1;
            }
        }
        if data_lines == 0 {
            return raw;
        }
        let Ok(mut message) = serde_json::from_str::<Value>(&data) else {
            return raw;
        };
        if !self.list.filter(&self.route, &mut message) {
            return raw;
        }
        let mut out = String::with_capacity(raw.len());
        let mut wrote_data = false;
        for line in text.lines() {
            if line.starts_with("data:") {
                if !wrote_data {
                    out.push_str("data: ");
                    out.push_str(&message.to_string());
                    out.push('\n');
                    wrote_data = true;
                }
            } else if !line.is_empty() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push('\n');
        Bytes::from(out)
    }
}

impl HttpBody for SseFilter {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            if let Some(end) = event_end(&self.buf) {
                let raw = self.buf.split_to(end).freeze();
                let out = self.event(raw);
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if self.finished {
                if self.buf.is_empty() {
                    return Poll::Ready(None);
                }
                // An unterminated last event: relay what there is.
                let rest = self.buf.split().freeze();
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

    #[test]
    fn finds_event_ends() {
        assert_eq!(event_end(b"data: x\n\nrest"), Some(9));
        assert_eq!(event_end(b"data: x\r\n\r\n"), Some(11));
        assert_eq!(event_end(b"data: x\n"), None);
    }
}
