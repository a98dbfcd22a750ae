//! Resource reads a 2026-07-28 server marks cacheable, kept for this identity.
//!
//! A `resources/read` result with a positive `ttlMs` (and `resultType` absent or
//! `complete`) that a 2026-07-28 server gives a 2026-07-28 agent through `/mcp` is kept
//! for that long, under the snapshot version, the server and the URI as sent: the next
//! read of the same URI in the same snapshot is answered from here (decided by policy
//! first, like any read), its `ttlMs` what remains. The sidecar serves one identity, so
//! `cacheScope` `private` and `public` results alike may be kept.
//!
//! Not kept: a read that carries `inputResponses` or `requestState` (a retry: its result
//! answers one exchange), a result over [`MAX_ENTRY`] bytes, an answer that came as an
//! SSE stream, and anything once [`MAX_BYTES`] are held (expired entries are dropped
//! first). A server's list change or `notifications/resources/updated` heard on any
//! agent's notification stream drops its reads; a new snapshot makes the old ones
//! unreachable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

/// Largest result kept.
pub(super) const MAX_ENTRY: usize = 256 * 1024;
/// Bytes of results kept at most.
pub(super) const MAX_BYTES: usize = 16 * 1024 * 1024;

/// Snapshot version, caller (a gateway keeps each user's reads apart), server, URI as
/// sent.
pub(super) type Key = (String, String, String, String);

#[derive(Debug, Default)]
pub(super) struct Reads(Mutex<Held>);

#[derive(Debug, Default)]
struct Held {
    entries: HashMap<Key, Entry>,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    result: Arc<str>,
    expires: Instant,
}

impl Held {
    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.bytes -= e.result.len();
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Key, &Entry) -> bool) {
        let mut freed = 0;
        self.entries.retain(|k, e| {
            let kept = keep(k, e);
            if !kept {
                freed += e.result.len();
            }
            kept
        });
        self.bytes -= freed;
    }
}

impl Reads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kept result for `key`, its `ttlMs` what remains; `None` when there is none
    /// or it expired.
    pub(super) fn get(&self, key: &Key) -> Option<String> {
        self.get_at(key, Instant::now())
    }

    fn get_at(&self, key: &Key, now: Instant) -> Option<String> {
        let mut held = self.lock();
        let entry = held.entries.get(key)?;
        let left = entry.expires.saturating_duration_since(now);
        if left.is_zero() {
            held.remove(key);
            return None;
        }
        let result = entry.result.clone();
        drop(held);
        let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
        crate::filter::rewrite_members(&result, |k, _, out| {
            if k != "ttlMs" {
                return false;
            }
            out.push_str(&ms.to_string());
            true
        })
    }

    /// Keep the result of `answer` (a JSON-RPC response) under `key` if it says it may
    /// be kept (module docs).
    pub(super) fn put(&self, key: Key, answer: &str) {
        self.put_at(key, answer, Instant::now());
    }

    fn put_at(&self, key: Key, answer: &str, now: Instant) {
        #[derive(Deserialize)]
        struct Answer<'a> {
            #[serde(borrow, default)]
            result: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Kind<'a> {
            #[serde(default, rename = "resultType")]
            result_type: Option<&'a str>,
        }
        let Some(result) = serde_json::from_str::<Answer<'_>>(answer)
            .ok()
            .and_then(|a| a.result)
        else {
            return;
        };
        let Ok(kind) = serde_json::from_str::<Kind<'_>>(result.get()) else {
            return;
        };
        // `ttlMs` read as for lists.
        let ttl = super::ttl_of(result.get());
        let complete = kind.result_type.is_none_or(|t| t == "complete");
        let size = result.get().len();
        if !complete || ttl.is_zero() || size > MAX_ENTRY {
            return;
        }
        let mut held = self.lock();
        held.remove(&key);
        if held.bytes + size > MAX_BYTES {
            held.retain(|_, e| e.expires > now);
        }
        if held.bytes + size > MAX_BYTES {
            return;
        }
        held.bytes += size;
        held.entries.insert(
            key,
            Entry {
                result: Arc::from(result.get()),
                expires: now + ttl,
            },
        );
    }

    /// Drop every read of `server` (it said something changed).
    pub(super) fn forget(&self, server: &str) {
        self.lock().retain(|(_, _, s, _), _| s != server);
    }
}

