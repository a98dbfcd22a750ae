//! OpenTelemetry traces, set up the same way by both binaries: whether tracing is on,
//! the OTLP/gRPC exporter, parent-based ratio sampling, the bounded export queue, and
//! W3C trace context read from and written to text.
//!
//! Tracing is off unless an OTLP endpoint is named: the binary's flag
//! (`--otlp-endpoint`), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
//! keep it off whatever is named. The rest of the standard variables apply as the
//! OpenTelemetry SDK reads them (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_EXPORTER_OTLP[_TRACES]_HEADERS`/`_TIMEOUT`),
//! plus `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` and
//! `OTEL_BSP_SCHEDULE_DELAY` for the queue below.
//!
//! Ended spans wait in one bounded queue; a span that finds it full is dropped and
//! counted (`<prefix>_trace_spans_total{result="dropped"}`), so a slow or absent
//! collector never blocks a request nor grows memory. One task drains the queue in
//! batches.
//!
//! Not here: which spans a binary makes and what they say.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use tokio::sync::{Notify, mpsc};

/// What a binary says about its tracing.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `--otlp-endpoint` flag, if given.
    pub endpoint: Option<String>,
    /// The `--trace-sampling` flag (0..=1), if given: parent-based ratio sampling.
    /// Otherwise `OTEL_TRACES_SAMPLER`, and parent-based always-on without it.
    pub sampling: Option<f64>,
    /// `service.name`, unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: &'static str,
    /// The counter of spans by result (`exported`, `dropped`, `failed`).
    pub spans_metric: &'static str,
}

/// Describe the spans counter and export it at zero for every result, tracing on or
/// off, so alerts can be written against it.
pub fn register(spans_metric: &'static str) {
    metrics::describe_counter!(
        spans_metric,
        "Trace spans by what became of them: exported to the OTLP endpoint, dropped because the export queue was full, or failed (the export was refused or timed out)"
    );
    for result in ["exported", "dropped", "failed"] {
        metrics::counter!(spans_metric, "result" => result).absolute(0);
    }
}

/// Tracing, on: the tracer spans are made with, and the export task.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    stop: Arc<Notify>,
    worker: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match env(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?}: not a number")),
    }
}

/// A sampling ratio as the flags take it: a number from 0 to 1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?}: give a number from 0 to 1 (0.1 records one trace in ten)"
        )),
    }
}

/// An OTLP/gRPC endpoint as the flags take it: an `http://` or `https://` URL.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let url = s.trim();
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if scheme_ok && url.parse::<http::Uri>().is_ok() {
        Ok(url.to_owned())
    } else {
        Err(format!(
            "OTLP endpoint {s:?}: must be an http:// or https:// URL (e.g. http://otel-collector:4317)"
        ))
    }
}

/// The endpoint tracing exports to, or `None` when tracing is off.
fn endpoint(flag: Option<&str>) -> Result<Option<String>, String> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match env("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={other:?}: only otlp (or none) is supported"
            ));
        }
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = env(name)
            && p.trim() != "grpc"
        {
            return Err(format!(
                "{name}={p:?}: only grpc is supported (OTLP over gRPC, port 4317 by convention)"
            ));
        }
    }
    let named = flag
        .map(str::to_owned)
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let Some(named) = named else {
        return Ok(None);
    };
    parse_endpoint(&named).map(Some)
}

