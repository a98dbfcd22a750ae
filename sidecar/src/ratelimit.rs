//! Token buckets for `rateLimit` rules.
//!
//! One [`Limiter`] per rule that has a limit; inside it, one bucket per caller and tool,
//! resource or prompt name the rule covers (or one per caller when the rule's scope is
//! `rule`). A sidecar has one caller, its own identity; a gateway one per user. Buckets
//! are found by a keyed hash of caller and name (random keys per limiter), so a lookup
//! never allocates and nobody can aim two names at one bucket.
//! A bucket holds up to `requests` tokens and refills continuously at `requests / per`.
//! Limiters are kept across snapshot swaps when the rule did not change (the snapshot
//! compiler looks them up by the rule's fingerprint), so reloading a config does not
//! hand every agent a fresh budget.
//!
//! The bucket map is behind a `Mutex` held for a few hundred nanoseconds; it is rate
//! state, not configuration. It is bounded: past [`MAX_BUCKETS`] names, full buckets
//! (idle long enough to have refilled) are dropped, and if none are, further names share
//! one overflow bucket, so a flood of invented names cannot grow memory.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most distinct names tracked per rule.
pub const MAX_BUCKETS: usize = 16_384;
/// The bucket names share once [`MAX_BUCKETS`] are taken and none is full.
const OVERFLOW: u64 = 0;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct Limiter {
    capacity: f64,
    per_second: f64,
    shared: bool,
    keys: std::collections::hash_map::RandomState,
    buckets: Mutex<HashMap<u64, Bucket>>,
}

impl Limiter {
    /// `requests` per `per`; `None` if the limit is unusable (zero window).
    pub fn new(requests: u32, per: Duration, shared: bool) -> Option<Self> {
        if per.is_zero() {
            return None;
        }
        Some(Limiter {
            capacity: f64::from(requests),
            per_second: f64::from(requests) / per.as_secs_f64(),
            shared,
            keys: std::collections::hash_map::RandomState::new(),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Take a token for caller `who` and `name`, or say how long until one is available.
    pub fn acquire(&self, who: &str, name: &str) -> Result<(), Duration> {
        self.acquire_at(who, name, Instant::now())
    }

    fn key(&self, who: &str, name: &str) -> u64 {
        let mut h = self.keys.build_hasher();
        who.hash(&mut h);
        if !self.shared {
            name.hash(&mut h);
        }
        // 0 is the overflow bucket's.
        h.finish().max(1)
    }

    fn acquire_at(&self, who: &str, name: &str, now: Instant) -> Result<(), Duration> {
        let key = self.key(who, name);
        // A poisoned lock only means another thread panicked mid-update of plain
        // numbers; the map is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = if buckets.contains_key(&key) || buckets.len() < MAX_BUCKETS {
            key
        } else {
            self.evict_full(&mut buckets, now);
            if buckets.len() < MAX_BUCKETS {
                key
            } else {
                OVERFLOW
            }
        };
        let capacity = self.capacity;
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: capacity,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else if self.per_second > 0.0 {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        } else {
            Err(Duration::MAX)
        }
    }

    fn evict_full(&self, buckets: &mut HashMap<u64, Bucket>, now: Instant) {
        let (capacity, rate) = (self.capacity, self.per_second);
        buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < capacity
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_then_refills() {
        let l = Limiter::new(3, Duration::from_secs(3), false).expect("valid");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.acquire_at("me", "get_issue", t0).is_ok());
        }
        let wait = l.acquire_at("me", "get_issue", t0).expect_err("empty");
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another tool has its own budget.
        assert!(l.acquire_at("me", "list_issues", t0).is_ok());
        // After a second, one token is back.
        assert!(
            l.acquire_at("me", "get_issue", t0 + Duration::from_millis(1001))
                .is_ok()
        );
        assert!(
            l.acquire_at("me", "get_issue", t0 + Duration::from_millis(1002))
                .is_err()
        );
    }

    #[test]
    fn each_caller_has_its_own_budget() {
        let l = Limiter::new(1, Duration::from_secs(60), false).expect("valid");
        let shared = Limiter::new(1, Duration::from_secs(60), true).expect("valid");
        let t0 = Instant::now();
        for limiter in [&l, &shared] {
            assert!(limiter.acquire_at("alice", "get_issue", t0).is_ok());
            assert!(limiter.acquire_at("alice", "get_issue", t0).is_err());
            assert!(limiter.acquire_at("bob", "get_issue", t0).is_ok());
        }
    }

    #[test]
    fn shared_scope_is_one_budget() {
        let l = Limiter::new(2, Duration::from_secs(60), true).expect("valid");
        let t0 = Instant::now();
        assert!(l.acquire_at("me", "a", t0).is_ok());
        assert!(l.acquire_at("me", "b", t0).is_ok());
        assert!(l.acquire_at("me", "c", t0).is_err());
    }

    #[test]
    fn invented_names_cannot_grow_memory() {
        let l = Limiter::new(1, Duration::from_secs(3600), false).expect("valid");
        let t0 = Instant::now();
        for i in 0..(MAX_BUCKETS * 2) {
            let _ = l.acquire_at("me", &format!("tool-{i}"), t0);
        }
        assert!(l.buckets.lock().expect("lock").len() <= MAX_BUCKETS + 1);
        assert!(Limiter::new(1, Duration::ZERO, false).is_none());
    }
}
