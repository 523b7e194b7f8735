//! The primary host: one VM run under checkpoint protection, from the lease claimed at start to
//! the lease given back at its end. The primary's counterpart of
//! [`BackupDaemon`](super::failover::BackupDaemon).
//!
//! # Life of a primary host
//! 1. **Before the VM exists** (`start.rs`): [`claim_start`] claims the lease for a start and keeps
//!    the disk's term file in step with it; [`connect_backup`] reaches the backup. Either failing
//!    stops the host with nothing half-started.
//! 2. **[`PrimaryHost::new`]** builds the epoch engine over the created machine: the machine's
//!    checkpoint source, the A-Link transport, the guest's disk, the lease the engine runs under,
//!    and the optional output trace and acknowledgement-authority hook.
//! 3. **[`PrimaryHost::run`]** starts the engine, then runs the machine on the caller's thread
//!    while a supervisor thread looks at the engine every [`PrimaryHostConfig::supervise_every`]
//!    (see `supervise.rs`): a fenced or failed engine, or one whose thread ended, never leaves the
//!    VM running. Each look is handed to the caller's report (its status file).
//! 4. **After the machine's run**: the engine stops, the output trace is flushed, the lease
//!    renewer stops and the lease is released: with [`ReleaseReason::HolderDied`] after a failure
//!    (the backup must take over at once, as if this process had died), with
//!    [`ReleaseReason::Stopped`] otherwise (a fenced host no longer holds it anyway). The run ends
//!    with a [`PrimaryExit`].
//!
//! While the engine runs alone (its backup lost, or none at start), [`PrimaryHostConfig::rejoin`]
//! looks for the backup's host and hands its link to the engine, which protects the VM again; a
//! planned switchover (its [`PrimaryHost::switchover_trigger`]) ends the run with
//! [`PrimaryExit::HandedOver`].
//!
//! What stays with the owner (the `ftvm` binary): the eBPF gate (it closes through the [`Fence`]
//! given here, and follows the lease and acknowledgements through hooks), the lease watchdog
//! process, the status file, signals.

mod start;
mod supervise;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftvm_vmm::machine::{CheckpointSourceError, Machine, MachineExit, MachineHandle, MachineRunError};

use crate::backup::standby::KeptStandby;
use crate::epoch::engine::{
    AckAuthorityHook, DiskSource, EngineConfig, EngineCreateError, EngineStatus, PrimaryEngine, StatusSnapshot,
};
use crate::ha::fence::Fence;
use crate::ha::lease::{Lease, Renewer};
use crate::ha::rejoin::{RejoinConfig, Rejoiner};
use crate::ha::quorum::ReleaseReason;
use crate::output::trace::FileTrace;
use crate::transport::CheckpointTransport;
use crate::ErrorChain;

pub use start::{claim_start, connect_backup, BackupConnectError, StartClaimError};
use supervise::{Ending, Supervisor};

/// How often the supervisor looks at the engine (and the status is reported) by default.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

/// What a [`PrimaryHost`] is built from.
pub struct PrimaryHostConfig {
    /// The VM, created and not yet run.
    pub machine: Machine,
    /// The A-Link, connected to the backup; or why there is none (no backup answered at start, or
    /// it refused): the VM then starts alone, with that reason in its status, and is protected
    /// once [`PrimaryHostConfig::rejoin`] finds its backup.
    pub transport: Result<Box<dyn CheckpointTransport>, String>,
    /// The epoch engine's settings.
    pub engine: EngineConfig,
    /// The guest's disk, for the initial synchronisation (none: a diskless guest).
    pub disk: Option<DiskSource>,
    /// The lease the VM runs under (claimed by [`claim_start`], or no quorum at all).
    pub lease: Lease,
    /// The lease's renewer: it stops before the lease is released at the end.
    pub renewer: Option<Renewer>,
    /// Told before output leaves on a fresh acknowledgement alone (the host's gate follows it).
    pub ack_authority_hook: Option<AckAuthorityHook>,
    /// A trace of the output-commit hold (for tests), flushed at the end.
    pub output_trace: Option<Arc<FileTrace>>,
    /// Closes this host's copy off the network for good when it is fenced or fails.
    pub fence: Arc<dyn Fence>,
    /// How often the supervisor looks at the engine.
    pub supervise_every: Duration,
    /// Where to look for a backup again whenever the VM runs alone (none: it stays alone).
    pub rejoin: Option<RejoinConfig>,
}

