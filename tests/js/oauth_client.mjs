// The official TypeScript SDK client with its own OAuth support, against the gateway:
// `node oauth_client.mjs URL`. Its first connect meets a 401; the SDK reads the
// protected-resource metadata the challenge names, discovers the authorization server
// there and starts the authorization-code flow with PKCE. Standing in for the user's
// browser, this script follows the authorization URL (the mock server redirects at
// once with a code), hands the code to the SDK (`finishAuth`: the SDK exchanges it,
// with its verifier and the RFC 8707 resource, for a token), connects again, lists
// the tools and calls `echo`. Prints one JSON report line.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";

const url = new URL(process.argv[2]);
const redirect = "http://127.0.0.1:9/callback";

class Provider {
  authorizationUrl = undefined;
  saved = undefined;
  verifier = undefined;
  get redirectUrl() {
    return redirect;
  }
  get clientMetadata() {
    return {
      client_name: "toolmesh e2e",
      redirect_uris: [redirect],
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "none",
    };
  }
  clientInformation() {
    return { client_id: "ide" };
  }
  tokens() {
    return this.saved;
  }
  saveTokens(tokens) {
    this.saved = tokens;
  }
  redirectToAuthorization(authorizationUrl) {
    this.authorizationUrl = authorizationUrl;
  }
  saveCodeVerifier(verifier) {
    this.verifier = verifier;
  }
  codeVerifier() {
    return this.verifier;
  }
}

const provider = new Provider();
const report = { unauthorizedFirst: false };

const first = new StreamableHTTPClientTransport(url, { authProvider: provider });
const client = new Client({ name: "toolmesh-e2e", version: "0" });
try {
  await client.connect(first);
} catch (e) {
  if (!(e instanceof UnauthorizedError)) throw e;
  report.unauthorizedFirst = true;
}
if (!provider.authorizationUrl) throw new Error("the SDK never started authorization");
report.issuer = provider.authorizationUrl.origin;
// The user's browser: the authorization server redirects back with a code.
const answer = await fetch(provider.authorizationUrl, { redirect: "manual" });
const location = new URL(answer.headers.get("location"));
const code = location.searchParams.get("code");
if (!code) throw new Error(`no code in ${location}`);
await first.finishAuth(code);

const transport = new StreamableHTTPClientTransport(url, { authProvider: provider });
const again = new Client({ name: "toolmesh-e2e", version: "0" });
await again.connect(transport);
const { tools } = await again.listTools();
report.tools = tools.map((t) => t.name).sort();
const result = await again.callTool({ name: "echo", arguments: { text: "through the gateway" } });
report.echo = result.content?.[0]?.text;
await again.close();
console.log(JSON.stringify(report));
