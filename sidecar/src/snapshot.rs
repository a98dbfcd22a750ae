//! The active configuration: a snapshot compiled once into what the request path
//! reads, and the lock-free slot that holds it.
//!
//! A [`Runtime`] is built from a [`pb::Snapshot`] when it arrives (from the standalone
//! file or the control plane), never per request: upstream URIs are parsed, credential
//! headers are turned into sensitive `HeaderValue`s, each server's rules are compiled
//! ([`crate::policy`], rate limiters carried over), the redacted `/config` document is
//! serialized. The request path does one `ArcSwapOption::load_full` and
//! reads; a swap never waits for it, and in-flight requests keep the `Arc` they loaded.
//!
//! This module does not fetch snapshots (see [`crate::standalone`] and
//! [`crate::discovery`]) and does not decide policy (see [`crate::policy`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::Uri;
use metrics::SharedString;
use toolmesh_proto::render::redacted;
use toolmesh_proto::v1alpha1 as pb;

use crate::mcp::TargetKind;
use crate::policy::{LimiterSource, ServerPolicy};
use crate::ratelimit::Limiter;
use crate::telemetry;

/// One upstream endpoint, parsed and checked once.
#[derive(Debug)]
pub struct Endpoint {
    /// The full URI requests are sent to (cloning it is a reference-count bump).
    pub uri: Uri,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("endpoint {url:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("endpoint {url:?}: scheme must be http or https")),
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("endpoint {url:?}: no host"));
        };
        if authority.as_str().contains('@') {
            return Err(format!(
                "endpoint {url:?}: user info in URLs is not supported; use a credential"
            ));
        }
        Ok(Endpoint { uri })
    }
}

/// The header an upstream server's credential is sent in.
#[derive(Debug)]
pub struct Credential {
    pub header: HeaderName,
    /// Marked sensitive: hyper's HPACK never indexes it, and `Debug` prints `Sensitive`.
    pub value: HeaderValue,
}

/// How a server in the mesh is reached: the identity its server-side sidecar must
/// prove, and the mutual-TLS client, made on first use (one pool per route).
#[derive(Debug)]
pub struct MeshRoute {
    pub identity: String,
    pub client: std::sync::OnceLock<Result<crate::upstream::Client, String>>,
}

/// Everything the request path needs to reach one upstream server.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// `name` as a metrics label value (shared, so labelling never allocates).
    pub label: SharedString,
    pub endpoints: Vec<Endpoint>,
    pub credential: Option<Credential>,
    /// How long the upstream has to start answering (response head).
    pub timeout: Duration,
    /// This identity's rules for the server.
    pub policy: ServerPolicy,
    /// Set for a server behind a server-side sidecar: reached over mutual TLS.
    pub mesh: Option<MeshRoute>,
    /// What the aggregated `/mcp` puts before this server's tool and prompt names
    /// (`<prefix>__<name>`); empty for the one unprefixed server.
    pub prefix: Arc<str>,
    /// The server speaks the legacy HTTP+SSE transport (2024-11-05): never relayed,
    /// always served through a stream the sidecar holds ([`crate::aggregate`]).
    pub sse: bool,
    /// Whether the server speaks 2026-07-28: learnt once per snapshot, on the first
    /// request that needs to know (0 not yet, 1 it does, 2 only 2025 revisions, 3 only
    /// 2026-07-28: it refuses 2025 sessions).
    generation: std::sync::atomic::AtomicU8,
    /// Round-robin cursor for requests that carry no session.
    next: AtomicUsize,
    /// The server's approved definitions, if it has pins.
    pub pins: Option<Arc<crate::pin::Pinned>>,
    /// Where its OAuth access token comes from, if it has `spec.oauth`.
    pub oauth: Option<Arc<crate::oauth::TokenSource>>,
    /// Requests in flight to the server, at most `--upstream-max-connections`
    /// ([`crate::upstream`]); made on first use.
    pub in_flight: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
}

impl Route {
    /// Does a list of `kind` need its items judged at all (by the policy, or by pins)?
    pub fn filters(&self, kind: TargetKind) -> bool {
        self.policy.filters(kind)
            || (self.pins.is_some() && matches!(kind, TargetKind::Tool | TargetKind::Prompt))
    }

