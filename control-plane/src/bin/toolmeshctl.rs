//! toolmeshctl: the platform team's command line for the control plane's admin API.
//!
//! kubectl habits: `apply -f FILE|DIR|-`, `get KIND [NAME] [-o yaml|json]`,
//! `delete KIND NAME`, `status`; and for pinned definitions `diff SERVER` and
//! `pin SERVER [--file F]`. Exit status 1 with the server's message on failure (and
//! from `diff` when something drifted).

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
        env = "TOOLMESH_CTL_SERVER",
        default_value = "http://127.0.0.1:16010"
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
    /// Give up on connecting, and on each call, after this long.
    #[arg(long, global = true, env = "TOOLMESH_CTL_TIMEOUT", default_value = "10s", value_parser = toolmesh_proto::resource::parse_duration, value_name = "DURATION")]
    timeout: std::time::Duration,
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
    /// The sidecar fleet: identity, node, versions sent and acknowledged, last refusal,
    /// and why a snapshot could not be delivered. Fetched a page at a time.
    Status {
        /// Only sidecars whose identity matches this glob (e.g. `team-a/*`).
        #[arg(long)]
        identity: Option<String>,
        /// Only sidecars that are not connected (kept for the control plane's
        /// --fleet-expiry after they disconnect).
        #[arg(long)]
        disconnected: bool,
        /// Show at most this many (0: all, fetched page by page).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// What sidecars saw of SERVER's tools and prompts that does not match its pins
    /// (`spec.pins`): per definition, the members that changed and what they say now.
    /// Exit status 1 when anything drifted.
    Diff {
        #[arg(value_name = "SERVER")]
        name: String,
    },
    /// Propose pins for SERVER: the McpServer as it is, with a pin for each definition
    /// sidecars reported as drifted or unpinned (or each one in --file), printed as
    /// YAML to review and `apply`. Existing pins for other names are kept.
    Pin {
        #[arg(value_name = "SERVER")]
        name: String,
        /// Take the definitions from this file instead: a saved `tools/list` or
        /// `prompts/list` response or result (`-`: stdin).
        #[arg(long, value_name = "FILE")]
        file: Option<String>,
    },
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
    let channel = tokio::time::timeout(
        cli.timeout,
        endpoint
            .connect_timeout(cli.timeout)
            .timeout(cli.timeout)
            .connect(),
    )
    .await
    .map_err(|_| {
        format!(
            "connecting to the control plane at {} timed out after {:?} (is --server right, and is it up?)",
            cli.server, cli.timeout
        )
    })?
    .map_err(|e| {
        format!(
            "cannot reach the control plane at {}: {} (is --server right, and is it up?)",
            cli.server,
            toolmesh_proto::error_chain(&e)
        )
    })?;
    Ok(AdminServiceClient::new(channel)
        .max_decoding_message_size(toolmesh_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(toolmesh_proto::MAX_MESSAGE_BYTES))
}

/// What a failed call says: the server's message, or what went wrong on the way.
fn failure(call: &str, timeout: std::time::Duration, e: &tonic::Status) -> String {
    match e.code() {
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            format!("the control plane did not answer {call} within {timeout:?}")
        }
        // Something answered, but not the control plane's gRPC (an HTTP/1 server, the
        // admin port, a TLS port spoken to in plaintext).
        _ if [
            "compression flag",
            "grpc-status header missing",
            "h2 protocol",
            "transport error",
            "invalid content type",
        ]
        .iter()
        .any(|hint| e.message().contains(hint)) =>
        {
            let cause = std::error::Error::source(e)
                .map(|c| format!(": {}", toolmesh_proto::error_chain(c)))
                .unwrap_or_default();
            format!(
                "{call} failed: {}{cause} (is --server the control plane's gRPC port, with the right http/https?)",
                e.message()
            )
        }
        _ => e.message().to_owned(),
    }
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

/// The files, directories and `-` named, each file's path and text; checked here
/// first, so an error names the file and the document in it.
fn read_inputs(files: &[String]) -> Result<String, String> {
    use toolmesh_control_plane::serve::{join_sources, parse_sources, read_sources};
    let mut sources = Vec::new();
    for f in files {
        if f == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("stdin: {e}"))?;
            sources.push((PathBuf::from("(stdin)"), text));
        } else {
            sources.extend(read_sources(&[PathBuf::from(f)])?);
        }
    }
    parse_sources(&sources)?;
    Ok(join_sources(&sources))
}

