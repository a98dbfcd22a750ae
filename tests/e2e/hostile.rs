//! The bad-input corpus: malformed and hostile requests, each with its documented answer.
//! Second corpus: hostile bearer tokens at a gateway (`every_hostile_token_…`).
//!
//! Every case is sent as raw bytes over its own TCP connection (so that requests a
//! well-behaved HTTP client refuses to send, such as CR in a header value or two
//! Content-Length headers, can be sent) to a sidecar whose policy allows only the
//! `echo` tool. Each case names the HTTP status and, where the sidecar answers itself,
//! the JSON-RPC error code (README, "Error answers"). Afterwards: the sidecar still
//! serves, never panicked, and the upstream never ran anything but `echo`.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use toolmesh_tests::{DemoServer, Sidecar};

use crate::support::{admin, demo_config};

/// Only `echo` is allowed; everything else is denied by default.
fn config(url: &str) -> String {
    demo_config(url, r#" [{server: demo, tools: ["echo"]}]"#)
}

/// What a case expects: HTTP status and the sidecar's JSON-RPC code, if it answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    /// The sidecar's own JSON-RPC error.
    Sidecar(u16, i64),
    /// Relayed from the upstream with this status; the upstream's own error code, if any.
    Upstream(u16, Option<i64>),
    /// Refused by the HTTP layer (hyper) before any MCP handling: status only.
    Http(u16),
}

struct Case {
    name: &'static str,
    request: Vec<u8>,
    answer: Answer,
}

const MODERN: &str = "2026-07-28";

/// A JSON-RPC body with the 2026-07-28 `_meta` added to `params`.
fn modern(method: &str, params: Value) -> String {
    let mut params = params;
    if let Some(p) = params.as_object_mut() {
        p.insert(
            "_meta".into(),
            serde_json::json!({
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientCapabilities": {}
            }),
        );
    }
    serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string()
}

fn call(name: &str) -> String {
    modern(
        "tools/call",
        serde_json::json!({"name": name, "arguments": {"text": "x"}}),
    )
}

/// Raw HTTP/1.1 request builder with sensible defaults a case can override.
struct Raw {
    method: &'static str,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    content_length: bool,
}

