//! The aggregated endpoint `/mcp`: one MCP server whose tools, prompts, resources and
//! templates are those of every server this identity may use, as the policy shows them.
//!
//! The sidecar speaks MCP itself here, in both generations, towards the agent:
//! `initialize` (2025-03-26 … 2025-11-25: a session of the aggregate, sealed like every
//! session id the agent sees) and `server/discover` (2026-07-28, stateless) are
//! answered by the sidecar; list requests fan out to every server in parallel, each
//! within its own timeout, and are merged; `tools/call`, `prompts/get`,
//! `resources/read` and `completion/complete` go to the one server that owns the name.
//!
//! - **Names.** Tools and prompts appear as `<prefix>__<name>` (the server's name unless
//!   its `McpServer` sets `prefix`; `prefix: ""` keeps one server's names as they are).
//!   Prefixes hold no `_`, so the first `__` ends one. An unprefixed server's item whose
//!   name would read as another server's is hidden (logged), never shadowing it.
//!   Resource URIs are shown as they are: a read goes to the server whose list (or
//!   template, by its literal start) showed the URI, else to the one server whose
//!   policy shows it.
//! - **One decision.** A call's body is rewritten with the real name (every other
//!   member kept byte for byte), parsed again, and decided by the same function as on
//!   `/mcp/<server>` ([`crate::proxy`]): what is judged is what is sent.
//! - **Upstream generations.** Each server's generation is learnt once per snapshot
//!   (`server/discover`; a server that does not answer it is a 2025-11-25 one). A 2025
//!   agent's session owns one upstream session per server, opened on first use and
//!   ended with it. A 2026-07-28 agent reaches a 2026 server statelessly, and a 2025-only
//!   server through one upstream session the sidecar holds for this identity
//!   (re-opened when the server loses it), with request ids made unique and the 2026
//!   `_meta` keys taken out (bridging). A 2025 agent reaches a server that refuses its
//!   session (it speaks only 2026-07-28, learnt once per snapshot from the refusal)
//!   statelessly, its `input_required` rounds turned into server requests
//!   ([`rounds`]).
//! - **Bridging on `/mcp/<server>`.** The same machinery serves one server on its own
//!   path, names as they are, when the agent's generation is one the server lacks:
//!   `Proxy::bridge` (2026 agent, 2025-only server) and `Proxy::bridge_legacy`
//!   (2025 agent, 2026-only server; its session is the sidecar's, bound to that path).
//! - **Server requests.** Sampling, elicitation and roots requests in a server's stream
//!   reach a 2025 agent with their id rewritten to `"toolmesh:<server>:<id>"`, so two
//!   servers' ids never collide; the agent's answer goes back to that server with its
//!   own id. During a bridged 2026 agent's call they end its answer as an
//!   `input_required` round, the exchange parked until the agent's retry
//!   ([`parked`]); elsewhere (a 2026 agent's notification stream) the server gets an
//!   error answer at once.
//! - **Failures.** A server that fails or times out during a list is left out of the
//!   merged list (logged, counted in `toolmesh_aggregate_list_failures_total`); the
//!   others answer.
//! - **Notifications** ([`notify`]): a 2025 agent's `GET /mcp` and a 2026 agent's
//!   `subscriptions/listen` carry what every server sends (list changes and the
//!   updates of subscribed resources, for the latter), each server's stream re-opened
//!   until the agent goes away.
//! - **Cache.** Each server's part of a merged list (visible items, prefixed) is kept
//!   while the server's `ttlMs` lasts, per snapshot and per 2025 session (or per
//!   identity for stateless agents); a list change heard on a notification stream
//!   drops it; a server that gives no `ttlMs` is never cached. Merged answers to 2026
//!   agents carry the shortest remaining `ttlMs` (0 when any part may not be kept).
//!   Resource reads a 2026 server marks cacheable are kept too ([`reads`]).
//!
//! - **Pages** ([`page`]): each server's list is collected whole (up to [`MAX_PAGES`]
//!   of its pages) and the merged list is given out in pages of
//!   [`page::PAGE_ITEMS`], the cursor naming the server and place the next page
//!   starts at.
//!
//! - **Legacy HTTP+SSE upstreams** ([`sse`]): a server declared `transport: sse` is
//!   never relayed; its upstream sessions are streams the sidecar holds, and agents of
//!   both generations reach it as they reach a 2025-11-25 server.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method as HttpMethod, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::filter::{self, Framing};
use crate::identity::Identity;
use crate::mcp::{self, Envelope, Kind, Method};
use crate::snapshot::{Route, Runtime};
mod notify;
mod page;
mod parked;
mod reads;
mod rounds;
mod sse;

use crate::stdio::{ENVELOPE_KEYS, LEGACY_VERSIONS, complete_modern_result, json_string};

/// The session id's "server" for sessions of the aggregate (no server has this name).
const AGGREGATE: &str = "/mcp";
/// The version the sidecar asks 2025-generation servers for.
const LEGACY_VERSION: &str = "2025-11-25";
/// Pages of one server's list collected at most.
pub const MAX_PAGES: usize = 100;
/// Largest answer read from one server for the sidecar's own requests.
const MAX_REPLY: usize = filter::MAX_FILTERED_BODY;
/// Sessions of the aggregate kept at most (the least recently opened go first).
const MAX_SESSIONS: usize = 4096;
/// Largest `initialize` params a session of the aggregate keeps.
const MAX_INIT_PARAMS: usize = 64 * 1024;
/// Resource URIs whose server is remembered at most.
const MAX_OWNERS: usize = 100_000;
/// Lists cached at most (expired ones are dropped first; beyond, nothing is cached).
const MAX_CACHED: usize = 4096;
/// Prefix of the ids given to server requests on the way to a 2025 agent.
const SERVER_REQUEST: &str = "toolmesh:";
/// The server requests that cross generations (as 2026 input requests and back).
const INPUT_METHODS: [&str; 3] = ["elicitation/create", "sampling/createMessage", "roots/list"];

/// What the aggregate remembers between requests: agents' sessions, the upstream
/// sessions held for 2026-07-28 agents, servers' generations, resource owners.
#[derive(Debug, Default)]
pub struct Aggregate {
    sessions: Mutex<Oldest<String, Arc<AgentSession>>>,
    /// Upstream sessions the sidecar holds for stateless agents, by subject (a sidecar
    /// has one; a gateway one per user, the least recently added dropped beyond
    /// [`MAX_SHARED_SUBJECTS`]), then by server.
    shared: Mutex<Oldest<Identity, Arc<Upstreams>>>,
    /// The server whose list showed a resource URI, and templates' literal starts.
    owners: Mutex<Owners>,
    /// Servers' lists as the agent sees them, for as long as the servers say.
    cache: Mutex<HashMap<CacheKey, Cached>>,
    /// Bridged calls waiting for their 2026 agents' input ([`parked`]).
    parked: parked::ParkedCalls,
    /// Resource reads servers mark cacheable ([`reads`]).
    reads: reads::Reads,
    next_id: AtomicU64,
}

/// A map that holds at most a given number of entries, the oldest dropped first:
/// sessions of the aggregate by token, upstream sessions held per subject.
#[derive(Debug)]
struct Oldest<K, V> {
    map: HashMap<K, V>,
    /// Keys in insertion order (a key removed from `map` may linger here until its
    /// turn comes; dropping it then drops nothing).
    order: std::collections::VecDeque<K>,
}

impl<K, V> Default for Oldest<K, V> {
    fn default() -> Self {
        Oldest {
            map: HashMap::new(),
            order: std::collections::VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Oldest<K, V> {
    fn get<Q: std::hash::Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.map.get(key)
    }

    /// Insert `value` under `key`, first dropping the oldest entry when `max` are held.
    fn insert(&mut self, key: K, value: V, max: usize) -> &mut V {
        if self.map.len() >= max
            && let Some(oldest) = self.order.pop_front()
        {
            self.map.remove(&oldest);
        }
        self.order.push_back(key.clone());
        self.map.entry(key).insert_entry(value).into_mut()
    }

    fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(keep);
    }
}

/// A cached list: snapshot version, server, list method, whose it is (the 2025
/// session it was fetched in, or the subject for stateless agents), and whether its
/// names are prefixed (the aggregate) or as the server names them (bridged).
type CacheKey = (String, String, Method, Scope, bool);

/// Whose a cached list is: lists are filtered by the caller's policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    Session(String),
    Subject(Identity),
}

#[derive(Debug)]
struct Cached {
    items: Arc<Vec<String>>,
    expires: tokio::time::Instant,
}

#[derive(Debug, Default)]
struct Owners {
    uris: HashMap<String, String>,
    templates: Vec<(String, String)>,
}

/// A 2025-generation agent's session of the aggregate.
#[derive(Debug)]
struct AgentSession {
    /// Its key in [`Sessions`], and its lists' scope in the cache.
    token: String,
    /// The server whose own path it was opened on (bridged), or `None` for `/mcp`: a
    /// session is used only where it was opened.
    only: Option<String>,
    /// The agent's `initialize` params, which open each upstream session.
    init_params: Box<RawValue>,
    /// Its 2026 `_meta` envelope, for servers that speak only 2026-07-28.
    envelope: String,
    upstreams: Arc<Upstreams>,
    /// Input requests of such servers the agent has yet to answer ([`rounds`]).
    pending: rounds::Pending,
    /// Requests in flight, by the agent's id (raw), to the server handling them: where
    /// a cancellation goes.
    in_flight: Mutex<HashMap<String, String>>,
    /// Bridged requests to servers that speak only 2026-07-28, by the agent's id: a
    /// cancellation ends them (which cancels a stateless request upstream).
    cancels: Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>,
}

/// Upstream sessions by server, each opened once (concurrent first uses wait for it).
#[derive(Debug, Default)]
struct Upstreams(Mutex<HashMap<String, Arc<tokio::sync::OnceCell<UpstreamSession>>>>);

#[derive(Debug, Clone)]
struct UpstreamSession {
    /// The snapshot version it was opened under (a new snapshot may move the server).
    version: String,
    endpoint: usize,
    id: Option<HeaderValue>,
    /// The server's `InitializeResult`, raw.
    init: Arc<str>,
    /// A legacy HTTP+SSE server's stream, which carries this session ([`sse`]).
    legacy: Option<Arc<sse::Channel>>,
}

/// Upstream sessions held for stateless agents, per subject.
/// Subjects whose upstream sessions are held at most (a gateway's users).
const MAX_SHARED_SUBJECTS: usize = 1024;