impl PrimaryHostConfig {
    /// The engine's default settings, no disk, renewer, hook or trace, looked at every
    /// [`SUPERVISE_EVERY`].
    pub fn new(
        machine: Machine,
        transport: Result<Box<dyn CheckpointTransport>, String>,
        lease: Lease,
        fence: Arc<dyn Fence>,
    ) -> Self {
        Self {
            machine,
            transport,
            engine: EngineConfig::default(),
            disk: None,
            lease,
            renewer: None,
            ack_authority_hook: None,
            output_trace: None,
            fence,
            supervise_every: SUPERVISE_EVERY,
            rejoin: None,
        }
    }
}

impl std::fmt::Debug for PrimaryHostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryHostConfig")
            .field("machine", &self.machine)
            .field("engine", &self.engine)
            .field("disk", &self.disk)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Why [`PrimaryHost::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryHostCreateError {
    /// The machine cannot be checkpointed.
    #[error("cannot set up checkpoints")]
    Checkpoints(#[source] CheckpointSourceError),
    /// The engine could not be built.
    #[error("cannot start the epoch engine")]
    Engine(#[source] EngineCreateError),
    /// An output trace was asked for, but output goes through another gate than the userspace
    /// hold.
    #[error("the output trace needs the userspace output hold")]
    NoOutputHold,
}

/// Why [`PrimaryHost::run`] failed (the VM did not run, or its run failed, and nothing fenced or
/// failed first).
#[derive(Debug, thiserror::Error)]
pub enum PrimaryHostRunError {
    /// The engine's thread did not start (the VM never ran).
    #[error("cannot start the epoch engine thread")]
    EngineThread(#[source] std::io::Error),
    /// The supervisor's thread did not start (the VM never ran).
    #[error("cannot start the supervisor thread")]
    SupervisorThread(#[source] std::io::Error),
    /// The machine's run failed (a vCPU, the devices).
    #[error(transparent)]
    Machine(#[from] MachineRunError),
}

/// How a primary host's run ended.
#[derive(Debug)]
pub enum PrimaryExit {
    /// The machine's run ended (the guest exited, or the owner stopped it): the backup was told
    /// goodbye (unless the pair was already simplex) and does not take over.
    Stopped(MachineExit),
    /// Another copy runs the VM (the backup took over, or the lease went to the other host):
    /// this copy was fenced and stopped; the other host serves the guest.
    Fenced {
        /// Why, from the engine.
        reason: String,
    },
    /// The engine failed: this copy was fenced and stopped without a goodbye, so that the backup
    /// resumes the VM from the last committed epoch.
    Failed {
        /// Why, from the engine.
        reason: String,
    },
    /// A planned switchover: the backup runs the VM from `epoch`, this copy was stopped there
    /// (its output all released) and the lease given up.
    HandedOver {
        /// The final epoch.
        epoch: ftvm_proto::EpochId,
        /// The VM as handed over, for this host's standby (see [`KeptStandby`]).
        kept: Option<KeptStandby>,
    },
}

/// The primary host of one VM. See the module documentation.
pub struct PrimaryHost {
    machine: Machine,
    engine: PrimaryEngine,
    lease: Lease,
    renewer: Option<Renewer>,
    output_trace: Option<Arc<FileTrace>>,
    fence: Arc<dyn Fence>,
    supervise_every: Duration,
    rejoin: Option<RejoinConfig>,
}

impl std::fmt::Debug for PrimaryHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryHost")
            .field("machine", &self.machine)
            .field("engine", &self.engine)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl PrimaryHost {
    /// Builds the engine over `cfg.machine`; nothing runs yet.
    pub fn new(cfg: PrimaryHostConfig) -> Result<Self, PrimaryHostCreateError> {
        let PrimaryHostConfig {
            mut machine,
            transport,
            engine,
            disk,
            lease,
            renewer,
            ack_authority_hook,
            output_trace,
            fence,
            supervise_every,
            rejoin,
        } = cfg;
        let source = machine.checkpoint_source().map_err(PrimaryHostCreateError::Checkpoints)?;
        let engine = match transport {
            Ok(link) => PrimaryEngine::new(source, link, disk, engine),
            Err(why) => PrimaryEngine::alone(source, disk, engine, why),
        };
        let mut engine = engine.map_err(PrimaryHostCreateError::Engine)?.with_lease(lease.clone());
        if let Some(hook) = ack_authority_hook {
            engine = engine.with_ack_authority_hook(hook);
        }
        // Before the engine runs: the hold takes its first frame at the first checkpoint.
        if let Some(trace) = &output_trace {
            let hold = engine.output_hold().ok_or(PrimaryHostCreateError::NoOutputHold)?;
            hold.set_trace(Some(trace.clone()));
        }
        Ok(Self { machine, engine, lease, renewer, output_trace, fence, supervise_every, rejoin })
    }

    /// The engine's status, to share with whoever publishes progress (it lives as long as the
    /// engine does, and past it).
    pub fn engine_status(&self) -> Arc<EngineStatus> {
        self.engine.status()
    }

    /// A handle on the machine (to stop it on a signal).
    pub fn machine_handle(&self) -> MachineHandle {
        self.machine.handle()
    }

    /// Asks the engine for a planned switchover (see
    /// [`SwitchoverTrigger`](crate::epoch::engine::SwitchoverTrigger)).
    pub fn switchover_trigger(&self) -> crate::epoch::engine::SwitchoverTrigger {
        self.engine.switchover_trigger()
    }

    /// The lease the VM runs under.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Runs the VM to its end under supervision (see the module documentation); `report` gets the
    /// engine's status at each look of the supervisor, after it acted on it.
    pub fn run(self, mut report: impl FnMut(&StatusSnapshot) + Send) -> Result<PrimaryExit, PrimaryHostRunError> {
        let Self { mut machine, engine, lease, renewer, output_trace, fence, supervise_every, rejoin } = self;
        let status = engine.status();
        let engine = match engine.spawn() {
            Ok(e) => e,
            Err(e) => {
                // The VM never ran: the lease goes as if this host had died.
                drop(renewer);
                lease.release(ReleaseReason::HolderDied);
                return Err(PrimaryHostRunError::EngineThread(e));
            }
        };
        // A rejoin thread that does not start leaves the VM protected as long as this backup
        // lasts: said, not fatal.
        let rejoiner = rejoin.and_then(|cfg| {
            Rejoiner::spawn(cfg, lease.clone(), status.clone(), engine.attacher())
                .map_err(|e| tracing::error!(error = %e, "cannot start looking for a backup: the VM will not be protected again after a failure"))
                .ok()
        });
        let machine_handle = machine.handle();
        let done = AtomicBool::new(false);
        let ending = Mutex::new(None);
        let supervisor = Supervisor {
            status: &status,
            engine: &engine,
            machine: &machine_handle,
            fence: &*fence,
            every: supervise_every,
            done: &done,
            ending: &ending,
        };
        let ran = std::thread::scope(|scope| {
            let thread = std::thread::Builder::new().name("status".into()).spawn_scoped(scope, || supervisor.run(&mut report))?;
            let exit = machine.run();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            // Its panics are caught at each report; a panic elsewhere loses no verdict (kept in
            // `ending`).
            let _ = thread.join();
            Ok(exit)
        });
        let exit = match ran {
            Ok(exit) => exit,
            Err(e) => {
                // The VM never ran: its engine stops, and the lease goes as if this host had died.
                let _ = engine.stop();
                drop(renewer);
                lease.release(ReleaseReason::HolderDied);
                return Err(PrimaryHostRunError::SupervisorThread(e));
            }
        };
        drop(rejoiner);
        let kept = match engine.stop() {
            Ok(report) => report.kept,
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "epoch engine ended with an error");
                None
            }
        };
        if let Some(Err(e)) = output_trace.map(|t| t.flush()) {
            tracing::warn!(error = %e, "cannot write the end of the output trace");
        }
        drop(renewer);
        let ending = ending.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The VM no longer runs here: the lease goes. After a failure the backup must take over
        // at once, as if this process had died.
        let failed = matches!(ending, Some(Ending::Failed(_)));
        lease.release(if failed { ReleaseReason::HolderDied } else { ReleaseReason::Stopped });
        match ending {
            Some(Ending::Failed(reason)) => Ok(PrimaryExit::Failed { reason }),
            Some(Ending::Fenced(reason)) => Ok(PrimaryExit::Fenced { reason }),
            Some(Ending::HandedOver(epoch)) => Ok(PrimaryExit::HandedOver { epoch, kept }),
            None => Ok(PrimaryExit::Stopped(exit?)),
        }
    }
}