impl Raw {
    fn post(body: impl Into<Vec<u8>>) -> Raw {
        Raw {
            method: "POST",
            path: "/mcp/demo".into(),
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                (
                    "accept".into(),
                    b"application/json, text/event-stream".to_vec(),
                ),
            ],
            body: body.into(),
            content_length: true,
        }
    }

    /// A well-formed modern `tools/call` for `name` with its headers.
    fn call(name: &str) -> Raw {
        Raw::post(call(name)).modern("tools/call", Some(name))
    }

    fn modern(self, method: &str, name: Option<&str>) -> Raw {
        let mut raw = self
            .header("mcp-protocol-version", MODERN)
            .header("mcp-method", method);
        if let Some(name) = name {
            raw = raw.header("mcp-name", name);
        }
        raw
    }

    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Raw {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    fn without(mut self, name: &str) -> Raw {
        self.headers.retain(|(n, _)| n != name);
        self
    }

    fn method(mut self, method: &'static str) -> Raw {
        self.method = method;
        self
    }

    fn path(mut self, path: &str) -> Raw {
        self.path = path.into();
        self
    }

    /// Leave Content-Length to the case's own headers.
    fn no_length(mut self) -> Raw {
        self.content_length = false;
        self
    }

    fn bytes(&self, host: &str) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n",
            self.method, self.path
        )
        .into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if self.content_length {
            out.extend_from_slice(format!("content-length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

fn case(name: &'static str, raw: Raw, answer: Answer, host: &str) -> Case {
    Case {
        name,
        request: raw.bytes(host),
        answer,
    }
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn corpus(host: &str) -> Vec<Case> {
    use Answer::{Http, Sidecar, Upstream};
    let ping_legacy = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let c = |name, raw, answer| case(name, raw, answer, host);
    vec![
        // --- the body is not JSON-RPC
        c("not json", Raw::post("{not json"), Sidecar(400, -32700)),
        c("empty body", Raw::post(""), Sidecar(400, -32700)),
        c(
            "invalid utf-8",
            Raw::post(&b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\xff\xfe\"}"[..]),
            Sidecar(400, -32700),
        ),
        c(
            "truncated json",
            Raw::post(r#"{"jsonrpc":"2.0","id":1,"method":"tools/ca"#),
            Sidecar(400, -32700),
        ),
        c(
            "trailing garbage",
            Raw::post(format!("{ping_legacy}xyz")),
            Sidecar(400, -32700),
        ),
        c(
            "json string",
            Raw::post(r#""tools/call""#),
            Sidecar(400, -32600),
        ),
        c("json number", Raw::post("42"), Sidecar(400, -32600)),
        c("json null", Raw::post("null"), Sidecar(400, -32600)),
        c("empty array", Raw::post("[]"), Sidecar(400, -32600)),
        c(
            "jsonrpc 1.0",
            Raw::post(r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#),
            Sidecar(400, -32600),
        ),
        c(
            "no jsonrpc member",
            Raw::post(r#"{"id":1,"method":"ping"}"#),
            Sidecar(400, -32600),
        ),
        c(
            "method is a number",
            Raw::post(r#"{"jsonrpc":"2.0","id":1,"method":5}"#),
            Sidecar(400, -32600),
        ),
        c(
            "id is an object",
            Raw::post(r#"{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}"#),
            Sidecar(400, -32600),
        ),
        c(
            "id is an array",
            Raw::post(r#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#),
            Sidecar(400, -32600),
        ),
        c(
            "id out of f64 range",
            Raw::post(r#"{"jsonrpc":"2.0","id":1e400,"method":"ping"}"#),
            // Valid JSON: ids are relayed as they are; rmcp refuses the number.
            Upstream(415, None),
        ),
        c(
            "params is an array",
            Raw::post(modern("tools/call", Value::Null).replace("null", "[1,2]"))
                .modern("tools/call", None),
            Sidecar(400, -32600),
        ),
        c(
            "tool name is a number",
            Raw::post(modern("tools/call", serde_json::json!({"name": 7})))
                .modern("tools/call", Some("7")),
            Sidecar(400, -32600),
        ),
        c(
            "resource uri is an object",
            Raw::post(modern(
                "resources/read",
                serde_json::json!({"uri": {"x": 1}}),
            ))
            .modern("resources/read", Some("x")),
            Sidecar(400, -32600),
        ),
        c(
            "nesting 129 deep",
            Raw::post(format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":{}}}}}"#,
                nested(127)
            )),
            Sidecar(400, -32700),
        ),
        c(
            "nesting 10,000 deep",
            Raw::post(format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":{}}}}}"#,
                nested(10_000)
            )),
            Sidecar(400, -32700),
        ),
        // --- smuggling a different call past the policy
        c(
            "duplicate method member",
            Raw::post(
                r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"add"}}"#,
            ),
            Sidecar(400, -32600),
        ),
        c(
            "duplicate tool name member",
            Raw::post(call("echo").replace(r#""name":"echo""#, r#""name":"echo","name":"add""#))
                .modern("tools/call", Some("echo")),
            Sidecar(400, -32600),
        ),
        c(
            "escaped denied name",
            Raw::post(call("add").replace(r#""name":"add""#, r#""name":"\u0061dd""#))
                .modern("tools/call", Some("add")),
            Sidecar(200, -32088),
        ),
        c(
            "escaped allowed name",
            Raw::post(call("echo").replace(r#""name":"echo""#, r#""name":"ech\u006f""#))
                .modern("tools/call", Some("echo")),
            Upstream(200, None),
        ),
        c(
            "escaped method",
            Raw::post(call("add").replace(r#""method":"tools/call""#, r#""method":"tools\/call""#))
                .modern("tools/call", Some("add")),
            Sidecar(200, -32088),
        ),
        c("denied tool", Raw::call("add"), Sidecar(200, -32088)),
        c(
            "glob characters as a name",
            Raw::call("*"),
            Sidecar(200, -32088),
        ),
        c(
            "path-like tool name",
            Raw::call("../../echo"),
            Sidecar(200, -32088),
        ),
        c(
            "tool name with NUL",
            Raw::post(call("add").replace(r#""name":"add""#, r#""name":"echo\u0000""#))
                .modern("tools/call", None)
                .header("mcp-name", "=?base64?ZWNobwA=?="),
            Sidecar(200, -32088),
        ),
        c(
            "denied call without id",
            Raw::post(call("add").replace(r#""id":1,"#, "")).modern("tools/call", Some("add")),
            Sidecar(200, -32088),
        ),
        c(
            "denied call with null id",
            Raw::post(call("add").replace(r#""id":1"#, r#""id":null"#))
                .modern("tools/call", Some("add")),
            Sidecar(200, -32088),
        ),
        c(
            "batch from a modern client",
            Raw::post(format!("[{},{}]", call("echo"), call("add")))
                .header("mcp-protocol-version", MODERN),
            Sidecar(400, -32600),
        ),
        c(
            "batch from a 2025-11-25 client",
            Raw::post(format!("[{ping_legacy},{ping_legacy}]"))
                .header("mcp-protocol-version", "2025-11-25"),
            Sidecar(400, -32600),
        ),
        // --- headers that disagree with the body
        c(
            "mcp-method mismatch",
            Raw::post(call("add")).modern("ping", None),
            Sidecar(400, -32020),
        ),
        c(
            "mcp-name mismatch",
            Raw::post(call("add")).modern("tools/call", Some("echo")),
            Sidecar(400, -32020),
        ),
        c(
            "duplicate mcp-name",
            Raw::call("echo").header("mcp-name", "add"),
            Sidecar(400, -32020),
        ),
        c(
            "protocol header vs _meta",
            Raw::post(call("echo"))
                .header("mcp-protocol-version", "2025-11-25")
                .header("mcp-method", "tools/call")
                .header("mcp-name", "echo"),
            Sidecar(400, -32020),
        ),
        c(
            "modern without mcp-method",
            Raw::call("echo").without("mcp-method"),
            Sidecar(400, -32020),
        ),
        c(
            "modern without mcp-name",
            Raw::call("echo").without("mcp-name"),
            Sidecar(400, -32020),
        ),
        c(
            "base64 mcp-name matching",
            Raw::post(call("echo"))
                .modern("tools/call", None)
                .header("mcp-name", "=?base64?ZWNobw==?="),
            Upstream(200, None),
        ),
        c(
            "base64 mcp-name invalid",
            Raw::post(call("echo"))
                .modern("tools/call", None)
                .header("mcp-name", "=?base64?!!!?="),
            Sidecar(400, -32020),
        ),
        c(
            "non-ascii mcp-name",
            Raw::post(call("echo"))
                .modern("tools/call", None)
                .header("mcp-name", b"ech\xc3\xb6"),
            Sidecar(400, -32020),
        ),
        // --- the HTTP layer
        c(
            "CR inside a header value",
            Raw::call("echo").header("x-note", b"a\rb"),
            Http(400),
        ),
        c(
            "obsolete line folding",
            Raw::call("echo").header("x-note", b"a\r\n b"),
            Http(400),
        ),
        c(
            "header name with a space",
            Raw::call("echo").header("x note", "1"),
            Http(400),
        ),
        c(
            "1 MiB header",
            Raw::call("echo").header("x-big", "a".repeat(1 << 20)),
            Http(431),
        ),
        c(
            "content-length and chunked",
            Raw::call("echo").header("transfer-encoding", "chunked"),
            Sidecar(400, -32600),
        ),
        c(
            "two content-lengths",
            Raw::call("echo")
                .no_length()
                .header("content-length", "10")
                .header("content-length", "11"),
            Http(400),
        ),
        c(
            "content-length not a number",
            Raw::call("echo")
                .no_length()
                .header("content-length", "ten"),
            Http(400),
        ),
        c(
            "chunked body over the limit",
            Raw::post(format!("100001\r\n{}\r\n0\r\n\r\n", "x".repeat(0x10_0001)))
                .no_length()
                .header("transfer-encoding", "chunked"),
            Sidecar(413, -32082),
        ),
        c(
            "body over the limit",
            Raw::post(format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"p":"{}"}}}}"#,
                "x".repeat(1 << 20)
            )),
            Sidecar(413, -32082),
        ),
        c(
            "no content-type",
            Raw::call("echo").without("content-type"),
            Sidecar(415, -32083),
        ),
        c(
            "text/plain",
            Raw::call("echo")
                .without("content-type")
                .header("content-type", "text/plain"),
            Sidecar(415, -32083),
        ),
        c(
            "application/jsonp",
            Raw::call("echo")
                .without("content-type")
                .header("content-type", "application/jsonp"),
            Sidecar(415, -32083),
        ),
        c(
            "json with charset",
            Raw::call("echo")
                .without("content-type")
                .header("content-type", "application/json; charset=utf-8"),
            Upstream(200, None),
        ),
        c("PUT", Raw::call("echo").method("PUT"), Sidecar(405, -32600)),
        c(
            "PATCH",
            Raw::call("echo").method("PATCH"),
            Sidecar(405, -32600),
        ),
        c(
            "OPTIONS",
            Raw::call("echo").method("OPTIONS"),
            Sidecar(405, -32600),
        ),
        // --- where the request goes
        c(
            "unknown server",
            Raw::call("echo").path("/mcp/nope"),
            Sidecar(404, -32081),
        ),
        c(
            "dot-dot path",
            Raw::call("echo").path("/mcp/../admin"),
            Sidecar(404, -32081),
        ),
        c(
            "encoded slash",
            Raw::call("echo").path("/mcp/demo%2F..%2Fx"),
            Sidecar(404, -32081),
        ),
        c(
            "server path with a tail",
            Raw::call("echo").path("/mcp/demo/extra"),
            Sidecar(404, -32081),
        ),
        c(
            "foreign origin",
            Raw::call("echo").header("origin", "http://evil.example.com"),
            Sidecar(403, -32080),
        ),
        c(
            "origin null",
            Raw::call("echo").header("origin", "null"),
            Sidecar(403, -32080),
        ),
        c(
            "lookalike origin",
            Raw::call("echo").header("origin", "http://localhost.evil.example.com"),
            Sidecar(403, -32080),
        ),
        c(
            "duplicate session ids",
            Raw::post(ping_legacy)
                .header("mcp-protocol-version", "2025-11-25")
                .header("mcp-session-id", "a")
                .header("mcp-session-id", "b"),
            Sidecar(400, -32600),
        ),
        c(
            "session id with a control byte",
            Raw::post(ping_legacy)
                .header("mcp-protocol-version", "2025-11-25")
                .header("mcp-session-id", b"a\x01b"),
            Http(400),
        ),
        // --- policy holes (README "Policy"): each must not reach the upstream
        c(
            "forged session id",
            Raw::call("echo").header("mcp-session-id", "tm1.0.YWJj.AAAAAAAAAAAAAAAAAAAAAA"),
            Sidecar(404, -32084),
        ),
        c(
            "upstream's own session id",
            Raw::call("echo").header("mcp-session-id", "5f7c1a2e-0000-4000-8000-000000000000"),
            Sidecar(404, -32084),
        ),
        c(
            "batch of 2025-03-26 with a call",
            Raw::post(format!(
                "[{ping_legacy},{}]",
                r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo"}}"#
            ))
            .header("mcp-protocol-version", "2025-03-26"),
            Sidecar(400, -32600),
        ),
        c(
            "batch of 2025-03-26 with a list",
            Raw::post(r#"[{"jsonrpc":"2.0","id":2,"method":"tools/list"}]"#)
                .header("mcp-protocol-version", "2025-03-26"),
            Sidecar(400, -32600),
        ),
        c(
            "name key in another case",
            Raw::post(call("echo").replace(r#""name":"echo""#, r#""name":"echo","Name":"add""#))
                .modern("tools/call", Some("echo")),
            Sidecar(400, -32600),
        ),
        c(
            "params key with a long s",
            Raw::post(call("echo").replace(
                r#""params":"#,
                "\"param\u{17f}\":{\"name\":\"add\"},\"params\":",
            ))
            .modern("tools/call", Some("echo")),
            Sidecar(400, -32600),
        ),
        c(
            "resource uri with dot segments",
            Raw::post(modern(
                "resources/read",
                serde_json::json!({"uri": "test://static-text/../../template/1/data"}),
            ))
            .modern(
                "resources/read",
                Some("test://static-text/../../template/1/data"),
            ),
            Sidecar(400, -32600),
        ),
        c(
            "resource uri in upper case",
            Raw::post(modern(
                "resources/read",
                serde_json::json!({"uri": "TEST://static-text"}),
            ))
            .modern("resources/read", Some("TEST://static-text")),
            Sidecar(400, -32600),
        ),
        c(
            "gzip request body",
            Raw::call("echo").header("content-encoding", "gzip"),
            Sidecar(415, -32083),
        ),
        c(
            "utf-16 charset",
            Raw::call("echo")
                .without("content-type")
                .header("content-type", "application/json; charset=utf-16"),
            Sidecar(415, -32083),
        ),
        c(
            "two host headers",
            Raw::call("echo").header("host", "evil.example.com"),
            Sidecar(403, -32080),
        ),
        c(
            "second origin not allowed",
            Raw::call("echo")
                .header("origin", "http://localhost")
                .header("origin", "http://evil.example.com"),
            Sidecar(403, -32080),
        ),
        // --- odd but harmless: relayed, the upstream answers
        c(
            "unknown method",
            Raw::post(modern("foo/bar", serde_json::json!({}))).modern("foo/bar", None),
            Upstream(404, Some(-32601)),
        ),
        c(
            "method in another case",
            Raw::post(modern("Tools/Call", serde_json::json!({"name": "add"})))
                .modern("Tools/Call", None),
            Upstream(404, Some(-32601)),
        ),
        c(
            "10 KB string id",
            Raw::post(
                call("echo").replace(r#""id":1"#, &format!(r#""id":"{}""#, "i".repeat(10_000))),
            )
            .modern("tools/call", Some("echo")),
            Upstream(200, None),
        ),
        c(
            "128 levels of arguments",
            Raw::post(call("echo").replace(
                r#""text":"x""#,
                &format!(r#""text":"x","deep":{}"#, nested(120)),
            ))
            .modern("tools/call", Some("echo")),
            Upstream(200, None),
        ),
    ]
}

/// Send one raw request; the status and the body (chunked bodies decoded).
async fn send(addr: std::net::SocketAddr, request: &[u8]) -> Result<(u16, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    // The peer may answer and close before reading everything (e.g. 431): ignore.
    let _ = stream.write_all(request).await;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("no answer within 10 s")?
        .or_else(|e| if response.is_empty() { Err(e) } else { Ok(0) })?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |i| i + 4);
    let (head, body) = response.split_at(split);
    let chunked = String::from_utf8_lossy(head)
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_vec()
        },
    ))
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&body[start..(start + size).min(body.len())]);
        body = &body[(start + size + 2).min(body.len())..];
    }
    out
}

/// The JSON-RPC error code and source in a JSON or SSE body.
fn error_of(body: &[u8]) -> (Option<i64>, bool) {
    let text = String::from_utf8_lossy(body);
    let message: Value = serde_json::from_str(&text).unwrap_or_else(|_| {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v.get("result").is_some() || v.get("error").is_some())
            .unwrap_or(Value::Null)
    });
    let from_sidecar = message["error"]["data"]["source"] == "toolmesh-sidecar";
    (message["error"]["code"].as_i64(), from_sidecar)
}

#[tokio::test]
async fn every_hostile_request_gets_its_documented_answer() -> Result<()> {
    let server = DemoServer::start(&["--json-response"]).await?;
    let sidecar = Sidecar::start(&config(&server.url()), &["--max-body-bytes", "65536"]).await?;
    let host = sidecar.mcp.to_string();
    let cases = corpus(&host);
    assert!(cases.len() >= 50, "the corpus has {} cases", cases.len());

    let mut wrong = Vec::new();
    for case in &cases {
        let (status, body) = match send(sidecar.mcp, &case.request).await {
            Ok(answer) => answer,
            Err(e) => {
                wrong.push(format!("{}: no answer: {e:#}", case.name));
                continue;
            }
        };
        let (code, from_sidecar) = error_of(&body);
        let got = match case.answer {
            Answer::Sidecar(..) if from_sidecar => {
                Answer::Sidecar(status, code.unwrap_or_default())
            }
            Answer::Http(_) if code.is_none() => Answer::Http(status),
            _ if from_sidecar => Answer::Sidecar(status, code.unwrap_or_default()),
            _ => Answer::Upstream(status, code),
        };
        if got != case.answer {
            wrong.push(format!(
                "{}: expected {:?}, got {got:?}: {}",
                case.name,
                case.answer,
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases answered otherwise:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );

    // No harm: still serving, nothing panicked, and the upstream only ever ran `echo`.
    assert_eq!(admin(&sidecar, "/live").await?.0, 200);
    let logs = sidecar.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    let ran: Vec<String> = server
        .proc
        .output
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("call "))
        .map(str::to_owned)
        .collect();
    assert!(
        !ran.is_empty() && ran.iter().all(|name| name == "echo"),
        "the upstream ran {ran:?}"
    );
    println!(
        "{} hostile requests answered as documented; the upstream ran echo {} times",
        cases.len(),
        ran.len()
    );
    Ok(())
}

/// One hostile token case: the `Authorization` header lines sent (none, one, two),
/// and the answer: status, the `error` of the body, and its `error_description`.
struct TokenCase {
    name: &'static str,
    authorization: Vec<String>,
    status: u16,
    error: &'static str,
    description: &'static str,
}

#[tokio::test]
async fn every_hostile_token_gets_its_documented_answer() -> Result<()> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let s = crate::gateway::Stack::start().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mint = |claims: Value| {
        let authz = &s.authz;
        let mut spec = serde_json::json!({"sub": "alice", "aud": s.origin, "scope": "mcp"});
        if let (Some(spec), Some(more)) = (spec.as_object_mut(), claims.as_object()) {
            spec.extend(more.clone());
        }
        async move { authz.mint(spec).await }
    };
    let good = s.token("alice").await?;
    let parts: Vec<&str> = good.split('.').collect();
    let claims: Value = serde_json::from_slice(&b64.decode(parts[1])?)?;
    let public = s.authz.public_key().await?;
    let kid = public["kid"].as_str().context("kid")?;
    // HS256 keyed with the issuer's public key (as JWK text, and as its modulus).
    let hmac = |secret: &[u8]| {
        let header =
            b64.encode(serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": kid}).to_string());
        let signing = format!("{header}.{}", parts[1]);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        format!(
            "{signing}.{}",
            b64.encode(ring::hmac::sign(&key, signing.as_bytes()))
        )
    };
    let modulus = b64.decode(public["n"].as_str().context("n")?)?;
    let with_claims = |changed: Value| {
        format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(changed.to_string()),
            parts[2]
        )
    };
    let mut mallory = claims.clone();
    mallory["sub"] = "mallory".into();
    let mut longer = claims.clone();
    longer["exp"] = (now + 10 * 365 * 86_400).into();
    let none = |alg: &str| {
        format!(
            "{}.{}.",
            b64.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
            parts[1]
        )
    };
    let bearer = |t: &str| vec![format!("Bearer {t}")];
    let invalid = |name, authorization, description| TokenCase {
        name,
        authorization,
        status: 401,
        error: "invalid_token",
        description,
    };
    let cases = vec![
        TokenCase {
            name: "no Authorization",
            authorization: vec![],
            status: 401,
            error: "invalid_request",
            description: "a bearer token is required",
        },
        TokenCase {
            name: "Basic credentials",
            authorization: vec!["Basic YWxpY2U6c2VjcmV0".into()],
            status: 401,
            error: "invalid_request",
            description: "a bearer token is required",
        },
        invalid(
            "an empty bearer token",
            vec!["Bearer ".into()],
            "the bearer token is empty or too long",
        ),
        invalid(
            "a 9 KiB token",
            bearer(&"a".repeat(9 * 1024)),
            "the bearer token is empty or too long",
        ),
        invalid(
            "a token with a space",
            vec![format!("Bearer {} x", good)],
            "the bearer token has characters a token cannot hold",
        ),
        invalid(
            "two Authorization headers, both good",
            vec![format!("Bearer {good}"), format!("Bearer {good}")],
            "more than one Authorization header",
        ),
        invalid(
            "two parts",
            bearer(&format!("{}.{}", parts[0], parts[1])),
            "not a signed JWT",
        ),
        invalid(
            "a trailing dot",
            bearer(&format!("{good}.")),
            "not a signed JWT",
        ),
        invalid("alg none", bearer(&none("none")), "not a signed JWT"),
        invalid("alg None", bearer(&none("None")), "not a signed JWT"),
        invalid(
            "HS256 keyed with the public JWK",
            bearer(&hmac(public.to_string().as_bytes())),
            "the token's signature algorithm is not accepted",
        ),
        invalid(
            "HS256 keyed with the modulus",
            bearer(&hmac(&modulus)),
            "the token's signature algorithm is not accepted",
        ),
        invalid(
            "another user under alice's signature",
            bearer(&with_claims(mallory)),
            "the token's signature does not verify",
        ),
        invalid(
            "a later exp under the same signature",
            bearer(&with_claims(longer)),
            "the token's signature does not verify",
        ),
        invalid(
            "signature of another token",
            bearer(&format!(
                "{}.{}.{}",
                parts[0],
                parts[1],
                s.token("bob").await?.rsplit('.').next().unwrap_or_default()
            )),
            "the token's signature does not verify",
        ),
        invalid(
            "expired ten minutes ago",
            bearer(&mint(serde_json::json!({"expiresIn": -600})).await?),
            "the token has expired",
        ),
        invalid(
            "not valid for an hour (nbf)",
            bearer(&mint(serde_json::json!({"claims": {"nbf": now + 3600}})).await?),
            "the token is not valid yet (nbf)",
        ),
        invalid(
            "an untrusted issuer",
            bearer(&mint(serde_json::json!({"iss": "https://evil.example.com"})).await?),
            "the token's issuer is not trusted",
        ),
        invalid(
            "the issuer with a path appended",
            bearer(&mint(serde_json::json!({"iss": format!("{}/evil", s.authz.issuer)})).await?),
            "the token's issuer is not trusted",
        ),
        invalid(
            "a key never published",
            bearer(&mint(serde_json::json!({"foreign": true})).await?),
            "no key of the issuer matches the token",
        ),
        invalid(
            "no sub",
            bearer(&mint(serde_json::json!({"sub": null})).await?),
            "the token's sub is missing or not a string",
        ),
        invalid(
            "sub a number",
            bearer(&mint(serde_json::json!({"claims": {"sub": 42}})).await?),
            "the token's sub is missing or not a string",
        ),
        invalid(
            "no aud",
            bearer(&mint(serde_json::json!({"aud": null})).await?),
            "the token has no aud",
        ),
        invalid(
            "no exp",
            bearer(&mint(serde_json::json!({"claims": {"exp": null}})).await?),
            "the token has no exp",
        ),
        invalid(
            "another resource's aud",
            bearer(&mint(serde_json::json!({"aud": "https://other.example.com"})).await?),
            "the token's audience is not this resource",
        ),
        invalid(
            "an aud that only starts like ours",
            bearer(&mint(serde_json::json!({"aud": format!("{}.evil.example", s.origin)})).await?),
            "the token's audience is not this resource",
        ),
        invalid(
            "another path's aud",
            bearer(&mint(serde_json::json!({"aud": format!("{}/mcp/other", s.origin)})).await?),
            "the token's audience is not this resource",
        ),
        TokenCase {
            name: "no required scope",
            authorization: bearer(&mint(serde_json::json!({"scope": "read write"})).await?),
            status: 403,
            error: "insufficient_scope",
            description: "the token lacks a scope this gateway requires",
        },
    ];
    let host = s.gateway.mcp.to_string();
    let body = call("echo");
    let mut wrong = Vec::new();
    for case in &cases {
        let mut request = format!(
            "POST /mcp/demo HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: {MODERN}\r\nmcp-method: tools/call\r\nmcp-name: echo\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
        for line in &case.authorization {
            request.push_str(&format!("authorization: {line}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        let (status, answer) = send(s.gateway.mcp, request.as_bytes()).await?;
        let text = String::from_utf8_lossy(&answer);
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let tokens_echoed = case.authorization.iter().any(|line| {
            let token = line
                .trim_start_matches("Bearer ")
                .trim_start_matches("Basic ");
            token.len() > 8 && text.contains(token)
        });
        if status != case.status
            || json["error"] != case.error
            || json["error_description"] != case.description
            || tokens_echoed
        {
            wrong.push(format!(
                "{}: expected {} {} {:?}, got {status} {text}",
                case.name, case.status, case.error, case.description
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} token cases answered otherwise:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    assert_eq!(s.ran("echo"), 0, "a hostile token's call ran upstream");
    // The positive control, and no token in the gateway's logs.
    let mut headers = crate::support::modern_headers("echo");
    headers.push(("authorization", format!("Bearer {good}")));
    let reply = crate::support::post(
        &s.gateway.url("demo"),
        &crate::support::borrow(&headers),
        call("echo"),
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(s.ran("echo"), 1);
    assert!(!s.gateway.logs().contains(&good));
    let refused = || {
        crate::support::audit_lines(&s.gateway)
            .iter()
            .filter(|l| l["subject"] == "(unauthenticated)")
            .count()
    };
    crate::support::eventually(5, || async { refused() >= cases.len() }).await;
    assert_eq!(refused(), cases.len(), "one audit line per refused token");
    println!("{} hostile tokens answered as documented", cases.len());
    Ok(())
}
