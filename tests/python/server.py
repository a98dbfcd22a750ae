"""An MCP server on the official Python SDK (MCPServer) that speaks only 2026-07-28.

usage: server.py

The SDK serves both protocol generations; this server keeps only the stateless one,
as a 2026-only deployment does: a request without a 2026-07-28 `MCP-Protocol-Version`
header (the 2025 `initialize` handshake, a session's GET stream or DELETE) is refused
with the SDK's "unsupported protocol version" error. Interactive tools ask the client
through `input_required` rounds (elicitation, sampling).

It prints `listening on http://ADDR/mcp` once it accepts connections, and one line per
tool run (`call NAME ARGS`, with what the client answered) and resource read (`read
URI`), so tests can prove from the server's side what ran. Resource reads carry
`ttlMs` 60000 (`cacheScope` private).
"""

import json
import socket
import sys
from typing import Annotated

import anyio
import uvicorn
from mcp.server.caching import CacheHint
from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve, Sample
from mcp_types import SamplingMessage, TextContent
from pydantic import BaseModel

MODERN = "2026-07-28"
UNSUPPORTED_PROTOCOL_VERSION = -32022

# Resource reads may be kept for a minute (ttlMs), by this identity only.
server = MCPServer(
    "toolmesh-e2e-python-modern",
    cache_hints={"resources/read": CacheHint(ttl_ms=60_000, scope="private")},
)


def log(line: str) -> None:
    print(line, flush=True)


class Name(BaseModel):
    name: str


def ask_name() -> Elicit[Name]:
    return Elicit("Who is asking?", Name)


def ask_capital(prompt: str) -> Sample:
    return Sample(
        [SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
        max_tokens=16,
    )


@server.tool()
def echo(text: str) -> str:
    """Returns its text argument."""
    log(f"call echo {json.dumps({'text': text})}")
    return text


@server.tool()
def greet(answer: Annotated[ElicitationResult[Name], Resolve(ask_name)]) -> str:
    """Asks the client who it is (elicitation), then greets it."""
    log(f"call greet action={answer.action}")
    return f"action={answer.action}"


@server.tool()
def capital(prompt: str, sampled: Annotated[object, Resolve(ask_capital)]) -> str:
    """Asks the client's model (sampling) and says what it answered."""
    text = getattr(sampled.content, "text", "")
    log(f"call capital sampled={text}")
    return f"model said: {text}"


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleeps, saying when it starts and whether it finished or was cancelled."""
    log("call sleep start")
    try:
        await anyio.sleep(seconds)
    except BaseException:
        log("call sleep cancelled")
        raise
    log("call sleep done")
    return "slept"


@server.prompt()
def haiku(topic: str) -> str:
    """A haiku about a topic."""
    return f"Write a haiku about {topic}."


@server.tool()
async def touch(uri: str, ctx: Context) -> str:
    """Announces that the resource at uri changed (to subscriptions/listen streams)."""
    log(f"call touch {json.dumps({'uri': uri})}")
    await ctx.notify_resource_updated(uri)
    return f"touched {uri}"


@server.resource("note://python/readme")
def readme() -> str:
    """A note."""
    log("read note://python/readme")
    return "hello from python"


def modern_only(app):
    """Refuse every request that is not a 2026-07-28 one, as a 2026-only server does."""

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        version = headers.get(b"mcp-protocol-version", b"").decode("latin-1")
        if version >= MODERN:
            return await app(scope, receive, send)
        log(f"refused {scope['method']} version={version or '-'}")
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": None,
                "error": {
                    "code": UNSUPPORTED_PROTOCOL_VERSION,
                    "message": "Unsupported protocol version",
                    "data": {"supported": [MODERN], "requested": version or None},
                },
            }
        ).encode()
        status = 400 if scope["method"] == "POST" else 405
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return guarded


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    host, port = sock.getsockname()
    app = modern_only(server.streamable_http_app())
    config = uvicorn.Config(app, log_level="warning")
    log(f"listening on http://{host}:{port}/mcp")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