impl Aggregate {
    /// The upstream sessions held for `subject`'s stateless requests.
    fn shared_of(&self, subject: &Identity) -> Arc<Upstreams> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(upstreams) = shared.get(subject) {
            return upstreams.clone();
        }
        shared
            .insert(subject.clone(), Arc::default(), MAX_SHARED_SUBJECTS)
            .clone()
    }

    /// Forget the cached lists and reads of `server` (it said a list changed).
    fn invalidate(&self, server: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, s, _, _, _), _| s != server);
        self.reads.forget(server);
    }
}

impl Upstreams {
    fn cell(&self, server: &str) -> Arc<tokio::sync::OnceCell<UpstreamSession>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cell) = map.get(server) {
            return cell.clone();
        }
        map.entry(server.to_owned()).or_default().clone()
    }

    fn forget(&self, server: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(server);
    }

    fn opened(&self) -> Vec<(String, UpstreamSession)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.get()?.clone())))
            .collect()
    }
}

/// Who the agent is in this request, as far as the aggregate needs to know.
struct Agent<'a> {
    subject: &'a Identity,
    runtime: &'a Arc<Runtime>,
    /// 2026-07-28 or later: stateless.
    modern: bool,
    session: Option<Arc<AgentSession>>,
    /// Bridging on `/mcp/<server>`: this server alone, its names as they are.
    only: Option<&'a Arc<Route>>,
    /// The params of the request being served, when a 2026 agent's: its `_meta`
    /// capabilities open the upstream session it is bridged on.
    request: Option<&'a RawValue>,
}

impl Agent<'_> {
    /// The servers this request is about: the one bridged, or every aggregated one.
    fn routes(&self) -> Vec<&Arc<Route>> {
        match self.only {
            Some(route) => vec![route],
            None => self.runtime.aggregated().iter().collect(),
        }
    }
}

/// [`Agent`] owned, for tasks that outlive the request (notification streams).
#[derive(Debug, Clone)]
struct Owned {
    subject: Identity,
    runtime: Arc<Runtime>,
    modern: bool,
    session: Option<Arc<AgentSession>>,
    only: Option<Arc<Route>>,
}

impl Owned {
    fn agent(&self) -> Agent<'_> {
        Agent {
            subject: &self.subject,
            runtime: &self.runtime,
            modern: self.modern,
            session: self.session.clone(),
            only: self.only.as_ref(),
            request: None,
        }
    }
}

/// A JSON-RPC answer of an upstream to one of the sidecar's own requests.
enum Reply {
    Result(Box<RawValue>),
    Error(Box<RawValue>),
}

impl crate::proxy::Proxy {
    /// `/mcp`: the aggregate (module docs).
    pub(crate) async fn aggregate(
        self: &Arc<Self>,
        req: http::Request<Incoming>,
        subject: &Identity,
        runtime: &Arc<Runtime>,
        ctx: &mut crate::proxy::Ctx,
    ) -> Result<Response<Body>, ProxyError> {
        ctx.server = crate::telemetry::AGGREGATE_SERVER;
        let (parts, incoming) = req.into_parts();
        match parts.method {
            HttpMethod::POST => {}
            HttpMethod::DELETE => {
                ctx.decision = crate::audit::Verdict::Plumbing;
                ctx.trace_from(&parts.headers, None);
                return self
                    .end_session(subject, runtime, &parts.headers, None)
                    .await;
            }
            HttpMethod::GET => {
                ctx.decision = crate::audit::Verdict::Plumbing;
                let session = self.agent_session(subject, &parts.headers, None)?;
                let agent = Owned {
                    subject: subject.clone(),
                    runtime: runtime.clone(),
                    modern: false,
                    session: Some(session),
                    only: None,
                };
                return Ok(notify::stream(self.listen(
                    agent,
                    notify::Wanted::ALL,
                    None,
                    HashMap::new(),
                )));
            }
            other => return Err(ProxyError::MethodNotAllowed(other.to_string())),
        }
        let body = self.read_body(&parts.headers, incoming).await?;
        let envelope = mcp::parse(&body).map_err(crate::proxy::rejection)?;
        ctx.request_id = envelope.id().map(|id| id.to_owned());
        let Envelope::Single(message) = &envelope else {
            return Err(ProxyError::InvalidRequest(
                "JSON-RPC batches are not accepted on the aggregated /mcp".to_owned(),
            ));
        };
        ctx.trace_from(&parts.headers, Some(message));
        ctx.method = message.rpc.map_or("(response)", Method::name);
        ctx.rpc_method = message.method.as_deref().map(crate::proxy::truncate);
        let modern =
            mcp::check_headers(&parts.headers, &envelope).map_err(crate::proxy::rejection)?;
        ctx.decision = crate::audit::Verdict::Plumbing;
        let session = if modern || message.rpc == Some(Method::Initialize) {
            None
        } else {
            Some(self.agent_session(subject, &parts.headers, None)?)
        };
        let agent = Agent {
            subject,
            runtime,
            modern,
            session,
            only: None,
            request: message.params,
        };
        if message.kind == Kind::Request && message.rpc == Some(Method::Initialize) && !modern {
            return self.initialize(subject, message, message.id, None).await;
        }
        self.dispatch(&agent, message, &parts.headers, &body, ctx)
            .await
    }

    /// A 2026-07-28 request on `/mcp/<server>` for a server that speaks only 2025
    /// revisions: served as the aggregate serves it, with this server alone and its
    /// names as they are (bridging). Decided, filtered and audited as on the
    /// aggregate, by the same functions as the relayed path.
    pub(crate) async fn bridge(
        self: &Arc<Self>,
        runtime: &Arc<Runtime>,
        route: &Arc<Route>,
        headers: &HeaderMap,
        body: &Bytes,
        ctx: &mut crate::proxy::Ctx,
    ) -> Result<Response<Body>, ProxyError> {
        let envelope = mcp::parse(body).map_err(crate::proxy::rejection)?;
        let Envelope::Single(message) = &envelope else {
            return Err(ProxyError::InvalidRequest(
                "not a single message".to_owned(),
            ));
        };
        let subject = ctx.subject.clone();
        let agent = Agent {
            subject: &subject,
            runtime,
            modern: true,
            session: None,
            only: Some(route),
            request: message.params,
        };
        self.dispatch(&agent, message, headers, body, ctx).await
    }

    /// A 2025 agent on `/mcp/<server>` for a server that speaks only 2026-07-28: its
    /// session is the sidecar's (as on the aggregate, with this server alone and its
    /// names as they are), its requests reach the server statelessly ([`rounds`]).
    pub(crate) async fn bridge_legacy(
        self: &Arc<Self>,
        runtime: &Arc<Runtime>,
        route: &Arc<Route>,
        method: &HttpMethod,
        headers: &HeaderMap,
        body: &Bytes,
        ctx: &mut crate::proxy::Ctx,
    ) -> Result<Response<Body>, ProxyError> {
        let subject = ctx.subject.clone();
        match *method {
            HttpMethod::DELETE => {
                return self
                    .end_session(&subject, runtime, headers, Some(route))
                    .await;
            }
            HttpMethod::GET => {
                let session = self.agent_session(&subject, headers, Some(route))?;
                let agent = Owned {
                    subject,
                    runtime: runtime.clone(),
                    modern: false,
                    session: Some(session),
                    only: Some(route.clone()),
                };
                return Ok(notify::stream(self.listen(
                    agent,
                    notify::Wanted::ALL,
                    None,
                    HashMap::new(),
                )));
            }
            _ => {}
        }
        let envelope = mcp::parse(body).map_err(crate::proxy::rejection)?;
        let Envelope::Single(message) = &envelope else {
            return Err(ProxyError::InvalidRequest(format!(
                "JSON-RPC batches cannot reach server {}: {}",
                route.name,
                if route.sse {
                    "it speaks the legacy HTTP+SSE transport"
                } else {
                    "it speaks only 2026-07-28"
                }
            )));
        };
        if message.kind == Kind::Request && message.rpc == Some(Method::Initialize) {
            return self
                .initialize(&subject, message, message.id, Some((runtime, route)))
                .await;
        }
        let session = self.agent_session(&subject, headers, Some(route))?;
        let agent = Agent {
            subject: &subject,
            runtime,
            modern: false,
            session: Some(session),
            only: Some(route),
            request: None,
        };
        self.dispatch(&agent, message, headers, body, ctx).await
    }

    /// One message of an agent (its session, if any, already checked).
    async fn dispatch(
        self: &Arc<Self>,
        agent: &Agent<'_>,
        message: &mcp::Message<'_>,
        headers: &HeaderMap,
        body: &Bytes,
        ctx: &mut crate::proxy::Ctx,
    ) -> Result<Response<Body>, ProxyError> {
        let id = message.id;
        let modern = agent.modern;
        let where_ = if agent.only.is_some() {
            "bridged to a server of the other protocol generation"
        } else {
            "served by the aggregated /mcp; use /mcp/<server>"
        };
        match (message.kind, message.rpc) {
            (Kind::Response, _) if !agent.modern => self.answer_server(agent, message, body).await,
            (Kind::Response, _) => Err(ProxyError::InvalidRequest(
                "a 2026-07-28 client answers no server requests".to_owned(),
            )),
            (Kind::Notification, rpc) => {
                self.notification(agent, rpc, message).await;
                Ok(accepted())
            }
            (Kind::Request, Some(Method::Discover)) if modern => match agent.only {
                None => Ok(json_answer(id, &discover_result(), &HeaderMap::new())),
                Some(route) => {
                    let init = self.server_init(agent, route).await?;
                    Ok(json_answer(id, &bridged_discover(&init), &HeaderMap::new()))
                }
            },
            (Kind::Request, Some(Method::SubscriptionsListen)) if modern => {
                let (wanted, asked) = notify::Wanted::requested(message.params);
                let Some(id) = id else {
                    return Err(ProxyError::InvalidRequest(
                        "subscriptions/listen without an id".to_owned(),
                    ));
                };
                let subscribed = self.subscribed(agent, asked).await;
                let honored = wanted
                    .with_uris(subscribed.values().flatten().cloned().collect())
                    .filter();
                let owned = Owned {
                    subject: agent.subject.clone(),
                    runtime: agent.runtime.clone(),
                    modern: true,
                    session: None,
                    only: agent.only.cloned(),
                };
                Ok(notify::stream(self.listen(
                    owned,
                    wanted,
                    Some((id.to_owned(), honored)),
                    subscribed,
                )))
            }
            (Kind::Request, Some(Method::Ping)) => Ok(json_answer(id, "{}", &HeaderMap::new())),
            (Kind::Request, Some(method)) if method.list().is_some() => {
                self.list(agent, method, id, message.params).await
            }
            (Kind::Request, Some(Method::LoggingSetLevel)) => {
                self.set_level(agent, message.params).await;
                Ok(json_answer(id, "{}", &HeaderMap::new()))
            }
            (Kind::Request, Some(method))
                if method.is_gated() || method == Method::ResourcesUnsubscribe =>
            {
                self.call(agent, method, message, headers, body, ctx).await
            }
            (Kind::Request, _) => Err(ProxyError::InvalidRequest(format!(
                "method {:?} is not {where_}",
                message.method.as_deref().unwrap_or_default()
            ))),
        }
    }

