//! A planned switchover: the backup takes the VM over at an epoch boundary, with one pause.
//!
//! 1. A final checkpoint, after which the VM stays paused.
//! 2. Its acknowledgement, and the release of its output: the backup's copy is the VM, and every
//!    frame the guest sent has left this host.
//! 3. A handover to the backup (protocol 1.4), which answers that it takes over.
//! 4. The lease is given up, so that the backup's claim is granted at once; this copy stays
//!    paused and is stopped by its owner (state [`EngineState::HandedOver`]).
//!
//! Until the backup's answer this host keeps the lease, so the backup cannot run the VM: a
//! switchover that fails on the way (the pair not protected, no acknowledgement, an older backup,
//! no answer) resumes the VM here and says why in status; the link's failure itself is handled as
//! always (simplex, under a new term the backup's copy cannot match). Without a quorum nothing
//! stops the backup once told, so after the handover is sent this copy never resumes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_proto::EpochId;

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::staging::copy_guest;
use super::status::EngineState;
use crate::backup::standby::{KeptStandby, StandbyMemory};
use super::PrimaryEngine;
use super::Resume;
use crate::ha::quorum::ReleaseReason;
use crate::{lock, ErrorChain};

/// How long the backup has to acknowledge the final epoch, and then to answer the handover.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// Asks a running engine for a planned switchover (a host's signal handler holds one); the engine
/// acts on it at its next turn. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct SwitchoverTrigger(pub(super) Arc<AtomicBool>);

impl SwitchoverTrigger {
    /// Asks for a switchover.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Takes a pending request.
    pub(super) fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// How a switchover ended.
pub(super) enum Switchover {
    /// The backup runs the VM from `epoch`; this copy must stop.
    HandedOver(EpochId),
    /// The VM runs on here.
    Refused,
}

impl PrimaryEngine {
    /// Hands the VM over to the backup (see the module documentation).
    pub(super) fn switch_over(&mut self) -> Switchover {
        if self.status.snapshot().state != EngineState::Protected {
            return self.refuse_switchover("the pair is not protected");
        }
        tracing::info!("switchover: final checkpoint");
        let sent = match self.checkpoint(Resume::No) {
            Ok(sent) => sent,
            Err(e) => {
                self.resume_after_switchover();
                return self.refuse_switchover(&format!("the final checkpoint failed: {}", ErrorChain(&e)));
            }
        };
        let epoch = self.next_epoch.saturating_sub(1);
        if let Err(e) = sent {
            self.resume_after_switchover();
            self.go_simplex(&e);
            return self.refuse_switchover("the final epoch did not reach the backup");
        }
        let deadline = Instant::now() + HANDOVER_WAIT;
        // Bounded by the deadline; a few hundred microseconds each turn.
        loop {
            self.collect_acks();
            if self.in_flight.is_empty() && self.ack.released.load(Ordering::Acquire) > epoch {
                break;
            }
            if let Some(reason) = self.link_failure() {
                self.resume_after_switchover();
                self.go_simplex(&reason);
                return self.refuse_switchover("the backup was lost before it acknowledged the final epoch");
            }
            if lock(&self.ack.superseded).is_some() || Instant::now() > deadline {
                self.resume_after_switchover();
                return self.refuse_switchover("the backup did not acknowledge the final epoch in time");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Err(e) = self.transport.hand_over(EpochId(epoch)) {
            self.resume_after_switchover();
            return self.refuse_switchover(&format!("cannot hand over: {}", ErrorChain(&e)));
        }
        let quorum = self.ack.lease.has_quorum();
        // Bounded by the deadline.
        while lock(&self.ack.superseded).is_none() {
            if Instant::now() > deadline {
                if !quorum {
                    // The backup may run the VM already: this copy must not.
                    tracing::error!(epoch, "switchover: the backup did not answer the handover; without a quorum this copy stays stopped");
                    return Switchover::HandedOver(EpochId(epoch));
                }
                // The backup cannot have the lease this host holds: the VM runs on here, and the
                // backup, whose session ended, is left as the link's failure leaves it.
                self.resume_after_switchover();
                return self.refuse_switchover("the backup did not answer the handover");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // The backup takes over: the lease goes now, so that its claim is granted at once.
        self.ack.lease.release(ReleaseReason::Stopped);
        tracing::warn!(epoch, "switchover: the VM is handed over to the backup");
        self.kept = self.keep_standby(EpochId(epoch));
        Switchover::HandedOver(EpochId(epoch))
    }

    /// A copy of the paused VM as handed over at `epoch` (memory, final state), for this host's
    /// next standby: the new primary then sends it only the pages written since. `None` (the next
    /// standby starts blank and gets all of memory) when it cannot be made.
    fn keep_standby(&mut self, epoch: EpochId) -> Option<KeptStandby> {
        let state = self.final_state.take()?;
        let t = Instant::now();
        let mem = self.source.guest_memory();
        let len = mem.iter().map(|r| r.start_addr().0 + r.len()).max()?;
        let mut memory = match StandbyMemory::new(usize::try_from(len).ok()?) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep the handed-over VM's memory: this host's next standby gets all of it again");
                return None;
            }
        };
        for r in mem.iter() {
            let start = r.start_addr().0 as usize;
            let dst = &mut memory.as_mut_slice()[start..start + r.len() as usize];
            if let Err(e) = copy_guest(&mem, r.start_addr(), dst) {
                tracing::warn!(error = %e, "cannot copy the handed-over VM's memory: this host's next standby gets all of it again");
                return None;
            }
        }
        tracing::info!(epoch = epoch.0, mib = len >> 20, copy_ms = t.elapsed().as_millis() as u64, "kept the handed-over VM for this host's standby");
        Some(KeptStandby { epoch, state, memory })
    }

    fn resume_after_switchover(&mut self) {
        if let Err(e) = self.source.resume() {
            tracing::error!(error = %ErrorChain(&e), "switchover: cannot resume the VM");
        }
    }

    fn refuse_switchover(&mut self, why: &str) -> Switchover {
        tracing::warn!(reason = why, "switchover refused; the VM runs on here");
        let why = why.to_string();
        self.status.update(|s| s.switchover_refused = Some(why));
        Switchover::Refused
    }
}