impl Tracing {
    /// Start tracing if it is on; `Ok(None)` when it is off. Must run inside the Tokio
    /// runtime (the export task is spawned on it).
    pub fn start(settings: &Settings) -> Result<Option<Tracing>, String> {
        let Some(endpoint) = endpoint(settings.endpoint.as_deref())? else {
            return Ok(None);
        };
        let queue = env_number("OTEL_BSP_MAX_QUEUE_SIZE", 2048usize)?.max(1);
        let batch = env_number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512usize)?.clamp(1, queue);
        let delay = Duration::from_millis(env_number("OTEL_BSP_SCHEDULE_DELAY", 5000u64)?);
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone());
        if endpoint.starts_with("https://") {
            builder = builder.with_tls_config(
                opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                    .with_native_roots(),
            );
        }
        let mut exporter = builder
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if env("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(settings.service_name);
        }
        let resource = resource.build();
        // The export task owns the exporter: it is told the resource here, as a batch
        // processor would tell it.
        exporter.set_resource(&resource);

        let (tx, rx) = mpsc::channel(queue);
        let stop = Arc::new(Notify::new());
        let worker = tokio::spawn(export(
            exporter,
            rx,
            batch,
            delay,
            stop.clone(),
            settings.spans_metric,
        ));
        let mut provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(Queue {
                tx,
                spans_metric: settings.spans_metric,
            });
        if let Some(ratio) = settings.sampling {
            provider = provider.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(ratio),
            )));
        }
        let provider = provider.build();
        let tracer = provider.tracer(settings.service_name);
        tracing::info!(%endpoint, "exporting traces");
        Ok(Some(Tracing {
            provider,
            tracer,
            stop,
            worker: std::sync::Mutex::new(Some(worker)),
        }))
    }

    /// What spans are made with (cheap to clone).
    pub fn tracer(&self) -> &SdkTracer {
        &self.tracer
    }

    /// Export what is queued (waiting at most `timeout`), then stop. Spans ended after
    /// this are dropped.
    pub async fn shutdown(&self, timeout: Duration) {
        let _ = self.provider.shutdown();
        self.stop.notify_one();
        let worker = self.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(worker) = worker
            && tokio::time::timeout(timeout, worker).await.is_err()
        {
            tracing::warn!("trace export did not finish within {timeout:?}; queued spans dropped");
        }
    }
}

/// The span processor: ended spans into the bounded queue, or counted as dropped.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
    spans_metric: &'static str,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            metrics::counter!(self.spans_metric, "result" => "dropped").increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: wait for a span, then gather more until the batch is full or
/// `delay` has passed, export, repeat; on stop, export what is queued and end.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    batch: usize,
    delay: Duration,
    stop: Arc<Notify>,
    spans_metric: &'static str,
) {
    let mut spans = Vec::with_capacity(batch);
    let mut stopping = false;
    loop {
        if !stopping {
            tokio::select! {
                n = rx.recv_many(&mut spans, batch) => stopping = n == 0,
                _ = stop.notified() => stopping = true,
            }
            let deadline = tokio::time::sleep(delay);
            tokio::pin!(deadline);
            while !stopping && spans.len() < batch {
                let room = batch - spans.len();
                tokio::select! {
                    n = rx.recv_many(&mut spans, room) => stopping = n == 0,
                    _ = &mut deadline => break,
                    _ = stop.notified() => stopping = true,
                }
            }
        }
        while spans.len() < batch {
            match rx.try_recv() {
                Ok(span) => spans.push(span),
                Err(_) => break,
            }
        }
        if spans.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        let n = spans.len() as u64;
        let sent = std::mem::replace(&mut spans, Vec::with_capacity(batch));
        let result = if exporter.export(sent).await.is_ok() {
            "exported"
        } else {
            "failed"
        };
        metrics::counter!(spans_metric, "result" => result).increment(n);
    }
}

/// W3C `traceparent` and `tracestate` as the agent sent them.
#[derive(Debug)]
struct Carrier<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The remote span context a `traceparent` (and `tracestate`) names, if valid.
pub fn parent(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let carrier = Carrier {
        traceparent,
        tracestate,
    };
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// `traceparent` and `tracestate` (if any) for `span` (`None` for an invalid one).
pub fn header(span: &SpanContext) -> Option<(String, Option<String>)> {
    if !span.is_valid() {
        return None;
    }
    let parent = format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    );
    let state = span.trace_state().header();
    Some((parent, (!state.is_empty()).then_some(state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_and_refuses_what_w3c_refuses() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = parent(text, Some("a=1,b=2")).expect("valid");
        assert!(span.is_remote() && span.is_sampled());
        let (traceparent, tracestate) = header(&span).expect("written");
        assert_eq!(traceparent, text);
        assert_eq!(tracestate.as_deref(), Some("a=1,b=2"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "not a traceparent",
        ] {
            assert!(parent(bad, None).is_none(), "{bad}");
        }
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_and_refuses_what_it_cannot_speak() {
        // The process environment of a test run names no OTLP endpoint.
        if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            assert_eq!(endpoint(None), Ok(None));
        }
        assert!(endpoint(Some("collector:4317")).is_err());
        assert_eq!(
            endpoint(Some("http://collector:4317")),
            Ok(Some("http://collector:4317".to_owned()))
        );
    }
}