    /// The agent's session of the aggregate, from its sealed id.
    fn agent_session(
        &self,
        subject: &Identity,
        headers: &HeaderMap,
        only: Option<&Route>,
    ) -> Result<Arc<AgentSession>, ProxyError> {
        let mut ids = headers.get_all(mcp::HEADER_SESSION).iter();
        let (Some(sealed), None) = (ids.next(), ids.next()) else {
            return Err(ProxyError::InvalidRequest(
                "a session of the aggregate needs exactly one Mcp-Session-Id (send initialize first)"
                    .to_owned(),
            ));
        };
        let (_, token) = self
            .sessions
            .open(subject.as_str(), AGGREGATE, 1, sealed.as_bytes())
            .ok_or(ProxyError::UnknownSession)?;
        let token = token.to_str().map_err(|_| ProxyError::UnknownSession)?;
        let sessions = self
            .aggregate
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        sessions
            .get(token)
            .filter(|s| s.only.as_deref() == only.map(|r| r.name.as_str()))
            .cloned()
            .ok_or(ProxyError::UnknownSession)
    }

    async fn initialize(
        &self,
        subject: &Identity,
        message: &mcp::Message<'_>,
        id: Option<&RawValue>,
        only: Option<(&Arc<Runtime>, &Arc<Route>)>,
    ) -> Result<Response<Body>, ProxyError> {
        #[derive(Deserialize)]
        struct Params<'a> {
            #[serde(borrow, rename = "protocolVersion")]
            version: Option<Cow<'a, str>>,
        }
        let params = message
            .params
            .ok_or_else(|| ProxyError::InvalidRequest("initialize without params".to_owned()))?;
        // Kept for the session's life (each upstream session opens with it): bounded.
        if params.get().len() > MAX_INIT_PARAMS {
            return Err(ProxyError::InvalidRequest(format!(
                "initialize params over {MAX_INIT_PARAMS} bytes"
            )));
        }
        let requested: Params<'_> = serde_json::from_str(params.get())
            .map_err(|e| ProxyError::InvalidRequest(format!("initialize params: {e}")))?;
        let version = match requested.version.as_deref() {
            Some(v) if LEGACY_VERSIONS.contains(&v) => v.to_owned(),
            _ => LEGACY_VERSION.to_owned(),
        };
        let token = random_token()?;
        let sealed = self
            .sessions
            .seal(subject.as_str(), AGGREGATE, 0, token.as_bytes())
            .ok_or_else(|| ProxyError::Misconfigured("session id too long".to_owned()))?;
        let session = Arc::new(AgentSession {
            token: token.clone(),
            only: only.map(|(_, route)| route.name.clone()),
            init_params: params.to_owned(),
            envelope: rounds::envelope(params),
            upstreams: Arc::default(),
            pending: rounds::Pending::default(),
            in_flight: Mutex::default(),
            cancels: Mutex::default(),
        });
        {
            let mut sessions = self
                .aggregate
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            sessions.insert(token, session.clone(), MAX_SESSIONS);
        }
        let result = match only {
            None => format!(
                "{{\"protocolVersion\":{},\"capabilities\":{CAPABILITIES},\"serverInfo\":{},\"instructions\":{}}}",
                json_string(&version),
                server_info(),
                json_string(INSTRUCTIONS)
            ),
            // The server's own description.
            Some((runtime, route)) => {
                let agent = Agent {
                    subject,
                    runtime,
                    modern: false,
                    session: Some(session),
                    only: Some(route),
                    request: None,
                };
                // A legacy HTTP+SSE server's from the session this one opens with it,
                // at once (the agent keeps the version agreed here).
                if route.sse {
                    let init = self.server_init(&agent, route).await?;
                    initialize_result(&bridged_discover(&init), &version)
                } else {
                    // A 2026-only server's, from its `server/discover`.
                    match self.ask(&agent, route, Method::Discover, "{}").await? {
                        Reply::Result(discovered) => initialize_result(discovered.get(), &version),
                        Reply::Error(e) => {
                            return Err(ProxyError::UpstreamFailed {
                                server: route.name.clone(),
                                reason: format!(
                                    "server/discover answered {}",
                                    crate::proxy::truncate(e.get())
                                ),
                            });
                        }
                    }
                }
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(mcp::HEADER_SESSION, sealed);
        Ok(json_answer(id, &result, &headers))
    }

    async fn end_session(
        &self,
        subject: &Identity,
        runtime: &Arc<Runtime>,
        headers: &HeaderMap,
        only: Option<&Arc<Route>>,
    ) -> Result<Response<Body>, ProxyError> {
        let session = self.agent_session(subject, headers, only.map(|r| &**r))?;
        {
            let mut sessions = self
                .aggregate
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            sessions.retain(|_, s| !Arc::ptr_eq(s, &session));
        }
        for (server, upstream) in session.upstreams.opened() {
            let (Some(route), Some(id)) = (runtime.route(&server), upstream.id) else {
                continue;
            };
            let mut headers = HeaderMap::new();
            headers.insert(mcp::HEADER_SESSION, id);
            let uri = route.endpoints[upstream.endpoint.min(route.endpoints.len() - 1)]
                .uri
                .clone();
            if let Err(e) = self
                .upstream
                .send(route, uri, HttpMethod::DELETE, headers, Bytes::new())
                .await
            {
                tracing::debug!(server = %server, error = %e, "ending an upstream session failed");
            }
        }
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::OK;
        Ok(resp)
    }

    async fn notification(
        &self,
        agent: &Agent<'_>,
        rpc: Option<Method>,
        message: &mcp::Message<'_>,
    ) {
        let Some(session) = &agent.session else {
            // Stateless agents cancel by closing their request; nothing else is routed.
            return;
        };
        match rpc {
            Some(Method::NotificationsCancelled) => {
                #[derive(Deserialize)]
                struct Cancelled<'a> {
                    #[serde(borrow, rename = "requestId")]
                    request_id: Option<&'a RawValue>,
                }
                let Some(target) = message
                    .params
                    .and_then(|p| serde_json::from_str::<Cancelled<'_>>(p.get()).ok())
                    .and_then(|c| c.request_id)
                else {
                    return;
                };
                let server = session
                    .in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(target.get())
                    .cloned();
                let Some(route) = server.and_then(|s| agent.runtime.route(&s).cloned()) else {
                    return;
                };
                // No session to carry it: the bridged request is ended instead, which
                // cancels it upstream ([`rounds`]).
                if route.refuses_sessions() {
                    let cancel = session
                        .cancels
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(target.get());
                    if let Some(cancel) = cancel {
                        let _ = cancel.send(());
                    }
                    return;
                }
                let text = format!(
                    "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/cancelled\",\"params\":{}}}",
                    message.params.map_or("{}", RawValue::get)
                );
                let _ = self.post_session(agent, &route, Bytes::from(text)).await;
            }
            Some(Method::NotificationsRootsListChanged) => {
                for (server, _) in session.upstreams.opened() {
                    if let Some(route) = agent.runtime.route(&server).cloned() {
                        let text =
                            "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/roots/list_changed\"}";
                        let _ = self
                            .post_session(agent, &route, Bytes::from_static(text.as_bytes()))
                            .await;
                    }
                }
            }
            // `notifications/initialized` and the rest are the aggregate's own business.
            _ => {}
        }
    }

    /// A 2025 agent's answer to a server request: back to the server that asked, with
    /// that server's id.
    async fn answer_server(
        &self,
        agent: &Agent<'_>,
        message: &mcp::Message<'_>,
        body: &Bytes,
    ) -> Result<Response<Body>, ProxyError> {
        let unknown =
            || ProxyError::InvalidRequest("a response to no request of the aggregate".to_owned());
        let id: Cow<'_, str> = message
            .id
            .and_then(|id| serde_json::from_str(id.get()).ok())
            .ok_or_else(unknown)?;
        // An input request of a bridged round: the round waits for it here.
        if let Some(session) = &agent.session
            && id.contains(":input-")
        {
            let answered: rounds::Answered<'_> =
                serde_json::from_slice(body).map_err(|_| unknown())?;
            let answer = match (answered.result, answered.error) {
                (Some(result), _) => Ok(result.to_owned()),
                (None, Some(error)) => Err(error.to_owned()),
                (None, None) => return Err(unknown()),
            };
            if session.pending.answer(&id, answer) {
                return Ok(accepted());
            }
            return Err(unknown());
        }
        let (server, original) = id
            .strip_prefix(SERVER_REQUEST)
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(unknown)?;
        let route = agent.runtime.route(server).cloned().ok_or_else(unknown)?;
        RawValue::from_string(original.to_owned()).map_err(|_| unknown())?;
        let text = std::str::from_utf8(body).map_err(|_| unknown())?;
        let rewritten = filter::rewrite_members(text, |key, _, out| {
            if key == "id" {
                out.push_str(original);
                true
            } else {
                false
            }
        })
        .ok_or_else(unknown)?;
        let resp = self
            .post_session(agent, &route, Bytes::from(rewritten))
            .await?;
        let mut answer = Response::new(body::empty());
        *answer.status_mut() = if resp.status().is_success() {
            StatusCode::ACCEPTED
        } else {
            resp.status()
        };
        Ok(answer)
    }

    /// `logging/setLevel` goes to every server (each answers for itself; one that
    /// fails is logged, not the agent's problem).
    async fn set_level(&self, agent: &Agent<'_>, params: Option<&RawValue>) {
        let params = params.map_or("{}", RawValue::get);
        let sets = agent.routes().into_iter().map(|route| async move {
            let set = tokio::time::timeout(
                route.timeout,
                self.ask(agent, route, Method::LoggingSetLevel, params),
            )
            .await;
            if !matches!(set, Ok(Ok(Reply::Result(_)))) {
                tracing::debug!(server = %route.name, "logging/setLevel not taken");
            }
        });
        futures_util::future::join_all(sets).await;
    }

    /// A list request, answered with every server's visible items merged.
    async fn list(
        &self,
        agent: &Agent<'_>,
        method: Method,
        id: Option<&RawValue>,
        params: Option<&RawValue>,
    ) -> Result<Response<Body>, ProxyError> {
        let Some(kind) = method.list() else {
            return Err(ProxyError::InvalidRequest("not a list".to_owned()));
        };
        let cursor = page::requested(params, &agent.runtime.version)?;
        let (merged, ttl) = self.merged(agent, method).await;
        let (items, next) = page::page(&merged, cursor.as_ref(), &agent.runtime.version);
        let mut result = format!("{{\"{}\":[{}]", kind.field, items.join(","));
        if let Some(next) = next {
            result.push_str(&format!(",\"nextCursor\":{}", json_string(&next)));
        }
        if agent.modern {
            result.push_str(&format!(
                ",\"resultType\":\"complete\",\"ttlMs\":{},\"cacheScope\":\"private\"",
                ttl.as_millis()
            ));
        }
        result.push('}');
        Ok(json_answer(id, &result, &HeaderMap::new()))
    }

    /// Every server's visible items of one list, as the agent sees them. Servers are
    /// taken unprefixed first, then by name: a resource (or template) two servers list
    /// is shown once, and belongs to the first.
    ///
    /// Also how long the merged list may be kept: the shortest time any server's part
    /// may, and zero when a part may not be kept or a server is missing.
    async fn merged(&self, agent: &Agent<'_>, method: Method) -> (page::Merged, Duration) {
        let Some(kind) = method.list() else {
            return (page::Merged::default(), Duration::ZERO);
        };
        let mut ttl = Duration::MAX;
        let mut routes = agent.routes();
        routes.sort_by(|a, b| page::order(a).cmp(&page::order(b)));
        let fetches = routes.iter().map(|route| async move {
            let items =
                tokio::time::timeout(route.timeout, self.server_items(agent, route, method)).await;
            (*route, items)
        });
        let resources = kind.kind == mcp::TargetKind::Resource;
        let mut merged = page::Merged::default();
        let mut owned: HashMap<String, String> = HashMap::new();
        let mut answered: Vec<&str> = Vec::new();
        for (route, fetched) in futures_util::future::join_all(fetches).await {
            let (items, kept) = match fetched {
                Ok(Ok(part)) => part,
                Ok(Err(e)) => {
                    list_failed(route, method, &e.to_string());
                    ttl = Duration::ZERO;
                    continue;
                }
                Err(_) => {
                    list_failed(route, method, "timed out");
                    ttl = Duration::ZERO;
                    continue;
                }
            };
            ttl = ttl.min(kept);
            answered.push(&route.name);
            merged.start_part(route);
            for item in items.iter() {
                if resources {
                    let Some(key) = resource_key(kind, item) else {
                        continue;
                    };
                    if owned.contains_key(&key) {
                        tracing::debug!(server = %route.name, resource = %key, "listed by an earlier server too; shown once");
                        continue;
                    }
                    owned.insert(key, route.name.clone());
                }
                merged.items.push(item.clone());
            }
        }
        if resources {
            self.remember_owners(kind, &answered, owned);
        }
        (
            merged,
            if ttl == Duration::MAX {
                Duration::ZERO
            } else {
                ttl
            },
        )
    }

    /// One server's part of a merged list, as the agent sees it, from the cache while
    /// the server's `ttlMs` lasts; and how much longer it may be kept.
    async fn server_items(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
        method: Method,
    ) -> Result<(Arc<Vec<String>>, Duration), ProxyError> {
        let scope = match &agent.session {
            Some(s) => Scope::Session(s.token.clone()),
            None => Scope::Subject(agent.subject.clone()),
        };
        let key: CacheKey = (
            agent.runtime.version.clone(),
            route.name.clone(),
            method,
            scope,
            agent.only.is_none(),
        );
        let now = tokio::time::Instant::now();
        let hit = {
            let cache = self
                .aggregate
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            cache
                .get(&key)
                .filter(|c| c.expires > now)
                .map(|c| (c.items.clone(), c.expires - now))
        };
        crate::telemetry::aggregate_cache(
            crate::telemetry::AGGREGATE_LIST_CACHE,
            &route.label,
            hit.is_some(),
        );
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let Some(kind) = method.list() else {
            return Ok((Arc::default(), Duration::ZERO));
        };
        let (items, ttl) = self.collect(agent, route, method).await?;
        let shown: Vec<String> = if kind.kind == mcp::TargetKind::Resource || agent.only.is_some() {
            items
        } else {
            items
                .iter()
                .filter_map(|item| {
                    let shown = self.expose(agent.runtime, route, kind, item);
                    if shown.is_none() {
                        tracing::warn!(
                            server = %route.name,
                            "an item of the unprefixed server would read as another server's; hidden on /mcp"
                        );
                    }
                    shown
                })
                .collect()
        };
        let shown = Arc::new(shown);
        if !ttl.is_zero() {
            let mut cache = self
                .aggregate
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHED {
                cache.retain(|_, c| c.expires > now);
            }
            if cache.len() < MAX_CACHED {
                cache.insert(
                    key,
                    Cached {
                        items: shown.clone(),
                        expires: now + ttl,
                    },
                );
            }
        }
        Ok((shown, ttl))
    }

    /// One server's list: every page, the items the policy shows, and how long the
    /// server says it may be kept (the shortest `ttlMs` of its pages; zero when a page
    /// gives none).
    async fn collect(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
        method: Method,
    ) -> Result<(Vec<String>, Duration), ProxyError> {
        let Some(kind) = method.list() else {
            return Ok((Vec::new(), Duration::ZERO));
        };
        let mut ttl = Duration::MAX;
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let params = cursor
                .as_deref()
                .map(|c| format!("{{\"cursor\":{c}}}"))
                .unwrap_or_else(|| "{}".to_owned());
            let reply = self.ask(agent, route, method, &params).await?;
            let result = match reply {
                Reply::Result(result) => result,
                Reply::Error(error) => {
                    return Err(ProxyError::UpstreamFailed {
                        server: route.name.clone(),
                        reason: format!(
                            "{} answered {}",
                            method.name(),
                            crate::proxy::truncate(error.get())
                        ),
                    });
                }
            };
            let (visible, next) = kind.visible_items(route, result.get()).ok_or_else(|| {
                ProxyError::UpstreamFailed {
                    server: route.name.clone(),
                    reason: format!("its {} result cannot be read", method.name()),
                }
            })?;
            items.extend(visible.into_iter().map(|i| i.get().to_owned()));
            ttl = ttl.min(ttl_of(result.get()));
            match next.map(RawValue::get) {
                Some(next) if next != "null" && cursor.as_deref() != Some(next) => {
                    cursor = Some(next.to_owned());
                }
                _ => break,
            }
        }
        Ok((items, ttl))
    }

