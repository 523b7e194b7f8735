//! The clock the eBPF programs read: `bpf_ktime_get_ns` is `CLOCK_MONOTONIC` in nanoseconds, so
//! every expiry written to a map must be computed from the same clock.

use std::time::Instant;

/// `CLOCK_MONOTONIC` now, in nanoseconds: the time base of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        // Cannot happen on Linux. 0 is "long ago": any expiry computed from it is already past,
        // which errs on the fenced side.
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The `CLOCK_MONOTONIC` nanoseconds of `at`. std's `Instant` reads the same clock on Linux but
/// does not expose its value, so this measures the offset to now (rounding errs towards the
/// past: an expiry computed with it is never later than `at`).
pub fn instant_to_monotonic_ns(at: Instant) -> u64 {
    let now_instant = Instant::now();
    let now_ns = monotonic_ns();
    if at >= now_instant {
        let ahead = u64::try_from(at.duration_since(now_instant).as_nanos()).unwrap_or(u64::MAX);
        now_ns.saturating_add(ahead)
    } else {
        let behind = u64::try_from(now_instant.duration_since(at).as_nanos()).unwrap_or(u64::MAX);
        now_ns.saturating_sub(behind)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn monotonic_ns_advances_and_instants_convert() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} → {b}");

        let at = Instant::now() + Duration::from_millis(300);
        let ns = instant_to_monotonic_ns(at);
        let expected = monotonic_ns() + 300_000_000;
        assert!(ns.abs_diff(expected) < 5_000_000, "{ns} vs {expected}");
        let past = instant_to_monotonic_ns(Instant::now() - Duration::from_millis(10));
        assert!(past < monotonic_ns());
    }
}
