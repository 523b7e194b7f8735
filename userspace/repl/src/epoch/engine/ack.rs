//! The acknowledgement side: what the transport's acknowledgement thread does with each event
//! (release the output of acknowledged epochs, forget their disk writes, note a lost link or a
//! takeover), and the disk write observer that feeds the replicator from the device.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_vmm::devices::virtio::block::DiskWriteObserver;

use super::status::{EngineState, EngineStatus};
use crate::disk::{DiskReplicator, MemoryDiskReplicator};
use crate::ha::heartbeat::monotonic_us;
use crate::ha::lease::{Lease, ACK_AUTHORITY};
use crate::lock;
use crate::output::gate::OutputGate;
use crate::transport::AckEvent;

/// Feeds guest disk writes to the replicator (the device's submission path calls it).
#[derive(Debug)]
pub(super) struct Observer {
    pub(super) ack: Arc<AckSide>,
}

impl DiskWriteObserver for Observer {
    fn record(&self, sector: u64, data: &[u8]) {
        let Err(e) = lock(&self.ack.disk).record(sector, data) else {
            return;
        };
        // Before the write completes to the guest, so before any output that could depend on it
        // is even held: from now on no acknowledgement releases output (the backup lacks this
        // write), and the engine leaves the backup at its next step.
        if !self.ack.disk_lost.swap(true, Ordering::SeqCst) {
            let reason = format!("{e}: the backup lacks a guest disk write, the pair is not protected any more");
            tracing::error!(%reason, "disk write not replicated");
            self.ack.status.update(|s| s.disk_replication_lost = true);
            let mut d = lock(&self.ack.down);
            if d.is_none() {
                *d = Some(reason);
            }
        }
    }

    fn flush(&self) {
        // Durability on the backup follows the epoch commit; nothing to do at submission.
    }
}

/// Told, before output leaves on a fresh acknowledgement alone (no valid lease), the
/// [`monotonic_us`] time until which that acknowledgement lets output out: the epoch's send plus
/// [`ACK_AUTHORITY`]. A kernel gate that otherwise follows the lease lets the output through until
/// then (see [`super::PrimaryEngine::with_ack_authority_hook`]).
pub type AckAuthorityHook = Arc<dyn Fn(u64) + Send + Sync>;

pub(super) struct AuthorityHook(pub(super) Option<AckAuthorityHook>);

impl std::fmt::Debug for AuthorityHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(hook)" } else { "None" })
    }
}

/// What the acknowledgement thread and the engine share.
#[derive(Debug)]
pub(super) struct AckSide {
    pub(super) gate: Arc<dyn OutputGate>,
    pub(super) disk: Arc<Mutex<MemoryDiskReplicator>>,
    pub(super) status: Arc<EngineStatus>,
    /// Last acknowledged epoch + 1 (0: none).
    pub(super) acked: AtomicU64,
    /// The initial-sync epoch (its acknowledgement commits no disk writes).
    pub(super) sync_epoch: AtomicU64,
    /// Set when the link went down; the engine goes simplex at its next step.
    pub(super) down: Mutex<Option<String>>,
    /// A guest disk write could not be recorded for the backup: no acknowledgement may release
    /// output any more (it could depend on that write), only the switch to simplex does.
    pub(super) disk_lost: AtomicBool,
    /// After the switch to simplex, late acknowledgements change nothing.
    pub(super) simplex: AtomicBool,
    /// Set when the backup said it takes over: nothing is released any more.
    pub(super) superseded: Mutex<Option<String>>,
    /// The right to let output out: while it is valid, any acknowledged epoch's output leaves;
    /// without it, only output whose acknowledgement came within [`ACK_AUTHORITY`] of the epoch's
    /// send (see [`crate::ha::lease`]).
    pub(super) lease: Lease,
    /// Told before output leaves on an acknowledgement alone.
    pub(super) authority: AuthorityHook,
    /// Last epoch whose output was released + 1 (0: none).
    pub(super) released: AtomicU64,
    /// (epoch, round trip) of recent acknowledgements, for the epoch spans.
    pub(super) round_trips: Mutex<VecDeque<(u64, Duration)>>,
}