    /// A list item as the agent sees it on `/mcp` (tools and prompts prefixed), or
    /// `None` when an unprefixed item would read as another server's.
    fn expose(
        &self,
        runtime: &Runtime,
        route: &Arc<Route>,
        kind: filter::ListKind,
        item: &str,
    ) -> Option<String> {
        if kind.kind == mcp::TargetKind::Resource {
            return Some(item.to_owned());
        }
        if route.prefix.is_empty() {
            #[derive(Deserialize)]
            struct Named<'a> {
                #[serde(borrow)]
                name: Cow<'a, str>,
            }
            let name = serde_json::from_str::<Named<'_>>(item).ok()?.name;
            let owner = runtime.resolve(&name).map(|(r, _)| r.name.as_str());
            return (owner == Some(route.name.as_str())).then(|| item.to_owned());
        }
        // One pass: the name is read where it is rewritten.
        let mut named = false;
        let shown = filter::rewrite_members(item, |key, raw, out| {
            if key != "name" {
                return false;
            }
            let Ok(name) = serde_json::from_str::<Cow<'_, str>>(raw) else {
                return false;
            };
            named = true;
            out.push_str(&json_string(&format!("{}__{}", route.prefix, name)));
            true
        })?;
        named.then_some(shown)
    }

    /// Record who owns the resources (or templates) of a merged list; servers that
    /// did not answer keep what they owned.
    fn remember_owners(
        &self,
        kind: filter::ListKind,
        answered: &[&str],
        owned: HashMap<String, String>,
    ) {
        let mut owners = self
            .aggregate
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if kind.key == "uriTemplate" {
            owners
                .templates
                .retain(|(_, s)| !answered.contains(&s.as_str()));
            for (template, server) in owned {
                let literal = template.split('{').next().unwrap_or_default().to_owned();
                owners.templates.push((literal, server));
            }
        } else {
            owners.uris.retain(|_, s| !answered.contains(&s.as_str()));
            for (uri, server) in owned {
                if owners.uris.len() >= MAX_OWNERS {
                    break;
                }
                owners.uris.insert(uri, server);
            }
        }
    }

    /// The server a resource URI belongs to (module docs).
    fn owner_of(&self, runtime: &Runtime, uri: &str) -> Option<Arc<Route>> {
        {
            let owners = self
                .aggregate
                .owners
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let named = owners.uris.get(uri).or_else(|| {
                owners
                    .templates
                    .iter()
                    .filter(|(literal, _)| !literal.is_empty() && uri.starts_with(literal.as_str()))
                    .max_by_key(|(literal, _)| literal.len())
                    .map(|(_, server)| server)
            });
            if let Some(route) = named.and_then(|s| runtime.route(s)) {
                return Some(route.clone());
            }
        }
        let mut showing = runtime
            .aggregated()
            .iter()
            .filter(|r| r.policy.visible(mcp::TargetKind::Resource, uri));
        match (showing.next(), showing.next()) {
            (Some(only), None) => Some(only.clone()),
            _ => None,
        }
    }

    /// A gated request: to the server that owns its target, decided as on
    /// `/mcp/<server>`, the answer relayed.
    async fn call(
        self: &Arc<Self>,
        agent: &Agent<'_>,
        method: Method,
        message: &mcp::Message<'_>,
        headers: &HeaderMap,
        body: &Bytes,
        ctx: &mut crate::proxy::Ctx,
    ) -> Result<Response<Body>, ProxyError> {
        let target = message
            .acts_on
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        // Resources belong to a server by the URI as listed: the one sent.
        let uri = message.target.clone().unwrap_or_default();
        let (route, real): (Arc<Route>, Option<String>) = match (agent.only, method) {
            (Some(route), _) => (route.clone(), None),
            (None, Method::ToolsCall | Method::PromptsGet) => {
                let (route, real) = agent.runtime.resolve(&target).ok_or_else(|| {
                    ProxyError::InvalidRequest(format!(
                        "{} {:?}: no server on /mcp has that prefix",
                        if method == Method::ToolsCall {
                            "tool"
                        } else {
                            "prompt"
                        },
                        crate::proxy::truncate(&target)
                    ))
                })?;
                (route.clone(), Some(real.to_owned()))
            }
            (None, Method::CompletionComplete) => match message.acts_on.as_ref().map(|t| t.kind) {
                Some(mcp::TargetKind::Prompt) => {
                    let (route, real) = agent.runtime.resolve(&target).ok_or_else(|| {
                        ProxyError::InvalidRequest("completion of an unknown prompt".to_owned())
                    })?;
                    (route.clone(), Some(real.to_owned()))
                }
                _ => (self.resource_owner(agent, &target).await?, None),
            },
            (None, _) => (self.resource_owner(agent, &uri).await?, None),
        };
        ctx.server = route.label.clone();
        let text = std::str::from_utf8(body)
            .map_err(|_| ProxyError::Parse("the body is not UTF-8".to_owned()))?;
        let bridged = agent.modern && !self.speaks_modern(&route).await;
        // A 2025 agent, a server that speaks only 2026-07-28: bridged the other way.
        let reverse = match &agent.session {
            Some(session) if !agent.modern && self.modern_only(agent, &route).await => {
                Some(session.clone())
            }
            _ => None,
        };
        let upstream_id = if bridged {
            Some(
                self.aggregate
                    .next_id
                    .fetch_add(1, Ordering::Relaxed)
                    .to_string(),
            )
        } else {
            None
        };
        let rewritten = rewrite_request(
            text,
            method,
            real.as_deref(),
            upstream_id.as_deref(),
            bridged,
        )
        .and_then(|text| match &reverse {
            Some(session) => rounds::with_envelope(&text, &session.envelope),
            None => Some(text),
        })
        .ok_or_else(|| {
            ProxyError::InvalidRequest("the request cannot be rewritten for its server".to_owned())
        })?;
        // The one decision: the rewritten body, parsed as the per-server path parses it.
        let forwarded = Bytes::from(rewritten);
        let envelope = mcp::parse(&forwarded).map_err(crate::proxy::rejection)?;
        let Envelope::Single(judged) = &envelope else {
            return Err(ProxyError::InvalidRequest(
                "not a single request".to_owned(),
            ));
        };
        crate::proxy::authorize(&route, agent.subject, judged, ctx)?;
        let lists = crate::proxy::response_filter(&route, judged);
        let call = |upstream_id: String, lists| -> Result<parked::Call, ProxyError> {
            Ok(parked::Call {
                subject: agent.subject.as_str().to_owned(),
                route: route.clone(),
                method,
                target: judged.target.as_deref().unwrap_or_default().to_owned(),
                upstream_id,
                agent_id: message
                    .id
                    .ok_or_else(|| {
                        ProxyError::InvalidRequest("a request without an id".to_owned())
                    })?
                    .to_owned(),
                lists,
            })
        };
        // A bridged 2026 agent's retry of a round the server asked for.
        if bridged && let Some(retry) = parked::Retry::of(judged.params) {
            return self.resume(agent, call(String::new(), lists)?, retry).await;
        }
        // A 2026 agent's read of a 2026 server's resource, perhaps kept ([`reads`]).
        let read_key = (method == Method::ResourcesRead
            && agent.modern
            && !bridged
            && reads::fresh_request(judged.params))
        .then(|| {
            (
                agent.runtime.version.clone(),
                agent.subject.as_str().to_owned(),
                route.name.clone(),
                uri.to_string(),
            )
        });
        if let Some(key) = &read_key {
            let kept = self.aggregate.reads.get(key);
            crate::telemetry::aggregate_cache(
                crate::telemetry::AGGREGATE_READ_CACHE,
                &route.label,
                kept.is_some(),
            );
            if let Some(result) = kept {
                return Ok(json_answer(message.id, &result, &HeaderMap::new()));
            }
        }

        let mut up_headers = HeaderMap::new();
        if reverse.is_some() {
            up_headers = modern_headers(method, judged.target.as_deref());
            // Kept for the retries of its rounds, which do not pass through send_to.
            json_post(&mut up_headers);
        } else if agent.modern && !bridged {
            for name in [mcp::HEADER_PROTOCOL_VERSION, mcp::HEADER_METHOD] {
                if let Some(v) = headers.get(name) {
                    up_headers.insert(name, v.clone());
                }
            }
            if let Some(name) = &judged.target {
                up_headers.insert(mcp::HEADER_NAME, header_value(name));
            }
        }
        let in_flight = agent.session.as_ref().zip(message.id).map(|(s, id)| {
            s.in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.get().to_owned(), route.name.clone());
            InFlightGuard {
                session: s.clone(),
                id: id.get().to_owned(),
            }
        });
        // A request bridged to a 2026-only server can be cancelled while it waits.
        let mut cancelled = reverse.as_ref().zip(message.id).map(|(session, id)| {
            let (cancel, cancelled) = tokio::sync::oneshot::channel();
            session
                .cancels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.get().to_owned(), cancel);
            cancelled
        });
        let sent = self.send_to(agent, &route, up_headers.clone(), forwarded.clone());
        let resp = match &mut cancelled {
            None => sent.await?,
            Some(cancelled) => tokio::select! {
                resp = sent => resp?,
                Ok(()) = cancelled => return Err(ProxyError::UpstreamFailed {
                    server: route.name.clone(),
                    reason: "the agent cancelled the request".to_owned(),
                }),
            },
        };
        if let Some(session) = reverse {
            let cancelled = cancelled.unwrap_or_else(|| tokio::sync::oneshot::channel().1);
            let bridged = rounds::Bridged {
                cancelled,
                route: route.clone(),
                session,
                agent_id: message
                    .id
                    .ok_or_else(|| {
                        ProxyError::InvalidRequest("a request without an id".to_owned())
                    })?
                    .to_owned(),
                headers: up_headers,
                request: String::from_utf8_lossy(&forwarded).into_owned(),
                lists,
                _in_flight: in_flight,
            };
            return self.rounds(bridged, resp).await;
        }
        let (mut parts, incoming) = resp.into_parts();
        crate::upstream::clean_response_headers(&mut parts.headers);
        parts.headers.remove(mcp::HEADER_SESSION);
        let framing = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| Framing::of(v.as_bytes()));
        // Bridged (a 2026 agent, a 2025 server): the agent's id back and server requests
        // refused. A 2025 agent: server requests' ids made the aggregate's.
        let rewrite = Rewrite {
            server: route.name.clone(),
            agent_id: upstream_id.as_ref().and(message.id.map(|i| i.to_owned())),
            // Every 2026 result the aggregate gives is complete in that generation's
            // shape, whatever the server left out (rmcp omits `resultType`, which the
            // Python SDK requires).
            modern: agent.modern.then_some(method),
            prefix_requests: !agent.modern,
            refuse_server_requests: bridged.then(|| {
                (
                    self.upstream.clone(),
                    route.clone(),
                    self.shared_session(agent.subject, &route),
                )
            }),
        };
        let relayed = body::relay(incoming, move || drop(in_flight));
        // A bridged 2026 agent: the server's requests during the call become rounds.
        if let (true, Some(Framing::Sse), Some(upstream_id)) = (bridged, framing, &upstream_id) {
            let stream = parked::Stream {
                body: relayed,
                buf: BytesMut::new(),
            };
            return Ok(self.relay_bridged(call(upstream_id.clone(), lists)?, stream));
        }
        let body = match framing {
            Some(Framing::Sse) if rewrite.needed() || lists.is_some() => {
                parts.headers.remove(header::CONTENT_LENGTH);
                rewrite_stream(relayed, rewrite, route.clone(), lists)
            }
            // A JSON answer is one response: no server requests in it.
            Some(Framing::Json)
                if rewrite.agent_id.is_some() || rewrite.modern.is_some() || lists.is_some() =>
            {
                parts.headers.remove(header::CONTENT_LENGTH);
                let text = read_all(relayed)
                    .await
                    .map_err(|e| ProxyError::UpstreamFailed {
                        server: route.name.clone(),
                        reason: e,
                    })?;
                let text = String::from_utf8_lossy(&text);
                let filtered = match &lists {
                    Some(lists) => lists.filter_text(&route, &text).ok_or_else(|| {
                        ProxyError::UpstreamFailed {
                            server: route.name.clone(),
                            reason: "its answer cannot be read".to_owned(),
                        }
                    })?,
                    None => text.into_owned(),
                };
                let answer = rewrite.message(&filtered).unwrap_or(filtered);
                if let Some(key) = read_key
                    && parts.status.is_success()
                {
                    self.aggregate.reads.put(key, &answer);
                }
                body::full(answer)
            }
            _ => relayed,
        };
        Ok(Response::from_parts(parts, body))
    }

    /// The resources among `uris` a 2026 agent's `subscriptions/listen` may subscribe
    /// to, by the server each belongs to: a URI servers read as it is sent
    /// ([`crate::uri`]), whose server's policy shows it. Others are not honoured (left
    /// out of the acknowledgement).
    async fn subscribed(
        &self,
        agent: &Agent<'_>,
        uris: Vec<String>,
    ) -> HashMap<String, Vec<String>> {
        let mut by_server: HashMap<String, Vec<String>> = HashMap::new();
        for uri in uris {
            let Ok(meaning) = crate::uri::canonical(&uri) else {
                continue;
            };
            let route = match agent.only {
                Some(route) => route.clone(),
                None => match self.resource_owner(agent, &uri).await {
                    Ok(route) => route,
                    Err(_) => continue,
                },
            };
            if route.policy.visible(mcp::TargetKind::Resource, &meaning) {
                by_server.entry(route.name.clone()).or_default().push(uri);
            }
        }
        by_server
    }

    /// The server `uri` belongs to; when no list has shown it yet, the resource and
    /// template lists are fetched once to learn it.
    async fn resource_owner(&self, agent: &Agent<'_>, uri: &str) -> Result<Arc<Route>, ProxyError> {
        if let Some(route) = self.owner_of(agent.runtime, uri) {
            return Ok(route);
        }
        futures_util::future::join(
            self.merged(agent, Method::ResourcesList),
            self.merged(agent, Method::ResourcesTemplatesList),
        )
        .await;
        self.owner_of(agent.runtime, uri).ok_or_else(|| {
            ProxyError::InvalidRequest(format!(
                "resource {:?}: no server on /mcp lists it or a template it matches",
                crate::proxy::truncate(uri)
            ))
        })
    }

    /// Does `route`'s server speak 2026-07-28? Learnt once per snapshot (on the route)
    /// by asking `server/discover`; `None` while the server cannot be asked (it is
    /// asked again next time).
    pub(crate) async fn generation(&self, route: &Arc<Route>) -> Option<bool> {
        match route.speaks_modern() {
            Some(known) => Some(known),
            // Once per snapshot: boxed, so the request future (which hyper allocates
            // per connection) does not carry the probe's state.
            None => Box::pin(self.ask_generation(route)).await,
        }
    }

    async fn ask_generation(&self, route: &Arc<Route>) -> Option<bool> {
        let id = self.aggregate.next_id.fetch_add(1, Ordering::Relaxed);
        let text = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"server/discover\",\"params\":{{\"_meta\":{}}}}}",
            modern_meta()
        );
        let mut headers = modern_headers(Method::Discover, None);
        json_post(&mut headers);
        let uri = route.endpoints[route.pick()].uri.clone();
        let resp = self
            .upstream
            .probe(route, uri, headers, Bytes::from(text))
            .await
            .ok()?;
        // Only a clear answer decides: a result naming 2026-07-28 (modern), a JSON-RPC
        // error or a 4xx refusal (a 2025 server without a session). A 5xx or an answer
        // that cannot be read decides nothing.
        let status = resp.status();
        let modern = if status.is_client_error() {
            false
        } else if status.is_success() {
            match read_reply(resp.map(body::incoming), id).await.ok()? {
                Reply::Result(r) => r.get().contains(mcp::MODERN_VERSION),
                Reply::Error(_) => false,
            }
        } else {
            return None;
        };
        route.learn_generation(modern);
        Some(modern)
    }

    /// [`Proxy::generation`], a server that cannot be asked taken for a 2025 one.
    async fn speaks_modern(&self, route: &Arc<Route>) -> bool {
        self.generation(route).await.unwrap_or(false)
    }

    /// Does this agent reach `route`'s server statelessly (2026-07-28)? A 2026 agent
    /// when the server speaks it; a 2025 agent when the server speaks nothing else.
    async fn stateless(&self, agent: &Agent<'_>, route: &Arc<Route>) -> bool {
        if agent.modern {
            self.speaks_modern(route).await
        } else {
            self.modern_only(agent, route).await
        }
    }

    /// Does `route`'s server refuse 2025 sessions? Learnt once per snapshot: when a
    /// server that speaks 2026-07-28 refuses the first 2025 agent's session (opening
    /// it, which that agent needs anyway).
    async fn modern_only(&self, agent: &Agent<'_>, route: &Arc<Route>) -> bool {
        if route.refuses_sessions() {
            return true;
        }
        if agent.session.is_none() || !self.speaks_modern(route).await {
            return false;
        }
        let (upstreams, init) = self.upstreams_of(agent);
        let cell = upstreams.cell(&route.name);
        let failed = cell
            .get_or_try_init(|| self.open_upstream(agent, route, init))
            .await
            .is_err();
        failed && route.refuses_sessions()
    }

    /// One of the sidecar's own requests to `route` for this agent; its answer.
    async fn ask(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
        method: Method,
        params: &str,
    ) -> Result<Reply, ProxyError> {
        let id = self.aggregate.next_id.fetch_add(1, Ordering::Relaxed);
        let modern = self.stateless(agent, route).await;
        let (params, headers) = if modern {
            let params =
                filter::rewrite_members(params, |_, _, _| false).unwrap_or_else(|| "{}".to_owned());
            let with_meta = format!(
                "{{\"_meta\":{}{}{}",
                modern_meta(),
                if params.len() > 2 { "," } else { "" },
                &params[1..]
            );
            (with_meta, modern_headers(method, None))
        } else {
            (params.to_owned(), HeaderMap::new())
        };
        let text = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":{},\"params\":{params}}}",
            json_string(method.name())
        );
        let resp = if modern {
            let uri = route.endpoints[route.pick()].uri.clone();
            let mut headers = headers;
            json_post(&mut headers);
            self.upstream
                .send(route, uri, HttpMethod::POST, headers, Bytes::from(text))
                .await?
                .map(body::incoming)
        } else {
            self.post_session(agent, route, Bytes::from(text)).await?
        };
        if !resp.status().is_success() {
            return Err(ProxyError::UpstreamFailed {
                server: route.name.clone(),
                reason: format!("{} answered HTTP {}", method.name(), resp.status()),
            });
        }
        read_reply(resp, id)
            .await
            .map_err(|reason| ProxyError::UpstreamFailed {
                server: route.name.clone(),
                reason,
            })
    }

    /// Send a forwarded request: stateless when it has 2026 headers, else on the
    /// upstream session for this agent.
    async fn send_to(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, ProxyError> {
        // Only a stateless request has 2026 headers.
        if !headers.is_empty() {
            let uri = route.endpoints[route.pick()].uri.clone();
            let mut headers = headers;
            json_post(&mut headers);
            return Ok(self
                .upstream
                .send(route, uri, HttpMethod::POST, headers, body)
                .await?
                .map(body::incoming));
        }
        self.post_session(agent, route, body).await
    }

    /// The `InitializeResult` of `route`'s server, from this agent's upstream session
    /// (opened for it if need be).
    async fn server_init(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
    ) -> Result<Arc<str>, ProxyError> {
        let (upstreams, init) = self.upstreams_of(agent);
        let cell = upstreams.cell(&route.name);
        let session = cell
            .get_or_try_init(|| self.open_upstream(agent, route, init))
            .await?;
        Ok(session.init.clone())
    }

    /// The upstream sessions this agent uses: its own (2025 agent) or the identity's
    /// shared ones (2026 agent reaching a 2025 server).
    fn upstreams_of<'a>(&self, agent: &'a Agent<'_>) -> (Arc<Upstreams>, Option<&'a RawValue>) {
        match &agent.session {
            Some(s) => (s.upstreams.clone(), Some(&s.init_params)),
            None => (self.aggregate.shared_of(agent.subject), None),
        }
    }

    fn shared_session(&self, subject: &Identity, route: &Route) -> Option<UpstreamSession> {
        self.aggregate
            .shared_of(subject)
            .cell(&route.name)
            .get()
            .cloned()
    }

    /// POST `body` on this agent's session with `route`, opening it (again) as needed.
    async fn post_session(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
        body: Bytes,
    ) -> Result<Response<Body>, ProxyError> {
        let (upstreams, init) = self.upstreams_of(agent);
        for attempt in 0..2 {
            let cell = upstreams.cell(&route.name);
            let session = cell
                .get_or_try_init(|| self.open_upstream(agent, route, init))
                .await?
                .clone();
            let lost = session.legacy.as_ref().is_some_and(|c| c.is_closed());
            if (session.version != agent.runtime.version || lost) && attempt == 0 {
                upstreams.forget(&route.name);
                continue;
            }
            if let Some(channel) = &session.legacy {
                let resp = channel.send(body.clone()).await?;
                if resp.status() != StatusCode::NOT_FOUND {
                    return Ok(resp);
                }
                // The server forgot the session: open a new one, once.
                upstreams.forget(&route.name);
                continue;
            }
            let mut headers = HeaderMap::new();
            json_post(&mut headers);
            headers.insert(
                mcp::HEADER_PROTOCOL_VERSION,
                HeaderValue::from_static(LEGACY_VERSION),
            );
            if let Some(id) = &session.id {
                headers.insert(mcp::HEADER_SESSION, id.clone());
            }
            let endpoint = session.endpoint.min(route.endpoints.len() - 1);
            let uri = route.endpoints[endpoint].uri.clone();
            let resp = self
                .upstream
                .send(route, uri, HttpMethod::POST, headers, body.clone())
                .await?;
            // The server lost the session (restarted): open a new one, once.
            if resp.status() == StatusCode::NOT_FOUND && session.id.is_some() && attempt == 0 {
                upstreams.forget(&route.name);
                continue;
            }
            return Ok(resp.map(body::incoming));
        }
        Err(ProxyError::UpstreamUnavailable {
            server: route.name.clone(),
            reason: "its session could not be re-opened".to_owned(),
        })
    }

    /// Open a 2025-generation session with `route` (initialize, then initialized).
    async fn open_upstream(
        &self,
        agent: &Agent<'_>,
        route: &Arc<Route>,
        init: Option<&RawValue>,
    ) -> Result<UpstreamSession, ProxyError> {
        // Learnt (by a concurrent first use, perhaps): not asked again.
        if route.refuses_sessions() {
            return Err(ProxyError::UpstreamFailed {
                server: route.name.clone(),
                reason: "it speaks only 2026-07-28 and refuses 2025 sessions".to_owned(),
            });
        }
        let id = self.aggregate.next_id.fetch_add(1, Ordering::Relaxed);
        // A 2026 agent's session (the identity's): opened with the capabilities and
        // client info its request carries, so that the server asks what it can answer.
        let default_params = agent_init(agent.request);
        let params = init.map_or(default_params.as_str(), RawValue::get);
        let text = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"initialize\",\"params\":{params}}}"
        );
        let endpoint = route.pick();
        let uri = route.endpoints[endpoint].uri.clone();
        let legacy = if route.sse {
            Some(Arc::new(
                sse::Channel::open(&self.upstream, route, endpoint).await?,
            ))
        } else {
            None
        };
        let resp = match &legacy {
            Some(channel) => channel.send(Bytes::from(text)).await?,
            None => {
                let mut headers = HeaderMap::new();
                json_post(&mut headers);
                self.upstream
                    .send(
                        route,
                        uri.clone(),
                        HttpMethod::POST,
                        headers,
                        Bytes::from(text),
                    )
                    .await?
                    .map(body::incoming)
            }
        };
        let failed = |reason: String| ProxyError::UpstreamFailed {
            server: route.name.clone(),
            reason,
        };
        // A server that speaks 2026-07-28 and refuses the handshake speaks nothing else.
        let refused = || {
            if route.speaks_modern() == Some(true) {
                route.learn_modern_only();
            }
        };
        if !resp.status().is_success() {
            if resp.status().is_client_error() {
                refused();
            }
            return Err(failed(format!(
                "initialize answered HTTP {}",
                resp.status()
            )));
        }
        let session_id = resp.headers().get(mcp::HEADER_SESSION).cloned();
        let init: Arc<str> = match read_reply(resp, id).await.map_err(failed)? {
            Reply::Result(result) => Arc::from(result.get()),
            Reply::Error(e) => {
                refused();
                return Err(failed(format!(
                    "initialize answered {}",
                    crate::proxy::truncate(e.get())
                )));
            }
        };
        let mut headers = HeaderMap::new();
        json_post(&mut headers);
        headers.insert(
            mcp::HEADER_PROTOCOL_VERSION,
            HeaderValue::from_static(LEGACY_VERSION),
        );
        if let Some(sid) = &session_id {
            headers.insert(mcp::HEADER_SESSION, sid.clone());
        }
        let initialized =
            Bytes::from_static(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}");
        match &legacy {
            Some(channel) => drop(channel.send(initialized).await?),
            None => drop(
                self.upstream
                    .send(route, uri, HttpMethod::POST, headers, initialized)
                    .await?,
            ),
        }
        Ok(UpstreamSession {
            version: agent.runtime.version.clone(),
            endpoint,
            id: session_id,
            init,
            legacy,
        })
    }
}

