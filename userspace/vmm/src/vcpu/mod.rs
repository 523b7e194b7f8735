//! The vCPU: a thread running `KVM_RUN` as an explicit state machine (Paused, Running, Exited),
//! driven by [`VcpuEvent`]s from a [`VcpuHandle`] and answering with [`VcpuResponse`]s.
//!
//! ```text
//!            Resume                 guest exit / error
//!  Paused ───────────▶ Running ─────────────────────▶ Exited
//!    ▲  ◀───────────────  │                              │
//!    │       Pause        │ Stop                         │ Stop
//!    └── Stop ──▶ (thread ends) ◀────────────────────────┘
//! ```
//!
//! The vCPU starts Paused. A pause is taken only at a *pause point*: `KVM_RUN` returning `EINTR`
//! because `immediate_exit` was set. KVM completes a pending I/O or MMIO exit before it returns
//! there, so in Paused the vCPU's registers are exactly the guest's (Paused is the only state in
//! which vCPU state may be read or written; the checkpoint code relies on that).
//!
//! [`VcpuEvent::SaveState`] and [`VcpuEvent::RestoreState`] are handled by the vCPU thread, which
//! owns the vCPU fd, only while Paused; a Running vCPU answers them with
//! [`state::VcpuSaveError::NotPaused`] (or the restore equivalent) and keeps running.

pub mod io;
pub mod kick;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_sync_regs, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::{VcpuExit, VcpuFd};

pub use io::{Console, IoAction, IoHandler, StatusCell, VcpuContext};
pub use kick::Kick;
pub use state::{StateConfig, VcpuRestoreError, VcpuSaveError, VcpuState};

/// Drains a vCPU's dirty ring when KVM reports it full (`KVM_EXIT_DIRTY_RING_FULL`), on the
/// vCPU's own thread, so that `KVM_RUN` can go on. See [`crate::dirty::kvm_ring`].
pub trait DirtyRingFullHandler: Send + Sync + std::fmt::Debug {
    /// Harvests vCPU `vcpu`'s ring into the tracker's pending pages and recycles its entries.
    fn ring_full(&self, vcpu: u32) -> std::io::Result<()>;
}

/// How long a [`VcpuHandle`] waits for the vCPU thread to answer. Answers normally take
/// microseconds; this only catches a wedged thread.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to a vCPU thread.
#[derive(Debug, Clone)]
pub enum VcpuEvent {
    /// Stop running the guest at the next pause point.
    Pause,
    /// Run the guest.
    Resume,
    /// End the thread.
    Stop,
    /// Read the vCPU's state (only while Paused).
    SaveState,
    /// Pause, answer [`VcpuResponse::Paused`], then at once read the state and send it as a
    /// second answer. A checkpoint pauses this way so that the vCPU thread's state ioctls run
    /// while the engine harvests dirty pages on its own thread.
    PauseAndSave,
    /// Write the vCPU's state (only while Paused).
    RestoreState(Box<VcpuState>),
}

/// A vCPU thread's answer to a [`VcpuEvent`].
#[derive(Debug)]
pub enum VcpuResponse {
    /// Now paused.
    Paused,
    /// Now running.
    Resumed,
    /// The thread is ending.
    Stopped,
    /// The guest has already exited (or failed); the vCPU cannot pause or run.
    Exited,
    /// The state [`VcpuEvent::SaveState`] asked for.
    SavedState(Box<VcpuState>),
    /// Why [`VcpuEvent::SaveState`] failed (for instance: the vCPU is running).
    SaveStateFailed(VcpuSaveError),
    /// [`VcpuEvent::RestoreState`] done.
    RestoredState,
    /// Why [`VcpuEvent::RestoreState`] failed.
    RestoreStateFailed(VcpuRestoreError),
}

impl VcpuResponse {
    /// The variant's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Paused => "Paused",
            Self::Resumed => "Resumed",
            Self::Stopped => "Stopped",
            Self::Exited => "Exited",
            Self::SavedState(_) => "SavedState",
            Self::SaveStateFailed(_) => "SaveStateFailed",
            Self::RestoredState => "RestoredState",
            Self::RestoreStateFailed(_) => "RestoreStateFailed",
        }
    }
}

/// The states of the vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Not running the guest; vCPU state may be read and written.
    Paused,
    /// In the `KVM_RUN` loop.
    Running,
    /// The guest exited or failed; waiting to be stopped.
    Exited,
}

