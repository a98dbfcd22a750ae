//! Accepting connections and draining them on shutdown.
//!
//! One accept loop per port, HTTP/1.1 and HTTP/2 (prior knowledge) on the same socket
//! via hyper-util's auto builder. A new connection must show its protocol, and an
//! HTTP/1.1 request its headers, within `--header-read-timeout` (slow-loris and
//! idle-connection protection). When shutdown is signalled the
//! loop stops accepting, asks every connection to finish gracefully (in-flight
//! requests and open streams complete, idle keep-alive connections close) and waits
//! up to the drain deadline; whatever is still open then is dropped.
//!
//! With a TLS configuration (server-side mode), the handshake follows within the
//! same deadline, and the peer's verified certificate chain travels with each request
//! in [`Peer`]; the configuration decides which clients get that far.
//!
//! This module knows nothing of MCP: it serves whatever service it is given.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::body::Body;

/// Who sent a request: the address, and on a TLS listener what the handshake verified.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: Option<std::sync::Arc<PeerTls>>,
}

/// A TLS peer: its verified certificate chain (leaf first), and the identity the
/// service read from it, worked out once per connection rather than per request.
#[derive(Debug)]
pub struct PeerTls {
    pub certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub identity: std::sync::OnceLock<Option<crate::identity::Identity>>,
}

/// Serve `handler` (given each request and its [`Peer`]) on `listener` until
/// `shutdown` turns true, then drain for at most `drain`. A connection's first bytes
/// (and TLS handshake, with `tls`), and the headers of each HTTP/1.1 request, must
/// arrive within `header_read`.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    header_read: Duration,
) where
    H: Fn(Request<Incoming>, Peer) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read);
    let builder = std::sync::Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut shutdown) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (builder, handler) = (builder.clone(), handler.clone());
                let acceptor = acceptor.clone();
                // Watched from accept on, so a drain also waits for (and closes)
                // connections still showing their protocol.
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    match acceptor {
                        None => {
                            if !protocol_shown(&stream, header_read).await {
                                tracing::debug!(listener = name, %peer, "closed: no request started in time");
                                return;
                            }
                            let who = Peer {
                                addr: peer,
                                tls: None,
                            };
                            serve_connection(&builder, stream, who, handler, watcher, name).await;
                        }
                        // Boxed: a plain connection's task need not have room for a
                        // TLS session (tasks are sized for their largest state).
                        Some(acceptor) => {
                            let tls = (acceptor, header_read);
                            Box::pin(serve_tls(
                                &builder, stream, peer, tls, handler, watcher, name,
                            ))
                            .await;
                        }
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    tracing::info!(listener = name, "stopped accepting; draining connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = name, "all connections drained"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(listener = name, deadline = ?drain, "drain deadline reached; closing remaining connections");
        }
    }
}

/// The TLS handshake (within `header_read`), then HTTP on the connection as the peer
/// its certificate names.
async fn serve_tls<H, F>(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    (acceptor, header_read): (tokio_rustls::TlsAcceptor, Duration),
    handler: H,
    watcher: hyper_util::server::graceful::Watcher,
    name: &'static str,
) where
    H: Fn(Request<Incoming>, Peer) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let stream = match tokio::time::timeout(header_read, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::info!(listener = name, %peer, error = %e, "TLS handshake refused");
            crate::telemetry::mesh_refused("handshake");
            return;
        }
        Err(_) => {
            tracing::debug!(listener = name, %peer, "closed: no TLS handshake in time");
            crate::telemetry::mesh_refused("timeout");
            return;
        }
    };
    let tls = stream.get_ref().1.peer_certificates().map(|c| {
        std::sync::Arc::new(PeerTls {
            certificates: c.iter().map(|d| d.clone().into_owned()).collect(),
            identity: std::sync::OnceLock::new(),
        })
    });
    let who = Peer { addr: peer, tls };
    serve_connection(builder, stream, who, handler, watcher, name).await;
}

/// Serve HTTP on one accepted connection (plain or TLS) as `who`, until it ends or the
/// drain closes it.
async fn serve_connection<S, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    io: S,
    who: Peer,
    handler: H,
    watcher: hyper_util::server::graceful::Watcher,
    name: &'static str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Peer) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let peer = who.addr;
    let service = service_fn(move |req| handler(req, who.clone()));
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
    }
}

/// Wait, at most `limit`, until the client has sent enough to tell HTTP/1.1 from the
/// HTTP/2 preface; false if it closed or stalled. hyper-util's protocol detection has
/// no timer and hyper's header timer starts after it, so without this a client that
/// connects and sends nothing (or half a preface) would hold a descriptor forever.
async fn protocol_shown(stream: &TcpStream, limit: Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let shown = async {
        let mut buf = [0u8; PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n == PREFACE.len() || buf[..n] != PREFACE[..n] => return true,
                // Part of the preface: peek returns at once while those bytes wait
                // unread, so poll for the rest.
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(limit, shown).await.unwrap_or(false)
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Pending connections the kernel queues before `accept` (std's default is 128, which
/// an agent opening a few hundred connections at once overflows into retransmits).
const BACKLOG: u32 = 1024;

/// Bind `addr`, naming the flag in the error. `[::]` binds both stacks (Linux's
/// default for an unspecified IPv6 address); where the pod has no IPv6 at all, it
/// falls back to `0.0.0.0`, so one injected flag serves IPv4, IPv6 and dual-stack
/// clusters.
pub async fn bind(flag: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    match bind_exactly(addr) {
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::warn!(%addr, error = %e, fallback = %v4, "no IPv6 here; binding IPv4 only");
            bind_exactly(v4)
        }
        other => other,
    }
    .map_err(|e| format!("{flag} {addr}: cannot bind: {e}"))
}

fn bind_exactly(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    socket.and_then(|s| {
        s.set_reuseaddr(true)?;
        s.bind(addr)?;
        s.listen(BACKLOG)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_unspecified_ipv6_address_serves_ipv4_clients_too() {
        // `[::]` binds both stacks, or IPv4 alone where there is no IPv6: either way an
        // IPv4 client (a kubelet probe on an IPv4 cluster) gets through.
        let listener = bind("--admin-listen", "[::]:0".parse().expect("addr"))
            .await
            .expect("bound");
        let port = listener.local_addr().expect("addr").port();
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("IPv4 client connects");
        accept.await.expect("task").expect("accepted");
    }
}
