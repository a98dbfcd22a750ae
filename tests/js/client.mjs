// An agent built on the official MCP TypeScript SDK, driven by the end-to-end tests.
//
// usage: node client.mjs URL PLAN_JSON
// Same contract as tests/python/client.py: PLAN_JSON maps a step to [tool, arguments];
// prints one JSON object with the tool names, each step's text, and what the server
// asked of the client.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { CreateMessageRequestSchema, ElicitRequestSchema } from "@modelcontextprotocol/sdk/types.js";

const [url, planJson] = process.argv.slice(2);
const plan = JSON.parse(planJson);
const seen = { progress: 0, sampling: 0, elicitation: 0 };

const client = new Client(
  { name: "toolmesh-e2e-ts", version: "0" },
  { capabilities: { sampling: {}, elicitation: { form: {} } } },
);
client.setRequestHandler(CreateMessageRequestSchema, async () => {
  seen.sampling += 1;
  return { role: "assistant", content: { type: "text", text: "Paris" }, model: "e2e" };
});
client.setRequestHandler(ElicitRequestSchema, async () => {
  seen.elicitation += 1;
  return { action: "decline" };
});

const transport = new StreamableHTTPClientTransport(new URL(url));
await client.connect(transport);
const out = { steps: {} };
out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
for (const [step, [tool, args]] of Object.entries(plan)) {
  const options = step === "progress" ? { onprogress: () => { seen.progress += 1; } } : {};
  const result = await client.callTool({ name: tool, arguments: args }, undefined, options);
  const text = result.content.filter((c) => c.type === "text").map((c) => c.text).join("\n");
  out.steps[step] = { error: Boolean(result.isError), text };
}
out.seen = seen;
await transport.terminateSession();
await client.close();
console.log(JSON.stringify(out));
