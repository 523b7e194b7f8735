//! Asking the primary's *host* whether it lives, when its daemon falls silent on the A-Link.
//!
//! The primary's host answers probes from the kernel (the XDP heartbeat responder of
//! `ftvm-ebpf-host`), with what its daemon last published: whether the daemon is known dead
//! (its watchdog says so), and when it last made progress. The backup's daemon asks through a
//! [`HostProbe`] (the binary wires in the real prober; this crate does not depend on eBPF) and
//! turns the answer into a [`ProbeOutcome`]:
//!
//! * no reply → the host is dead (or cut off): the silence timeouts and the quorum decide, as
//!   without a probe; trusted as "dead" at once only after the responder answered before;
//! * the daemon is dead → the primary is dead, at once;
//! * progress recent → the daemon lives (busy, or its A-Link connection broke): not dead; the
//!   quorum decides who runs the VM if the primary goes on alone;
//! * progress stopped for longer than the stuck bound → the daemon is stuck: dead.

use std::time::Duration;

/// One reply of the primary's host responder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostReply {
    /// The primary's generation (its lease term).
    pub generation: u64,
    /// The last epoch the primary saw committed.
    pub committed_epoch: u64,
    /// Whether the reply says the daemon died (its watchdog wrote it).
    pub daemon_dead: bool,
    /// How long before the reply the daemon last made progress (the host's own clock); `None`
    /// if it never published any.
    pub progress_age: Option<Duration>,
    /// Round trip of the probe.
    pub rtt: Duration,
}

/// Probes the primary's host. Implementations answer within a few milliseconds.
pub trait HostProbe: Send + std::fmt::Debug {
    /// Probes the host at `peer` (the primary's A-Link address); `Ok(None)` when no reply came in
    /// time.
    fn probe(&mut self, peer: std::net::IpAddr) -> Result<Option<HostReply>, String>;
}

/// What the last probe showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// No reply (`answered_before`: the responder did answer earlier, so its silence means
    /// something).
    NoReply { answered_before: bool },
    /// The host says its daemon died.
    DaemonDead(HostReply),
    /// The daemon made progress recently: alive.
    Alive(HostReply),
    /// The host answers, but the daemon made no progress for longer than the stuck bound.
    Stuck(HostReply),
    /// The probe could not be sent.
    Error,
}

impl ProbeOutcome {
    /// Classifies a reply (or its absence) with the stuck bound `stuck_after`.
    pub fn of(reply: Option<HostReply>, stuck_after: Duration, answered_before: bool) -> Self {
        match reply {
            None => Self::NoReply { answered_before },
            Some(r) if r.daemon_dead => Self::DaemonDead(r),
            Some(r) if r.progress_age.is_some_and(|age| age >= stuck_after) => Self::Stuck(r),
            Some(r) => Self::Alive(r),
        }
    }

    /// A short description for status files and logs.
    pub fn describe(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        match self {
            Self::NoReply { .. } => "no reply: host dead or cut off".to_string(),
            Self::DaemonDead(r) => format!("daemon dead (generation {}, epoch {})", r.generation, r.committed_epoch),
            Self::Alive(r) => format!(
                "daemon alive (progress {} ago, epoch {}, rtt {:.0} µs)",
                r.progress_age.map_or("unknown".to_string(), |a| format!("{:.1} ms", ms(a))),
                r.committed_epoch,
                r.rtt.as_secs_f64() * 1e6
            ),
            Self::Stuck(r) => format!(
                "daemon stuck (no progress for {:.0} ms, epoch {})",
                r.progress_age.map_or(0.0, ms),
                r.committed_epoch
            ),
            Self::Error => "probe failed".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(dead: bool, age_ms: Option<u64>) -> HostReply {
        HostReply {
            generation: 1,
            committed_epoch: 2,
            daemon_dead: dead,
            progress_age: age_ms.map(Duration::from_millis),
            rtt: Duration::from_micros(20),
        }
    }

    #[test]
    fn replies_are_classified() {
        let stuck = Duration::from_millis(1000);
        assert_eq!(ProbeOutcome::of(None, stuck, true), ProbeOutcome::NoReply { answered_before: true });
        assert!(matches!(ProbeOutcome::of(Some(reply(true, Some(1))), stuck, true), ProbeOutcome::DaemonDead(_)));
        assert!(matches!(ProbeOutcome::of(Some(reply(false, Some(999))), stuck, true), ProbeOutcome::Alive(_)));
        assert!(matches!(ProbeOutcome::of(Some(reply(false, Some(1000))), stuck, true), ProbeOutcome::Stuck(_)));
        assert!(matches!(ProbeOutcome::of(Some(reply(false, None)), stuck, true), ProbeOutcome::Alive(_)));
        assert!(ProbeOutcome::of(Some(reply(false, Some(5))), stuck, true).describe().contains("alive"));
    }
}
