//! Response bodies: our own small JSON answers, and upstream bodies relayed frame by
//! frame with a guard that keeps the active-streams gauge honest.
//!
//! Relayed bodies are never collected or re-encoded: each frame the upstream sends
//! (an SSE event, a chunk of JSON) is handed to the agent's connection as it arrives.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
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

/// Data frames that are already waiting behind one another are merged up to this
/// size before they go to the agent: one write instead of one per frame.
pub const COALESCE_BYTES: usize = 32 * 1024;

/// Scheduler turns the relay yields, holding data, for the upstream connection to hand
/// over a frame it has already read. Measured: hyper's client connection delivers the
/// next frame on the second turn (one turn merged nothing; see docs/benchmarks.md).
const YIELDS: u8 = 3;

/// An upstream body relayed as is; `on_end` runs once when the body finishes or the
/// agent goes away (drop), whichever comes first.
///
/// Frames are not held back to wait for the upstream: when it has nothing more ready,
/// what was taken is handed on. But hyper hands a response over one frame per turn of
/// its connection task, so before handing on, the relay yields a few turns ([`YIELDS`]):
/// frames the connection has already read (an SSE burst) then join in a single write
/// to the agent. Bytes are copied only when two or more frames merge.
pub fn relay<B>(inner: B, on_end: impl FnOnce() + Send + Sync + 'static) -> Body
where
    B: HttpBody<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<BodyError>,
{
    Relay::new(inner, on_end).boxed()
}

/// `inner`, holding `guard` until it ends (its last frame, an error, or the agent going
/// away): what a tracing span rides on to cover an SSE stream.
pub fn holding<G: Send + Sync + Unpin + 'static>(inner: Body, guard: G) -> Body {
    Holding {
        inner,
        guard: Some(guard),
    }
    .boxed()
}

struct Holding<G> {
    inner: Body,
    guard: Option<G>,
}

impl<G: Unpin> HttpBody for Holding<G> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream body as it is, boxed.
pub fn incoming(inner: Incoming) -> Body {
    inner.map_err(BodyError::from).boxed()
}

struct Relay<B> {
    inner: B,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
    /// One frame taken and not yet handed on (no copy).
    held: Option<Bytes>,
    /// Two or more frames taken and merged.
    merged: BytesMut,
    /// What comes after the held data: the end, an error or trailers.
    after: Option<After>,
    /// Turns yielded in a row while holding data.
    yields: u8,
}

enum After {
    End,
    Error(BodyError),
    Frame(Frame<Bytes>),
}

impl<B> Relay<B> {
    fn new(inner: B, on_end: impl FnOnce() + Send + Sync + 'static) -> Self {
        Relay {
            inner,
            on_end: Some(Box::new(on_end)),
            held: None,
            merged: BytesMut::new(),
            after: None,
            yields: 0,
        }
    }

    fn finish(&mut self) {
        if let Some(f) = self.on_end.take() {
            f();
        }
    }

    fn held_len(&self) -> usize {
        self.held.as_ref().map_or(0, Bytes::len) + self.merged.len()
    }

    fn hold(&mut self, data: Bytes) {
        if self.held.is_none() && self.merged.is_empty() {
            self.held = Some(data);
            return;
        }
        if let Some(first) = self.held.take() {
            self.merged.reserve(first.len() + data.len());
            self.merged.extend_from_slice(&first);
        }
        self.merged.extend_from_slice(&data);
    }

    fn take_held(&mut self) -> Option<Bytes> {
        match self.held.take() {
            Some(one) => Some(one),
            None if !self.merged.is_empty() => Some(self.merged.split().freeze()),
            None => None,
        }
    }

    /// Hand on what is held (if anything), with `after` to follow it.
    fn release(&mut self, after: After) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.take_held() {
            Some(data) => {
                self.after = Some(after);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            None => Poll::Ready(after.into_poll()),
        }
    }
}

impl After {
    fn into_poll(self) -> Option<Result<Frame<Bytes>, BodyError>> {
        match self {
            After::End => None,
            After::Error(e) => Some(Err(e)),
            After::Frame(f) => Some(Ok(f)),
        }
    }
}

