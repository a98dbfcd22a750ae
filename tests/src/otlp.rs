//! An OTLP/gRPC trace receiver on `127.0.0.1:0`: what a collector would get from the
//! binaries, kept in memory for assertions; and [`Sink`], an endpoint that answers
//! exports without decoding them, for the benchmark. It speaks
//! the real protocol (the `opentelemetry-proto` service definitions over tonic), so a
//! span reaching it went through the binaries' real exporter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// One received span and the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

impl Received {
    /// An attribute's value as text (strings as they are, numbers and booleans printed).
    pub fn attr(&self, key: &str) -> Option<String> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        Some(match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::BoolValue(b) => b.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    pub fn is_server(&self) -> bool {
        self.span.kind == SpanKind::Server as i32
    }

    pub fn is_client(&self) -> bool {
        self.span.kind == SpanKind::Client as i32
    }

    /// The span's status message, when it says it failed.
    pub fn error(&self) -> Option<String> {
        let status = self.span.status.as_ref()?;
        (status.code == 2).then(|| status.message.clone())
    }

    pub fn duration(&self) -> Duration {
        Duration::from_nanos(
            self.span
                .end_time_unix_nano
                .saturating_sub(self.span.start_time_unix_nano),
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Default)]
struct Store {
    spans: Mutex<Vec<Received>>,
}

/// The service: a handle on the shared store.
#[derive(Debug, Clone)]
struct Receiver(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    received.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        if let Ok(mut spans) = self.0.spans.lock() {
            spans.extend(received);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver; stops when dropped.
#[derive(Debug)]
pub struct Collector {
    addr: std::net::SocketAddr,
    store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start() -> Result<Collector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the OTLP receiver")?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::default());
        let service = TraceServiceServer::new(Receiver(store.clone()));
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Collector { addr, store, task })
    }

    /// The endpoint to give `--otlp-endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.store
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Wait up to `secs` for the spans `pick` selects to be non-empty; returns them.
    pub async fn wait_for(&self, secs: u64, pick: impl Fn(&Received) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let found: Vec<Received> = self.spans().into_iter().filter(|s| pick(s)).collect();
            if !found.is_empty() || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OTLP/gRPC endpoint that reads every export and answers OK without decoding it:
/// a collector that costs the machine as little as one can, so a benchmark measures
/// the exporter, not the receiver. Counts exports and bytes.
#[derive(Debug)]
pub struct Sink {
    addr: std::net::SocketAddr,
    exports: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub async fn start() -> Result<Sink> {
        use http_body_util::BodyExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the OTLP sink")?;
        let addr = listener.local_addr()?;
        let exports = Arc::new(AtomicU64::new(0));
        let counted = exports.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let counted = counted.clone();
                            async move {
                                // Read (and drop) the whole export, as a collector would.
                                let _ = req.into_body().collect().await;
                                counted.fetch_add(1, Ordering::Relaxed);
                                let mut trailers = http::HeaderMap::new();
                                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                                // An empty ExportTraceServiceResponse: a 5-byte gRPC frame.
                                let frames = vec![
                                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                        bytes::Bytes::from_static(&[0, 0, 0, 0, 0]),
                                    )),
                                    Ok(hyper::body::Frame::trailers(trailers)),
                                ];
                                let body =
                                    http_body_util::StreamBody::new(futures::stream::iter(frames));
                                let mut resp = http::Response::new(body);
                                resp.headers_mut().insert(
                                    http::header::CONTENT_TYPE,
                                    http::HeaderValue::from_static("application/grpc"),
                                );
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Ok(Sink {
            addr,
            exports,
            task,
        })
    }

    /// The endpoint to give `--otlp-endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Exports (batches of spans) answered so far.
    pub fn exports(&self) -> u64 {
        self.exports.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
