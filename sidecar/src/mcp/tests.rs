use http::{HeaderMap, HeaderValue};

use super::*;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(*k, HeaderValue::from_str(v).expect("header value"));
    }
    map
}

fn single(body: &str) -> Message<'_> {
    match parse(body.as_bytes()).expect("parses") {
        Envelope::Single(m) => m,
        Envelope::Batch(_) => panic!("not a batch"),
    }
}

const CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"x":[1,2,{"y":"z"}]}}}"#;
const MODERN_CALL: &str = r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"echo","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;

#[test]
fn reads_the_envelope_and_borrows() {
    let m = single(CALL);
    assert_eq!(m.kind, Kind::Request);
    assert_eq!(m.id.map(RawValue::get), Some("7"));
    assert_eq!(m.method.as_deref(), Some("tools/call"));
    assert!(matches!(m.target, Some(Cow::Borrowed("echo"))));
    assert_eq!(m.meta_version, None);
}

#[test]
fn targets_follow_the_method() {
    let m = single(
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a b","name":"ignored"}}"#,
    );
    assert_eq!(m.target.as_deref(), Some("file:///a b"));
    let m = single(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"name":5}}"#);
    assert_eq!(m.target, None);
    let m =
        single(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"caf\u00e9"}}"#);
    assert_eq!(m.target.as_deref(), Some("café"));
}

#[test]
fn kinds() {
    assert_eq!(
        single(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).kind,
        Kind::Notification
    );
    assert_eq!(
        single(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#).kind,
        Kind::Response
    );
    assert_eq!(
        single(r#"{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}}"#).kind,
        Kind::Response
    );
}

#[test]
fn bad_bodies_are_told_apart() {
    assert!(matches!(parse(b"{not json"), Err(Rejection::Parse(_))));
    assert!(matches!(parse(b""), Err(Rejection::Parse(_))));
    assert!(matches!(parse(b"  "), Err(Rejection::Parse(_))));
    assert!(matches!(parse(b"\xff\xfe"), Err(Rejection::Parse(_))));
    assert!(matches!(parse(b"42"), Err(Rejection::Invalid(_))));
    assert!(matches!(parse(b"[]"), Err(Rejection::Invalid(_))));
    assert!(matches!(
        parse(br#"{"id":1,"method":"ping"}"#),
        Err(Rejection::Invalid(_))
    ));
    assert!(matches!(
        parse(br#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#),
        Err(Rejection::Invalid(_))
    ));
    assert!(matches!(
        parse(br#"{"jsonrpc":"2.0","id":1}"#),
        Err(Rejection::Invalid(_))
    ));
    assert!(matches!(
        parse(br#"{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}"#),
        Err(Rejection::Invalid(_))
    ));
    assert!(matches!(
        parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":1}}"#),
        Err(Rejection::Invalid(_))
    ));
}

#[test]
fn batches_only_for_2025_03_26() {
    let body = format!("[{CALL},{CALL}]");
    let env = parse(body.as_bytes()).expect("batch parses");
    assert!(matches!(&env, Envelope::Batch(v) if v.len() == 2));
    assert_eq!(check_headers(&headers(&[]), &env), Ok(false));
    assert_eq!(
        check_headers(&headers(&[("mcp-protocol-version", "2025-03-26")]), &env),
        Ok(false)
    );
    assert!(matches!(
        check_headers(&headers(&[("mcp-protocol-version", "2025-06-18")]), &env),
        Err(Rejection::Invalid(_))
    ));
    assert!(matches!(
        check_headers(&headers(&[("mcp-method", "tools/call")]), &env),
        Err(Rejection::Header(_))
    ));
}

#[test]
fn legacy_requests_need_no_headers_but_present_ones_must_agree() {
    let env = parse(CALL.as_bytes()).expect("parses");
    let v = [("mcp-protocol-version", "2025-11-25")];
    assert_eq!(check_headers(&headers(&v), &env), Ok(false));
    assert_eq!(
        check_headers(
            &headers(&[v[0], ("mcp-method", "tools/call"), ("mcp-name", "echo")]),
            &env
        ),
        Ok(false)
    );
    assert!(matches!(
        check_headers(&headers(&[v[0], ("mcp-name", "delete_repo")]), &env),
        Err(Rejection::Header(_))
    ));
    assert!(matches!(
        check_headers(&headers(&[v[0], ("mcp-method", "tools/list")]), &env),
        Err(Rejection::Header(_))
    ));
}

#[test]
fn modern_requests_need_matching_headers() {
    let env = parse(MODERN_CALL.as_bytes()).expect("parses");
    let ok = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "echo"),
    ];
    assert_eq!(check_headers(&headers(&ok), &env), Ok(true));
    for missing in 0..3 {
        let mut h = ok.to_vec();
        h.remove(missing);
        assert!(
            matches!(check_headers(&headers(&h), &env), Err(Rejection::Header(_))),
            "{h:?}"
        );
    }
    let mut h = ok.to_vec();
    h[2] = ("mcp-name", "delete_repo");
    let err = check_headers(&headers(&h), &env).expect_err("mismatch");
    assert!(
        matches!(&err, Rejection::Header(m) if m.contains("delete_repo") && m.contains("echo")),
        "{err:?}"
    );
    let mut h = ok.to_vec();
    h.push(("mcp-name", "echo"));
    assert!(
        matches!(check_headers(&headers(&h), &env), Err(Rejection::Header(_))),
        "duplicate"
    );
    let mut h = ok.to_vec();
    h[0] = ("mcp-protocol-version", "2025-11-25");
    assert!(
        matches!(check_headers(&headers(&h), &env), Err(Rejection::Header(_))),
        "version disagreement"
    );
}

#[test]
fn base64_names() {
    let env = parse(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"café"}}"#.as_bytes(),
    )
    .expect("parses");
    let h = headers(&[
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "=?base64?Y2Fmw6k=?="),
    ]);
    assert_eq!(check_headers(&h, &env), Ok(true));
    let h = headers(&[
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "=?base64?!!?="),
    ]);
    assert!(matches!(check_headers(&h, &env), Err(Rejection::Header(_))));
}