/// Why a vCPU stopped running the guest. Each vCPU sends exactly one.
#[derive(Debug)]
pub enum VcpuExitReason {
    /// The guest wrote this code to the exit port.
    GuestExit(u32),
    /// A [`VcpuEvent::Stop`] ended it.
    Stopped,
    /// The guest or KVM failed.
    Failed(VcpuRunError),
}

/// What a vCPU thread reports on the machine's exit channel.
#[derive(Debug)]
pub struct VcpuExitReport {
    /// The vCPU index.
    pub id: u32,
    /// What happened.
    pub reason: VcpuExitReason,
}

/// Why the guest could not go on running.
#[derive(Debug, thiserror::Error)]
pub enum VcpuRunError {
    /// The guest took an exception (there is no IDT) or the CPU otherwise shut down.
    #[error("guest triple-faulted (shutdown) at rip={rip:#x}")]
    TripleFault {
        /// Guest RIP after the shutdown.
        rip: u64,
    },
    /// `hlt` reached KVM (it cannot at CPL 3; a ring-0 guest would use it).
    #[error("guest halted (hlt) at rip={rip:#x}; the guest must wait through the wait port")]
    Halted {
        /// Guest RIP after the `hlt`.
        rip: u64,
    },
    /// KVM could not emulate or handle something.
    #[error("KVM internal error, suberror {suberror} at rip={rip:#x}")]
    Internal {
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
        /// Guest RIP.
        rip: u64,
    },
    /// The CPU refused to enter the guest.
    #[error("KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})")]
    FailEntry {
        /// Hardware-specific reason.
        reason: u64,
        /// The host CPU.
        cpu: u32,
    },
    /// An exit the VMM does not handle.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN failed")]
    Run(#[source] std::io::Error),
    /// The dirty ring was full and could not be drained.
    #[error("cannot drain the full dirty ring")]
    DirtyRing(#[source] std::io::Error),
    /// Waiting for a device event failed.
    #[error("waiting for a device event failed")]
    Wait(#[source] std::io::Error),
}

/// Why a [`VcpuHandle`] request failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VcpuControlError {
    /// The thread has ended (or was never started).
    #[error("vCPU {0} thread is gone")]
    Gone(u32),
    /// The thread did not answer in time.
    #[error("vCPU {0} did not answer within {RESPONSE_TIMEOUT:?}")]
    Timeout(u32),
    /// The guest has exited; nothing to pause or resume.
    #[error("vCPU {0} has exited")]
    Exited(u32),
    /// The thread answered something else (it was stopped meanwhile).
    #[error("vCPU {id} answered {got}")]
    Unexpected {
        /// The vCPU.
        id: u32,
        /// Its answer ([`VcpuResponse::name`]).
        got: &'static str,
    },
}

/// Why a vCPU thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStartError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] std::io::Error),
    /// The interrupt eventfd could not be made.
    #[error("cannot create the vCPU interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot start the vCPU thread")]
    Spawn(#[source] std::io::Error),
}

/// A vCPU and everything its thread needs.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    cache: state::SaveCache,
    io: IoHandler,
    kick: Arc<Kick>,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
    exits: Sender<VcpuExitReport>,
    reported: bool,
    /// States read from the registers the pause's `KVM_RUN` stored (see [`Self::synced_regs`]).
    synced_saves: Arc<AtomicU64>,
}

/// RFLAGS bit 1 is set in every value the CPU holds: a stored copy with it clear was not stored.
const RFLAGS_FIXED: u64 = 1 << 1;

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // Before `fd` (and its kvm_run mapping) goes: no kick may touch it any more.
        self.kick.retire();
    }
}

/// Outcome of one exit, decided while the exit borrows the vCPU fd.
enum Step {
    Continue,
    PausePoint,
    GuestExit(u32),
    Shutdown,
    Hlt,
    Internal,
    FailEntry(u64, u32),
    Unexpected(String),
    WaitFailed(std::io::Error),
    DirtyRingFull,
}

