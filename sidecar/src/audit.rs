//! The audit stream: one JSON line per MCP request, written off the request path.
//!
//! The request path formats its line (into a per-thread scratch buffer) and appends it
//! to a shared batch under a short lock: it never waits for the disk. A writer thread
//! takes the whole batch at once and writes it (stdout by default, or `--audit-file`):
//! it sleeps until a line arrives, then lets lines gather for up to [`FLUSH_EVERY`]
//! (or until [`FLUSH_BYTES`] are waiting), so under load the request path wakes it a
//! few times a second rather than once per request. On graceful shutdown the writer
//! writes every line recorded and flushes before the process exits. If more than
//! [`MAX_PENDING`] bytes wait (the sink is stuck), further lines are dropped and
//! counted in `toolmesh_audit_dropped_total` rather than stalling agents or memory.
//!
//! Lines never contain secrets: credential values are not part of any field, and call
//! arguments appear only when the deciding rule sets `audit: {arguments: true}`.

use std::cell::RefCell;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;

use crate::telemetry;

/// Longest a line waits before the writer takes it.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting that wake the writer before [`FLUSH_EVERY`].
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Bytes that may wait for the writer; lines beyond are dropped and counted.
pub const MAX_PENDING: usize = 16 * 1024 * 1024;

/// What was decided about a request: the audit line's `decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A gated call an allow rule covered.
    Allowed,
    /// A gated call refused by a rule or by default.
    Denied,
    /// Allowed, but the rule's rate limit was used up.
    RateLimited,
    /// Not gated: protocol plumbing for an identity that may use the server.
    Plumbing,
    /// Refused before any decision (bad input, unknown server, not ready).
    Rejected,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::RateLimited => "rate_limited",
            Verdict::Plumbing => "plumbing",
            Verdict::Rejected => "rejected",
        }
    }
}

/// Scratch capacity a thread keeps between lines.
const SCRATCH_KEEP: usize = 64 * 1024;

/// One audit line.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub subject: &'a str,
    /// Gateway mode: the token's `sub`, client and issuer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<&'a str>,
    pub server: &'a str,
    /// HTTP method for GET/DELETE, otherwise the JSON-RPC method (or `(response)`,
    /// `(batch)`).
    pub method: &'a str,
    /// `tool`, `resource` or `prompt` for gated calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub decision: Verdict,
    pub rule: Option<&'a str>,
    pub status: u16,
    pub error_code: Option<i64>,
    pub latency_ms: f64,
    pub request_id: Option<&'a RawValue>,
    pub session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<&'a RawValue>,
    /// Tracing on: the request's trace id (the agent's, or a new trace's). Off: the
    /// trace id of the agent's `traceparent` header, when it sent a valid one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
    /// Tracing on: the id of the sidecar's SERVER span for this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<&'a str>,
    /// The server has pins and this definition (a list's drift line) or the called one
    /// does not match them: `drifted (<members>)` or `unpinned`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin: Option<&'a str>,
    /// A drift line: the live definition's digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_digest: Option<&'a str>,
}

/// The trace id of a W3C `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase,
/// neither id all zeros), or `None` for anything else: what goes in an audit line is
/// never free text from the network.
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(traceparent).ok()?;
    let mut parts = text.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    // Version 00 has exactly four parts; a later version may add some.
    let extra = parts.next().is_some();
    (hex(version, 2)
        && version != "ff"
        && !(version == "00" && extra)
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2))
    .then_some(trace)
}

