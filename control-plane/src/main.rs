//! The `toolmesh-control-plane` binary: subcommands over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// toolmesh-control-plane: resources in, per-identity snapshots out.
#[derive(Debug, Parser)]
#[command(name = "toolmesh-control-plane", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate resource files (multi-document YAML) as one set, exactly as the sidecar
    /// would; with --identity, print the snapshot that identity would receive, with
    /// credentials redacted. Exits 1 and names the bad field on invalid input.
    Check {
        /// Resource files; all of them form one set.
        #[arg(short = 'f', long = "file", required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Render the snapshot for this identity (e.g. agents/triage).
        #[arg(long, value_name = "NAME")]
        identity: Option<String>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { files, identity } => {
            match toolmesh_control_plane::check(&files, identity.as_deref()) {
                Ok(out) => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("toolmesh-control-plane: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
