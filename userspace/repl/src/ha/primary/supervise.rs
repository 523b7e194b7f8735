//! The primary's supervisor: one look at the engine every so often while the machine runs, and
//! what each look calls for.
//!
//! The rule it keeps: a VM never runs on while its engine has ended or says it must stop, and
//! status never says otherwise. The engine cannot stop the machine itself (the machine runs on its
//! owner's thread); it pauses the VM and says why in its state, and the supervisor ends the run:
//! * `Fenced`: another copy answers for the VM now; this one (already paused, its held output
//!   dropped) must end. The host's gate closes for good first, then the machine stops.
//! * `Failed`: this copy can no longer be protected (the engine could not capture, copy or resume
//!   the machine, or its thread panicked) and its output stays held: the gate closes, the machine
//!   stops, and the backup resumes the VM from the last committed epoch.
//! * The engine's thread ended in any other state while the machine runs: the machine stops too.
//!   Only an engine whose machine already ended gets there (every other way out of the engine is
//!   one of the two states above), so the machine's own exit tells how the run ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ftvm_proto::EpochId;
use ftvm_vmm::machine::MachineHandle;

use crate::epoch::engine::{EngineHandle, EngineState, EngineStatus, StatusSnapshot};
use crate::ha::fence::Fence;
use crate::lock;

/// Why the supervisor ended this copy of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Ending {
    /// Another copy runs the VM.
    Fenced(String),
    /// This copy's engine failed.
    Failed(String),
    /// The VM was handed over to the backup at this epoch (a planned switchover).
    HandedOver(EpochId),
}

/// What one look at the engine calls for.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Fence this copy and stop the machine, for this reason.
    End(Ending),
    /// Stop the machine (its engine is gone).
    StopMachine,
    /// Nothing: the engine runs.
    Nothing,
}

/// What the engine's `state` calls for; `engine_finished` was read before the state, so that a
/// finished engine's last state is the one looked at.
fn action(state: &EngineState, engine_finished: bool) -> Action {
    match state {
        EngineState::Fenced { reason } => Action::End(Ending::Fenced(reason.clone())),
        EngineState::Failed { reason } => Action::End(Ending::Failed(reason.clone())),
        EngineState::HandedOver { epoch } => Action::End(Ending::HandedOver(*epoch)),
        _ if engine_finished => Action::StopMachine,
        _ => Action::Nothing,
    }
}

/// Keeps `ending`; a failure outweighs a fence (the backup must then take over at once).
fn record(slot: &Mutex<Option<Ending>>, ending: Ending) {
    let mut slot = lock(slot);
    if !matches!(*slot, Some(Ending::Failed(_))) {
        *slot = Some(ending);
    }
}

/// The supervisor of one run; it borrows everything from [`super::PrimaryHost::run`].
pub(super) struct Supervisor<'a> {
    pub(super) status: &'a EngineStatus,
    pub(super) engine: &'a EngineHandle,
    pub(super) machine: &'a MachineHandle,
    pub(super) fence: &'a dyn Fence,
    pub(super) every: Duration,
    /// Set once the machine's run returned.
    pub(super) done: &'a AtomicBool,
    /// What ended the run, if the supervisor did.
    pub(super) ending: &'a Mutex<Option<Ending>>,
}

impl Supervisor<'_> {
    /// Looks every `every` until `done`, acting on each look, then hands the snapshot it acted on
    /// to `report` (the status file is written after the gate closed, so it never says less).
    pub(super) fn run(&self, report: &mut (dyn FnMut(&StatusSnapshot) + Send)) {
        let mut stop_logged = false;
        let mut report_failed = false;
        // Bounded by `done`, set when the machine's run returns; one look per period.
        while !self.done.load(Ordering::Relaxed) {
            let finished = self.engine.is_finished();
            let snapshot = self.status.snapshot();
            match action(&snapshot.state, finished) {
                Action::End(ending) => {
                    self.fence.fence();
                    record(self.ending, ending);
                    self.machine.stop();
                }
                Action::StopMachine => {
                    if !stop_logged {
                        tracing::warn!("the epoch engine ended while the VM ran: stopping the VM");
                        stop_logged = true;
                    }
                    self.machine.stop();
                }
                Action::Nothing => {}
            }
            // A status writer that panics must not take the supervision down with it.
            let reported = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| report(&snapshot)));
            if reported.is_err() && !report_failed {
                tracing::error!("the status report panicked: status is no longer written");
                report_failed = true;
            }
            std::thread::sleep(self.every);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::engine::SyncProgress;

    #[test]
    fn fenced_and_failed_engines_end_the_run_whatever_their_thread_does() {
        for finished in [false, true] {
            let fenced = EngineState::Fenced { reason: "the backup takes over".into() };
            assert_eq!(action(&fenced, finished), Action::End(Ending::Fenced("the backup takes over".into())));
            let failed = EngineState::Failed { reason: "the epoch engine panicked".into() };
            assert_eq!(action(&failed, finished), Action::End(Ending::Failed("the epoch engine panicked".into())));
        }
    }

    #[test]
    fn a_running_engine_leaves_the_machine_alone_and_an_ended_one_stops_it() {
        let states = [
            EngineState::Syncing(SyncProgress::default()),
            EngineState::Protected,
            EngineState::Simplex { reason: "the backup is gone".into() },
            EngineState::Stopped,
        ];
        for state in &states {
            assert_eq!(action(state, false), Action::Nothing, "{state:?}");
            assert_eq!(action(state, true), Action::StopMachine, "{state:?}");
        }
    }

    #[test]
    fn a_failure_outweighs_a_fence() {
        let slot = Mutex::new(None);
        record(&slot, Ending::Fenced("a".into()));
        assert_eq!(*lock(&slot), Some(Ending::Fenced("a".into())));
        record(&slot, Ending::Failed("b".into()));
        record(&slot, Ending::Fenced("c".into()));
        assert_eq!(*lock(&slot), Some(Ending::Failed("b".into())));
    }
}
