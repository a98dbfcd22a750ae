// A real OAuth 2.0 / OpenID authorization server for the gateway's end-to-end tests:
// `oauth2-mock-server` (discovery, JWKS, client credentials, authorization code with
// PKCE), with the RFC 8707 `resource` parameter turned into the token's audience, the
// client id into its subject for client credentials, and the scope asked for at
// /authorize granted with the code. A second port is the tests'
// handle on it (never exposed to the gateway):
//
//   POST /mint   {sub, aud, scope, client_id, claims, expiresIn, iss, foreign}
//                -> {token}: a token signed by the issuer's current key (or, with
//                `foreign`, by a key it never published; with `iss`, naming another
//                issuer)
//   POST /rotate -> {kid}: a new signing key, published and used from now on
//   GET  /public -> the first key's public JWK (for key-confusion attacks)
//   GET  /hits   -> {grant_type: count}: token requests answered, by grant
//   POST /ttl    {seconds} -> {}: the lifetime (expires_in) of tokens issued from now
//
// Besides the mock's own grants it serves RFC 8693 token exchange at
// <issuer>/token-exchange: the subject token must be a JWT this issuer signed; the
// token issued names its subject, the `audience` (or `resource`) asked for, and the
// authenticating client as `act.sub` (HTTP Basic, any secret).
//
// Prints one line: {"issuer": URL, "admin": URL}. Runs on Node >= 22.

import http from "node:http";
import { randomUUID } from "node:crypto";
import { OAuth2Server } from "oauth2-mock-server";
import { SignJWT, createLocalJWKSet, generateKeyPair, jwtVerify } from "jose";

const server = new OAuth2Server();
const first = await server.issuer.keys.generate("RS256");
let current = first.kid;
await server.start(0, "127.0.0.1");
const issuer = server.issuer.url;

// The scope asked for at /authorize, by code: granted with the token the code buys
// (the mock alone would grant "dummy").
const granted = new Map();
server.service.on("beforeAuthorizeRedirect", (redirect, req) => {
  const code = redirect.url.searchParams.get("code");
  if (code && typeof req.query.scope === "string") granted.set(code, req.query.scope);
});

server.service.on("beforeTokenSigning", (token, req) => {
  const body = req.body ?? {};
  // Every token its own, as real servers issue them (two in one second differ).
  token.payload.jti = randomUUID();
  if (typeof body.resource === "string") token.payload.aud = body.resource;
  if (body.grant_type === "authorization_code" && granted.has(body.code)) {
    token.payload.scope = granted.get(body.code);
  }
  if (body.grant_type === "client_credentials") {
    const basic = (req.headers.authorization ?? "").replace(/^Basic /i, "");
    const client = basic
      ? Buffer.from(basic, "base64").toString().split(":")[0]
      : body.client_id;
    token.payload.sub = client;
    token.payload.client_id = client;
  }
});

const foreign = await generateKeyPair("RS256", { extractable: true });

const hits = {};
let ttl = 3600;
server.service.on("beforeResponse", (response, req) => {
  const grant = (req.body ?? {}).grant_type ?? "unknown";
  hits[grant] = (hits[grant] ?? 0) + 1;
  if (response.body && typeof response.body === "object") response.body.expires_in = ttl;
});

const EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange";
server.service.addRoute("POST", "/token-exchange", async (req, res) => {
  const body = req.body ?? {};
  const fail = (error, description) =>
    res
      .writeHead(400, { "content-type": "application/json" })
      .end(JSON.stringify({ error, error_description: description }));
  if (body.grant_type !== EXCHANGE) return fail("unsupported_grant_type", String(body.grant_type));
  if (typeof body.subject_token !== "string") return fail("invalid_request", "no subject_token");
  let subject;
  try {
    const published = server.issuer.keys.toJSON();
    const jwks = createLocalJWKSet(Array.isArray(published) ? { keys: published } : published);
    subject = (await jwtVerify(body.subject_token, jwks, { issuer })).payload;
  } catch (e) {
    return fail("invalid_grant", `subject_token: ${e.message}`);
  }
  const basic = (req.headers.authorization ?? "").replace(/^Basic /i, "");
  const client = basic
    ? decodeURIComponent(Buffer.from(basic, "base64").toString().split(":")[0])
    : body.client_id;
  const token = await server.issuer.buildToken({
    kid: current,
    expiresIn: ttl,
    scopesOrTransform: (_header, claims) => {
      claims.sub = subject.sub;
      claims.jti = randomUUID();
      claims.aud = body.audience ?? body.resource;
      if (body.scope) claims.scope = body.scope;
      if (client) {
        claims.act = { sub: client };
        claims.client_id = client;
      }
    },
  });
  hits[EXCHANGE] = (hits[EXCHANGE] ?? 0) + 1;
  res.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" }).end(
    JSON.stringify({
      access_token: token,
      issued_token_type: "urn:ietf:params:oauth:token-type:access_token",
      token_type: "Bearer",
      expires_in: ttl,
    }),
  );
});

async function mint(spec) {
  const now = Math.floor(Date.now() / 1000);
  const payload = {
    iss: spec.iss ?? issuer,
    sub: spec.sub,
    aud: spec.aud,
    iat: now,
    nbf: now - 10,
    jti: randomUUID(),
    exp: now + (spec.expiresIn ?? 3600),
    ...(spec.scope ? { scope: spec.scope } : {}),
    ...(spec.client_id ? { client_id: spec.client_id } : {}),
    ...(spec.claims ?? {}),
  };
  // A claim given as null is left out (a token without `sub`, without `aud`).
  for (const k of Object.keys(payload)) {
    if (payload[k] === null || payload[k] === undefined) delete payload[k];
  }
  if (spec.foreign) {
    return new SignJWT(payload)
      .setProtectedHeader({ alg: "RS256", kid: "never-published", typ: "JWT" })
      .sign(foreign.privateKey);
  }
  // The mock's own signing path, with this key (its store rotates keys round-robin
  // otherwise).
  return server.issuer.buildToken({
    kid: current,
    expiresIn: spec.expiresIn ?? 3600,
    scopesOrTransform: (_header, claims) => {
      for (const k of Object.keys(claims)) delete claims[k];
      Object.assign(claims, payload);
    },
  });
}

const admin = http.createServer(async (req, res) => {
  try {
    let body = "";
    for await (const chunk of req) body += chunk;
    const spec = body ? JSON.parse(body) : {};
    let answer;
    if (req.method === "POST" && req.url === "/mint") {
      answer = { token: await mint(spec) };
    } else if (req.method === "POST" && req.url === "/rotate") {
      const key = await server.issuer.keys.generate("RS256");
      current = key.kid;
      answer = { kid: current };
    } else if (req.method === "GET" && req.url === "/hits") {
      answer = hits;
    } else if (req.method === "POST" && req.url === "/ttl") {
      ttl = spec.seconds;
      answer = {};
    } else if (req.method === "GET" && req.url === "/public") {
      const published = server.issuer.keys.toJSON();
      answer = (Array.isArray(published) ? published : published.keys).find((k) => k.kid === first.kid);
    } else {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
  } catch (e) {
    res.writeHead(500).end(String(e));
  }
});
admin.listen(0, "127.0.0.1", () => {
  const { port } = admin.address();
  console.log(JSON.stringify({ issuer, admin: `http://127.0.0.1:${port}` }));
});