    /// Does the server speak 2026-07-28, as far as is known?
    pub fn speaks_modern(&self) -> Option<bool> {
        match self.generation.load(Ordering::Relaxed) {
            1 | 3 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Remember what the server speaks, for as long as this snapshot is served.
    pub fn learn_generation(&self, modern: bool) {
        self.generation
            .store(if modern { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Does the server refuse 2025 sessions (it speaks only 2026-07-28)?
    pub fn refuses_sessions(&self) -> bool {
        self.generation.load(Ordering::Relaxed) == 3
    }

    /// Are a 2025 agent's sessions on this server's own path the sidecar's, never
    /// relayed? For a legacy HTTP+SSE server, and one that refuses 2025 sessions.
    pub fn holds_sessions(&self) -> bool {
        self.sse || self.refuses_sessions()
    }

    /// Remember that the server refused a 2025 session though it speaks 2026-07-28.
    pub fn learn_modern_only(&self) {
        self.generation.store(3, Ordering::Relaxed);
    }

    /// The endpoint for a request without session affinity (round-robin).
    pub fn pick(&self) -> usize {
        if self.endpoints.len() <= 1 {
            return 0;
        }
        self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len()
    }
}

/// A compiled snapshot. Immutable once built.
#[derive(Debug)]
pub struct Runtime {
    pub version: String,
    pub identity: String,
    routes: HashMap<String, Arc<Route>>,
    /// Comma-separated names, precomputed for the unknown-server error.
    known: String,
    /// The redacted snapshot as JSON, served by the admin `/config` endpoint.
    config_json: Bytes,
    /// Rate limiters by rule fingerprint, handed to the next snapshot's unchanged rules.
    limiters: HashMap<Vec<u8>, Arc<Limiter>>,
    /// Server-side mode: the servers this identity runs, with every caller's policies.
    pub served: Vec<pb::Served>,
    /// Gateway mode: issuers the control plane trusts for gateways.
    issuers: Vec<String>,
    /// Whether any route goes through the mesh (then a workload certificate is needed).
    pub meshed: bool,
    /// The routes the aggregated `/mcp` serves, sorted by name.
    aggregated: Vec<Arc<Route>>,
    /// Route by non-empty prefix.
    prefixes: HashMap<Arc<str>, Arc<Route>>,
    /// The route whose names `/mcp` shows as they are, if any.
    unprefixed: Option<Arc<Route>>,
    /// A gateway's snapshot (its policies carry token subjects): the servers and
    /// policies each caller's runtime is narrowed from ([`crate::gateway`]).
    gateway: Option<Box<(Vec<pb::Server>, Vec<pb::Policy>)>>,
}

impl LimiterSource for Option<&Runtime> {
    fn limiter(&self, fingerprint: &[u8]) -> Option<Arc<Limiter>> {
        self.and_then(|r| r.limiters.get(fingerprint).cloned())
    }
}

impl Runtime {
    /// Compile a snapshot. Fails, naming the server and field, if anything in it could
    /// not be used; the caller keeps serving the previous runtime then.
    ///
    /// `previous` is the runtime being replaced: rate limiters of unchanged rules are
    /// taken over from it. Servers this identity has no allow rule for are not routed.
    pub fn compile(snapshot: &pb::Snapshot, previous: Option<&Runtime>) -> Result<Self, String> {
        Runtime::compile_with(snapshot, &previous, true)
    }

    /// [`Runtime::compile`], rate limiters of unchanged rules taken from `previous`;
    /// the redacted `/config` document made only when `dump` (a gateway's per-caller
    /// runtimes have none: `/config` shows the snapshot they were narrowed from).
    pub fn compile_with(
        snapshot: &pb::Snapshot,
        previous: &dyn LimiterSource,
        dump: bool,
    ) -> Result<Self, String> {
        // Each rule is filed under its server once: matching every server against every
        // rule would make compiling quadratic in the size of the snapshot.
        let mut rules: HashMap<&str, Vec<(&str, usize, &pb::Rule)>> = HashMap::new();
        for policy in &snapshot.policies {
            for (index, rule) in policy.rules.iter().enumerate() {
                let named = (policy.name.as_str(), index, rule);
                rules.entry(rule.server.as_str()).or_default().push(named);
            }
        }
        let mut seen = HashSet::with_capacity(snapshot.servers.len());
        let mut routes = HashMap::with_capacity(snapshot.servers.len());
        let mut limiters = Vec::new();
        for server in &snapshot.servers {
            if !seen.insert(server.name.as_str()) {
                return Err(format!("server {}: listed twice", server.name));
            }
            let own = rules.get(server.name.as_str()).into_iter().flatten();
            let policy = ServerPolicy::compile_rules(own.copied(), previous, &mut limiters);
            if !policy.usable() {
                continue;
            }
            let route = compile_server(server, policy)
                .map_err(|e| format!("server {}: {e}", server.name))?;
            routes.insert(server.name.clone(), Arc::new(route));
        }
        // Names on /mcp must not collide, whether or not this identity may use both.
        toolmesh_proto::resource::check_prefixes(
            snapshot
                .servers
                .iter()
                .map(|s| (s.name.as_str(), s.prefix.as_deref().unwrap_or(&s.name))),
        )
        .map_err(|(name, message)| format!("server {name}: prefix: {message}"))?;
        let mut names: Vec<&str> = routes.keys().map(String::as_str).collect();
        names.sort_unstable();
        let known = if names.is_empty() {
            "(none)".to_owned()
        } else {
            names.join(", ")
        };
        let config_json = if dump {
            serde_json::to_vec_pretty(&redacted(snapshot))
                .map_err(|e| format!("snapshot does not serialize: {e}"))?
        } else {
            Vec::new()
        };
        let mut aggregated: Vec<Arc<Route>> = routes.values().cloned().collect();
        aggregated.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let prefixes = aggregated
            .iter()
            .filter(|r| !r.prefix.is_empty())
            .map(|r| (r.prefix.clone(), r.clone()))
            .collect();
        let unprefixed = aggregated.iter().find(|r| r.prefix.is_empty()).cloned();
        Ok(Runtime {
            aggregated,
            prefixes,
            unprefixed,
            version: snapshot.version.clone(),
            identity: snapshot.identity.clone(),
            meshed: routes.values().any(|r| r.mesh.is_some()),
            routes,
            known,
            config_json: Bytes::from(config_json),
            limiters: limiters.into_iter().collect(),
            served: snapshot.served.clone(),
            issuers: snapshot.issuers.clone(),
            gateway: snapshot
                .policies
                .iter()
                .any(|p| !p.subjects.is_empty())
                .then(|| Box::new((snapshot.servers.clone(), snapshot.policies.clone()))),
        })
    }

    /// Gateway mode: the issuers the control plane trusts for gateways (empty for any
    /// other snapshot).
    pub fn issuers(&self) -> &[String] {
        &self.issuers
    }

    /// Gateway mode: the snapshot's policies, each with its token subjects (empty for
    /// any other snapshot).
    pub fn policies(&self) -> &[pb::Policy] {
        self.gateway.as_ref().map_or(&[], |g| &g.1)
    }

    /// Gateway mode: the runtime of a caller whom `policies` (some of this snapshot's)
    /// are about: this snapshot's servers, those rules. Its rate limiters come from
    /// `limiters` when the rule is unchanged, and are all added to `made`.
    pub fn narrowed(
        &self,
        policies: Vec<pb::Policy>,
        limiters: &dyn LimiterSource,
        made: &mut Vec<(Vec<u8>, Arc<Limiter>)>,
    ) -> Result<Runtime, String> {
        let snapshot = pb::Snapshot {
            version: self.version.clone(),
            identity: self.identity.clone(),
            servers: self
                .gateway
                .as_ref()
                .map(|g| g.0.clone())
                .unwrap_or_default(),
            policies,
            served: Vec::new(),
            issuers: Vec::new(),
        };
        let mut runtime = Runtime::compile_with(&snapshot, limiters, false)?;
        runtime.gateway = None;
        made.extend(runtime.limiters.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(runtime)
    }

    /// Server-side mode: the runtime that decides for `caller`, whose peer certificate
    /// named it, on `served` (one of this runtime's served servers) reached at `local`.
    /// Only the policies whose subjects match `caller` count, as on the caller's own
    /// sidecar. `previous` is the caller's runtime for the snapshot before, whose rate
    /// limiters carry over.
    pub fn for_caller(
        &self,
        served: &pb::Served,
        caller: &str,
        local: &str,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, String> {
        let snapshot = pb::Snapshot {
            version: self.version.clone(),
            identity: caller.to_owned(),
            servers: vec![pb::Server {
                name: served.name.clone(),
                endpoints: vec![pb::Endpoint {
                    url: local.to_owned(),
                }],
                credential: served.credential.clone(),
                timeout_ms: served.timeout_ms,
                mesh: None,
                prefix: None,
                transport: 0,
                pins: None,
                oauth: None,
            }],
            policies: served
                .policies
                .iter()
                .filter(|p| {
                    p.subjects
                        .iter()
                        .any(|s| toolmesh_proto::glob::matches(s, caller))
                })
                .filter_map(|p| p.policy.clone())
                .collect(),
            served: Vec::new(),
            issuers: Vec::new(),
        };
        Runtime::compile(&snapshot, previous)
    }

    pub fn route(&self, server: &str) -> Option<&Arc<Route>> {
        self.routes.get(server)
    }

    /// The routes the aggregated `/mcp` serves, sorted by name.
    pub fn aggregated(&self) -> &[Arc<Route>] {
        &self.aggregated
    }

    /// The route and real name behind a tool or prompt name shown on `/mcp`: the part
    /// before the first `__` when it is a route's prefix (prefixes hold no `_`), or else
    /// the unprefixed route with the name as it is.
    pub fn resolve<'n>(&self, exposed: &'n str) -> Option<(&Arc<Route>, &'n str)> {
        if let Some((prefix, name)) = exposed.split_once("__")
            && let Some(route) = self.prefixes.get(prefix)
        {
            return Some((route, name));
        }
        self.unprefixed.as_ref().map(|route| (route, exposed))
    }

    pub fn known_servers(&self) -> &str {
        &self.known
    }

    pub fn config_json(&self) -> Bytes {
        self.config_json.clone()
    }
}

fn compile_server(server: &pb::Server, policy: ServerPolicy) -> Result<Route, String> {
    if server.endpoints.is_empty() {
        return Err("no endpoints".to_owned());
    }
    let endpoints = server
        .endpoints
        .iter()
        .map(|e| Endpoint::parse(&e.url))
        .collect::<Result<Vec<_>, _>>()?;
    let credential = match &server.credential {
        None => None,
        Some(c) => {
            let header = HeaderName::from_bytes(c.header.as_bytes())
                .map_err(|_| format!("credential header {:?} is not a header name", c.header))?;
            // Never echo the value: it is a secret.
            let mut value = HeaderValue::from_str(&c.value)
                .map_err(|_| "credential value is not a valid header value".to_owned())?;
            value.set_sensitive(true);
            Some(Credential { header, value })
        }
    };
    if server.timeout_ms == 0 {
        return Err("timeout must be positive".to_owned());
    }
    if let Some(prefix) = &server.prefix
        && !toolmesh_proto::resource::is_prefix(prefix)
    {
        return Err(format!(
            "prefix {prefix:?}: letters, digits and '-' only (a '_' would make names on /mcp ambiguous)"
        ));
    }
    let sse = match pb::Transport::try_from(server.transport) {
        Ok(pb::Transport::StreamableHttp) => false,
        Ok(pb::Transport::Sse) => true,
        Err(_) => return Err(format!("transport {} is not known", server.transport)),
    };
    if sse && server.mesh.is_some() {
        return Err("transport SSE cannot be combined with mesh".to_owned());
    }
    Ok(Route {
        name: server.name.clone(),
        label: SharedString::from(Arc::<str>::from(server.name.as_str())),
        endpoints,
        credential,
        timeout: Duration::from_millis(server.timeout_ms),
        policy,
        mesh: server.mesh.as_ref().map(|m| MeshRoute {
            identity: m.identity.clone(),
            client: std::sync::OnceLock::new(),
        }),
        prefix: Arc::from(server.prefix.as_deref().unwrap_or(&server.name)),
        sse,
        // A legacy server speaks no 2026-07-28: known without asking.
        generation: std::sync::atomic::AtomicU8::new(if sse { 2 } else { 0 }),
        next: AtomicUsize::new(0),
        pins: server
            .pins
            .as_ref()
            .map(|p| crate::pin::Pinned::for_server(&server.name, p)),
        oauth: server
            .oauth
            .as_ref()
            .map(|o| crate::oauth::TokenSource::for_server(&server.name, o)),
        in_flight: std::sync::OnceLock::new(),
    })
}

/// The slot holding the active runtime; `None` until the first snapshot loads.
#[derive(Debug, Default)]
pub struct Active {
    slot: ArcSwapOption<Runtime>,
    /// Why no configuration is loaded, when something was tried and refused (shown by
    /// `/ready`); cleared once one is.
    problem: std::sync::Mutex<Option<String>>,
}

impl Active {
    /// The runtime a request uses from start to end (one atomic load, no lock).
    pub fn current(&self) -> Option<Arc<Runtime>> {
        self.slot.load_full()
    }

    pub fn is_loaded(&self) -> bool {
        self.slot.load().is_some()
    }

    /// Compile and swap in a snapshot. On error nothing changes.
    /// Returns whether the version changed.
    pub fn apply(&self, snapshot: &pb::Snapshot) -> Result<bool, String> {
        match self.prepare(snapshot)? {
            Some(runtime) => {
                self.install(runtime);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Compile a snapshot without serving it yet; `None` when it is the version
    /// already served.
    pub fn prepare(&self, snapshot: &pb::Snapshot) -> Result<Option<Runtime>, String> {
        let current = self.slot.load();
        if current
            .as_ref()
            .is_some_and(|r| r.version == snapshot.version)
        {
            return Ok(None);
        }
        Runtime::compile(snapshot, current.as_deref()).map(Some)
    }

    /// Serve a compiled snapshot from now on.
    pub fn install(&self, runtime: Runtime) {
        let previous = self.slot.load().as_ref().map(|r| r.version.clone());
        telemetry::config_applied(previous.as_deref(), &runtime.version);
        self.slot.store(Some(Arc::new(runtime)));
        self.set_problem(None);
    }

    /// Record why nothing could be loaded (`None` clears it).
    pub fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A route named `s` (one endpoint that refuses connections) compiled from `credential`
/// and `rule`: for unit tests of the modules that work on routes.
#[cfg(test)]
pub(crate) fn test_route(
    credential: Option<pb::Credential>,
    rule: pb::Rule,
) -> std::sync::Arc<Route> {
    let snapshot = pb::Snapshot {
        version: "v".into(),
        identity: "agents/a".into(),
        servers: vec![pb::Server {
            name: "s".into(),
            endpoints: vec![pb::Endpoint {
                url: "http://127.0.0.1:1/mcp".into(),
            }],
            credential,
            timeout_ms: 1000,
            mesh: None,
            prefix: None,
            transport: 0,
            pins: None,
            oauth: None,
        }],
        policies: vec![pb::Policy {
            name: "p".into(),
            rules: vec![pb::Rule {
                server: "s".into(),
                ..rule
            }],
            ..Default::default()
        }],
        served: Vec::new(),
        issuers: Vec::new(),
    };
    Runtime::compile(&snapshot, None)
        .expect("compiles")
        .route("s")
        .expect("route")
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(url: &str) -> pb::Snapshot {
        pb::Snapshot {
            version: "v1".into(),
            identity: "agents/a".into(),
            servers: vec![pb::Server {
                name: "demo".into(),
                endpoints: vec![pb::Endpoint { url: url.into() }],
                credential: Some(pb::Credential {
                    header: "authorization".into(),
                    value: "Bearer s3cret".into(),
                    source: "demo-token/token".into(),
                }),
                timeout_ms: 1000,
                mesh: None,
                prefix: None,
                transport: 0,
                pins: None,
                oauth: None,
            }],
            policies: vec![pb::Policy {
                name: "p".into(),
                rules: vec![pb::Rule {
                    server: "demo".into(),
                    tools: vec!["*".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            served: Vec::new(),
            issuers: Vec::new(),
        }
    }

    #[test]
    fn a_legacy_sse_server_is_never_relayed_and_an_unknown_transport_is_refused() {
        let mut snap = snapshot("http://127.0.0.1:1/sse");
        snap.servers[0].transport = pb::Transport::Sse as i32;
        let runtime = Runtime::compile(&snap, None).expect("compiles");
        let route = runtime.route("demo").expect("routed");
        assert!(route.sse && route.holds_sessions());
        assert_eq!(route.speaks_modern(), Some(false), "known without asking");
        snap.servers[0].transport = 7;
        let e = Runtime::compile(&snap, None).expect_err("unknown transport");
        assert!(
            e.contains("server demo") && e.contains("transport 7"),
            "{e}"
        );
    }

    #[test]
    fn compiles_routes_and_redacts_config() {
        let rt = Runtime::compile(&snapshot("http://127.0.0.1:9/mcp"), None).expect("compiles");
        let route = rt.route("demo").expect("route");
        assert_eq!(route.endpoints[0].uri.to_string(), "http://127.0.0.1:9/mcp");
        assert!(
            route
                .credential
                .as_ref()
                .expect("credential")
                .value
                .is_sensitive()
        );
        let json = String::from_utf8(rt.config_json().to_vec()).expect("utf8");
        assert!(!json.contains("s3cret"), "{json}");
        assert!(
            json.contains("\"action\": \"allow\""),
            "actions by name: {json}"
        );
        assert_eq!(rt.known_servers(), "demo");
    }

    #[test]
    fn rejects_unusable_endpoint() {
        let err = Runtime::compile(&snapshot("ftp://example.com/"), None).expect_err("bad scheme");
        assert!(
            err.contains("server demo") && err.contains("scheme"),
            "{err}"
        );
    }

    #[test]
    fn servers_without_an_allow_rule_are_not_routed() {
        let mut snap = snapshot("http://127.0.0.1:9/mcp");
        snap.policies[0].rules[0].action = pb::Action::Deny as i32;
        let rt = Runtime::compile(&snap, None).expect("compiles");
        assert!(rt.route("demo").is_none());
        assert_eq!(rt.known_servers(), "(none)");
    }

    #[test]
    fn compiling_is_linear_in_servers_and_rules() {
        // Found by timing the `snapshot` fuzz target's worst case: every server was
        // matched against every rule, and 3,000 servers and 3,000 rules for other
        // servers (44 KB of protobuf) took a third of a second.
        let mut snap = snapshot("http://127.0.0.1:9/mcp");
        let rule = snap.policies[0].rules[0].clone();
        snap.servers.extend((0..20_000).map(|i| pb::Server {
            name: format!("idle-{i}"),
            ..Default::default()
        }));
        snap.policies[0].rules.extend((0..20_000).map(|i| pb::Rule {
            server: format!("other-{i}"),
            ..rule.clone()
        }));
        let started = std::time::Instant::now();
        let rt = Runtime::compile(&snap, None).expect("compiles");
        let took = started.elapsed();
        assert_eq!(rt.known_servers(), "demo");
        // Quadratic (400 million comparisons) this took 4 s in a debug build; linear,
        // a quarter of a second.
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_server_listed_twice_is_refused_even_without_rules() {
        let mut snap = snapshot("http://127.0.0.1:9/mcp");
        let idle = pb::Server {
            name: "idle".into(),
            ..Default::default()
        };
        snap.servers.extend([idle.clone(), idle]);
        let err = Runtime::compile(&snap, None).expect_err("refused");
        assert_eq!(err, "server idle: listed twice");
    }

    #[test]
    fn names_on_the_aggregate_resolve_to_one_server() {
        let mut snap = snapshot("http://127.0.0.1:9/mcp");
        let rule = snap.policies[0].rules[0].clone();
        let server = snap.servers[0].clone();
        for (name, prefix) in [("github", Some("gh")), ("plain", Some(""))] {
            snap.servers.push(pb::Server {
                name: name.into(),
                prefix: prefix.map(str::to_owned),
                ..server.clone()
            });
            snap.policies[0].rules.push(pb::Rule {
                server: name.into(),
                ..rule.clone()
            });
        }
        let rt = Runtime::compile(&snap, None).expect("compiles");
        let resolve = |exposed| rt.resolve(exposed).map(|(r, n)| (r.name.as_str(), n));
        assert_eq!(resolve("demo__echo"), Some(("demo", "echo")));
        assert_eq!(resolve("gh__list__all"), Some(("github", "list__all")));
        assert_eq!(resolve("gh___x"), Some(("github", "_x")));
        // Not a prefix (the server's name is not its prefix): the unprefixed server's.
        assert_eq!(resolve("github__x"), Some(("plain", "github__x")));
        assert_eq!(resolve("echo"), Some(("plain", "echo")));
        let names: Vec<&str> = rt.aggregated().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["demo", "github", "plain"]);

        // Two unprefixed servers, or a prefix taken twice: refused (NACK), naming both.
        snap.servers[1].prefix = Some(String::new());
        let err = Runtime::compile(&snap, None).expect_err("collision");
        assert!(err.contains("plain") && err.contains("github"), "{err}");
        snap.servers[1].prefix = Some("demo".into());
        let err = Runtime::compile(&snap, None).expect_err("collision");
        assert!(err.contains("\"demo\""), "{err}");
        snap.servers[1].prefix = Some("a_b".into());
        let err = Runtime::compile(&snap, None).expect_err("bad prefix");
        assert!(err.contains("server github: prefix"), "{err}");
    }

    #[test]
    fn same_version_is_not_reapplied() {
        let active = Active::default();
        assert!(!active.is_loaded());
        let snap = snapshot("http://127.0.0.1:9/mcp");
        assert!(active.apply(&snap).expect("first"));
        assert!(!active.apply(&snap).expect("second"));
        assert!(active.is_loaded());
    }
}
