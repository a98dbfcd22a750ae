//! The `toolmesh-control-plane` binary: subcommands over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// toolmesh-control-plane: resources in, per-identity snapshots out.
#[derive(Debug, Parser)]
#[command(name = "toolmesh-control-plane", version, about)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, global = true, env = "TOOLMESH_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the snapshot stream and the admin API from the embedded store.
    Serve(Box<toolmesh_control_plane::serve::ServeArgs>),
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
    /// Print the CustomResourceDefinitions (McpServer, AccessPolicy) as YAML, generated
    /// from the same types the control plane reads. `deploy/kubernetes/base/crds.yaml` is
    /// this output.
    Crds,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { files, identity } => {
            toolmesh_control_plane::check(&files, identity.as_deref()).map(|out| println!("{out}"))
        }
        Command::Crds => toolmesh_proto::crd::definitions_yaml().map(|out| print!("{out}")),
        Command::Serve(args) => {
            let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .json()
                .flatten_event(true)
                .with_writer(std::io::stderr)
                .init();
            match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(toolmesh_control_plane::serve::run(*args)),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolmesh-control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every flag has its own id and name (clap checks this only in debug builds, at
    /// the first parse: a clash would stop the binary at start).
    #[test]
    fn the_command_line_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