impl Vcpu {
    /// Starts vCPU `id` (whose registers are already set) on its own thread, in the Paused
    /// state. Its single exit report goes to `exits`.
    pub fn start(
        id: u32,
        mut fd: VcpuFd,
        ctx: VcpuContext,
        exits: Sender<VcpuExitReport>,
    ) -> Result<VcpuHandle, VcpuStartError> {
        kick::install_kick_handler().map_err(VcpuStartError::SignalHandler)?;
        let run = fd.get_kvm_run();
        let flag = std::ptr::addr_of_mut!(run.immediate_exit);
        let valid_regs = ctx
            .state
            .sync_regs
            .then_some(std::ptr::addr_of_mut!(run.kvm_valid_regs));
        // SAFETY: `flag` and `valid_regs` point into the vCPU's kvm_run mapping, owned by `fd`
        // (`kvm_valid_regs` at an 8-byte offset of the page-aligned mapping); `fd` moves into the
        // `Vcpu` below, whose Drop retires the kick before `fd` is dropped. User space only
        // touches them through the `Kick` (this module never calls set_kvm_immediate_exit nor
        // set_sync_valid_reg).
        let kick =
            Arc::new(unsafe { Kick::new(flag, valid_regs) }.map_err(VcpuStartError::EventFd)?);
        let synced_saves = Arc::new(AtomicU64::new(0));
        let (event_tx, event_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let vcpu = Vcpu {
            id,
            fd,
            cache: state::SaveCache::default(),
            io: IoHandler::new(ctx, kick.clone()),
            kick: kick.clone(),
            events: event_rx,
            responses: resp_tx,
            exits,
            reported: false,
            synced_saves: synced_saves.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu.thread_main())
            .map_err(VcpuStartError::Spawn)?;
        {
            use std::os::unix::thread::JoinHandleExt as _;
            kick.set_thread(thread.as_pthread_t());
        }
        Ok(VcpuHandle {
            id,
            events: event_tx,
            responses: resp_rx,
            kick,
            synced_saves,
            thread: Some(thread),
            save_pending: false,
            resume_pending: false,
        })
    }

    fn thread_main(mut self) {
        // The process may block signals in every thread (the CLI blocks SIGINT/SIGTERM); the kick
        // must get through, or a vCPU in KVM_RUN could not be paused.
        if let Err(e) = vmm_sys_util::signal::unblock_signal(kick::kick_signal()) {
            tracing::warn!(error = %e, "cannot unblock the vCPU kick signal");
        }
        let mut state = RunState::Paused;
        while let Some(next) = self.step(state) {
            state = next;
        }
        self.io.ctx().console.flush();
    }

    /// One state of the machine; `None` ends the thread.
    fn step(&mut self, state: RunState) -> Option<RunState> {
        match state {
            RunState::Paused => self.paused(),
            RunState::Running => self.running(),
            RunState::Exited => self.exited(),
        }
    }

    fn respond(&self, r: VcpuResponse) {
        // The handle may be gone (machine shutting down); nobody to tell.
        let _ = self.responses.send(r);
    }

    fn report(&mut self, reason: VcpuExitReason) {
        if !self.reported {
            self.reported = true;
            let _ = self.exits.send(VcpuExitReport {
                id: self.id,
                reason,
            });
        }
    }

    fn stop(&mut self) -> Option<RunState> {
        self.report(VcpuExitReason::Stopped);
        self.respond(VcpuResponse::Stopped);
        None
    }

    fn paused(&mut self) -> Option<RunState> {
        match self.events.recv() {
            Ok(VcpuEvent::Pause) => {
                self.respond(VcpuResponse::Paused);
                Some(RunState::Paused)
            }
            Ok(VcpuEvent::Resume) => {
                self.respond(VcpuResponse::Resumed);
                // The kick that came with this Resume would make the first KVM_RUN return at
                // once; clear it here, and handle whatever was sent meanwhile.
                match self.pause_point() {
                    Some(next) => next,
                    None => Some(RunState::Running),
                }
            }
            Ok(VcpuEvent::SaveState) => {
                self.save_and_respond();
                Some(RunState::Paused)
            }
            Ok(VcpuEvent::PauseAndSave) => {
                self.respond(VcpuResponse::Paused);
                self.save_and_respond();
                Some(RunState::Paused)
            }
            Ok(VcpuEvent::RestoreState(s)) => {
                // The restored CPUID and TSC frequency may differ from what was cached.
                self.cache.clear();
                let r = state::restore_state(&self.fd, &self.io.ctx().state, &s);
                // What the last run stored is not this state.
                self.fd.sync_regs_mut().regs.rflags = 0;
                self.respond(match r {
                    Ok(()) => VcpuResponse::RestoredState,
                    Err(e) => VcpuResponse::RestoreStateFailed(e),
                });
                Some(RunState::Paused)
            }
            Ok(VcpuEvent::Stop) | Err(_) => self.stop(),
        }
    }

    /// Reads the state (Paused only) and sends it.
    fn save_and_respond(&mut self) {
        let synced = self.synced_regs();
        let r = state::save_state_cached(
            &self.fd,
            &self.io.ctx().state,
            &mut self.cache,
            synced.as_ref(),
        );
        if synced.is_some() && r.is_ok() {
            self.synced_saves.fetch_add(1, Ordering::Relaxed);
        }
        self.respond(match r {
            Ok(s) => VcpuResponse::SavedState(Box::new(s)),
            Err(e) => VcpuResponse::SaveStateFailed(e),
        });
    }

    /// The registers, special registers and events the last `KVM_RUN` stored in `kvm_run`, if it
    /// did: a kick asked for them (see [`kick`]), and the run marked before it was overwritten.
    fn synced_regs(&self) -> Option<kvm_sync_regs> {
        if !self.io.ctx().state.sync_regs {
            return None;
        }
        let s = self.fd.sync_regs();
        (s.regs.rflags & RFLAGS_FIXED != 0).then_some(s)
    }

    fn exited(&mut self) -> Option<RunState> {
        match self.events.recv() {
            Ok(VcpuEvent::Pause | VcpuEvent::Resume | VcpuEvent::PauseAndSave) => {
                self.respond(VcpuResponse::Exited);
                Some(RunState::Exited)
            }
            Ok(VcpuEvent::SaveState) => {
                self.respond(VcpuResponse::SaveStateFailed(VcpuSaveError::Exited(
                    self.id,
                )));
                Some(RunState::Exited)
            }
            Ok(VcpuEvent::RestoreState(_)) => {
                self.respond(VcpuResponse::RestoreStateFailed(VcpuRestoreError::Exited(
                    self.id,
                )));
                Some(RunState::Exited)
            }
            Ok(VcpuEvent::Stop) | Err(_) => {
                self.respond(VcpuResponse::Stopped);
                None
            }
        }
    }

    /// At a pause point: handle what was asked. `None` = keep running.
    fn pause_point(&mut self) -> Option<Option<RunState>> {
        // Clear first, then read the channel: a request sent after the read sets the flag again.
        self.kick.clear();
        loop {
            match self.events.try_recv() {
                Ok(VcpuEvent::Pause) => {
                    self.respond(VcpuResponse::Paused);
                    return Some(Some(RunState::Paused));
                }
                Ok(VcpuEvent::PauseAndSave) => {
                    self.respond(VcpuResponse::Paused);
                    self.save_and_respond();
                    return Some(Some(RunState::Paused));
                }
                Ok(VcpuEvent::Resume) => self.respond(VcpuResponse::Resumed),
                // Firecracker's rule: state is read and written only while Paused. A running
                // vCPU refuses and goes on running.
                Ok(VcpuEvent::SaveState) => {
                    self.respond(VcpuResponse::SaveStateFailed(VcpuSaveError::NotPaused(
                        self.id,
                    )));
                }
                Ok(VcpuEvent::RestoreState(_)) => {
                    self.respond(VcpuResponse::RestoreStateFailed(
                        VcpuRestoreError::NotPaused(self.id),
                    ));
                }
                Ok(VcpuEvent::Stop) | Err(TryRecvError::Disconnected) => return Some(self.stop()),
                Err(TryRecvError::Empty) => return None,
            }
        }
    }

    fn fail(&mut self, e: VcpuRunError) -> Option<RunState> {
        // The machine returns the error to its caller; this is only for the trace.
        tracing::debug!(vcpu = self.id, error = %e, "vCPU failed");
        self.report(VcpuExitReason::Failed(e));
        Some(RunState::Exited)
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map_or(0, |r| r.rip)
    }

    fn running(&mut self) -> Option<RunState> {
        loop {
            // A wait a pause cut short goes on first (the guest never saw it end); a request that
            // comes meanwhile cuts it again and leaves `immediate_exit` set for the run below.
            if let IoAction::WaitFailed(kind, msg) = self.io.resume_wait() {
                return self.fail(VcpuRunError::Wait(std::io::Error::new(kind, msg)));
            }
            // Marked, so that a pause can tell whether this run stores the registers.
            self.fd.sync_regs_mut().regs.rflags = 0;
            let step = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => match self.io.io_out(port, data) {
                        IoAction::Continue => Step::Continue,
                        IoAction::Exit(code) => Step::GuestExit(code),
                        IoAction::WaitFailed(kind, msg) => {
                            Step::WaitFailed(std::io::Error::new(kind, msg))
                        }
                    },
                    VcpuExit::IoIn(port, data) => {
                        self.io.io_in(port, data);
                        Step::Continue
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        self.io.mmio_read(addr, data);
                        Step::Continue
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.io.mmio_write(addr, data);
                        Step::Continue
                    }
                    VcpuExit::Intr => Step::PausePoint,
                    VcpuExit::Shutdown => Step::Shutdown,
                    VcpuExit::Hlt => Step::Hlt,
                    VcpuExit::InternalError => Step::Internal,
                    VcpuExit::FailEntry(reason, cpu) => Step::FailEntry(reason, cpu),
                    // kvm-ioctls has no variant for it.
                    VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => Step::DirtyRingFull,
                    other => Step::Unexpected(format!("{other:?}")),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::PausePoint,
                Err(e) => return self.fail(VcpuRunError::Run(e.into())),
            };
            match step {
                Step::Continue => {}
                Step::PausePoint => {
                    if let Some(next) = self.pause_point() {
                        return next;
                    }
                }
                Step::GuestExit(code) => {
                    tracing::debug!(vcpu = self.id, code, "guest exited");
                    self.report(VcpuExitReason::GuestExit(code));
                    return Some(RunState::Exited);
                }
                Step::DirtyRingFull => {
                    let drained = match &self.io.ctx().dirty_ring {
                        Some(h) => h.ring_full(self.id),
                        None => Err(std::io::Error::other("no dirty ring handler")),
                    };
                    if let Err(e) = drained {
                        return self.fail(VcpuRunError::DirtyRing(e));
                    }
                }
                Step::Shutdown => return self.fail(VcpuRunError::TripleFault { rip: self.rip() }),
                Step::Hlt => return self.fail(VcpuRunError::Halted { rip: self.rip() }),
                Step::Internal => {
                    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // union member the kernel filled in.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.rip();
                    return self.fail(VcpuRunError::Internal { suberror, rip });
                }
                Step::FailEntry(reason, cpu) => {
                    return self.fail(VcpuRunError::FailEntry { reason, cpu })
                }
                Step::Unexpected(what) => return self.fail(VcpuRunError::UnexpectedExit(what)),
                Step::WaitFailed(e) => return self.fail(VcpuRunError::Wait(e)),
            }
        }
    }
}