/// Removes a request from its session's in-flight table when its answer ends.
struct InFlightGuard {
    session: Arc<AgentSession>,
    id: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.session
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        self.session
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// A list result's `ttlMs` (zero when absent or not a whole number of milliseconds).
fn ttl_of(result: &str) -> Duration {
    #[derive(Deserialize)]
    struct Hint {
        #[serde(default, rename = "ttlMs")]
        ttl_ms: Option<serde_json::Value>,
    }
    serde_json::from_str::<Hint>(result)
        .ok()
        .and_then(|h| h.ttl_ms?.as_u64())
        .map_or(Duration::ZERO, Duration::from_millis)
}

/// What names a resource or template item (its `uri` or `uriTemplate`).
fn resource_key(kind: filter::ListKind, item: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Located<'a> {
        #[serde(borrow, default)]
        uri: Option<Cow<'a, str>>,
        #[serde(borrow, default, rename = "uriTemplate")]
        template: Option<Cow<'a, str>>,
    }
    let located: Located<'_> = serde_json::from_str(item).ok()?;
    match kind.key {
        "uri" => located.uri,
        _ => located.template,
    }
    .map(Cow::into_owned)
}

fn list_failed(route: &Route, method: Method, reason: &str) {
    tracing::warn!(server = %route.name, method = method.name(), reason, "left out of the aggregated list");
    crate::telemetry::aggregate_list_failed(&route.label, method.name());
}

