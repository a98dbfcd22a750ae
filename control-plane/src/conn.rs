//! Connection hygiene on every control-plane port: what a TCP connection must do to
//! stay, and what the accept loops do when the process runs out of descriptors.
//!
//! - [`Acceptor`]: an accept loop's error handling. `EMFILE` and the like do not spin
//!   the loop: it backs off (10 ms doubling to 1 s), logs at most once a second and
//!   counts `toolmesh_cp_accept_errors_total{listener}`.
//! - [`incoming`]: the gRPC port's connections, vetted before tonic sees them. A new
//!   connection must send its first bytes, and finish its TLS handshake, within
//!   `--first-bytes-timeout` each, and at most `--max-pending-connections` may be at
//!   that stage at once (more are closed at once): idle or slow connections cannot
//!   pile up until descriptors run out. A connection that then sends nothing for
//!   `--idle-timeout` is closed ([`IdleTimeout`]); sidecars send an HTTP/2 keepalive
//!   every 30 s, so only dead or idle peers are cut. TLS is done here (not by tonic) so
//!   that the handshake has a deadline and the certificate can be reloaded
//!   ([`crate::certs`]).
//!
//! This module knows nothing of gRPC or of who a peer is.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The limits [`incoming`] applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub first_bytes: Duration,
    pub idle: Duration,
    pub max_pending: usize,
}

/// The error side of an accept loop.
#[derive(Debug)]
pub struct Acceptor {
    name: &'static str,
    backoff: Duration,
    last_log: Option<Instant>,
}

const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Acceptor {
    pub fn new(name: &'static str) -> Acceptor {
        Acceptor {
            name,
            backoff: BACKOFF_START,
            last_log: None,
        }
    }

    /// The next connection; accept errors are waited out, never spun on.
    pub async fn accept(&mut self, listener: &TcpListener) -> TcpStream {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    self.backoff = BACKOFF_START;
                    return stream;
                }
                Err(e) => {
                    metrics::counter!("toolmesh_cp_accept_errors_total", "listener" => self.name)
                        .increment(1);
                    let now = Instant::now();
                    if self
                        .last_log
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                    {
                        self.last_log = Some(now);
                        tracing::warn!(listener = self.name, error = %e, retry_in = ?self.backoff, "accept failed (out of file descriptors?); backing off");
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("toolmesh_cp_connections_closed_total", "reason" => reason).increment(1);
}

/// The gRPC port's vetted connections (TLS when `tls` is set, its ALPN `h2`), for
/// tonic's `serve_with_incoming`. The accept task ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let handshaker = tls.map(tokio_rustls::TlsAcceptor::from);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let pending = Arc::new(AtomicUsize::new(0));
        let mut acceptor = Acceptor::new("grpc");
        loop {
            let stream = tokio::select! {
                stream = acceptor.accept(&listener) => stream,
                () = tx.closed() => return,
            };
            if pending.load(Ordering::Relaxed) >= limits.max_pending {
                refused("pending");
                continue;
            }
            let _ = stream.set_nodelay(true);
            pending.fetch_add(1, Ordering::Relaxed);
            let (tx, pending, handshaker) = (tx.clone(), pending.clone(), handshaker.clone());
            tokio::spawn(async move {
                let conn = vet(stream, limits, handshaker.as_ref()).await;
                pending.fetch_sub(1, Ordering::Relaxed);
                if let Some(conn) = conn {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A connection that showed its first bytes, and finished its TLS handshake, in time.
async fn vet(
    stream: TcpStream,
    limits: Limits,
    acceptor: Option<&tokio_rustls::TlsAcceptor>,
) -> Option<Conn> {
    if !first_bytes(&stream, limits.first_bytes).await {
        refused("first_bytes");
        return None;
    }
    let stream = IdleTimeout::new(stream, limits.idle);
    let Some(acceptor) = acceptor else {
        return Some(Conn::Plain(stream));
    };
    match tokio::time::timeout(limits.first_bytes, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(Conn::Tls(Box::new(tls))),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            refused("handshake");
            None
        }
        Err(_) => {
            refused("handshake");
            None
        }
    }
}

/// A vetted gRPC connection: plaintext (`--dev`) or TLS.
#[derive(Debug)]
pub enum Conn {
    Plain(IdleTimeout),
    Tls(Box<tokio_rustls::server::TlsStream<IdleTimeout>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// Whether the peer sent something within `limit` (and did not just close).
async fn first_bytes(stream: &TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, stream.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// A TCP stream that fails its reads once the peer has sent nothing for `idle`.
#[derive(Debug)]
pub struct IdleTimeout {
    inner: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleTimeout {
    pub fn new(inner: TcpStream, idle: Duration) -> IdleTimeout {
        IdleTimeout {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    refused("idle");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle past --idle-timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for IdleTimeout {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn silent_connections_are_closed_and_talkers_pass() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut vetted = incoming(
            listener,
            Limits {
                first_bytes: Duration::from_millis(200),
                idle: Duration::from_millis(300),
                max_pending: 2,
            },
            None,
        );
        // Two silent connections fill the pending slots; a third is closed at once.
        let silent: Vec<TcpStream> =
            futures_util::future::join_all((0..2).map(|_| TcpStream::connect(addr)))
                .await
                .into_iter()
                .map(|c| c.expect("connect"))
                .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed at once: {read:?}"
        );

        // After the first-bytes timeout the silent ones are gone and a talker passes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut talker = TcpStream::connect(addr).await.expect("connect");
        talker.write_all(b"hello").await.expect("write");
        let mut conn = tokio::time::timeout(Duration::from_secs(1), vetted.next())
            .await
            .expect("in time")
            .expect("a connection")
            .expect("ok");
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
        // Then it goes quiet: its reads fail after the idle timeout.
        let idle = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut got)).await;
        assert!(
            matches!(&idle, Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{idle:?}"
        );
        drop(silent);
    }

    #[tokio::test]
    async fn a_stalled_tls_handshake_is_cut() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let source = crate::certs::Source::Pem {
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
        };
        let tls = crate::certs::Reloading::new(source, "test")
            .expect("loads")
            .server_config(&[b"h2"])
            .expect("config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut vetted = incoming(
            listener,
            Limits {
                first_bytes: Duration::from_millis(200),
                idle: Duration::from_secs(5),
                max_pending: 4,
            },
            Some(tls),
        );
        // The first byte of a ClientHello, then nothing.
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(&[0x16]).await.expect("write");
        let mut buf = [0u8; 16];
        let cut = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf)).await;
        assert!(matches!(cut, Ok(Ok(0)) | Ok(Err(_))), "closed: {cut:?}");
        // Nothing reached tonic.
        let nothing = tokio::time::timeout(Duration::from_millis(100), vetted.next()).await;
        assert!(nothing.is_err(), "no connection was handed on");
    }
}