impl<B> HttpBody for Relay<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(after) = this.after.take() {
            return Poll::Ready(after.into_poll());
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.hold(data);
                        this.yields = 0;
                        if this.held_len() >= COALESCE_BYTES {
                            return Poll::Ready(this.take_held().map(|d| Ok(Frame::data(d))));
                        }
                    }
                    Err(trailers) => return this.release(After::Frame(trailers)),
                },
                Poll::Ready(Some(Err(e))) => {
                    this.finish();
                    return this.release(After::Error(e.into()));
                }
                Poll::Ready(None) => {
                    this.finish();
                    return this.release(After::End);
                }
                Poll::Pending if this.held_len() == 0 => return Poll::Pending,
                // Something is held and the upstream side has nothing ready. That
                // poll told hyper's connection task to read on; give it a few turns
                // before handing on what is held.
                Poll::Pending if this.yields < YIELDS => {
                    this.yields += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => {
                    this.yields = 0;
                    return Poll::Ready(this.take_held().map(|d| Ok(Frame::data(d))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.after {
            Some(After::End) => true,
            Some(_) => false,
            None => self.held_len() == 0 && self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let held = self.held_len() as u64;
        if held > 0 {
            hint.set_lower(hint.lower() + held);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + held);
            }
        }
        hint
    }
}

impl<B> Drop for Relay<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::StreamBody;

    type Item = Result<Frame<Bytes>, BodyError>;

    fn frames(parts: &[&str]) -> Vec<Item> {
        parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::copy_from_slice(p.as_bytes()))))
            .collect()
    }

    /// The data frames the agent's connection would write, in order, and the end.
    async fn written<B>(body: B) -> (Vec<Bytes>, Option<String>)
    where
        B: HttpBody<Data = Bytes, Error = BodyError> + Unpin,
    {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => out.push(f.into_data().unwrap_or_default()),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn frames_already_waiting_are_written_together_and_on_end_runs_once() {
        let ended = Arc::new(AtomicUsize::new(0));
        let counter = ended.clone();
        let events: Vec<String> = (0..100).map(|i| format!("data: {i}\n\n")).collect();
        let parts: Vec<&str> = events.iter().map(String::as_str).collect();
        let inner = StreamBody::new(futures_util::stream::iter(frames(&parts)));
        let relay = Relay::new(inner, move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let (out, error) = written(relay).await;
        assert_eq!(error, None);
        assert_eq!(out.len(), 1, "100 ready frames, one write");
        assert_eq!(out[0], Bytes::from(events.concat()));
        assert_eq!(ended.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_frame_is_not_held_waiting_for_the_next() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Item>(4);
        let inner = StreamBody::new(tokio_stream_from(rx));
        let mut relay = Relay::new(inner, || {});
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("send");
        // Nothing else comes: the first frame must still arrive.
        let first = tokio::time::timeout(std::time::Duration::from_secs(1), relay.frame())
            .await
            .expect("not held back")
            .expect("a frame")
            .expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"first")));
        tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .await
            .expect("send");
        drop(tx);
        let (rest, error) = written(relay).await;
        assert_eq!((rest, error), (vec![Bytes::from_static(b"second")], None));
    }

    #[tokio::test]
    async fn data_before_an_error_is_delivered_then_the_error() {
        let mut items = frames(&["data: 1\n\n", "data: 2\n\n"]);
        items.push(Err("upstream connection reset".into()));
        let inner = StreamBody::new(futures_util::stream::iter(items));
        let (out, error) = written(Relay::new(inner, || {})).await;
        assert_eq!(out, vec![Bytes::from_static(b"data: 1\n\ndata: 2\n\n")]);
        assert_eq!(error.as_deref(), Some("upstream connection reset"));
    }

    #[tokio::test]
    async fn merges_stop_at_the_coalescing_limit_and_big_frames_are_not_copied() {
        let big = Bytes::from(vec![b'x'; COALESCE_BYTES * 2]);
        let small = "y".repeat(COALESCE_BYTES / 4);
        let mut items: Vec<Item> = vec![Ok(Frame::data(big.clone()))];
        items.extend(frames(&[&small, &small, &small, &small, &small]));
        let inner = StreamBody::new(futures_util::stream::iter(items));
        let (out, _) = written(Relay::new(inner, || {})).await;
        assert_eq!(out[0].as_ptr(), big.as_ptr(), "passed through, not copied");
        let lens: Vec<usize> = out[1..].iter().map(Bytes::len).collect();
        assert_eq!(lens, vec![COALESCE_BYTES, COALESCE_BYTES / 4]);
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Item>,
    ) -> impl futures_util::Stream<Item = Item> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}

/// A response body fed by a channel; it ends when the sender is dropped.
#[derive(Debug)]
pub struct Channel {
    pub rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl HttpBody for Channel {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
