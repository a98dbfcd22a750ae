// An MCP server built on the official TypeScript SDK (its McpServer, a resource
// template with completion, and its InMemoryEventStore for resumption), served over
// Streamable HTTP with sessions on /mcp and over the legacy HTTP+SSE transport on
// /sse; /redirect answers every request with a 307 to /mcp. The end-to-end tests put it behind the sidecar as an upstream we did not write.
//
// usage: node server.mjs
// Prints `listening on http://127.0.0.1:PORT/mcp` once it accepts connections. Every
// tool call, resource read and completion it executes is written to stderr
// (`call NAME ARGS`, `read URI`, `complete REF VALUE`), so a test can prove from the
// server's side that something refused never ran.
import http from "node:http";
import { randomUUID } from "node:crypto";
import { McpServer, ResourceTemplate } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { SSEServerTransport } from "@modelcontextprotocol/sdk/server/sse.js";
import { InMemoryEventStore } from "@modelcontextprotocol/sdk/examples/shared/inMemoryEventStore.js";
import { z } from "zod";

function build() {
  const server = new McpServer({ name: "toolmesh-e2e-ts-server", version: "0" });
  const text = (t) => ({ content: [{ type: "text", text: t }] });
  for (const name of ["echo", "write_file", "delete_file"]) {
    server.registerTool(
      name,
      {
        description: `${name}: records its arguments`,
        inputSchema: { text: z.any().optional(), path: z.any().optional(), n: z.any().optional() },
      },
      async (args) => {
        console.error(`call ${name} ${JSON.stringify(args)}`);
        return text(name === "echo" ? String(args.text) : `${name} ${JSON.stringify(args)}`);
      },
    );
  }
  // A list change on demand: registering a tool on a connected server makes the SDK
  // send notifications/tools/list_changed on the session's stream.
  server.registerTool(
    "add_tool",
    { description: "add_tool: registers a tool named by text", inputSchema: { text: z.any().optional() } },
    async (args) => {
      const added = String(args.text ?? "added");
      console.error(`call add_tool ${JSON.stringify(args)}`);
      server.registerTool(added, { description: "registered at run time" }, async () => text(added));
      return text(`added ${added}`);
    },
  );
  const read = (uri) => {
    console.error(`read ${uri.href}`);
    return { contents: [{ uri: uri.href, text: `contents of ${uri.href}` }] };
  };
  server.registerResource("readme", "docs://public/readme", {}, read);
  server.registerResource("keys", "docs://secret/keys", {}, read);
  for (const area of ["public", "secret"]) {
    server.registerResource(
      `${area}-files`,
      new ResourceTemplate(`docs://${area}/files/{name}`, {
        list: undefined,
        complete: {
          name: (value) => {
            console.error(`complete docs://${area}/files/{name} ${value}`);
            return ["guide", "keys"].filter((n) => n.startsWith(value));
          },
        },
      }),
      {},
      (uri) => read(uri),
    );
  }
  for (const name of ["public_prompt", "secret_prompt"]) {
    server.registerPrompt(name, { description: name }, () => {
      console.error(`prompt ${name}`);
      return { messages: [{ role: "user", content: { type: "text", text: name } }] };
    });
  }
  return server;
}

const sessions = new Map();
const legacy = new Map();

const httpServer = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, "http://localhost");
    if (url.pathname === "/sse" && req.method === "GET") {
      const transport = new SSEServerTransport("/messages", res);
      legacy.set(transport.sessionId, transport);
      res.on("close", () => legacy.delete(transport.sessionId));
      await build().connect(transport);
      return;
    }
    if (url.pathname === "/messages" && req.method === "POST") {
      const transport = legacy.get(url.searchParams.get("sessionId"));
      if (!transport) {
        res.writeHead(404).end();
        return;
      }
      await transport.handlePostMessage(req, res);
      return;
    }
    if (url.pathname === "/redirect") {
      // An upstream that sends the agent elsewhere (here: to itself, directly).
      console.error("redirected");
      res.writeHead(307, { location: `http://127.0.0.1:${httpServer.address().port}/mcp`, link: "<http://127.0.0.1/>; rel=next" });
      res.end();
      return;
    }
    if (url.pathname !== "/mcp") {
      res.writeHead(404).end();
      return;
    }
    const id = req.headers["mcp-session-id"];
    let transport = id ? sessions.get(id) : undefined;
    if (id && !transport) {
      console.error(`unknown session ${id}`);
      res.writeHead(404, { "content-type": "application/json" });
      res.end(JSON.stringify({ jsonrpc: "2.0", id: null, error: { code: -32001, message: "Session not found" } }));
      return;
    }
    if (!transport) {
      transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        eventStore: new InMemoryEventStore(),
        onsessioninitialized: (sid) => {
          console.error(`session opened ${sid}`);
          sessions.set(sid, transport);
        },
        onsessionclosed: (sid) => {
          console.error(`session closed ${sid}`);
          sessions.delete(sid);
        },
      });
      await build().connect(transport);
    }
    await transport.handleRequest(req, res);
  } catch (e) {
    console.error(`error ${e && e.stack}`);
    if (!res.headersSent) res.writeHead(500).end();
  }
});

httpServer.listen(0, "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${httpServer.address().port}/mcp`);
});
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
