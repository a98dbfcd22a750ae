//! End-to-end tests: real binaries, real MCP servers, real MCP clients.