/// A workload certificate's remaining life as the status table shows it.
fn certificate_left(expires: u64, now: u64) -> String {
    match expires {
        0 => "-".to_owned(),
        at if at <= now => "expired".to_owned(),
        at => {
            let left = at - now;
            if left >= 3600 {
                format!("{}h{:02}m", left / 3600, left % 3600 / 60)
            } else if left >= 60 {
                format!("{}m{:02}s", left / 60, left % 60)
            } else {
                format!("{left}s")
            }
        }
    }
}

fn status_table(sidecars: &[pb::SidecarStatus]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = format!(
        "{:<28} {:<24} {:<8} {:<10} {:<18} {:<18} {:<9} {}\n",
        "IDENTITY", "NODE", "KIND", "CONNECTED", "SENT", "ACKED", "CERT", "PROBLEM"
    );
    for s in sidecars {
        let nack = if !s.delivery_error.is_empty() {
            format!("undeliverable: {}", s.delivery_error)
        } else if s.nack_reason.is_empty() {
            "-".to_owned()
        } else {
            format!("{}: {}", s.nacked_version, s.nack_reason)
        };
        out += &format!(
            "{:<28} {:<24} {:<8} {:<10} {:<18} {:<18} {:<9} {}\n",
            s.identity,
            s.node,
            if s.gateway { "gateway" } else { "sidecar" },
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
            certificate_left(s.certificate_expires, now),
            nack
        );
    }
    out
}

async fn run(cli: Cli) -> Result<(), String> {
    // Inputs are read and checked before anything is sent.
    let yaml = match &cli.command {
        Command::Apply { files } => Some(read_inputs(files)?),
        _ => None,
    };
    let mut admin = client(&cli).await?;
    let timeout = cli.timeout;
    let fail = |call: &'static str| move |e: tonic::Status| failure(call, timeout, &e);
    match &cli.command {
        Command::Apply { .. } => {
            let yaml = yaml.unwrap_or_default().into_bytes();
            let resp = admin
                .apply(authorized(&cli, pb::ApplyRequest { yaml })?)
                .await
                .map_err(fail("Apply"))?;
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
                .map_err(fail("Get"))?
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
            admin
                .delete(authorized(&cli, req)?)
                .await
                .map_err(fail("Delete"))?;
            println!("{kind}/{name} deleted");
        }
        Command::Status {
            identity,
            disconnected,
            limit,
        } => {
            let mut shown = Vec::new();
            let mut page_token = String::new();
            let total = loop {
                let want = if *limit == 0 {
                    0
                } else {
                    u32::try_from(limit - shown.len()).unwrap_or(u32::MAX)
                };
                let req = pb::StatusRequest {
                    identity: identity.clone().unwrap_or_default(),
                    disconnected: *disconnected,
                    limit: want,
                    page_token: std::mem::take(&mut page_token),
                };
                let page = admin
                    .status(authorized(&cli, req)?)
                    .await
                    .map_err(fail("Status"))?
                    .into_inner();
                shown.extend(page.sidecars);
                if page.next_page_token.is_empty() || (*limit > 0 && shown.len() >= *limit) {
                    break page.total;
                }
                page_token = page.next_page_token;
            };
            print!("{}", status_table(&shown));
            if (shown.len() as u64) < total {
                println!("({} of {total} shown)", shown.len());
            }
            let drifts = drifts(&mut admin, &cli, "").await?;
            if !drifts.is_empty() {
                print!("\n{}", toolmesh_control_plane::drift::table(&drifts));
            }
        }
        Command::Diff { name: server } => {
            let drifts = drifts(&mut admin, &cli, server).await?;
            if drifts.is_empty() {
                println!("no definition of {server} differs from its pins");
            } else {
                print!("{}", toolmesh_control_plane::drift::diff_text(&drifts));
                return Err(format!(
                    "{} definition(s) of {server} differ from its pins",
                    drifts.len()
                ));
            }
        }
        Command::Pin { name: server, file } => {
            let req = pb::GetRequest {
                kind: "McpServer".into(),
                name: server.clone(),
            };
            let found = admin
                .get(authorized(&cli, req)?)
                .await
                .map_err(fail("Get"))?
                .into_inner()
                .resources;
            let text = found
                .first()
                .ok_or_else(|| format!("no McpServer {server}"))?;
            let value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            let mut resource =
                toolmesh_proto::resource::parse_document(0, value).map_err(|e| e.to_string())?;
            let toolmesh_proto::resource::Resource::McpServer(mcp) = &mut resource else {
                return Err(format!("{server} is not an McpServer"));
            };
            let definitions = match file {
                Some(file) => {
                    let text = if file == "-" {
                        let mut text = String::new();
                        std::io::stdin()
                            .read_to_string(&mut text)
                            .map_err(|e| format!("stdin: {e}"))?;
                        text
                    } else {
                        std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?
                    };
                    toolmesh_control_plane::drift::definitions_in(&text)
                        .map_err(|e| format!("{file}: {e}"))?
                }
                None => reported_definitions(&mut admin, &cli, server).await?,
            };
            let pins = mcp.spec.pins.get_or_insert_with(Default::default);
            let proposal = toolmesh_control_plane::drift::propose(pins, &definitions)?;
            println!(
                "{}",
                serde_saphyr::to_string(&resource)
                    .map_err(|e| e.to_string())?
                    .trim_end()
            );
            eprintln!(
                "{server}: {} pin(s) added{}, {} changed{}, {} unchanged; review, then `toolmeshctl apply -f` it",
                proposal.added.len(),
                listed(&proposal.added),
                proposal.changed.len(),
                listed(&proposal.changed),
                proposal.unchanged
            );
        }
    }
    Ok(())
}