/// Controls one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u32,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    kick: Arc<Kick>,
    synced_saves: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    /// A [`VcpuEvent::PauseAndSave`] was answered Paused; its state answer is still to be read.
    save_pending: bool,
    /// A [`VcpuEvent::Resume`] was sent and its answer not read yet (see [`Self::resume`]).
    resume_pending: bool,
}

/// Sends a stop to a vCPU without waiting: cheap to clone, usable from any thread (a signal
/// thread, say) while another thread is waiting on the [`VcpuHandle`].
#[derive(Debug, Clone)]
pub struct VcpuStopper {
    events: Sender<VcpuEvent>,
    kick: Arc<Kick>,
}

impl VcpuStopper {
    /// Asks the vCPU thread to stop; returns at once.
    pub fn stop(&self) {
        if self.events.send(VcpuEvent::Stop).is_ok() {
            self.kick.kick();
        }
    }
}

impl VcpuHandle {
    /// The vCPU index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// How many of this vCPU's states were read from the registers its pause's `KVM_RUN` stored,
    /// without the three register ioctls.
    pub fn synced_saves(&self) -> u64 {
        self.synced_saves.load(Ordering::Relaxed)
    }

    /// A stopper for this vCPU.
    pub fn stopper(&self) -> VcpuStopper {
        VcpuStopper {
            events: self.events.clone(),
            kick: self.kick.clone(),
        }
    }

