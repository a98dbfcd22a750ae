//! Response bodies: our own small JSON answers, and upstream bodies relayed frame by
//! frame with a guard that keeps the active-streams gauge honest.
//!
//! Relayed bodies are never collected or re-encoded: each frame the upstream sends
//! (an SSE event, a chunk of JSON) is handed to the agent's connection as it arrives.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;

/// Why a response body stopped early (the upstream's connection failed, a filtered
/// list was too large); the agent's connection is then cut.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type every response of the sidecar has.
pub type Body = BoxBody<Bytes, BodyError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// An upstream body relayed as is; `on_end` runs once when the body finishes or the
/// agent goes away (drop), whichever comes first.
pub fn relay(inner: Incoming, on_end: impl FnOnce() + Send + Sync + 'static) -> Body {
    Relay {
        inner,
        on_end: Some(Box::new(on_end)),
    }
    .boxed()
}

struct Relay {
    inner: Incoming,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Relay {
    fn finish(&mut self) {
        if let Some(f) = self.on_end.take() {
            f();
        }
    }
}

impl HttpBody for Relay {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.finish();
        }
        polled.map_err(BodyError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.finish();
    }
}