/// What the aggregate says it can do: the kinds of items it merges, their list
/// changes (fanned in), logging (set on every server) and completions (routed). No
/// resource subscriptions through the capabilities: `resources/subscribe` is routed to
/// the owner, but updates reach only a 2025 agent's GET stream.
const CAPABILITIES: &str = "{\"logging\":{},\"tools\":{\"listChanged\":true},\"prompts\":{\"listChanged\":true},\"resources\":{\"listChanged\":true},\"completions\":{}}";
const INSTRUCTIONS: &str = "Every MCP server this agent may use, through its toolmesh sidecar. Tools and prompts are named <server>__<name>.";

fn server_info() -> String {
    format!(
        "{{\"name\":\"toolmesh\",\"version\":{}}}",
        json_string(env!("CARGO_PKG_VERSION"))
    )
}

fn discover_result() -> String {
    format!(
        "{{\"resultType\":\"complete\",\"supportedVersions\":{},\"capabilities\":{CAPABILITIES},\"instructions\":{},\"ttlMs\":0,\"cacheScope\":\"private\",\"_meta\":{{\"io.modelcontextprotocol/serverInfo\":{}}}}}",
        serde_json::Value::from(crate::stdio::supported_versions()),
        json_string(INSTRUCTIONS),
        server_info()
    )
}