    /// Sends `event` and kicks the thread, without waiting for the answer.
    pub fn send_event(&self, event: VcpuEvent) -> Result<(), VcpuControlError> {
        self.events
            .send(event)
            .map_err(|_| VcpuControlError::Gone(self.id))?;
        self.kick.kick();
        Ok(())
    }

    /// Sends `event` and waits for the thread's answer. [`VcpuResponse::Exited`] becomes
    /// [`VcpuControlError::Exited`].
    fn request(&mut self, event: VcpuEvent) -> Result<VcpuResponse, VcpuControlError> {
        self.read_pending_answers();
        // Drop answers to requests that timed out earlier, so this one reads its own.
        while self.responses.try_recv().is_ok() {}
        self.send_event(event)?;
        self.next_response()
    }

    /// Reads the answers still owed to earlier requests (a state after [`Self::pause_and_save`],
    /// a resume's), which would otherwise be taken for the next request's answer. An exited vCPU
    /// answers the next request Exited too, so their errors are not kept.
    fn read_pending_answers(&mut self) {
        if std::mem::take(&mut self.save_pending) {
            let _ = self.next_response();
        }
        if std::mem::take(&mut self.resume_pending) {
            let _ = self.next_response();
        }
    }

    fn next_response(&self) -> Result<VcpuResponse, VcpuControlError> {
        match self.responses.recv_timeout(RESPONSE_TIMEOUT) {
            Ok(VcpuResponse::Exited) => Err(VcpuControlError::Exited(self.id)),
            Ok(got) => Ok(got),
            Err(RecvTimeoutError::Timeout) => Err(VcpuControlError::Timeout(self.id)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuControlError::Gone(self.id)),
        }
    }

