//! toolmeshctl: the platform team's command line for the control plane's admin API.
//!
//! kubectl habits: `apply -f FILE|DIR|-`, `get KIND [NAME] [-o yaml|json]`,
//! `delete KIND NAME`, `status`. Exit status 1 with the server's message on failure.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_proto::v1alpha1::admin_service_client::AdminServiceClient;

/// toolmeshctl: manage toolmesh resources and watch the sidecar fleet.
#[derive(Debug, Parser)]
#[command(
    name = "toolmeshctl",
    version,
    about = "Manage toolmesh resources and watch the sidecar fleet"
)]
struct Cli {
    /// Control plane gRPC URL (https:// for TLS).
    #[arg(
        long,
        global = true,
        env = "TOOLMESH_CONTROL_PLANE",
        default_value = "http://127.0.0.1:15010"
    )]
    server: String,
    /// Admin token.
    #[arg(
        long,
        global = true,
        env = "TOOLMESH_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// PEM CA certificate to verify the control plane's TLS certificate.
    #[arg(long, global = true, env = "TOOLMESH_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update resources from YAML files, directories (*.yaml) or `-` (stdin).
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Show resources of a kind (McpServer, AccessPolicy, Secret), or one by name.
    Get {
        kind: String,
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, default_value = "yaml", value_parser = ["yaml", "json"])]
        output: String,
    },
    /// Delete one resource.
    Delete { kind: String, name: String },
    /// The sidecar fleet: identity, node, versions sent and acknowledged, last refusal.
    Status,
}

async fn client(cli: &Cli) -> Result<AdminServiceClient<Channel>, String> {
    let mut endpoint =
        Channel::from_shared(cli.server.clone()).map_err(|e| format!("--server: {e}"))?;
    if cli.server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cli.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("--ca-file {}: {e}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach the control plane at {}: {e}", cli.server))?;
    Ok(AdminServiceClient::new(channel))
}

fn authorized<T>(cli: &Cli, message: T) -> Result<tonic::Request<T>, String> {
    let token = cli
        .token
        .as_deref()
        .ok_or("no admin token: pass --token or set TOOLMESH_ADMIN_TOKEN")?;
    let mut req = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the admin token has characters a header cannot carry".to_owned())?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

fn read_inputs(files: &[String]) -> Result<String, String> {
    let mut text = String::new();
    for f in files {
        if f == "-" {
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("stdin: {e}"))?;
            text.push_str("\n---\n");
        } else {
            text.push_str(&toolmesh_control_plane::serve::read_paths(&[
                PathBuf::from(f),
            ])?);
        }
    }
    Ok(text)
}

fn status_table(sidecars: &[pb::SidecarStatus]) -> String {
    let mut out = format!(
        "{:<28} {:<24} {:<10} {:<18} {:<18} {}\n",
        "IDENTITY", "NODE", "CONNECTED", "SENT", "ACKED", "LAST NACK"
    );
    for s in sidecars {
        let nack = if s.nack_reason.is_empty() {
            "-".to_owned()
        } else {
            format!("{}: {}", s.nacked_version, s.nack_reason)
        };
        out += &format!(
            "{:<28} {:<24} {:<10} {:<18} {:<18} {}\n",
            s.identity,
            s.node,
            if s.connected { "yes" } else { "no" },
            if s.sent_version.is_empty() {
                "-"
            } else {
                &s.sent_version
            },
            if s.acked_version.is_empty() {
                "-"
            } else {
                &s.acked_version
            },
            nack
        );
    }
    out
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut admin = client(&cli).await?;
    let fail = |e: tonic::Status| e.message().to_owned();
    match &cli.command {
        Command::Apply { files } => {
            let yaml = read_inputs(files)?;
            let resp = admin
                .apply(authorized(&cli, pb::ApplyRequest { yaml })?)
                .await
                .map_err(fail)?;
            for line in resp.into_inner().results {
                println!("{line}");
            }
        }
        Command::Get { kind, name, output } => {
            let req = pb::GetRequest {
                kind: kind.clone(),
                name: name.clone().unwrap_or_default(),
            };
            let resp = admin
                .get(authorized(&cli, req)?)
                .await
                .map_err(fail)?
                .into_inner();
            let values: Vec<serde_json::Value> = resp
                .resources
                .iter()
                .filter_map(|r| serde_json::from_str(r).ok())
                .collect();
            if output == "json" {
                let shown = if name.is_some() && values.len() == 1 {
                    values[0].clone()
                } else {
                    serde_json::Value::Array(values)
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&shown).map_err(|e| e.to_string())?
                );
            } else {
                for v in values {
                    println!(
                        "---\n{}",
                        serde_saphyr::to_string(&v)
                            .map_err(|e| e.to_string())?
                            .trim_end()
                    );
                }
            }
        }
        Command::Delete { kind, name } => {
            let req = pb::DeleteRequest {
                kind: kind.clone(),
                name: name.clone(),
            };
            admin.delete(authorized(&cli, req)?).await.map_err(fail)?;
            println!("{kind}/{name} deleted");
        }
        Command::Status => {
            let resp = admin
                .status(authorized(&cli, pb::StatusRequest {})?)
                .await
                .map_err(fail)?;
            print!("{}", status_table(&resp.into_inner().sidecars));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolmeshctl: {e}");
            ExitCode::FAILURE
        }
    }
}
