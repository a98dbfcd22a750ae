//! The audit stream: one JSON line per MCP request, written off the request path.
//!
//! The request path formats its line and hands it to a bounded channel with `try_send`:
//! it never waits for the disk. A writer task batches lines into a buffered writer
//! (stdout by default, or `--audit-file`) and flushes whenever the channel runs dry. On
//! graceful shutdown the writer drains every queued line and flushes before the process
//! exits. If the writer falls [`QUEUE`] lines behind, further lines are dropped and
//! counted in `toolmesh_audit_dropped_total` rather than stalling agents.
//!
//! Lines never contain secrets: credential values are not part of any field, and call
//! arguments appear only when the deciding rule sets `audit: {arguments: true}`.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::value::RawValue;
use std::sync::mpsc;

use crate::telemetry;

/// Lines that may wait for the writer.
pub const QUEUE: usize = 65_536;

/// One audit line.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub subject: &'a str,
    pub server: &'a str,
    /// HTTP method for GET/DELETE, otherwise the JSON-RPC method (or `(response)`,
    /// `(batch)`).
    pub method: &'a str,
    /// `tool`, `resource` or `prompt` for gated calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// `allowed`, `denied`, `rate_limited`, `plumbing` (not gated) or `rejected`
    /// (refused before a decision: bad input, unknown server, not ready).
    pub decision: &'static str,
    pub rule: Option<&'a str>,
    pub status: u16,
    pub error_code: Option<i64>,
    pub latency_ms: f64,
    pub request_id: Option<&'a RawValue>,
    pub session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<&'a RawValue>,
}

/// The sending side, shared by the request path.
#[derive(Debug, Clone)]
pub struct Audit {
    tx: mpsc::SyncSender<Message>,
}

#[derive(Debug)]
enum Message {
    Line(String),
    /// Everything sent before this is written; flush and stop.
    Finish,
}

/// The writer thread's handle: [`Writer::finish`] drains and flushes.
#[derive(Debug)]
pub struct Writer {
    tx: mpsc::SyncSender<Message>,
    thread: std::thread::JoinHandle<()>,
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
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || write_loop(&rx, sink))
            .map_err(|e| format!("audit writer: {e}"))?;
        Ok((Audit { tx: tx.clone() }, Writer { tx, thread }))
    }

    /// Queue one line; never blocks.
    pub fn record(&self, record: &Record<'_>) {
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        line.push('\n');
        if self.tx.try_send(Message::Line(line)).is_err() {
            telemetry::audit_dropped();
        }
    }
}

impl Writer {
    /// Write every line queued so far, flush, and stop.
    pub async fn finish(self) {
        let Writer { tx, thread } = self;
        let _ = tokio::task::spawn_blocking(move || {
            // Blocking here is fine: shutdown waits for the audit trail on purpose.
            let _ = tx.send(Message::Finish);
            let _ = thread.join();
        })
        .await;
    }
}

fn write_loop(rx: &mpsc::Receiver<Message>, sink: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, sink);
    let mut failed = false;
    loop {
        // Block for the next line; then take whatever else is queued before flushing.
        let mut next = rx.recv();
        loop {
            match next {
                Ok(Message::Line(line)) => {
                    if let Err(e) = out.write_all(line.as_bytes())
                        && !failed
                    {
                        failed = true;
                        tracing::error!(error = %e, "audit stream write failed");
                    }
                }
                Ok(Message::Finish) | Err(_) => {
                    let _ = out.flush();
                    return;
                }
            }
            match rx.try_recv() {
                Ok(m) => next = Ok(m),
                Err(_) => break,
            }
        }
        let _ = out.flush();
    }
}
