//! The `toolmesh-sidecar` binary: flags, logging, runtime; everything else is in the
//! library ([`toolmesh_sidecar::run`]).
//!
//! `toolmesh-sidecar wait-ready ADDR SECONDS` is a second, tiny mode: it polls
//! `http://ADDR/ready` until it answers 200 (exit 0) or SECONDS pass (exit 1). The
//! injected sidecar's `postStart` hook runs it on clusters without native sidecars, so
//! the agent containers start only once their tools are reachable.
//!
//! `toolmesh-sidecar wait-idle ADDR SECONDS` is the other hook of such sidecars
//! (`preStop`): it returns once `http://ADDR/idle` has answered 200 twice a second
//! apart (no MCP call or response stream in flight: the agent is done), or after
//! SECONDS, so SIGTERM reaches the sidecar after the agent's last calls.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use toolmesh_sidecar::config::Config;
use tracing_subscriber::EnvFilter;

/// Exit status for a usage error (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("wait-ready") => return wait_ready(&args[2..]),
        Some("wait-idle") => return wait_idle(&args[2..]),
        _ => {}
    }
    let config = Config::parse();
    if let Err(problems) = config.check() {
        for p in problems {
            eprintln!("toolmesh-sidecar: {p}");
        }
        return ExitCode::from(EXIT_USAGE);
    }
    let filter = match EnvFilter::try_new(&config.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("toolmesh-sidecar: --log {:?}: {e}", config.log);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if config.log_format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    // One worker: tokio's current-thread scheduler serves everything on the main
    // thread (no work-stealing bookkeeping, no cross-thread wakeups).
    let mut runtime = if config.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if config.workers > 1 {
        runtime.worker_threads(config.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("toolmesh-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(toolmesh_sidecar::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "toolmesh-sidecar failed");
            ExitCode::FAILURE
        }
    }
}

/// `ADDR SECONDS` of the hook modes, or the usage line printed.
fn hook_args<'a>(mode: &str, args: &'a [String]) -> Option<(&'a str, u64)> {
    match (args.first(), args.get(1).map(|s| s.parse::<u64>())) {
        (Some(addr), Some(Ok(seconds))) => Some((addr, seconds)),
        _ => {
            eprintln!("usage: toolmesh-sidecar {mode} ADDR SECONDS");
            None
        }
    }
}

/// `wait-idle ADDR SECONDS`: poll `/idle` until it has answered 200 twice a second
/// apart, or the deadline (then exit 0 too: the pod is going away either way).
fn wait_idle(args: &[String]) -> ExitCode {
    let Some((addr, seconds)) = hook_args("wait-idle", args) else {
        return ExitCode::from(EXIT_USAGE);
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut idle_since: Option<Instant> = None;
    while Instant::now() < deadline {
        if get_ok(addr, "/idle") {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(1) {
                return ExitCode::SUCCESS;
            }
        } else {
            idle_since = None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("toolmesh-sidecar: calls still in flight after {seconds}s; stopping anyway");
    ExitCode::SUCCESS
}

/// `wait-ready ADDR SECONDS`: poll `/ready` on ADDR until 200 or the deadline.
fn wait_ready(args: &[String]) -> ExitCode {
    let Some((addr, seconds)) = hook_args("wait-ready", args) else {
        return ExitCode::from(EXIT_USAGE);
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if get_ok(addr, "/ready") {
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            eprintln!("toolmesh-sidecar: http://{addr}/ready did not answer 200 within {seconds}s");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One `GET path` on ADDR: true on a 200.
fn get_ok(addr: &str, path: &str) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}
