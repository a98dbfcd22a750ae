//! Token buckets for `rateLimit` rules.
//!
//! One [`Limiter`] per rule that has a limit; inside it, one bucket per tool, resource
//! or prompt name the rule covers (or a single bucket when the rule's scope is `rule`).
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
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most distinct names tracked per rule.
pub const MAX_BUCKETS: usize = 4096;
const OVERFLOW: &str = "\u{0}overflow";
const SHARED: &str = "\u{0}rule";

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
    buckets: Mutex<HashMap<Box<str>, Bucket>>,
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
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Take a token for `name`, or say how long until one is available.
    pub fn acquire(&self, name: &str) -> Result<(), Duration> {
        self.acquire_at(name, Instant::now())
    }

    fn acquire_at(&self, name: &str, now: Instant) -> Result<(), Duration> {
        let key = if self.shared { SHARED } else { name };
        // A poisoned lock only means another thread panicked mid-update of plain
        // numbers; the map is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = if buckets.contains_key(key) || buckets.len() < MAX_BUCKETS {
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
        if !buckets.contains_key(key) {
            // The only allocation: the first call for a name.
            buckets.insert(
                key.into(),
                Bucket {
                    tokens: capacity,
                    last: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
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

    fn evict_full(&self, buckets: &mut HashMap<Box<str>, Bucket>, now: Instant) {
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
            assert!(l.acquire_at("get_issue", t0).is_ok());
        }
        let wait = l.acquire_at("get_issue", t0).expect_err("empty");
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another tool has its own budget.
        assert!(l.acquire_at("list_issues", t0).is_ok());
        // After a second, one token is back.
        assert!(
            l.acquire_at("get_issue", t0 + Duration::from_millis(1001))
                .is_ok()
        );
        assert!(
            l.acquire_at("get_issue", t0 + Duration::from_millis(1002))
                .is_err()
        );
    }

    #[test]
    fn shared_scope_is_one_budget() {
        let l = Limiter::new(2, Duration::from_secs(60), true).expect("valid");
        let t0 = Instant::now();
        assert!(l.acquire_at("a", t0).is_ok());
        assert!(l.acquire_at("b", t0).is_ok());
        assert!(l.acquire_at("c", t0).is_err());
    }

    #[test]
    fn invented_names_cannot_grow_memory() {
        let l = Limiter::new(1, Duration::from_secs(3600), false).expect("valid");
        let t0 = Instant::now();
        for i in 0..(MAX_BUCKETS * 2) {
            let _ = l.acquire_at(&format!("tool-{i}"), t0);
        }
        assert!(l.buckets.lock().expect("lock").len() <= MAX_BUCKETS + 1);
        assert!(Limiter::new(1, Duration::ZERO, false).is_none());
    }
}