/// ` (a, b)` for a non-empty list.
fn listed(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

/// What the control plane keeps of drifted definitions, of `server` (empty: all).
async fn drifts(
    admin: &mut AdminServiceClient<Channel>,
    cli: &Cli,
    server: &str,
) -> Result<Vec<pb::ReportedDrift>, String> {
    let req = pb::DriftsRequest {
        server: server.to_owned(),
    };
    Ok(admin
        .drifts(authorized(cli, req)?)
        .await
        .map_err(|e| failure("Drifts", cli.timeout, &e))?
        .into_inner()
        .drifts)
}

/// The live definitions sidecars reported for `server` (those small enough to carry).
async fn reported_definitions(
    admin: &mut AdminServiceClient<Channel>,
    cli: &Cli,
    server: &str,
) -> Result<Vec<(toolmesh_proto::pin::Kind, serde_json::Value)>, String> {
    let drifts = drifts(admin, cli, server).await?;
    let mut out = Vec::new();
    for d in drifts.into_iter().filter_map(|r| r.drift) {
        let kind = if d.kind == "tool" {
            toolmesh_proto::pin::Kind::Tool
        } else {
            toolmesh_proto::pin::Kind::Prompt
        };
        match serde_json::from_str(&d.definition) {
            Ok(definition) => out.push((kind, definition)),
            Err(_) => eprintln!(
                "{} {}: its definition was not reported (too large or unreadable); pin it with --file",
                d.kind, d.name
            ),
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no sidecar has reported a drifted or unpinned definition of {server}; list its tools through a sidecar first (with pins in mode warn and unpinned allow), or pass --file"
        ));
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::certificate_left;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn certificate_lifetimes_read_at_a_glance() {
        assert_eq!(certificate_left(0, 1_000), "-");
        assert_eq!(certificate_left(1_000, 1_000), "expired");
        assert_eq!(certificate_left(1_045, 1_000), "45s");
        assert_eq!(certificate_left(1_000 + 125, 1_000), "2m05s");
        assert_eq!(certificate_left(1_000 + 12 * 3600 - 60, 1_000), "11h59m");
    }
}
