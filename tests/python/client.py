"""An agent built on the official MCP Python SDK, driven by the end-to-end tests.

usage: client.py URL PLAN_JSON [modern]

PLAN_JSON maps a step name to [tool, arguments]; steps named "progress",
"sampling" and "elicitation" exercise those features. The script connects over
Streamable HTTP, lists tools, runs every step, and prints one JSON object on
stdout: the tool names, each step's text result, and what the server asked of
the client (progress notifications, sampling and elicitation requests).
With "modern" it speaks 2026-07-28 (server/discover, stateless requests, each
`input_required` round answered with the same callbacks and the call retried)
instead of the 2025 initialize handshake, and reports the version it adopted.
"""

import asyncio
import json
import sys

from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, plan: dict, modern: bool = False) -> dict:
    seen = {"progress": 0, "sampling": 0, "elicitation": 0}

    async def sampling(context, params):
        seen["sampling"] += 1
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="Paris"),
            model="e2e",
        )

    async def elicitation(context, params):
        seen["elicitation"] += 1
        return types.ElicitResult(action="decline")

    async def progress(progress, total, message):
        seen["progress"] += 1

    out = {"steps": {}}
    async with streamable_http_client(url) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(
            read, write, sampling_callback=sampling, elicitation_callback=elicitation
        ) as session:
            if modern:
                await session.discover()
                out["version"] = session.protocol_version
            else:
                await session.initialize()
            tools = await session.list_tools()
            out["tools"] = sorted(t.name for t in tools.tools)
            for step, (tool, arguments) in plan.items():
                callback = progress if step == "progress" else None
                if modern:
                    result = await call_modern(session, tool, arguments, callback, sampling, elicitation)
                else:
                    result = await session.call_tool(tool, arguments, progress_callback=callback)
                texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
                out["steps"][step] = {"error": bool(result.is_error), "text": "\n".join(texts)}
    out["seen"] = seen
    return out


async def call_modern(session, tool, arguments, callback, sampling, elicitation):
    """A 2026-07-28 call: each `input_required` round answered and the call retried."""
    responses, state = None, None
    for _ in range(8):
        result = await session.call_tool(
            tool,
            arguments,
            progress_callback=callback,
            input_responses=responses,
            request_state=state,
            allow_input_required=True,
        )
        if not isinstance(result, types.InputRequiredResult):
            return result
        responses = {}
        for key, request in (result.input_requests or {}).items():
            if request.method == "sampling/createMessage":
                responses[key] = await sampling(None, request.params)
            elif request.method == "elicitation/create":
                responses[key] = await elicitation(None, request.params)
            else:
                responses[key] = types.ListRootsResult(roots=[])
        state = result.request_state
    raise RuntimeError(f"{tool}: more than 8 input rounds")


if __name__ == "__main__":
    modern = len(sys.argv) > 3 and sys.argv[3] == "modern"
    print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), modern))))
