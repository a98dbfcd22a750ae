#!/usr/bin/env bash
# Quickstart: the whole local shape of toolmesh on one machine.
#
#   demo MCP servers       127.0.0.1:3001 (demo) and 127.0.0.1:3002 (calc): both
#                          toolmesh-demo-server, which ships with the repo
#   control plane          127.0.0.1:16010  gRPC (plaintext: --dev), admin 127.0.0.1:16014
#                          embedded store in .cache/quickstart/store, seeded from
#                          deploy/examples/resources/, tokens from deploy/examples/tokens.yaml
#   sidecar (agents/demo)  127.0.0.1:16001  MCP for the agent, admin 127.0.0.1:16020
#                          connected to the control plane, state in .cache/quickstart/sidecar
#
# Point any MCP client at http://127.0.0.1:16001/mcp (both servers, tools named
# demo__echo, calc__add, ...) or http://127.0.0.1:16001/mcp/demo; change what it may call with
# toolmeshctl (printed below). Ctrl-C stops everything.
#
# MODE=standalone runs the sidecar from deploy/examples/resources/demo.yaml instead,
# without a control plane (edit the file while it runs).
set -euo pipefail
cd "$(dirname "$0")/../.."

MODE=${MODE:-control-plane}
IDENTITY=agents/demo
STATE=.cache/quickstart
TOKENS=deploy/examples/tokens.yaml

cargo build --quiet -p toolmesh-sidecar -p toolmesh-control-plane -p toolmesh-tests --bins
bin=target/debug

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_ready() { # url what
  for _ in $(seq 100); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "quickstart: $2 did not become ready ($1)" >&2
  exit 1
}

"$bin/toolmesh-demo-server" --listen 127.0.0.1:3001 &
pids+=($!)
"$bin/toolmesh-demo-server" --listen 127.0.0.1:3002 --json-response &
pids+=($!)

if [ "$MODE" = standalone ]; then
  "$bin/toolmesh-sidecar" --config deploy/examples/resources/demo.yaml --identity "$IDENTITY" \
    --log-format text &
  pids+=($!)
else
  mkdir -p "$STATE/sidecar"
  # The sidecar's bootstrap token: its line in the tokens file.
  sed -n "s|^  $IDENTITY: \"\(.*\)\"|\1|p" "$TOKENS" >"$STATE/sidecar/token"
  chmod 600 "$STATE/sidecar/token"
  "$bin/toolmesh-control-plane" --log warn,toolmesh_control_plane=info serve --dev \
    --listen 127.0.0.1:16010 --admin-listen 127.0.0.1:16014 \
    --data-dir "$STATE/store" --tokens "$TOKENS" --seed deploy/examples/resources &
  pids+=($!)
  wait_ready http://127.0.0.1:16014/ready "the control plane"
  "$bin/toolmesh-sidecar" --control-plane http://127.0.0.1:16010 --identity "$IDENTITY" \
    --node quickstart --token-file "$STATE/sidecar/token" --state-dir "$STATE/sidecar" \
    --log-format text &
  pids+=($!)
fi
wait_ready http://127.0.0.1:16020/ready "the sidecar"

call='curl -s http://127.0.0.1:16001/mcp/demo -H "content-type: application/json" -H "accept: application/json, text/event-stream" -H "mcp-protocol-version: 2026-07-28" -H "mcp-method: tools/call" -H "mcp-name: add" -d '"'"'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}'"'"
cat <<MSG

toolmesh is up ($MODE mode).
  MCP endpoint for your agent:  http://127.0.0.1:16001/mcp       (demo__*, calc__add)
  one server on its own:        http://127.0.0.1:16001/mcp/demo
  sidecar admin:                http://127.0.0.1:16020/ready  /metrics  /config

Call a tool through the sidecar (the demo server's "add"):
  $call
MSG
if [ "$MODE" = standalone ]; then
  cat <<MSG
Edit deploy/examples/resources/demo.yaml while it runs: a valid change is live within
a second, an invalid one is logged and ignored.
MSG
else
  admin_token=$(sed -n 's|^admin: "\(.*\)"|\1|p' "$TOKENS")
  cat <<MSG
Change what the agent may call, live, in another shell:
  export TOOLMESH_CTL_SERVER=http://127.0.0.1:16010 TOOLMESH_ADMIN_TOKEN=$admin_token
  $bin/toolmeshctl status                       # the fleet: this sidecar and its version
  $bin/toolmeshctl get accesspolicy demo-agents
  $bin/toolmeshctl apply -f deploy/examples/changes/echo-only.yaml
  # the same call now answers -32088 "not permitted"; put it back with
  $bin/toolmeshctl apply -f deploy/examples/resources/
MSG
fi
echo
echo "Ctrl-C stops everything."
wait
