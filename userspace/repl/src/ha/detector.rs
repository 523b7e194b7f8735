//! Failure detection: has the primary gone?
//!
//! Time is plain [`monotonic_us`](super::heartbeat::monotonic_us) microseconds passed in by the
//! caller, so the logic is tested with a fake clock and the daemon decides how often to poll.
//!
//! Two inputs, for the two things that can stop:
//! * *daemon frames* ([`FailureDetector::observe`]): every epoch frame or heartbeat from the
//!   primary's daemon, i.e. proof that it makes progress;
//! * *host probes* ([`FailureDetector::observe_probe`]): replies from the primary's host that do
//!   not need its daemon (the planned XDP responder on the A-Link). Until that exists nothing
//!   calls it, and the frames alone decide.
//!
//! A host that answers probes but whose daemon sends nothing is "stuck", not "dead": it gets a
//! longer timeout (a busy daemon must not be mistaken for a dead host), and the verdict says
//! which it was, so that fencing can differ.

use std::time::Duration;

/// Timeouts of a [`TimeoutDetector`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorConfig {
    /// No frame for this long: the peer is suspected (status shows it; nothing happens yet).
    pub silent_after: Duration,
    /// No frame and no probe reply for this long: the host is dead.
    pub dead_after: Duration,
    /// The host answers probes but no frame came for this long: the daemon is stuck, and the
    /// primary is treated as dead.
    pub stuck_after: Duration,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            silent_after: Duration::from_millis(30),
            dead_after: Duration::from_millis(100),
            stuck_after: Duration::from_millis(1000),
        }
    }
}

/// Why the primary is considered dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadReason {
    /// Neither frames nor probe replies.
    HostSilent,
    /// The host answers probes, but its daemon made no progress.
    DaemonStuck,
    /// The primary's end of the A-Link closed or reset without a goodbye: its kernel closed the
    /// socket of a process that is gone. Decided by the daemon, not by a timeout.
    LinkClosed,
    /// The primary's host answered a probe saying its daemon died (see [`super::probe`]).
    DaemonDead,
    /// Not a death: the primary handed the VM over (a planned switchover) and stopped its copy.
    HandedOver,
}

/// The detector's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suspicion {
    /// Nothing was ever heard from a primary: nothing to judge.
    NeverSeen,
    /// Heard recently enough.
    Alive,
    /// Silent for `for_` (over the short timeout), not yet dead.
    Silent {
        /// Time since the last frame.
        for_: Duration,
    },
    /// Dead: take over.
    Dead {
        /// Time since the last frame.
        for_: Duration,
        /// Which timeout fired.
        reason: DeadReason,
    },
}

impl Suspicion {
    /// Whether the verdict is [`Suspicion::Dead`].
    pub fn is_dead(&self) -> bool {
        matches!(self, Self::Dead { .. })
    }
}

/// A failure detector. Implementations are pure state machines over the times they are given.
pub trait FailureDetector: Send {
    /// A frame (epoch data or heartbeat) from the primary's daemon arrived at `now_us`.
    fn observe(&mut self, now_us: u64);

    /// The primary's host answered a probe at `now_us`, independently of its daemon. Detectors
    /// without a probe input ignore it.
    fn observe_probe(&mut self, now_us: u64) {
        let _ = now_us;
    }

    /// The verdict at `now_us`.
    fn suspected(&self, now_us: u64) -> Suspicion;

    /// Forgets the peer (a new primary connects, or after a takeover).
    fn reset(&mut self);
}

/// Fixed timeouts on the last frame and the last probe reply.
#[derive(Clone, Debug)]
pub struct TimeoutDetector {
    config: DetectorConfig,
    last_frame_us: Option<u64>,
    last_probe_us: Option<u64>,
}

impl TimeoutDetector {
    /// A detector that has heard nothing yet.
    pub fn new(config: DetectorConfig) -> Self {
        Self { config, last_frame_us: None, last_probe_us: None }
    }

    /// Its timeouts.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }
}

fn since(now_us: u64, then_us: u64) -> Duration {
    Duration::from_micros(now_us.saturating_sub(then_us))
}

impl FailureDetector for TimeoutDetector {
    fn observe(&mut self, now_us: u64) {
        // Stamps may arrive out of order (polled from another thread): keep the latest.
        self.last_frame_us = Some(self.last_frame_us.map_or(now_us, |t| t.max(now_us)));
    }

