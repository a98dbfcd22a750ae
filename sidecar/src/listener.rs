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

/// Serve `handler` (given each request and its peer's address) on `listener` until
/// `shutdown` turns true, then drain for at most
/// `drain`. A connection's first bytes, and the headers of each HTTP/1.1 request, must
/// arrive within `header_read`.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    header_read: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
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
                // Watched from accept on, so a drain also waits for (and closes)
                // connections still showing their protocol.
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    if !protocol_shown(&stream, header_read).await {
                        tracing::debug!(listener = name, %peer, "closed: no request started in time");
                        return;
                    }
                    let service = service_fn(move |req| handler(req, peer));
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
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

/// Bind `addr`, naming the flag in the error.
pub async fn bind(flag: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    socket
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(BACKLOG)
        })
        .map_err(|e| format!("{flag} {addr}: cannot bind: {e}"))
}
