//! The benches' one timing loop: no external harness, a warm-up, then the best of
//! several timed batches, which is stable enough on a busy 2-core machine.

use std::time::Instant;

/// Nanoseconds per call of `f`: the best of `rounds` batches of `batch` calls.
pub fn best_ns(batch: u32, rounds: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..batch / 10 {
        f();
    }
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..batch {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(batch)
        })
        .fold(f64::INFINITY, f64::min)
}
