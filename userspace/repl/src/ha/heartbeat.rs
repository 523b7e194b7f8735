//! Liveness of the A-Link, as cheaply as possible.
//!
//! * The backup: every frame the receiver reads (epoch data or heartbeat) stamps a
//!   [`LinkActivity`], one relaxed atomic store of monotonic microseconds. The failure detector
//!   polls it; nothing else is shared between the receive path and the detector.
//! * The primary: while epochs flow, they are the heartbeat. When it is idle (no epoch for a
//!   while, or the engine stalled on something else), [`IdleHeartbeat`] sends a
//!   [`TcpTransport::heartbeat`] frame so that the backup's detector keeps hearing from it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::transport::tcp::TcpTransport;
use crate::transport::LinkError;

/// Microseconds of `CLOCK_MONOTONIC`, plus one so that 0 can mean "never". Shared by the
/// receiver's stamps and the detector's clock: both must read the same clock.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        // Cannot happen on Linux; 1 ("the beginning") keeps callers' arithmetic well defined.
        return 1;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000).saturating_add(1)
}

/// The time of the last frame received from the primary, in [`monotonic_us`] (0: none yet), and
/// whether the primary's last session ended with a goodbye (a deliberate departure, not a death).
/// Cloning shares the same stamp.
#[derive(Clone, Debug, Default)]
pub struct LinkActivity(Arc<Activity>);

#[derive(Debug, Default)]
struct Activity {
    last_us: AtomicU64,
    goodbye: AtomicBool,
}

impl LinkActivity {
    /// A stamp that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a frame received now.
    pub fn touch(&self) {
        self.touch_at(monotonic_us());
    }

    /// Records a frame received at `now_us`. The stamp never goes backwards.
    pub fn touch_at(&self, now_us: u64) {
        self.0.last_us.fetch_max(now_us, Ordering::Relaxed);
    }

    /// A primary authenticated: a sign of life, and any earlier goodbye is void.
    pub fn session_started(&self) {
        self.0.goodbye.store(false, Ordering::SeqCst);
        self.touch();
    }

    /// The primary said goodbye: it leaves on purpose, and its silence is not a death.
    pub fn goodbye(&self) {
        self.0.goodbye.store(true, Ordering::SeqCst);
    }

    /// Whether the last session ended with a goodbye (and no session started since).
    pub fn said_goodbye(&self) -> bool {
        self.0.goodbye.load(Ordering::SeqCst)
    }

    /// When the last frame arrived, if any did.
    pub fn last_us(&self) -> Option<u64> {
        Some(self.0.last_us.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// How long ago the last frame arrived, if any did.
    pub fn age(&self, now_us: u64) -> Option<Duration> {
        self.last_us().map(|t| Duration::from_micros(now_us.saturating_sub(t)))
    }
}

/// The primary's idle heartbeat: a frame after `interval` without any other frame sent.
/// The epoch engine calls [`IdleHeartbeat::note_sent`] whenever it sends something, and
/// [`IdleHeartbeat::send_if_due`] from its loop.
#[derive(Clone, Debug)]
pub struct IdleHeartbeat {
    interval_us: u64,
    last_sent_us: u64,
}

impl IdleHeartbeat {
    /// Heartbeats after `interval` of silence. The backup's "peer silent" timeout should be a
    /// few intervals (the default detector suspects after 30 ms: an interval of 5–10 ms).
    pub fn new(interval: Duration) -> Self {
        let interval_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX).max(1);
        Self { interval_us, last_sent_us: 0 }
    }

    /// Something (epoch data, a heartbeat) went to the backup at `now_us`.
    pub fn note_sent(&mut self, now_us: u64) {
        self.last_sent_us = self.last_sent_us.max(now_us);
    }

    /// Whether a heartbeat is due at `now_us`.
    pub fn due(&self, now_us: u64) -> bool {
        now_us.saturating_sub(self.last_sent_us) >= self.interval_us
    }

    /// Sends a heartbeat on `transport` if one is due; returns whether it sent one.
    pub fn send_if_due(&mut self, now_us: u64, transport: &mut TcpTransport) -> Result<bool, LinkError> {
        if !self.due(now_us) {
            return Ok(false);
        }
        transport.heartbeat()?;
        self.note_sent(now_us);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_moves_forward_and_is_never_zero() {
        let a = monotonic_us();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_us();
        assert!(a > 0 && b >= a + 2_000, "{a} -> {b}");
    }

    #[test]
    fn activity_stamp_never_goes_backwards() {
        let a = LinkActivity::new();
        assert_eq!(a.last_us(), None);
        assert_eq!(a.age(100), None);
        a.touch_at(50);
        a.clone().touch_at(40);
        assert_eq!(a.last_us(), Some(50));
        assert_eq!(a.age(80), Some(Duration::from_micros(30)));
        assert!(!a.said_goodbye());
        a.goodbye();
        assert!(a.said_goodbye());
        a.session_started();
        assert!(!a.said_goodbye() && a.last_us().is_some_and(|t| t > 50));
    }

    #[test]
    fn idle_heartbeat_is_due_only_after_an_interval_of_silence() {
        let mut h = IdleHeartbeat::new(Duration::from_millis(5));
        h.note_sent(1_000);
        assert!(!h.due(5_999));
        assert!(h.due(6_000));
        h.note_sent(6_000);
        assert!(!h.due(10_000));
    }
}
