//! End-to-end tests: the real `toolmesh-sidecar` and `toolmesh-control-plane` binaries
//! between real MCP clients and real MCP servers, each a separate process on an
//! ephemeral loopback port.
//!
//! - `generations`: an rmcp client through the sidecar to the rmcp demo server, in
//!   both protocol generations (sessions, SSE, progress, sampling, elicitation,
//!   resources, prompts, session end; 2026-07-28 discover, stateless calls and
//!   `input_required` rounds).
//! - `wire`: raw HTTP for what SDK clients never send: header/body mismatches, bad
//!   input, resumption with `Last-Event-ID`, credential hygiene.
//! - `hostile`: the bad-input corpus, malformed or hostile requests and hostile bearer
//!   tokens at a gateway, each with its documented answer, and proof the upstream only
//!   ran what policy allows.
//! - `holes`: policy holes tried against the TypeScript SDK's server and rmcp's:
//!   values by meaning, URIs as servers resolve them, lists on every path, sessions
//!   bound to their identity, what is forwarded, audit of abandoned calls, limits.
//! - `policy`: default deny, list filtering, rate limits, audit lines.
//! - `control`: the control plane, `toolmeshctl` and sidecars in control-plane mode:
//!   live policy changes, per-identity snapshots, NACKs, fail static, TLS.
//! - `credentials`: upstream OAuth tokens from a real authorization server: client
//!   credentials fetched once under load, refreshed before expiry, renewed after a
//!   401; RFC 8693 token exchange naming the pod; no token or secret shown.
//! - `integrity`: damaged state files, snapshots that cannot be persisted, limits
//!   from apply to delivery, 1,500-file applies and seeds, pod churn, idle-connection
//!   floods under a descriptor limit, toolmeshctl's errors.
//! - `faults`: faults under load (config swaps, control plane restarts, SIGTERM,
//!   failing upstreams, dropped connections, slow-loris), each bounded to seconds.
//! - `operations`: hot reload, admin endpoints, graceful shutdown.
//! - `aggregate`: the aggregated `/mcp` over three servers (server-everything, the
//!   rmcp demo server, the TypeScript SDK's server) with the TypeScript and Python SDK
//!   clients in both generations: prefixes, one decision, server requests from two
//!   servers in one session, bridging a 2026-07-28 agent to 2025-only servers.
//! - `gateway`: gateway mode behind a real authorization server (`oauth2-mock-server`):
//!   discovery from the 401, per-user decisions, sessions and rate limits, key
//!   rotation, client credentials, service-account tokens, TLS, the control plane's
//!   gateway snapshots, and the TypeScript SDK's own OAuth flow.
//! - `traces`: OpenTelemetry spans to a real OTLP receiver: parents from the header
//!   or `_meta`, MCP attributes, the context the upstream receives, denied calls, SSE
//!   streams, sampling, a collector that never answers, gateway users and refused
//!   tokens; the control plane's apply and push spans.
//! - `conformance`: the official MCP conformance suite, direct and through the sidecar.
//! - `bench`: a half-second smoke run of the benchmark binary (list and paced calls,
//!   direct and through a sidecar), every answer checked.
//! - `webhook`: the sidecar-injection webhook over TLS, called by curl.
//! - `kubernetes`: the control plane in cluster mode against a stand-in API server:
//!   service-account identity, CRD watches, Lease, status, the self-managed CA.
//! - `mesh`: no way around the sidecar: agent sidecar → server-side sidecar over
//!   mutual TLS with control-plane-issued workload certificates; plain, anonymous-TLS
//!   and wrong-identity callers refused, with the upstream's proof; rotation under load.
//! - `monitoring`: `deploy/monitoring/`'s alerts pass `promtool check rules` and their
//!   unit tests, and every metric the alerts and the dashboard name is exported by the
//!   real control plane and sidecar.
//! - `pins`: pinned definitions: a server's rug pull hidden and refused with the
//!   upstream's proof, reported once to the control plane; warn mode; `toolmeshctl
//!   pin`/`diff` round trips on the rmcp demo server and server-everything.
//! - `peers`: the reference server (`server-everything`) and the Python and
//!   TypeScript SDK clients.
//! - `stdio`: the stdio bridge in front of `server-everything` in stdio mode: both
//!   SDK clients, both generations, a child killed mid-call, the HTTP edges.

mod aggregate;
mod bench;
mod conformance;
mod control;
mod credentials;
mod faults;
mod gateway;
mod generations;
mod holes;
mod hostile;
mod integrity;
mod kubernetes;
mod mesh;
mod monitoring;
mod operations;
mod peers;
mod pins;
mod policy;
mod stdio;
mod support;
mod traces;
mod webhook;
mod wire;
