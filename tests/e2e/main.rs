//! End-to-end tests: the real `toolmesh-sidecar` binary between real MCP clients and
//! real MCP servers, each a separate process on an ephemeral loopback port.
//!
//! - `generations`: an rmcp client through the sidecar to the rmcp demo server, in
//!   both protocol generations (sessions, SSE, progress, sampling, elicitation,
//!   resources, prompts, session end; 2026-07-28 discover, stateless calls and
//!   `input_required` rounds).
//! - `wire`: raw HTTP for what SDK clients never send: header/body mismatches, bad
//!   input, resumption with `Last-Event-ID`, credential hygiene.
//! - `operations`: hot reload, admin endpoints, graceful shutdown.
//! - `conformance`: the official MCP conformance suite, direct and through the sidecar.
//! - `peers`: the reference server (`server-everything`) and the Python and
//!   TypeScript SDK clients.

mod conformance;
mod control;
mod generations;
mod operations;
mod peers;
mod policy;
mod support;
mod wire;