    fn unexpected(&self, got: &VcpuResponse) -> VcpuControlError {
        VcpuControlError::Unexpected {
            id: self.id,
            got: got.name(),
        }
    }

    /// Pauses the vCPU; returns once it is paused (at a pause point, its state consistent).
    pub fn pause(&mut self) -> Result<(), VcpuControlError> {
        match self.request(VcpuEvent::Pause)? {
            VcpuResponse::Paused => Ok(()),
            got => Err(self.unexpected(&got)),
        }
    }

    /// Pauses the vCPU like [`Self::pause`], and has it read its state right away, on its own
    /// thread; [`Self::save_state`] then returns that state (waiting for it if need be).
    pub fn pause_and_save(&mut self) -> Result<(), VcpuControlError> {
        match self.request(VcpuEvent::PauseAndSave)? {
            VcpuResponse::Paused => {
                self.save_pending = true;
                Ok(())
            }
            got => Err(self.unexpected(&got)),
        }
    }

    /// Lets the vCPU run again; returns once the request is sent, without waiting for the
    /// thread's answer (read by the next request). Every checkpoint resumes, and the answer's
    /// round trip between two threads was the larger part of the resume. No kick: a paused
    /// thread waits on the request channel, not in `KVM_RUN`, and a running one has nothing to
    /// be interrupted for.
    pub fn resume(&mut self) -> Result<(), VcpuControlError> {
        self.read_pending_answers();
        self.events.send(VcpuEvent::Resume).map_err(|_| VcpuControlError::Gone(self.id))?;
        self.resume_pending = true;
        Ok(())
    }

    /// Reads the vCPU's state. Refused ([`VcpuSaveError::NotPaused`]) unless it is paused.
    /// After [`Self::pause_and_save`], returns the state read at that pause.
    pub fn save_state(&mut self) -> Result<VcpuState, VcpuSaveError> {
        let answer = if self.save_pending {
            self.save_pending = false;
            self.next_response()?
        } else {
            self.request(VcpuEvent::SaveState)?
        };
        match answer {
            VcpuResponse::SavedState(s) => Ok(*s),
            VcpuResponse::SaveStateFailed(e) => Err(e),
            got => Err(self.unexpected(&got).into()),
        }
    }

    /// Writes the vCPU's state. Refused ([`VcpuRestoreError::NotPaused`]) unless it is paused.
    pub fn restore_state(&mut self, state: VcpuState) -> Result<(), VcpuRestoreError> {
        match self.request(VcpuEvent::RestoreState(Box::new(state)))? {
            VcpuResponse::RestoredState => Ok(()),
            VcpuResponse::RestoreStateFailed(e) => Err(e),
            got => Err(self.unexpected(&got).into()),
        }
    }

    /// Stops the vCPU thread and waits for it to end.
    pub fn stop(&mut self) -> Result<(), VcpuControlError> {
        // A thread that already ended cannot receive; joining is all there is to do.
        let _ = self.send_event(VcpuEvent::Stop);
        self.join();
        Ok(())
    }

    /// Waits for the thread to end (after a stop).
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(vcpu = self.id, "vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}
