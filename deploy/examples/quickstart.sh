#!/usr/bin/env bash
# Quickstart: the demo MCP server on 127.0.0.1:3001 and toolmesh-sidecar in front of it
# (standalone mode, deploy/examples/standalone.yaml, identity agents/demo).
# Point any MCP client at http://127.0.0.1:15001/mcp/demo. Ctrl-C stops both.
#
# Environment: CONFIG (default deploy/examples/standalone.yaml), IDENTITY (agents/demo).
set -euo pipefail
cd "$(dirname "$0")/../.."

CONFIG=${CONFIG:-deploy/examples/standalone.yaml}
IDENTITY=${IDENTITY:-agents/demo}

cargo build --quiet -p toolmesh-sidecar -p toolmesh-tests --bins
bin=target/debug

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$bin/toolmesh-demo-server" --listen 127.0.0.1:3001 &
pids+=($!)
"$bin/toolmesh-sidecar" --config "$CONFIG" --identity "$IDENTITY" --log-format text &
pids+=($!)

for _ in $(seq 50); do
  curl -fsS http://127.0.0.1:15020/ready >/dev/null 2>&1 && break
  sleep 0.2
done
cat <<MSG

toolmesh is up.
  MCP endpoint for your agent:  http://127.0.0.1:15001/mcp/demo
  admin:                        http://127.0.0.1:15020/ready  /metrics  /config
  config (edit it live):        $CONFIG

Try it with the official MCP Python SDK, or with curl:
  curl -s http://127.0.0.1:15001/mcp/demo -H 'content-type: application/json' \\
    -H 'accept: application/json, text/event-stream' \\
    -H 'mcp-protocol-version: 2026-07-28' -H 'mcp-method: tools/call' -H 'mcp-name: echo' \\
    -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}'

Ctrl-C stops both.
MSG
wait