/// May this read's result be kept or answered from what is kept? Not a retry that
/// carries input responses or a request state.
pub(super) fn fresh_request(params: Option<&RawValue>) -> bool {
    #[derive(Deserialize)]
    struct Retry<'a> {
        #[serde(borrow, default, rename = "inputResponses")]
        input_responses: Option<&'a RawValue>,
        #[serde(borrow, default, rename = "requestState")]
        request_state: Option<&'a RawValue>,
    }
    params
        .and_then(|p| serde_json::from_str::<Retry<'_>>(p.get()).ok())
        .is_some_and(|r| r.input_responses.is_none() && r.request_state.is_none())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(uri: &str) -> Key {
        (
            "v1".to_owned(),
            "me".to_owned(),
            "py".to_owned(),
            uri.to_owned(),
        )
    }

    fn answer(result: &str) -> String {
        format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{result}}}")
    }

    #[test]
    fn a_read_is_kept_as_long_as_its_ttl_says_and_shows_what_remains() {
        let reads = Reads::default();
        let start = Instant::now();
        let result = r#"{"contents":[{"uri":"a://x","text":"hi"}],"ttlMs":60000,"cacheScope":"private","resultType":"complete"}"#;
        reads.put_at(key("a://x"), &answer(result), start);
        let later = start + Duration::from_secs(20);
        let hit = reads.get_at(&key("a://x"), later).expect("kept");
        let v: serde_json::Value = serde_json::from_str(&hit).expect("JSON");
        assert_eq!(v["ttlMs"], 40000, "{hit}");
        assert_eq!(v["contents"][0]["text"], "hi");
        assert!(reads.get_at(&key("a://y"), later).is_none(), "another URI");
        let after = start + Duration::from_secs(61);
        assert!(reads.get_at(&key("a://x"), after).is_none(), "expired");
        assert_eq!(reads.lock().bytes, 0);
    }

    #[test]
    fn only_complete_results_with_a_ttl_are_kept() {
        let reads = Reads::default();
        for result in [
            r#"{"contents":[],"ttlMs":0}"#,
            r#"{"contents":[]}"#,
            r#"{"contents":[],"ttlMs":"60000"}"#,
            r#"{"resultType":"input_required","inputRequests":{},"ttlMs":60000}"#,
        ] {
            reads.put(key("a://x"), &answer(result));
            assert!(reads.get(&key("a://x")).is_none(), "{result}");
        }
        let error = r#"{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"no"}}"#;
        reads.put(key("a://x"), error);
        assert!(reads.get(&key("a://x")).is_none());
        let big = format!(
            r#"{{"contents":[{{"text":"{}"}}],"ttlMs":1000}}"#,
            "x".repeat(MAX_ENTRY)
        );
        reads.put(key("a://x"), &answer(&big));
        assert!(reads.get(&key("a://x")).is_none(), "too large");
    }

    #[test]
    fn a_servers_change_drops_its_reads_only() {
        let reads = Reads::default();
        let result = r#"{"contents":[],"ttlMs":60000}"#;
        reads.put(key("a://x"), &answer(result));
        let other = (
            "v1".to_owned(),
            "me".to_owned(),
            "ts".to_owned(),
            "a://x".to_owned(),
        );
        reads.put(other.clone(), &answer(result));
        reads.forget("py");
        assert!(reads.get(&key("a://x")).is_none());
        assert!(reads.get(&other).is_some());
    }

    #[test]
    fn a_retry_is_never_answered_from_or_kept_in_the_cache() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).expect("JSON");
        assert!(fresh_request(Some(&raw(r#"{"uri":"a://x"}"#))));
        assert!(!fresh_request(Some(&raw(
            r#"{"uri":"a://x","inputResponses":{}}"#
        ))));
        assert!(!fresh_request(Some(&raw(
            r#"{"uri":"a://x","requestState":"s"}"#
        ))));
        assert!(!fresh_request(None));
    }
}