#[test]
fn modern_notifications_and_discover() {
    let env =
        parse(br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#)
            .expect("parses");
    assert_eq!(
        check_headers(&headers(&[("mcp-protocol-version", "2026-07-28")]), &env),
        Ok(true)
    );
    let env = parse(br#"{"jsonrpc":"2.0","id":1,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#).expect("parses");
    let h = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "server/discover"),
    ];
    assert_eq!(check_headers(&headers(&h), &env), Ok(true));
    // Generation detected from _meta alone: the version header is then required.
    assert!(matches!(
        check_headers(&headers(&h[1..]), &env),
        Err(Rejection::Header(_))
    ));
    // Mcp-Name is optional where the spec does not require it, but must agree when sent.
    let env = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"t1"}}"#)
        .expect("parses");
    let h = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tasks/get"),
    ];
    assert_eq!(check_headers(&headers(&h), &env), Ok(true));
    let mut h = h.to_vec();
    h.push(("mcp-name", "t2"));
    assert!(matches!(
        check_headers(&headers(&h), &env),
        Err(Rejection::Header(_))
    ));
}

#[test]
fn nesting_is_limited_outside_strings_only() {
    let nest = |n: usize| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":{}{}}}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    // params and the object around it are two levels.
    assert!(parse(nest(MAX_DEPTH - 2).as_bytes()).is_ok());
    assert!(
        matches!(parse(nest(MAX_DEPTH - 1).as_bytes()), Err(Rejection::Parse(m)) if m.contains("deeper"))
    );
    // Brackets inside strings, escaped quotes included, do not count.
    let stringy = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"\"{}"}}}}"#,
        "[".repeat(1000)
    );
    assert!(parse(stringy.as_bytes()).is_ok());
}

fn rejected(body: &str) -> Rejection {
    parse(body.as_bytes()).expect_err("refused")
}

#[test]
fn keys_that_fold_to_a_policy_key_are_refused() {
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","Name":"delete"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","NAME":"delete"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","Method":"prompts/get","params":{"name":"echo"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"Arguments":{"x":1}}}"#,
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\"},\"param\u{17f}\":{\"name\":\"delete\"}}",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"resources/read\",\"params\":{\"uri\":\"test://a\",\"\u{212a}\":1,\"URI\":\"test://b\"}}",
        r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"a","Name":"b"},"argument":{"name":"x","value":""}}}"#,
    ] {
        assert!(
            matches!(rejected(body), Rejection::Invalid(ref m) if m.contains("only by case")),
            "{body}"
        );
    }
    // Other keys are the server's business.
    single(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","Cursor":1,"x":2}}"#,
    );
    assert!(keys_fold_equal("param\u{17f}", "params"));
    assert!(keys_fold_equal("\u{212a}ey", "key"));
    assert!(!keys_fold_equal("names", "name"));
}

#[test]
fn resource_uris_are_judged_as_servers_resolve_them() {
    let m = single(
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"docs://public/%73ecret"}}"#,
    );
    let subject = m.acts_on.expect("target");
    assert_eq!(subject.name, "docs://public/secret");
    // Mcp-Name still mirrors the body as sent.
    assert_eq!(m.target.as_deref(), Some("docs://public/%73ecret"));
    for uri in [
        "docs://public/../secret",
        "DOCS://public/x",
        "docs://public/x\t",
        " docs://public/x",
        "not a uri",
    ] {
        let body = serde_json::json!({"jsonrpc":"2.0","id":1,"method":"resources/subscribe","params":{"uri": uri}}).to_string();
        assert!(matches!(rejected(&body), Rejection::Invalid(_)), "{uri:?}");
    }
    let body = serde_json::json!({"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"docs://x/../{path}"},"argument":{"name":"path","value":""}}}).to_string();
    assert!(matches!(rejected(&body), Rejection::Invalid(_)));
    let body = serde_json::json!({"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"docs://x/{path}"},"argument":{"name":"path","value":""}}}).to_string();
    assert_eq!(
        single(&body).acts_on.expect("target").name,
        "docs://x/{path}"
    );
}
