//! The control plane's spans, when tracing is on (`--otlp-endpoint`; set up by
//! [`toolmesh_proto::otel`]): one SERVER span per apply through the admin API, and one
//! span per snapshot push, from the push to the sidecar's ACK or NACK, linked to the
//! apply whose change it carries. From a trace an on-call engineer sees which
//! sidecars took a change, how long each took, and which refused it and why.
//!
//! Applies and pushes meet through the store's change counter: an apply records its
//! span under the counter value it produced; a stream that renders after that value
//! links its push to it. The last [`RECENT`] applies are remembered, so a push that
//! follows several quick applies links to the one it saw. Changes that come from a
//! Kubernetes watch have no apply span; their pushes are not linked.
//!
//! Not here: exporting and sampling ([`toolmesh_proto::otel`]).

use std::collections::VecDeque;
use std::sync::Mutex;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Link, Span as _, SpanContext, SpanKind, Status, Tracer as _};
use opentelemetry_sdk::trace::{SdkTracer, Span};

/// How many applies' spans are remembered for pushes to link to.
pub const RECENT: usize = 16;

/// The tracer and the spans of recent applies.
#[derive(Debug)]
pub struct Traces {
    tracer: SdkTracer,
    changes: Mutex<Changes>,
}

#[derive(Debug, Default)]
struct Changes {
    /// An apply under way: a change seen before it is recorded is its.
    pending: Option<SpanContext>,
    recent: VecDeque<(u64, SpanContext)>,
}

impl Traces {
    pub fn new(tracer: SdkTracer) -> Traces {
        Traces {
            tracer,
            changes: Mutex::new(Changes::default()),
        }
    }

    /// An apply of `resources` resources starts.
    pub fn apply_started(&self, resources: usize) -> Span {
        let span = self
            .tracer
            .span_builder("toolmesh.apply")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.method", "Apply"),
                KeyValue::new("toolmesh.resources", resources as i64),
            ])
            .start(&self.tracer);
        if let Ok(mut changes) = self.changes.lock() {
            changes.pending = Some(span.span_context().clone());
        }
        span
    }

    /// The apply ended: it produced change `generation`, or failed with `error`.
    pub fn apply_ended(&self, mut span: Span, generation: u64, error: Option<String>) {
        if let Ok(mut changes) = self.changes.lock() {
            let cx = changes.pending.take();
            if let (Some(cx), None) = (cx, &error) {
                if changes.recent.len() == RECENT {
                    changes.recent.pop_front();
                }
                changes.recent.push_back((generation, cx));
            }
        }
        span.set_attribute(KeyValue::new("toolmesh.generation", generation as i64));
        if let Some(error) = error {
            span.set_status(Status::error(error));
        }
        span.end();
    }

    /// The span of the apply that produced change `generation` (or of the apply under
    /// way, whose change a stream may see before it is recorded).
    fn cause(&self, generation: u64) -> Option<SpanContext> {
        let changes = self.changes.lock().ok()?;
        changes
            .recent
            .iter()
            .rev()
            .find(|(g, _)| *g == generation)
            .map(|(_, cx)| cx.clone())
            .or_else(|| changes.pending.clone())
    }

    /// A push of `version` to `identity`'s sidecar on `node`, after change
    /// `generation`: its span, linked to that change's apply, lasts until the answer.
    pub fn push(&self, generation: u64, identity: &str, node: &str, version: &str) -> Span {
        let links = self
            .cause(generation)
            .map(|cx| vec![Link::with_context(cx)])
            .unwrap_or_default();
        self.tracer
            .span_builder("toolmesh.push")
            .with_kind(SpanKind::Producer)
            .with_links(links)
            .with_attributes([
                KeyValue::new("toolmesh.identity", identity.to_owned()),
                KeyValue::new("toolmesh.node", node.to_owned()),
                KeyValue::new("toolmesh.version", version.to_owned()),
                KeyValue::new("toolmesh.generation", generation as i64),
            ])
            .start(&self.tracer)
    }
}

/// How a push ended: `None` for an ACK, else why not (a NACK's reason, a newer push,
/// the stream's end).
pub fn answered(mut span: Span, refused: Option<String>) {
    match refused {
        None => span.set_attribute(KeyValue::new("toolmesh.answer", "ack")),
        Some(why) => {
            span.set_attribute(KeyValue::new("toolmesh.answer", "none"));
            span.set_status(Status::error(why));
        }
    }
    span.end();
}

/// A NACK: the sidecar refused the push, for `reason`.
pub fn nacked(mut span: Span, reason: &str) {
    span.set_attribute(KeyValue::new("toolmesh.answer", "nack"));
    span.set_status(Status::error(format!("refused: {reason}")));
    span.end();
}