    fn observe_probe(&mut self, now_us: u64) {
        self.last_probe_us = Some(self.last_probe_us.map_or(now_us, |t| t.max(now_us)));
    }

    fn suspected(&self, now_us: u64) -> Suspicion {
        let Some(frame) = self.last_frame_us else {
            return Suspicion::NeverSeen;
        };
        let quiet = since(now_us, frame);
        if quiet < self.config.silent_after {
            return Suspicion::Alive;
        }
        // The host is known alive when it answered a probe within the dead timeout.
        let host_alive = self.last_probe_us.is_some_and(|p| since(now_us, p) < self.config.dead_after);
        if host_alive {
            if quiet >= self.config.stuck_after {
                return Suspicion::Dead { for_: quiet, reason: DeadReason::DaemonStuck };
            }
        } else if quiet >= self.config.dead_after {
            return Suspicion::Dead { for_: quiet, reason: DeadReason::HostSilent };
        }
        Suspicion::Silent { for_: quiet }
    }

    fn reset(&mut self) {
        self.last_frame_us = None;
        self.last_probe_us = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000;

    fn det() -> TimeoutDetector {
        TimeoutDetector::new(DetectorConfig::default())
    }

    #[test]
    fn nothing_heard_is_never_dead() {
        let d = det();
        assert_eq!(d.suspected(0), Suspicion::NeverSeen);
        assert_eq!(d.suspected(u64::MAX), Suspicion::NeverSeen);
    }

    #[test]
    fn silence_goes_alive_then_silent_then_dead() {
        let mut d = det();
        d.observe(10 * MS);
        assert_eq!(d.suspected(39 * MS), Suspicion::Alive);
        assert_eq!(d.suspected(40 * MS), Suspicion::Silent { for_: Duration::from_millis(30) });
        assert_eq!(d.suspected(109 * MS), Suspicion::Silent { for_: Duration::from_millis(99) });
        assert_eq!(
            d.suspected(110 * MS),
            Suspicion::Dead { for_: Duration::from_millis(100), reason: DeadReason::HostSilent }
        );
        // A frame brings it back.
        d.observe(111 * MS);
        assert_eq!(d.suspected(112 * MS), Suspicion::Alive);
    }

    #[test]
    fn late_stamps_do_not_move_the_last_frame_back() {
        let mut d = det();
        d.observe(100 * MS);
        d.observe(50 * MS);
        assert_eq!(d.suspected(120 * MS), Suspicion::Alive);
        // A clock that appears to go back is "no time passed", not a huge silence.
        assert_eq!(d.suspected(10 * MS), Suspicion::Alive);
    }

    #[test]
    fn a_host_that_answers_probes_is_stuck_not_dead() {
        let mut d = det();
        d.observe(0);
        for t in (0..=999).step_by(20) {
            d.observe_probe(t * MS);
            let s = d.suspected(t * MS);
            assert!(!s.is_dead(), "at {t} ms: {s:?}");
        }
        d.observe_probe(1_000 * MS);
        assert_eq!(
            d.suspected(1_000 * MS),
            Suspicion::Dead { for_: Duration::from_secs(1), reason: DeadReason::DaemonStuck }
        );
    }

    #[test]
    fn probes_stopping_too_makes_the_host_dead() {
        let mut d = det();
        d.observe(0);
        d.observe_probe(200 * MS);
        assert!(matches!(d.suspected(250 * MS), Suspicion::Silent { .. }));
        assert_eq!(
            d.suspected(300 * MS),
            Suspicion::Dead { for_: Duration::from_millis(300), reason: DeadReason::HostSilent }
        );
    }

    #[test]
    fn configurable_timeouts_and_reset() {
        let cfg = DetectorConfig {
            silent_after: Duration::from_millis(5),
            dead_after: Duration::from_millis(10),
            stuck_after: Duration::from_millis(50),
        };
        let mut d = TimeoutDetector::new(cfg);
        d.observe(0);
        assert!(matches!(d.suspected(5 * MS), Suspicion::Silent { .. }));
        assert!(d.suspected(10 * MS).is_dead());
        d.reset();
        assert_eq!(d.suspected(10 * MS), Suspicion::NeverSeen);
        assert_eq!(d.config(), &cfg);
    }
}