/// The request path's handle: cheap to clone, never blocks on I/O.
#[derive(Debug, Clone)]
pub struct Audit {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    batch: Mutex<Batch>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Batch {
    bytes: Vec<u8>,
    finish: bool,
}

/// The writer thread's handle: [`Writer::finish`] writes everything and stops it.
#[derive(Debug)]
pub struct Writer {
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Batch> {
    // A panic while holding the lock leaves whole lines only (appends are single
    // `extend_from_slice` calls), so a poisoned batch is still good.
    shared.batch.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Audit {
    /// Start the writer thread: to `path` (appended), or stdout when `None`.
    pub fn start(path: Option<&Path>) -> Result<(Audit, Writer), String> {
        let sink: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("--audit-file {}: {e}", p.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("audit".into())
                .spawn(move || write_loop(&shared, sink))
                .map_err(|e| format!("audit writer: {e}"))?
        };
        Ok((
            Audit {
                shared: shared.clone(),
            },
            Writer { shared, thread },
        ))
    }

    /// Append one line to the batch; never blocks on I/O.
    pub fn record(&self, record: &Record<'_>) {
        SCRATCH.with_borrow_mut(|line| {
            line.clear();
            if serde_json::to_writer(&mut *line, record).is_err() {
                return;
            }
            line.push(b'\n');
            let mut batch = lock(&self.shared);
            let before = batch.bytes.len();
            if before + line.len() > MAX_PENDING {
                drop(batch);
                telemetry::audit_dropped();
                return;
            }
            batch.bytes.extend_from_slice(line);
            let after = batch.bytes.len();
            drop(batch);
            // Wake the writer only on the transitions it waits for: the first line of
            // a batch, and a batch growing past FLUSH_BYTES.
            if before == 0 || (before < FLUSH_BYTES && after >= FLUSH_BYTES) {
                self.shared.wake.notify_one();
            }
            // One long line must not keep a large buffer per thread for ever.
            if line.capacity() > SCRATCH_KEEP {
                *line = Vec::new();
            }
        });
    }
}

impl Writer {
    /// Write every line recorded so far, flush, and stop.
    pub async fn finish(self) {
        let Writer { shared, thread } = self;
        lock(&shared).finish = true;
        shared.wake.notify_one();
        // Blocking here is fine: shutdown waits for the audit trail on purpose.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

fn write_loop(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut taken = Vec::new();
    let mut failed = false;
    loop {
        let mut batch = lock(shared);
        // Sleep until there is a line (or the end).
        while batch.bytes.is_empty() && !batch.finish {
            batch = shared.wake.wait(batch).unwrap_or_else(|e| e.into_inner());
        }
        if batch.bytes.is_empty() && batch.finish {
            let _ = sink.flush();
            return;
        }
        // Let a batch gather, unless it is big already or the process is stopping.
        let deadline = Instant::now() + FLUSH_EVERY;
        while batch.bytes.len() < FLUSH_BYTES && !batch.finish {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            batch = shared
                .wake
                .wait_timeout(batch, deadline - now)
                .map(|(b, _)| b)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        // Swap buffers so the request path keeps appending while this one is written.
        std::mem::swap(&mut batch.bytes, &mut taken);
        drop(batch);
        if let Err(e) = sink.write_all(&taken).and_then(|()| sink.flush())
            && !failed
        {
            failed = true;
            tracing::error!(error = %e, "audit stream write failed");
        }
        taken.clear();
        // Do not keep a huge buffer from a burst.
        if taken.capacity() > 4 * FLUSH_BYTES {
            taken = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(server: &str) -> Record<'_> {
        Record {
            time: "2026-11-25T00:00:00Z".into(),
            subject: "agents/test",
            user: None,
            client_id: None,
            issuer: None,
            trace_id: None,
            span_id: None,
            pin: None,
            pin_digest: None,
            server,
            method: "tools/call",
            kind: Some("tool"),
            name: Some("echo"),
            decision: Verdict::Allowed,
            rule: None,
            status: 200,
            error_code: None,
            latency_ms: 0.1,
            request_id: None,
            session: None,
            arguments: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_line_from_every_thread_is_written_whole_before_finish_returns() {
        let dir = std::env::temp_dir().join(format!("toolmesh-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let (audit, writer) = Audit::start(Some(&path)).expect("start");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let audit = audit.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        let server = format!("s{t}-{i}");
                        audit.record(&record(&server));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        writer.finish().await;
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("whole JSON line"))
            .collect();
        assert_eq!(lines.len(), 20_000);
        // Each thread's lines keep their order.
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .filter_map(|l| l["server"].as_str())
                .filter(|s| s.starts_with(&format!("s{t}-")))
                .collect();
            let expected: Vec<String> = (0..5_000).map(|i| format!("s{t}-{i}")).collect();
            assert_eq!(mine, expected);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_a_well_formed_traceparent_gives_a_trace_id() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let ok = format!("00-{id}-00f067aa0ba902b7-01");
        assert_eq!(trace_id(ok.as_bytes()), Some(id));
        for bad in [
            String::new(),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{id}-0000000000000000-01"),
            format!("ff-{id}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", id.to_uppercase()),
            format!("00-{id}-00f067aa0ba902b7-01-extra"),
            format!("00-{id}\n-00f067aa0ba902b7-01"),
            format!("00-{id}-00f067aa0ba902b7"),
        ] {
            assert_eq!(trace_id(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version may carry more fields.
        let later = format!("01-{id}-00f067aa0ba902b7-01-xyz");
        assert_eq!(trace_id(later.as_bytes()), Some(id));
    }

    #[tokio::test]
    async fn a_line_reaches_the_file_within_the_flush_interval() {
        let dir = std::env::temp_dir().join(format!("toolmesh-audit-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.jsonl");
        let (audit, writer) = Audit::start(Some(&path)).expect("start");
        audit.record(&record("one"));
        let started = Instant::now();
        while std::fs::read_to_string(&path)
            .unwrap_or_default()
            .is_empty()
        {
            assert!(started.elapsed() < FLUSH_EVERY * 10, "not written");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.finish().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
