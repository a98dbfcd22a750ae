//! The trace context written into a request body (`trace::with_meta`, tracing on):
//! any body through it. What it rewrites is still JSON, carries exactly the sidecar's
//! `traceparent`/`tracestate` in `params._meta` (and no other key a case-insensitive
//! server would read as one), and means what the agent sent everywhere else: the same
//! message with the trace keys taken out of `_meta` on both sides (and the `params`/`_meta` it had to add removed). Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use toolmesh_sidecar::mcp::keys_fold_equal;
use toolmesh_sidecar::trace::with_meta;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const STATE: &str = "toolmesh=1";

/// `message` without the trace keys in `params._meta`, and without a `_meta` or
/// `params` left empty by that when `added` says the rewrite made them.
fn without_trace(mut message: Value, added: (bool, bool)) -> Value {
    if let Some(params) = message.get_mut("params").and_then(Value::as_object_mut) {
        if let Some(meta) = params.get_mut("_meta").and_then(Value::as_object_mut) {
            // Every key a case-insensitive server would read as a trace key.
            meta.retain(|k, _| {
                !keys_fold_equal(k, "traceparent") && !keys_fold_equal(k, "tracestate")
            });
        }
        if added.1 {
            params.remove("_meta");
        }
    }
    if added.0 {
        if let Some(m) = message.as_object_mut() {
            m.remove("params");
        }
    }
    message
}

#[derive(serde::Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    params: &'a serde_json::value::RawValue,
}

#[derive(serde::Deserialize)]
struct Params {
    #[serde(rename = "_meta")]
    meta: Trace,
}

#[derive(serde::Deserialize)]
struct Trace {
    traceparent: String,
    tracestate: String,
}

fuzz_target!(|data: &[u8]| {
    let Some(out) = with_meta(data, PARENT, Some(STATE)) else {
        return;
    };
    // JSON, whatever numbers it holds (serde_json's Value cannot hold 1e400; the
    // sidecar relays it as sent).
    let text = || String::from_utf8_lossy(&out).into_owned();
    serde_json::from_slice::<serde::de::IgnoredAny>(&out)
        .unwrap_or_else(|e| panic!("rewritten body is not JSON ({e}): {}", text()));
    let message: Message<'_> = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("no params in the rewritten body ({e}): {}", text()));
    let params: Params = serde_json::from_str(message.params.get())
        .unwrap_or_else(|e| panic!("no trace context in params._meta ({e}): {}", text()));
    assert_eq!(params.meta.traceparent, PARENT, "{}", text());
    assert_eq!(params.meta.tracestate, STATE, "{}", text());
    // Where serde_json can hold every value, the rest means what was sent.
    let (Ok(sent), Ok(rewritten)) = (
        serde_json::from_slice::<Value>(data),
        serde_json::from_slice::<Value>(&out),
    ) else {
        return;
    };
    let had_params = sent.get("params").is_some();
    let had_meta = sent["params"].get("_meta").is_some();
    assert_eq!(
        without_trace(sent, (false, false)),
        without_trace(rewritten, (!had_params, !had_meta)),
        "the rewrite changed more than the trace context"
    );
});
