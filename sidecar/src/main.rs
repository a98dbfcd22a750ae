//! The `toolmesh-sidecar` binary: flags, logging, runtime; everything else is in the
//! library ([`toolmesh_sidecar::run`]).

use std::process::ExitCode;

use clap::Parser;
use toolmesh_sidecar::config::Config;
use tracing_subscriber::EnvFilter;

/// Exit status for a usage error (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
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