/// `server/discover` for a bridged server: its own capabilities, instructions and
/// `serverInfo` (from its `InitializeResult`), the versions this path takes.
fn bridged_discover(init: &str) -> String {
    #[derive(Deserialize)]
    struct Init<'a> {
        #[serde(borrow, default)]
        capabilities: Option<&'a RawValue>,
        #[serde(borrow, default, rename = "serverInfo")]
        server_info: Option<&'a RawValue>,
        #[serde(borrow, default)]
        instructions: Option<&'a RawValue>,
    }
    let init: Option<Init<'_>> = serde_json::from_str(init).ok();
    let raw =
        |v: Option<&RawValue>, default: &'static str| v.map_or(default, RawValue::get).to_owned();
    let (capabilities, info, instructions) = match &init {
        Some(i) => (
            raw(i.capabilities, "{}"),
            raw(i.server_info, "{}"),
            i.instructions
                .map(|v| format!(",\"instructions\":{}", v.get())),
        ),
        None => ("{}".to_owned(), "{}".to_owned(), None),
    };
    format!(
        "{{\"resultType\":\"complete\",\"supportedVersions\":{},\"capabilities\":{capabilities}{},\"ttlMs\":0,\"cacheScope\":\"private\",\"_meta\":{{\"io.modelcontextprotocol/serverInfo\":{info}}}}}",
        serde_json::Value::from(crate::stdio::supported_versions()),
        instructions.unwrap_or_default()
    )
}

/// An `InitializeResult` at `version` for a server that speaks only 2026-07-28, from
/// its `server/discover` result: its capabilities, instructions and `serverInfo`.
fn initialize_result(discovered: &str, version: &str) -> String {
    #[derive(Deserialize)]
    struct Discovered<'a> {
        #[serde(borrow, default)]
        capabilities: Option<&'a RawValue>,
        #[serde(borrow, default)]
        instructions: Option<&'a RawValue>,
        #[serde(borrow, default, rename = "_meta")]
        meta: Option<Meta<'a>>,
    }
    #[derive(Deserialize)]
    struct Meta<'a> {
        #[serde(borrow, default, rename = "io.modelcontextprotocol/serverInfo")]
        server_info: Option<&'a RawValue>,
    }
    let d: Option<Discovered<'_>> = serde_json::from_str(discovered).ok();
    let capabilities = d
        .as_ref()
        .and_then(|d| d.capabilities)
        .map_or("{}", RawValue::get);
    let info = d
        .as_ref()
        .and_then(|d| d.meta.as_ref())
        .and_then(|m| m.server_info)
        .map_or_else(server_info, |i| i.get().to_owned());
    let instructions = d
        .as_ref()
        .and_then(|d| d.instructions)
        .map(|i| format!(",\"instructions\":{}", i.get()))
        .unwrap_or_default();
    format!(
        "{{\"protocolVersion\":{},\"capabilities\":{capabilities},\"serverInfo\":{info}{instructions}}}",
        json_string(version)
    )
}

/// `initialize` params for an upstream session held for 2026 agents: the 2026
/// envelope's capabilities and client info in `request` (its params), if any.
fn agent_init(request: Option<&RawValue>) -> String {
    #[derive(Deserialize)]
    struct Params<'a> {
        #[serde(borrow, default, rename = "_meta")]
        meta: Option<Meta<'a>>,
    }
    #[derive(Deserialize)]
    struct Meta<'a> {
        #[serde(borrow, default, rename = "io.modelcontextprotocol/clientCapabilities")]
        capabilities: Option<&'a RawValue>,
        #[serde(borrow, default, rename = "io.modelcontextprotocol/clientInfo")]
        info: Option<&'a RawValue>,
    }
    let meta = request
        .and_then(|p| serde_json::from_str::<Params<'_>>(p.get()).ok())
        .and_then(|p| p.meta);
    let capabilities = meta
        .as_ref()
        .and_then(|m| m.capabilities)
        .map_or("{}", RawValue::get);
    let info = meta
        .as_ref()
        .and_then(|m| m.info)
        .map_or_else(server_info, |i| i.get().to_owned());
    format!(
        "{{\"protocolVersion\":\"{LEGACY_VERSION}\",\"capabilities\":{capabilities},\"clientInfo\":{info}}}"
    )
}

/// The `_meta` of the sidecar's own 2026-07-28 requests.
fn modern_meta() -> String {
    format!(
        "{{\"{}\":\"{}\",\"io.modelcontextprotocol/clientInfo\":{},\"io.modelcontextprotocol/clientCapabilities\":{{}}}}",
        mcp::META_PROTOCOL_VERSION,
        mcp::MODERN_VERSION,
        server_info()
    )
}

/// The headers of a JSON-RPC POST that takes a JSON or an SSE answer.
fn json_post(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
}

fn modern_headers(method: Method, name: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        mcp::HEADER_PROTOCOL_VERSION,
        HeaderValue::from_static(mcp::MODERN_VERSION),
    );
    headers.insert(mcp::HEADER_METHOD, HeaderValue::from_static(method.name()));
    if let Some(name) = name {
        headers.insert(mcp::HEADER_NAME, header_value(name));
    }
    headers
}

/// A header value for a name from a body: as is when it is visible ASCII, else in the
/// `=?base64?…?=` form 2026-07-28 defines.
fn header_value(name: &str) -> HeaderValue {
    use base64::Engine as _;
    if name.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !name.starts_with("=?base64?")
        && let Ok(v) = HeaderValue::from_str(name)
    {
        return v;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(name.as_bytes());
    HeaderValue::from_str(&format!("=?base64?{encoded}?=")).unwrap_or(HeaderValue::from_static(""))
}

fn random_token() -> Result<String, ProxyError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 18];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ProxyError::Misconfigured("no system randomness".to_owned()))?;
    use base64::Engine as _;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn accepted() -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

/// A JSON answer with `result` for the request `id`.
fn json_answer(id: Option<&RawValue>, result: &str, headers: &HeaderMap) -> Response<Body> {
    let text = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{result}}}",
        id.map_or("null", RawValue::get)
    );
    let mut resp = json_message(text);
    for (k, v) in headers {
        resp.headers_mut().insert(k.clone(), v.clone());
    }
    resp
}