impl AckSide {
    pub(super) fn on_event(&self, ev: AckEvent) {
        match ev {
            AckEvent::Acked { epoch, round_trip } => {
                if self.simplex.load(Ordering::Acquire) || lock(&self.superseded).is_some() {
                    return;
                }
                self.acked.store(epoch.0 + 1, Ordering::Release);
                let now = monotonic_us();
                let lease_valid = self.lease.is_valid(now);
                let authority = round_trip < ACK_AUTHORITY || lease_valid;
                if authority && !self.disk_lost.load(Ordering::SeqCst) {
                    if let (false, Some(hook)) = (lease_valid, &self.authority.0) {
                        let sent = now.saturating_sub(u64::try_from(round_trip.as_micros()).unwrap_or(u64::MAX));
                        hook(sent.saturating_add(ACK_AUTHORITY.as_micros() as u64));
                    }
                    self.release_through(epoch.0);
                }
                let sync = self.sync_epoch.load(Ordering::Acquire);
                if epoch.0 > sync {
                    if let Err(e) = lock(&self.disk).commit(epoch) {
                        tracing::debug!(error = %e, "disk commit");
                    }
                }
                {
                    let mut q = lock(&self.round_trips);
                    if q.len() >= 256 {
                        q.pop_front();
                    }
                    q.push_back((epoch.0, round_trip));
                }
                self.status.update(|s| {
                    s.last_acked = Some(epoch);
                    s.last_ack_round_trip = Some(round_trip);
                    if epoch.0 > sync {
                        s.epochs_committed = epoch.0 - sync;
                        if matches!(s.state, EngineState::Syncing(_)) {
                            s.state = EngineState::Protected;
                        }
                    }
                });
            }
            AckEvent::LinkDown { reason } => {
                let mut d = lock(&self.down);
                if d.is_none() {
                    *d = Some(reason);
                }
            }
            AckEvent::Superseded { reason } => {
                // Under the same lock the Acked arm checks: no release can follow this.
                let mut s = lock(&self.superseded);
                if s.is_none() {
                    *s = Some(reason);
                }
            }
        }
    }

    pub(super) fn acked(&self) -> Option<u64> {
        self.acked.load(Ordering::Acquire).checked_sub(1)
    }

    pub(super) fn release_through(&self, epoch: u64) {
        match self.gate.release_through(epoch) {
            Ok(_) => {}
            // No network device attached to the hold: nothing to release.
            Err(e) => tracing::trace!(error = %e, "output hold release"),
        }
        self.released.fetch_max(epoch + 1, Ordering::AcqRel);
    }

    /// Releases output acknowledged too late to leave on the acknowledgement alone, once the
    /// lease is valid again. Under the lock the takeover notice is set with: nothing leaves after
    /// the backup said it took over.
    pub(super) fn release_late(&self) {
        let acked = self.acked.load(Ordering::Acquire);
        if acked <= self.released.load(Ordering::Acquire)
            || !self.lease.is_valid(monotonic_us())
            || self.disk_lost.load(Ordering::SeqCst)
        {
            return;
        }
        let superseded = lock(&self.superseded);
        if superseded.is_none() && !self.simplex.load(Ordering::Acquire) {
            self.release_through(acked - 1);
        }
    }
}

/// An epoch on the wire, waiting for its acknowledgement.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) epoch: u64,
    pub(super) committed_at: Instant,
    /// Longest wait for its acknowledgement.
    pub(super) timeout: Duration,
    pub(super) span: tracing::Span,
}

impl InFlight {
    /// How long this epoch, the oldest in flight, has waited beyond reason, if it has: the wait
    /// counts from its commit or from `oldest_since` (when its predecessor was acknowledged),
    /// whichever is later, since the backup acknowledges in order. Epochs committed while the
    /// backup still applies the initial synchronisation (seconds for a large disk) are not late.
    pub(super) fn overdue(&self, oldest_since: Instant, now: Instant) -> Option<Duration> {
        let waited = now.saturating_duration_since(self.committed_at.max(oldest_since));
        (waited > self.timeout).then_some(waited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(committed_at: Instant, timeout: Duration) -> InFlight {
        InFlight { epoch: 1, committed_at, timeout, span: tracing::Span::none() }
    }

    #[test]
    fn an_epoch_waits_from_its_commit_or_its_predecessors_acknowledgement() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Committed at t0 behind a long initial sync acknowledged at t0 + 2 s.
        let epoch = in_flight(t0, ms(500));
        assert_eq!(epoch.overdue(t0, t0 + ms(400)), None);
        assert_eq!(epoch.overdue(t0, t0 + ms(600)), Some(ms(600)), "late counting from its commit");
        assert_eq!(epoch.overdue(t0 + ms(2000), t0 + ms(2400)), None, "its clock starts at the sync's ack");
        assert_eq!(epoch.overdue(t0 + ms(2000), t0 + ms(2600)), Some(ms(600)));
        // Committed after its predecessor's acknowledgement: its own commit counts.
        let later = in_flight(t0 + ms(100), ms(500));
        assert_eq!(later.overdue(t0, t0 + ms(550)), None);
        assert_eq!(later.overdue(t0, t0 + ms(700)), Some(ms(600)));
    }
}
