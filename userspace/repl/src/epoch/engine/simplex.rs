//! Leaving protection: the backup is lost (go on alone, if the quorum grants it), another copy
//! runs the VM (fenced), or the engine cannot go on (failed); and the lease's policing of a VM
//! running alone.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::status::EngineState;
use super::PrimaryEngine;
use crate::ha::heartbeat::monotonic_us;
use crate::disk::DiskReplicator;
use crate::ha::quorum::Claim;
use crate::{lock, ErrorChain};

/// Longest wait, when the link fails, for a takeover notice the backup sent before (see
/// `CheckpointTransport::drain_after_failure`): it is in this host's socket by then, and its
/// reader needs only to be scheduled.
const TAKEOVER_NOTICE_WAIT: Duration = Duration::from_millis(50);

impl PrimaryEngine {
    /// Another copy runs the VM: pause this one for good and release nothing more. The machine's
    /// owner sees [`EngineState::Fenced`] and stops it.
    pub(super) fn fence(&mut self, reason: String) {
        tracing::error!(%reason, held_epochs = self.in_flight.len(), "another copy runs the VM: this one is paused and its held output dropped (fenced)");
        self.stop_for_good(EngineState::Fenced { reason });
    }

    /// The engine cannot go on: pause the VM for good and release nothing unacknowledged, without
    /// a goodbye (the backup takes over). The machine's owner sees [`EngineState::Failed`].
    pub(super) fn fail(&mut self, reason: String) {
        tracing::error!(%reason, held_epochs = self.in_flight.len(), "the engine failed: the VM is paused and its unacknowledged output dropped");
        self.stop_for_good(EngineState::Failed { reason });
    }

    pub(super) fn stop_for_good(&mut self, state: EngineState) {
        self.ack.simplex.store(true, Ordering::Release);
        if let Err(e) = self.source.pause() {
            tracing::error!(error = %ErrorChain(&e), "cannot pause the VM");
        }
        self.in_flight.clear();
        self.status.update(|s| s.state = state);
    }

    /// The backup is gone: no page or disk write is lost, every held frame leaves, the VM goes on.
    pub(super) fn go_simplex(&mut self, why: &dyn std::fmt::Display) {
        if self.simplex || lock(&self.ack.superseded).is_some() {
            return;
        }
        // A failed link may be a backup that took over: it said so before it closed, and that
        // must be heard before anything held leaves (without a quorum nothing else stops it).
        self.transport.drain_after_failure(TAKEOVER_NOTICE_WAIT);
        if lock(&self.ack.superseded).is_some() {
            return;
        }
        if let Err(refusal) = self.ack.lease.claim(Claim::RunAlone) {
            // The other side holds the right to run the VM: this copy must stop, not serve.
            let reason = format!("the quorum refused to let this primary run alone ({why}): {refusal}");
            *lock(&self.ack.superseded) = Some(reason);
            return;
        }
        self.simplex = true;
        // Nothing the guest writes from now on reaches a backup: every mark stays.
        self.intent_pass = None;
        self.ack.simplex.store(true, Ordering::Release);
        // Before anything held leaves: a backup that still hears us must not take over.
        self.transport.abandon(&why.to_string());
        self.ingress.set_link(None);
        // A backup that joins later gets all of memory and the disk again (see `reprotect`): what
        // the lost one lacked need not be kept, and a VM running alone pays nothing for
        // replication (no write recorded, no page tracked).
        let lost_epochs = self.in_flight.len();
        self.in_flight.clear();
        self.source.with_devices(|d| d.set_disk_write_observer(None));
        let dropped_disk_bytes = {
            let mut disk = lock(&self.ack.disk);
            let bytes = disk.backlog_bytes();
            disk.discard_all();
            bytes
        };
        if let Err(e) = self.source.stop_tracking() {
            tracing::warn!(error = %ErrorChain(&e), "cannot stop dirty tracking");
        }
        // The next backup gets all of memory.
        self.schedule.forget();
        self.unhold();
        let reason = why.to_string();
        tracing::warn!(%reason, lost_epochs, dropped_disk_bytes, "backup lost: running unprotected (simplex)");
        self.status.update(|s| {
            s.last_unprotected = Some(reason.clone());
            s.state = EngineState::Simplex { reason };
        });
    }

    /// A VM running alone emits without any hold: it may run only while its lease is valid. When
    /// the lease runs out (the quorum unreachable) it is paused, and resumed if a renewal comes
    /// back before anyone else claimed the VM; a lost lease fences it (at the loop's next turn).
    pub(super) fn police_simplex(&mut self) {
        let valid = self.ack.lease.is_valid(monotonic_us());
        if !valid && !self.lease_paused {
            if let Err(e) = self.source.pause() {
                tracing::error!(error = %ErrorChain(&e), "cannot pause the VM whose lease ran out");
                return;
            }
            self.lease_paused = true;
            tracing::error!("the lease ran out while running alone: the VM is paused until the quorum renews it");
            self.status.update(|s| {
                s.paused_for_lease = true;
                if let EngineState::Simplex { reason } = &mut s.state {
                    *reason = format!("paused: the lease ran out and the quorum cannot be reached ({reason})");
                }
            });
        } else if valid && self.lease_paused {
            if let Err(e) = self.source.resume() {
                tracing::error!(error = %ErrorChain(&e), "cannot resume the VM after its lease was renewed");
                return;
            }
            self.lease_paused = false;
            tracing::warn!("the lease is valid again: the VM runs alone again");
            self.status.update(|s| {
                s.paused_for_lease = false;
                if let EngineState::Simplex { reason } = &mut s.state {
                    if let Some(rest) = reason.strip_prefix("paused: the lease ran out and the quorum cannot be reached (") {
                        *reason = rest.trim_end_matches(')').to_string();
                    }
                }
            });
        }
    }

    /// Transmit goes back to direct, and every frame still held leaves, in order.
    pub(super) fn unhold(&mut self) {
        if !self.held {
            return;
        }
        self.held = false;
        self.ack.simplex.store(true, Ordering::Release);
        // Paused, so that no frame is appended between the last seal and the switch to direct,
        // and none goes out directly before the older held ones.
        let paused = self.source.pause();
        if let Err(e) = self.source.with_devices(|d| self.ack.gate.pass(d)) {
            tracing::warn!(error = %ErrorChain(&e), "cannot switch guest transmit back to direct");
        }
        if let Err(e) = self.ack.gate.release_all(self.next_epoch) {
            tracing::trace!(error = %ErrorChain(&e), "output release");
        }
        // The release sealed what was open: none of it waits for a checkpoint any more (a backup
        // that joins later would otherwise see output waiting at every turn, and checkpoint
        // without pause).
        self.frames_sealed = self.ack.gate.frames_in();
        if paused.is_ok() {
            if let Err(e) = self.source.resume() {
                tracing::error!(error = %ErrorChain(&e), "cannot resume the machine after releasing its output");
            }
        }
    }
}