/// One JSON-RPC message as a JSON response.
fn json_message(text: String) -> Response<Body> {
    let mut resp = Response::new(body::full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The body for the server: the real name (when given), the upstream id (bridged), and
/// for a bridged request the 2026 envelope keys out of `params._meta`; every other
/// member as it came.
fn rewrite_request(
    text: &str,
    method: Method,
    real: Option<&str>,
    upstream_id: Option<&str>,
    bridged: bool,
) -> Option<String> {
    let field = method.target_field();
    let mut bad = false;
    let out = filter::rewrite_members(text, |key, value, out| match key {
        "id" => match upstream_id {
            Some(id) => {
                out.push_str(id);
                true
            }
            None => false,
        },
        "params" => {
            let rewritten = filter::rewrite_members(value, |pkey, pvalue, pout| {
                if Some(pkey) == field
                    && let Some(real) = real
                {
                    pout.push_str(&json_string(real));
                    return true;
                }
                if pkey == "ref"
                    && let Some(real) = real
                {
                    // completion/complete on a prompt: its ref names it.
                    match filter::rewrite_members(pvalue, |rkey, _, rout| {
                        if rkey == "name" {
                            rout.push_str(&json_string(real));
                            true
                        } else {
                            false
                        }
                    }) {
                        Some(new) => pout.push_str(&new),
                        None => bad = true,
                    }
                    return true;
                }
                if pkey == "_meta" && bridged {
                    // A 2025 session carries these in its handshake, and dual-era
                    // servers refuse them on one.
                    match filter::remove_members(pvalue, &ENVELOPE_KEYS) {
                        Some(new) => pout.push_str(&new),
                        None => bad = true,
                    }
                    return true;
                }
                false
            });
            match rewritten {
                Some(new) => out.push_str(&new),
                None => bad = true,
            }
            true
        }
        _ => false,
    })?;
    (!bad).then_some(out)
}

/// What happens to each message of a forwarded request's answer on its way to the agent.
struct Rewrite {
    server: String,
    /// The agent's own id, when the request went upstream with another one.
    agent_id: Option<Box<RawValue>>,
    /// A bridged 2026-07-28 agent's method: its final result is completed to that
    /// generation.
    modern: Option<Method>,
    /// A 2025 agent: server requests get ids of the aggregate.
    prefix_requests: bool,
    /// A 2026-07-28 agent cannot take server requests: they are refused on this
    /// client and session.
    refuse_server_requests: Option<(
        crate::upstream::Upstream,
        Arc<Route>,
        Option<UpstreamSession>,
    )>,
}

#[derive(Deserialize)]
struct Shape<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
}

impl Rewrite {
    /// Does any message of the answer change?
    fn needed(&self) -> bool {
        self.agent_id.is_some()
            || self.modern.is_some()
            || self.prefix_requests
            || self.refuse_server_requests.is_some()
    }

    /// The message as the agent gets it; `None` to relay it as it is (or, for a
    /// refused server request, to drop it: see [`Rewrite::drops`]).
    fn message(&self, text: &str) -> Option<String> {
        let shape: Shape<'_> = serde_json::from_str(text).ok()?;
        match (&shape.method, shape.id) {
            // A server request.
            (Some(_), Some(_)) if !self.prefix_requests => None,
            (Some(_), Some(id)) => {
                let ours = json_string(&format!("{SERVER_REQUEST}{}:{}", self.server, id.get()));
                filter::rewrite_members(text, |k, _, out| {
                    if k == "id" {
                        out.push_str(&ours);
                        true
                    } else {
                        false
                    }
                })
            }
            // A notification.
            (Some(_), None) => None,
            // The answer.
            (None, _) => {
                if self.agent_id.is_none() && self.modern.is_none() {
                    return None;
                }
                filter::rewrite_members(text, |k, v, out| match k {
                    "id" => match &self.agent_id {
                        Some(id) => {
                            out.push_str(id.get());
                            true
                        }
                        None => false,
                    },
                    "result" => match self.modern {
                        Some(method) => {
                            out.push_str(&complete_modern_result(method, v));
                            true
                        }
                        None => false,
                    },
                    _ => false,
                })
                .filter(|_| shape.result.is_some() || self.agent_id.is_some())
            }
        }
    }

    /// A server request a 2026 agent cannot take: answered here, and dropped.
    fn drops(&self, text: &str) -> bool {
        let Some((upstream, route, session)) = &self.refuse_server_requests else {
            return false;
        };
        let Ok(shape) = serde_json::from_str::<Shape<'_>>(text) else {
            return false;
        };
        let (Some(method), Some(id)) = (shape.method, shape.id) else {
            return false;
        };
        let answer = crate::stdio::error_answer(
            id.get(),
            -32601,
            &format!("{method} cannot reach a 2026-07-28 agent through the aggregated /mcp"),
        );
        let (upstream, route, session) = (upstream.clone(), route.clone(), session.clone());
        tokio::spawn(async move {
            if let Some(channel) = session.as_ref().and_then(|s| s.legacy.as_ref()) {
                let _ = channel.send(Bytes::from(answer)).await;
                return;
            }
            let mut headers = HeaderMap::new();
            json_post(&mut headers);
            let endpoint = session
                .as_ref()
                .map_or(0, |s| s.endpoint)
                .min(route.endpoints.len() - 1);
            if let Some(id) = session.and_then(|s| s.id) {
                headers.insert(mcp::HEADER_SESSION, id);
                headers.insert(
                    mcp::HEADER_PROTOCOL_VERSION,
                    HeaderValue::from_static(LEGACY_VERSION),
                );
            }
            let uri = route.endpoints[endpoint].uri.clone();
            let _ = upstream
                .send(&route, uri, HttpMethod::POST, headers, Bytes::from(answer))
                .await;
        });
        true
    }
}

/// An SSE answer rewritten event by event as it arrives (server request ids, the
/// agent's id, lists filtered).
fn rewrite_stream(
    body: Body,
    rewrite: Rewrite,
    route: Arc<Route>,
    lists: Option<filter::Lists>,
) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut body = body;
        let mut buf = BytesMut::new();
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                () = tx.closed() => return,
            };
            let Some(Ok(frame)) = frame else { break };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            if buf.len() > MAX_REPLY {
                tracing::warn!(server = %route.name, "an event over the size limit; stream cut");
                return;
            }
            while let Some(end) = filter::event_end(&buf) {
                let data = next_event(&mut buf, end);
                if data.trim().is_empty() {
                    continue;
                }
                if rewrite.drops(&data) {
                    continue;
                }
                let data = match &lists {
                    Some(lists) => match lists.filter_text(&route, &data) {
                        Some(filtered) => filtered,
                        None => continue,
                    },
                    None => data,
                };
                let out = rewrite.message(&data).unwrap_or(data);
                if tx.send(crate::stdio::sse_event(&out)).await.is_err() {
                    return;
                }
            }
        }
    });
    body::Channel { rx }.boxed()
}

/// The data of the SSE event that ends at `end` of `buf`, taken off `buf`: its `data`
/// lines joined as the agent's parser joins them.
fn next_event(buf: &mut BytesMut, end: usize) -> String {
    let event = buf.split_to(end);
    let text = String::from_utf8_lossy(&event);
    let data: Vec<&str> = filter::lines(&text)
        .filter_map(filter::data_value)
        .collect();
    data.join("\n")
}

async fn read_all(mut body: Body) -> Result<Bytes, String> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_REPLY {
                return Err(format!("answer larger than {MAX_REPLY} bytes"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// The answer to the sidecar's request `id`, from a JSON body or an SSE stream.
async fn read_reply(resp: Response<Body>, id: u64) -> Result<Reply, String> {
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
        #[serde(borrow, default)]
        result: Option<&'a RawValue>,
        #[serde(borrow, default)]
        error: Option<&'a RawValue>,
    }
    let want = id.to_string();
    let pick = |text: &str| -> Option<Reply> {
        let answer: Answer<'_> = serde_json::from_str(text).ok()?;
        if answer.id.map(RawValue::get) != Some(want.as_str()) {
            return None;
        }
        match (answer.result, answer.error) {
            (Some(r), _) => Some(Reply::Result(r.to_owned())),
            (None, Some(e)) => Some(Reply::Error(e.to_owned())),
            _ => None,
        }
    };
    let framing = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| Framing::of(v.as_bytes()));
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > MAX_REPLY {
            return Err(format!("answer larger than {MAX_REPLY} bytes"));
        }
        buf.extend_from_slice(&data);
        if framing == Some(Framing::Sse) {
            while let Some(end) = filter::event_end(&buf) {
                if let Some(reply) = pick(&next_event(&mut buf, end)) {
                    return Ok(reply);
                }
            }
        }
    }
    if framing == Some(Framing::Json) {
        // Read as the agent's parser reads it; no copy when it is UTF-8 already.
        let text = match std::str::from_utf8(&buf) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(&buf),
        };
        if let Some(reply) = pick(text.strip_prefix('\u{feff}').unwrap_or(&text)) {
            return Ok(reply);
        }
    }
    Err("no answer to the request in its response".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).expect("JSON")
    }

    #[test]
    fn a_call_keeps_every_byte_but_the_name() {
        let text = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"gh__get","arguments":{"n":12345678901234567890123,"f":1.0e400,"s":"\u00e9"},"_meta":{"progressToken":"p"}}}"#;
        let out =
            rewrite_request(text, Method::ToolsCall, Some("get"), None, false).expect("rewritten");
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get","arguments":{"n":12345678901234567890123,"f":1.0e400,"s":"\u00e9"},"_meta":{"progressToken":"p"}}}"#
        );
        // Every copy of the name is the real one: a duplicate cannot carry the exposed
        // name (or anything else) past the decision.
        let dup = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"gh__a","name":"gh__b"}}"#;
        let out =
            rewrite_request(dup, Method::ToolsCall, Some("a"), None, false).expect("rewritten");
        assert_eq!(out.matches("\"name\":\"a\"").count(), 2, "{out}");
    }

    #[test]
    fn a_bridged_call_gets_our_id_and_loses_the_2026_envelope() {
        let text = r#"{"jsonrpc":"2.0","id":"agent-1","method":"tools/call","params":{"name":"ev__echo","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"x"},"progressToken":3}}}"#;
        let out = rewrite_request(text, Method::ToolsCall, Some("echo"), Some("42"), true)
            .expect("rewritten");
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"echo","arguments":{},"_meta":{"progressToken":3}}}"#
        );
    }

    #[test]
    fn a_prompt_completion_names_the_real_prompt() {
        let text = r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"demo__p"},"argument":{"name":"a","value":"x"}}}"#;
        let out = rewrite_request(text, Method::CompletionComplete, Some("p"), None, false)
            .expect("rewritten");
        assert!(
            out.contains(r#""ref":{"type":"ref/prompt","name":"p"}"#),
            "{out}"
        );
    }

    fn rewrite(agent_id: Option<&str>, modern: Option<Method>, prefix_requests: bool) -> Rewrite {
        Rewrite {
            server: "demo".into(),
            agent_id: agent_id.map(raw),
            modern,
            prefix_requests,
            refuse_server_requests: None,
        }
    }

    #[test]
    fn server_requests_get_ids_of_the_aggregate_and_answers_get_the_agents_id() {
        let r = rewrite(None, None, true);
        let out = r
            .message(
                r#"{"jsonrpc":"2.0","id":"a:b","method":"sampling/createMessage","params":{}}"#,
            )
            .expect("rewritten");
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":"toolmesh:demo:\"a:b\"","method":"sampling/createMessage","params":{}}"#
        );
        // Notifications and a 2025 agent's answer pass as they are.
        assert_eq!(
            r.message(r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{}}"#),
            None
        );
        assert_eq!(r.message(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#), None);

        let bridged = rewrite(Some(r#""agent-1""#), Some(Method::ToolsCall), false);
        let out = bridged
            .message(r#"{"jsonrpc":"2.0","id":42,"result":{"content":[]}}"#)
            .expect("rewritten");
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":"agent-1","result":{"resultType":"complete","content":[]}}"#
        );
        let out = bridged
            .message(r#"{"jsonrpc":"2.0","id":42,"error":{"code":1,"message":"m"}}"#)
            .expect("rewritten");
        assert!(
            out.starts_with(r#"{"jsonrpc":"2.0","id":"agent-1","error""#),
            "{out}"
        );
    }

    #[test]
    fn names_from_bodies_become_header_values() {
        assert_eq!(header_value("gh__get"), "gh__get");
        assert_eq!(header_value("é"), "=?base64?w6k=?=");
        assert_eq!(header_value("=?base64?x?="), "=?base64?PT9iYXNlNjQ/eD89?=");
    }
}
