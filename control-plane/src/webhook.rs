//! The mutating admission webhook's HTTPS listener: `POST /inject` with an
//! `AdmissionReview` (v1) body, answered by [`crate::inject::review`].
//!
//! TLS with rustls (ring), HTTP/1.1 (what the API server speaks to webhooks). Bodies
//! are bounded ([`MAX_BODY`]); anything that is not an `AdmissionReview` request gets a
//! 400 with the reason, other paths 404, other methods 405. The certificate comes from
//! [`crate::certs::Reloading`]: files renewed in place (cert-manager) are served
//! without a restart.
//!
//! Not here: what is injected (see [`crate::inject`]) or which pods are sent (the
//! `MutatingWebhookConfiguration`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::inject::Settings;

/// Largest accepted review (the API server caps objects near 3 MiB).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Flags of the webhook listener (part of `serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Serve the sidecar-injection webhook (HTTPS, `POST /inject`) on this address,
    /// e.g. 0.0.0.0:16017. Off when unset. Requires --webhook-cert and --webhook-key.
    #[arg(long, env = "TOOLMESH_CP_WEBHOOK_LISTEN", value_name = "ADDR")]
    pub webhook_listen: Option<SocketAddr>,
    /// PEM certificate chain the webhook serves (its name must match the Service the
    /// `MutatingWebhookConfiguration` calls).
    #[arg(long, env = "TOOLMESH_CP_WEBHOOK_CERT", value_name = "FILE")]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of --webhook-cert.
    #[arg(long, env = "TOOLMESH_CP_WEBHOOK_KEY", value_name = "FILE")]
    pub webhook_key: Option<PathBuf>,
    #[command(flatten)]
    pub inject: Settings,
}

/// Accept TLS connections on `listener` and answer reviews until `stop` resolves;
/// then stop accepting and wait for the reviews in flight (the caller bounds it).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: Arc<Settings>,
    stop: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut accepting = crate::conn::Acceptor::new("webhook");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            stream = accepting.accept(&listener) => stream,
            () = &mut stop => break,
        };
        let watcher = graceful.watcher();
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (acceptor, settings) = (acceptor.clone(), settings.clone());
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream));
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = service_fn(move |req| {
                let settings = settings.clone();
                async move { Ok::<_, Infallible>(handle(req, &settings).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn).await;
        });
    }
    drop(listener);
    // Reviews in flight finish; idle keep-alive connections are closed.
    graceful.shutdown().await;
}

fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

async fn handle(req: Request<Incoming>, settings: &Settings) -> Response<Full<Bytes>> {
    if req.uri().path() != "/inject" {
        return answer(
            StatusCode::NOT_FOUND,
            "text/plain",
            "the webhook is POST /inject\n",
        );
    }
    if req.method() != Method::POST {
        return answer(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "POST only\n");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return answer(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("request body: {e}\n"),
            );
        }
    };
    match crate::inject::review(&body, settings) {
        Ok(review) => answer(StatusCode::OK, "application/json", review),
        Err(e) => {
            tracing::warn!(error = %e, "webhook request refused");
            answer(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"))
        }
    }
}
