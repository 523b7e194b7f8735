//! Reproducible randomness for the system tests and the benchmarks, without a crate: xorshift64*
//! from a seed that is printed (or recorded) so a run can be replayed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The environment variable that replays a system test's random choices.
pub const TEST_SEED_VAR: &str = "FTVM_FAILOVER_SEED";

/// A seed from `$<var>` if it parses, else from the clock and the process id.
pub fn seed_from_env_or_clock(var: &str) -> u64 {
    std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
    })
}

/// xorshift64*.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The generator for `seed` (0, a fixed point of xorshift, counts as 1).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// Seeded from [`TEST_SEED_VAR`] or the clock; prints the seed, tagged `[<test>]`, with how
    /// to replay it.
    pub fn from_env_or_clock(test: &str) -> Self {
        let seed = seed_from_env_or_clock(TEST_SEED_VAR);
        println!("[{test}] random seed {seed} (replay with {TEST_SEED_VAR}={seed})");
        Self::new(seed)
    }

    /// The next 64 random bits (never ends, so not an `Iterator`).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `[lo, hi)` at microsecond resolution (`lo` when the span is under 1 µs).
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = u64::try_from(hi.saturating_sub(lo).as_micros()).unwrap_or(u64::MAX);
        lo + Duration::from_micros(self.below(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_stay_in_range() {
        let (lo, hi) = (Duration::from_millis(500), Duration::from_secs(2));
        let mut rng = Rng::new(42);
        for _ in 0..1000 {
            assert!((lo..hi).contains(&rng.duration(lo, hi)));
        }
        assert_eq!(rng.duration(lo, lo), lo);
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn a_seed_replays_the_same_sequence() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert!((0..100).all(|_| a.next() == b.next()));
        assert_eq!(Rng::new(0).next(), Rng::new(1).next());
    }
}
