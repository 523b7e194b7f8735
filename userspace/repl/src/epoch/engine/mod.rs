//! The primary's checkpoint epoch engine: pause → harvest → save state → seal → copy → resume →
//! send → release on ack.
//!
//! # Life of the engine
//! 1. **Initial synchronisation**, while the VM runs: the disk write observer is installed, dirty
//!    tracking starts, then every page of guest memory and the whole disk image stream to the backup
//!    as one initial-sync epoch. Pages and disk sectors the guest changes meanwhile are caught by
//!    the tracker and the observer and go with the first checkpoint.
//! 2. **First checkpoint**: guest transmit switches to [`TxMode::Held`](ftvm_vmm::devices::virtio::net::TxMode::Held), then the first incremental
//!    epoch carries the pages dirtied during the sync, the machine state and the disk writes; its
//!    acknowledgement makes the backup restorable.
//! 3. **Epoch loop**: a checkpoint starts when guest output waits in the hold and
//!    [`EngineConfig::min_epoch_gap`] has passed since the last one began (held output is latency
//!    a client sees, so it is checkpointed at once), and at the latest
//!    [`EngineConfig::epoch_interval`] after the last one (which bounds how far the backup lags a
//!    VM that answers nobody, and the work of the next epoch). Meanwhile, heartbeats keep the
//!    backup hearing from us. Each checkpoint: pause, capture (harvest + state),
//!    seal the output hold and the disk writes as epoch N, copy the dirty pages into a staging
//!    buffer, resume, then send and commit. The acknowledgement thread releases the held frames
//!    and forgets the disk writes of N. Epoch N+1 may start before N is acknowledged.
//! 4. **Failure** (a send, commit or ack timeout): every held frame is released and transmit goes
//!    back to [`TxMode::Direct`](ftvm_vmm::devices::virtio::net::TxMode::Direct): the engine is
//!    simplex and the VM carries on unprotected, paying nothing for replication (no disk write
//!    recorded, no page tracked). When the link still works the backup is told first (a goodbye),
//!    so that it does not take over a VM that still runs.
//! 5. **A backup joins** ([`BackupAttacher`]; or an engine built [`PrimaryEngine::alone`], on a
//!    host that took over): its link replaces the lost one and the engine starts again at step 1
//!    with the next epoch number, while the VM runs.
//! 6. **Fenced**: the backup says it takes over (it declared this primary dead), the quorum
//!    refuses to let this primary run alone, or the lease is lost (another host holds it now). The VM is paused at once and nothing held is
//!    released: the other copy resumes from the last committed epoch, and two copies must never
//!    serve. The engine ends; its owner stops the machine.
//!
//! While the epochs in flight are at their limit (a slow backup) the engine sends nothing else,
//! so it sends heartbeats: the backup must hear a live primary even when it is the slow one.
//!
//! # Why a staging copy
//! The transport may read the pages until `commit` returns (the zero-copy invariant of
//! [`PageSource`](crate::transport::PageSource)), and the VM should run while the epoch is on the wire. Copying the dirty pages
//! while paused is the simplest correct way to have both; it costs one `memcpy` of the dirty bytes
//! inside the pause (about 0.3 µs per page here). Copy-on-write write protection would take it out
//! of the pause; not done yet.
//!
//! # Where each part lives
//! This file: configuration, errors, the loop and one checkpoint. `sync`: the initial
//! synchronisation. `staging`: the staging copy. `ack`: the acknowledgement side and the disk
//! write observer. `simplex`: leaving protection (simplex, fenced, failed) and the lease's
//! policing of a VM running alone. `status`: what the engine reports. `handle`: the engine on
//! its own thread.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_proto::pages::PageRangeSet;
use ftvm_proto::EpochId;
use ftvm_vmm::devices::virtio::block::DiskWriteObserver;
use ftvm_vmm::devices::virtio::net::TxModeError;
use ftvm_vmm::machine::{CaptureError, CheckpointSource, MachineControlError, TrackingControlError};

use crate::ingress::IngressForwarder;
use crate::output::gate::{HoldGate, OutputGate};
use crate::output::hold::OutputHold;
use super::context::{EpochContext, EpochMetrics, EpochWindow, Percentiles};
use ftvm_proto::epoch::EpochBegin;
use crate::backup::standby::KeptStandby;
use crate::disk::intent::SharedIntent;
use crate::disk::{DiskReplicator, DiskWrite, MemoryDiskReplicator};
use crate::ha::heartbeat::{monotonic_us, IdleHeartbeat};
use crate::ha::lease::{Lease, LeaseConfig};
use crate::ha::quorum::QuorumClient;
use crate::transport::{
    BeginEpochError, CheckpointTransport, CommitError, SendDiskImageError, SendDiskWritesError,
    SendOutputError, SendPagesError, SendStateError,
};
use crate::ErrorChain;
use crate::lock;

mod ack;
mod attach;
mod cow;
mod schedule;
mod handle;
mod simplex;
mod staging;
mod status;
mod switchover;
mod sync;

pub use ack::AckAuthorityHook;
pub use attach::BackupAttacher;
pub use switchover::SwitchoverTrigger;
pub use handle::{EngineHandle, EngineStopError};
pub use status::{EngineState, EngineStatus, StatusSnapshot, SyncProgress};

use ack::{AckSide, InFlight, Observer};
use schedule::{Due, Schedule};
pub use schedule::CheckpointCounts;
use attach::BackupSlot;
use staging::Staging;

/// Pages copied and sent per step of the initial synchronisation (4 MiB).
const SYNC_CHUNK_PAGES: u64 = 1024;

/// Settings of a [`PrimaryEngine`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Longest time from the start of one checkpoint to the start of the next while no guest
    /// output waits (the VM idle, or computing without answering anyone). 50 ms by default: output
    /// is checkpointed at once whatever this is, and an idle pair then costs a checkpoint every
    /// 50 ms and a heartbeat every [`EngineConfig::heartbeat_interval`], not a checkpoint a
    /// millisecond. It bounds how far the backup lags such a VM, and so the work of the
    /// checkpoint that ends the stretch.
    pub epoch_interval: Duration,
    /// Shortest time from the start of one checkpoint to the start of the next one triggered by
    /// waiting guest output; `None` checkpoints only every `epoch_interval`.
    pub min_epoch_gap: Option<Duration>,
    /// An epoch not acknowledged this long after its commit means the backup is gone.
    pub ack_timeout: Duration,
    /// The same for the initial synchronisation, whose commit makes the backup flush the whole
    /// disk image first.
    pub sync_ack_timeout: Duration,
    /// Bytes of the output-commit hold ring.
    pub hold_capacity: usize,
    /// Most disk write bytes recorded and not yet acknowledged.
    pub disk_backlog: u64,
    /// Most epochs committed and not acknowledged; the engine skips a tick beyond it (keep it below
    /// the transport's own limit).
    pub max_in_flight: usize,
    /// A heartbeat goes to the backup after this long without any other frame (keep it well under
    /// the backup's silence timeouts).
    pub heartbeat_interval: Duration,
    /// How the dirty pages leave guest memory at a checkpoint.
    pub copy: CheckpointCopy,
    /// While no output waits, a checkpoint comes early once the dirty pages would take longer
    /// than this to send at the link's measured rate (see `schedule`); `None`: only output and
    /// the interval trigger checkpoints.
    pub dirty_send_budget: Option<Duration>,
    /// How often the dirty pages are looked at for that bound, the VM running (a harvest: about
    /// 50 µs for 256 MiB with KVM's bitmap here).
    pub dirty_probe_interval: Duration,
    /// Sends every frame the guest takes in to the backup as it comes (see [`crate::ingress`]): a
    /// takeover then answers the requests the dead primary had taken in without waiting for the
    /// clients to retransmit, at the cost of a small A-Link frame per received batch.
    pub input_ahead: bool,
    /// Where the input is kept until sent ahead, for this host's lease watchdog to send after
    /// a death (see [`crate::taken_ring`]).
    pub taken_ring: Option<Arc<crate::taken_ring::TakenRing>>,
}

/// How a checkpoint copies the epoch's dirty pages out of guest memory (see "Why a staging copy"
/// in the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckpointCopy {
    /// In the pause: the VM waits for the `memcpy` of every dirty page.
    #[default]
    StopAndCopy,
    /// After the pause: the pages are write-protected in it (userfaultfd) and copied once the VM
    /// runs again, a page its writer needs first (see `cow`). Not with the userfaultfd dirty
    /// tracker (one userfaultfd per range); an engine that cannot arm it copies in the pause.
    CopyOnWrite,
}

impl CheckpointCopy {
    /// The name used on the command line and in status: `stop` or `cow`.
    pub fn name(self) -> &'static str {
        match self {
            Self::StopAndCopy => "stop",
            Self::CopyOnWrite => "cow",
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            epoch_interval: Duration::from_millis(50),
            min_epoch_gap: Some(Duration::from_micros(200)),
            ack_timeout: Duration::from_millis(500),
            sync_ack_timeout: Duration::from_secs(30),
            hold_capacity: crate::output::hold::DEFAULT_HOLD_CAPACITY,
            disk_backlog: 256 << 20,
            max_in_flight: 32,
            heartbeat_interval: Duration::from_millis(5),
            copy: CheckpointCopy::StopAndCopy,
            dirty_send_budget: Some(Duration::from_millis(1)),
            dirty_probe_interval: Duration::from_millis(10),
            input_ahead: true,
            taken_ring: None,
        }
    }
}

/// The guest's disk, for the initial synchronisation.
#[derive(Clone, Debug)]
pub struct DiskSource {
    /// The raw image the guest's block device uses.
    pub path: PathBuf,
    /// Its size in bytes (a multiple of 512).
    pub bytes: u64,
    /// Its write-intent record, which the guest's block device marks before every write: with
    /// it, a backup whose copy differs only in known regions gets only those (see
    /// [`crate::disk::intent`]); without it, always the whole disk.
    pub intent: Option<Arc<SharedIntent>>,
}

impl DiskSource {
    /// The disk at `path`, of `bytes`, with no write-intent record.
    pub fn new(path: PathBuf, bytes: u64) -> Self {
        Self { path, bytes, intent: None }
    }

    /// The same disk, with its write-intent record.
    pub fn with_intent(mut self, intent: Arc<SharedIntent>) -> Self {
        self.intent = Some(intent);
        self
    }
}

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineCreateError {
    /// The output hold could not be made.
    #[error("Cannot create the output hold")]
    Hold(#[from] crate::output::hold::HoldConfigError),
    /// The machine has no dirty tracking.
    #[error("The machine was created without dirty tracking")]
    NoDirtyTracking,
}

/// Why the engine stopped on its own (the VM can no longer be checkpointed; a lost backup is never
/// an error: the engine goes simplex).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Dirty tracking could not start.
    #[error("Cannot start dirty tracking")]
    Tracking(#[source] TrackingControlError),
    /// The machine could not be paused (it stopped, or a vCPU failed).
    #[error("Cannot pause the machine")]
    Pause(#[source] MachineControlError),
    /// The machine could not be resumed.
    #[error("Cannot resume the machine")]
    Resume(#[source] MachineControlError),
    /// Capture failed.
    #[error("Cannot capture the machine")]
    Capture(#[source] CaptureError),
    /// The machine state could not be encoded.
    #[error("Cannot encode the machine state: {0}")]
    Encode(String),
    /// A harvested page could not be read from guest memory.
    #[error("Cannot copy page {pfn} from guest memory")]
    Copy {
        /// The page.
        pfn: u64,
    },
    /// The engine's thread panicked (a bug); its status says `Failed`.
    #[error("The epoch engine panicked")]
    Panicked,
}

impl EngineError {
    /// Whether the error only says that the machine ended (its guest exited or its owner stopped
    /// it, and a vCPU no longer answers): the VM stopped, the engine did not fail.
    pub fn machine_ended(&self) -> bool {
        use ftvm_vmm::vcpu::VcpuControlError as V;
        match self {
            Self::Pause(e) | Self::Resume(e) => matches!(e.source, V::Gone(_) | V::Exited(_) | V::Unexpected { .. }),
            _ => false,
        }
    }
}

/// A copy-on-write epoch's pages once armed (see `PrimaryEngine::arm_cow`): those to copy in the
/// pause, and those write-protected, to copy after the resume.
struct CowArmed {
    now: PageRangeSet,
    later: PageRangeSet,
}

/// Why a checkpoint is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// Guest output waits.
    Output,
    /// The dirty pages passed the bound.
    Dirty,
    /// The interval passed (or nothing was checkpointed yet).
    Interval,
}

/// Whether the VM runs on after a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resume {
    Yes,
    /// A switchover's final checkpoint.
    No,
}

/// Why an epoch did not reach the backup: the link is gone.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Begin(#[from] BeginEpochError),
    #[error(transparent)]
    Pages(#[from] SendPagesError),
    #[error(transparent)]
    State(#[from] SendStateError),
    #[error(transparent)]
    DiskWrites(#[from] SendDiskWritesError),
    #[error(transparent)]
    Output(#[from] SendOutputError),
    #[error(transparent)]
    DiskImage(#[from] SendDiskImageError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("Cannot read the guest disk image")]
    DiskRead(#[source] std::io::Error),
    #[error("Cannot read page {0} of guest memory")]
    MemoryRead(u64),
}

/// How [`PrimaryEngine::run_until`] ended.
#[derive(Debug)]
pub struct EngineReport {
    /// The status at the end.
    pub status: StatusSnapshot,
    /// Pause length of every incremental epoch, in order (for percentiles).
    pub pauses: Vec<Duration>,
    /// The figures of every incremental epoch sent (bounded: the last 100 000).
    pub epochs: Vec<EpochMetrics>,
    /// After a planned switchover: the VM as handed over (its final epoch's memory and state),
    /// for this host's next standby.
    pub kept: Option<KeptStandby>,
}

/// Most epochs kept in [`EngineReport::epochs`].
const MAX_REPORTED_EPOCHS: usize = 100_000;

/// The primary's checkpoint engine. See the module documentation.
pub struct PrimaryEngine {
    source: CheckpointSource,
    transport: Box<dyn CheckpointTransport>,
    /// The default gate's hold (none once another gate replaced it).
    hold: Option<Arc<OutputHold>>,
    disk_source: Option<DiskSource>,
    cfg: EngineConfig,
    status: Arc<EngineStatus>,
    ack: Arc<AckSide>,
    next_epoch: u64,
    in_flight: VecDeque<InFlight>,
    /// When the oldest epoch in flight became the oldest (its predecessor was acknowledged): the
    /// backup acknowledges in order, so an epoch's wait cannot start before that.
    oldest_since: Instant,
    staging: Staging,
    /// The write protection of copy-on-write epochs, once armed (see [`CheckpointCopy`]).
    cow: Option<cow::CowCopy>,
    held: bool,
    simplex: bool,
    /// Frames sealed into epochs so far (the hold's appended count beyond it is waiting output).
    frames_sealed: u64,
    /// A copy of the frames sealed with the epoch being sent, for the backup to replay.
    output: Vec<u8>,
    output_frames: Vec<std::ops::Range<usize>>,
    heartbeat: IdleHeartbeat,
    /// Set while a simplex VM is paused because its lease ran out.
    lease_paused: bool,
    /// A new backup's link, handed over while the VM runs alone (see [`BackupAttacher`]).
    attach: Arc<BackupSlot>,
    /// Asks for a planned switchover (see [`SwitchoverTrigger`]).
    switchover: SwitchoverTrigger,
    /// Set once the VM was handed over to the backup, at this epoch.
    handed_over: Option<EpochId>,
    epochs: Vec<EpochMetrics>,
    window: EpochWindow,
    rate: (Instant, u64),
    /// The write-intent record's clearing period, while a backup holds a synchronised copy.
    intent_pass: Option<sync::IntentPass>,
    /// The machine state of a switchover's final epoch, as sent.
    final_state: Option<Vec<u8>>,
    /// The VM as handed over, for this host's next standby (see [`KeptStandby`]).
    kept: Option<KeptStandby>,
    /// The epoch this VM was resumed from and the digest of that epoch's machine state, while
    /// every page written since is tracked (a VM taken over at a planned switchover): a backup
    /// holding exactly that epoch gets only those pages.
    resumed_from: Option<(EpochId, [u8; 32])>,
    /// Shown each epoch's dirty pages in its pause (tests).
    pause_probe: Option<PauseProbe>,
    /// When checkpoints are due, and the pages harvested for the dirty bound.
    schedule: Schedule,
    /// The machine state of the last epoch sent on this link, for the next one's delta (empty: the
    /// next state goes whole).
    sent_state: Vec<u8>,
    /// The next state as a delta, when the backup takes deltas.
    state_delta: Vec<u8>,
    /// Sends what the guest takes in to the backup as it comes (see [`crate::ingress`]).
    ingress: IngressForwarder,
}

/// Called in each checkpoint's pause, after the harvest, with the epoch, its dirty pages and guest
/// memory as the epoch will carry it: a test's view of "the memory of the pause".
pub type PauseProbe = Box<dyn FnMut(EpochId, &PageRangeSet, &ftvm_vmm::memory::GuestMemory) + Send>;

impl std::fmt::Debug for PrimaryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryEngine")
            .field("source", &self.source)
            .field("next_epoch", &self.next_epoch)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl PrimaryEngine {
    /// An engine for `source`'s machine, replicating to the backup at the other end of
    /// `transport`. `disk` is the guest's disk (none: a diskless guest); its size must be the
    /// backup's.
    pub fn new(
        source: CheckpointSource,
        transport: Box<dyn CheckpointTransport>,
        disk: Option<DiskSource>,
        cfg: EngineConfig,
    ) -> Result<Self, EngineCreateError> {
        if source.tracker_kind().is_none() {
            return Err(EngineCreateError::NoDirtyTracking);
        }
        let hold = Arc::new(OutputHold::new(cfg.hold_capacity)?);
        let ingress = IngressForwarder::new(cfg.taken_ring.clone());
        let gate: Arc<dyn OutputGate> = Arc::new(HoldGate(hold.clone()));
        let disk_bytes = disk.as_ref().map_or(0, |d| d.bytes);
        let replicator = Arc::new(Mutex::new(MemoryDiskReplicator::new(disk_bytes, cfg.disk_backlog)));
        let status = Arc::new(EngineStatus::new());
        status.update(|s| s.copy = cfg.copy);
        let ack = Arc::new(AckSide {
            gate,
            disk: replicator,
            status: status.clone(),
            acked: AtomicU64::new(0),
            sync_epoch: AtomicU64::new(0),
            down: Mutex::new(None),
            disk_lost: AtomicBool::new(false),
            simplex: AtomicBool::new(false),
            superseded: Mutex::new(None),
            lease: Lease::default(),
            authority: ack::AuthorityHook(None),
            released: AtomicU64::new(0),
            round_trips: Mutex::new(VecDeque::new()),
        });
        let heartbeat = IdleHeartbeat::new(cfg.heartbeat_interval);
        let schedule = Schedule::new(&cfg);
        Ok(Self {
            source,
            transport,
            hold: Some(hold),
            disk_source: disk,
            cfg,
            status,
            ack,
            next_epoch: 0,
            in_flight: VecDeque::new(),
            oldest_since: Instant::now(),
            staging: Staging::default(),
            cow: None,
            held: false,
            simplex: false,
            frames_sealed: 0,
            output: Vec::new(),
            output_frames: Vec::new(),
            heartbeat,
            lease_paused: false,
            attach: Arc::new(BackupSlot::default()),
            switchover: SwitchoverTrigger::default(),
            handed_over: None,
            epochs: Vec::new(),
            window: EpochWindow::default(),
            rate: (Instant::now(), 0),
            intent_pass: None,
            final_state: None,
            kept: None,
            resumed_from: None,
            pause_probe: None,
            schedule,
            sent_state: Vec::new(),
            state_delta: Vec::new(),
            ingress,
        })
    }

    /// An engine for a VM that runs alone from the start (`why`, for status): a host that took
    /// over has no backup until one joins. It checkpoints nothing until a backup's link is handed
    /// to it through [`PrimaryEngine::attacher`]; then it synchronises that backup and protects
    /// the VM as if the link had been there from the start.
    pub fn alone(
        source: CheckpointSource,
        disk: Option<DiskSource>,
        cfg: EngineConfig,
        why: String,
    ) -> Result<Self, EngineCreateError> {
        let engine = Self::new(source, Box::new(crate::transport::detached::Detached), disk, cfg)?;
        engine.ack.simplex.store(true, Ordering::Release);
        engine.status.update(|s| s.state = EngineState::Simplex { reason: why });
        Ok(Self { simplex: true, ..engine })
    }

    /// Starts epoch numbers after `epoch` (a VM restored from a backup's epoch goes on counting
    /// from it, so that its logs and its next backup's read as one history).
    pub fn numbering_after(mut self, epoch: EpochId) -> Self {
        self.next_epoch = self.next_epoch.max(epoch.0.saturating_add(1));
        self
    }

    /// This VM was just restored from `epoch`, whose machine state has the blake3 digest
    /// `state_digest` (a planned switchover): every page it writes from now on is tracked, so that
    /// a backup holding exactly that epoch (the host that handed the VM over) gets only those
    /// pages. Call it before the VM runs.
    pub fn resumed_from(mut self, epoch: EpochId, state_digest: [u8; 32]) -> Self {
        match self.source.start_tracking() {
            Ok(()) => self.resumed_from = Some((epoch, state_digest)),
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "cannot track pages from the resume: the next backup gets all of memory"),
        }
        self
    }

    /// Shows `probe` each epoch's dirty pages in its pause (for tests: it lengthens the pause).
    pub fn with_pause_probe(mut self, probe: PauseProbe) -> Self {
        self.pause_probe = Some(probe);
        self
    }

    /// Asks this engine for a planned switchover (see [`SwitchoverTrigger`]).
    pub fn switchover_trigger(&self) -> SwitchoverTrigger {
        self.switchover.clone()
    }

    /// Takes switchover requests from `trigger` (one its owner made before the engine existed).
    pub fn with_switchover_trigger(mut self, trigger: SwitchoverTrigger) -> Self {
        self.switchover = trigger;
        self
    }

    /// Hands a new backup's link to this engine while it runs alone (see [`BackupAttacher`]).
    pub fn attacher(&self) -> BackupAttacher {
        BackupAttacher(self.attach.clone())
    }

    /// Asks `quorum` before going on without the backup (the default grants every claim): a
    /// lease of its own, for tests; a host shares its [`Lease`] through [`PrimaryEngine::with_lease`].
    pub fn with_quorum(self, quorum: Box<dyn QuorumClient>) -> Self {
        self.with_lease(Lease::new(quorum, LeaseConfig::default(), 0))
    }

    /// Runs under `lease`: output leaves only with it (or a fresh acknowledgement), the VM goes on
    /// alone only when it grants a new term, and its loss fences the VM.
    pub fn with_lease(mut self, lease: Lease) -> Self {
        // Nothing runs before the engine does: the acknowledgement side is not shared yet.
        let owned = Arc::get_mut(&mut self.ack).map(|ack| ack.lease = lease).is_some();
        debug_assert!(owned, "the acknowledgement side is shared before the engine runs: the lease would be lost");
        self
    }

    /// Tells `hook`, before output leaves on a fresh acknowledgement alone (the lease not valid),
    /// until when that acknowledgement lets output out (see [`AckAuthorityHook`]).
    pub fn with_ack_authority_hook(mut self, hook: AckAuthorityHook) -> Self {
        // Nothing runs before the engine does: the acknowledgement side is not shared yet.
        let owned = Arc::get_mut(&mut self.ack).map(|ack| ack.authority = ack::AuthorityHook(Some(hook))).is_some();
        debug_assert!(owned, "the acknowledgement side is shared before the engine runs: the hook would be lost");
        self
    }

    /// The status, to share with whoever reports it.
    pub fn status(&self) -> Arc<EngineStatus> {
        self.status.clone()
    }

    /// The default gate's hold, which guest transmit goes through once protected (none after
    /// [`PrimaryEngine::with_output_gate`]).
    pub fn output_hold(&self) -> Option<Arc<OutputHold>> {
        self.hold.clone()
    }

    /// Holds the guest's output in `gate` instead of the default userspace hold.
    pub fn with_output_gate(mut self, gate: Arc<dyn OutputGate>) -> Self {
        // Nothing is held before the engine runs: the default gate can go.
        let owned = Arc::get_mut(&mut self.ack).map(|ack| ack.gate = gate).is_some();
        debug_assert!(owned, "the acknowledgement side is shared before the engine runs: the gate would be lost");
        if owned {
            self.hold = None;
        }
        self
    }

    /// Runs the engine on its own thread.
    pub fn spawn(self) -> std::io::Result<EngineHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let status = self.status.clone();
        let hold = self.hold.clone();
        let self_attach = self.attach.clone();
        let flag = stop.clone();
        let mut engine = self;
        let panic_status = status.clone();
        let thread = std::thread::Builder::new().name("ftvm-epoch".into()).spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run_until(&flag)));
            result.unwrap_or_else(|_| {
                // Nothing more is released (the hold stays shut); the owner stops the VM.
                panic_status.update(|s| s.state = EngineState::Failed { reason: "the epoch engine panicked".into() });
                Err(EngineError::Panicked)
            })
        })?;
        Ok(EngineHandle { stop, status, hold, attacher: BackupAttacher(self_attach), thread })
    }

    /// Synchronises the backup, then checkpoints every interval until `stop` is set or the machine
    /// can no longer be paused. A lost backup does not end it (simplex: it waits for `stop`).
    /// Stopping takes no final checkpoint; guest output still held is released, transmit goes
    /// back to direct, and the backup is told goodbye: a VM stopped on purpose is not taken over.
    pub fn run_until(&mut self, stop: &AtomicBool) -> Result<EngineReport, EngineError> {
        let ack = self.ack.clone();
        self.transport.set_ack_listener(Box::new(move |ev| ack.on_event(ev)));
        let result = self.run_inner(stop);
        // Decided here, whichever way the loop ended (the notice may arrive just as it stops).
        let superseded = lock(&self.ack.superseded).clone();
        let failed = match &result {
            Err(e) if !e.machine_ended() => Some(format!("the epoch engine failed: {}", ErrorChain(e))),
            _ => None,
        };
        match (superseded, failed) {
            // Handed over: the backup runs the VM from the final epoch, whose output has left.
            _ if self.handed_over.is_some() => {
                let epoch = self.handed_over.unwrap_or_default();
                self.stop_for_good(EngineState::HandedOver { epoch });
            }
            // The other copy answers for the VM: this one's held output must never leave.
            (Some(reason), _) => self.fence(reason),
            // This copy cannot be checkpointed any more: the backup's is the VM now.
            (None, Some(reason)) => self.fail(reason),
            (None, None) => {
                // Whatever else happened, the guest's output must not stay held.
                self.unhold();
                if !self.simplex {
                    // The VM stops here on purpose (its guest exited, or its owner stopped it): the
                    // backup must not bring it back. (A primary that dies says nothing.)
                    self.transport.abandon("the primary's VM stopped");
                }
            }
        }
        self.status.update(|s| {
            if !matches!(
                s.state,
                EngineState::Simplex { .. } | EngineState::Fenced { .. } | EngineState::Failed { .. } | EngineState::HandedOver { .. }
            ) {
                s.state = EngineState::Stopped;
            }
        });
        result.map(|()| EngineReport {
            status: self.status.snapshot(),
            pauses: self.epochs.iter().map(|m| m.pause).collect(),
            epochs: std::mem::take(&mut self.epochs),
            kept: self.kept.take(),
        })
    }

    fn run_inner(&mut self, stop: &AtomicBool) -> Result<(), EngineError> {
        if !self.simplex {
            self.protect(stop)?;
        }
        let mut last_start: Option<Instant> = None;
        // Bounded by `stop`; each iteration sleeps until the next checkpoint is due.
        while !stop.load(Ordering::Relaxed) {
            if let Some(reason) = self.ack.lease.lost() {
                let mut s = lock(&self.ack.superseded);
                if s.is_none() {
                    *s = Some(reason);
                }
            }
            if lock(&self.ack.superseded).is_some() {
                // `run_until` fences the VM.
                return Ok(());
            }
            if self.simplex {
                self.police_simplex();
                // A VM paused for want of a lease is not protected again until the quorum is back.
                if let Some(link) = self.attach.take().filter(|_| !self.lease_paused) {
                    self.reprotect(link, stop);
                    last_start = None;
                    continue;
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            self.ack.release_late();
            if self.switchover.take() {
                match self.switch_over() {
                    switchover::Switchover::HandedOver(epoch) => {
                        self.handed_over = Some(epoch);
                        return Ok(());
                    }
                    switchover::Switchover::Refused => {
                        last_start = None;
                        continue;
                    }
                }
            }
            match last_start.map_or(Due::Now, |t| self.due(t.elapsed())) {
                Due::Now => {}
                Due::After(wait) => {
                    // A long interval must not silence the link: the backup would take the quiet
                    // for a stuck primary.
                    std::thread::sleep(wait.min(self.heartbeat.until_due(monotonic_us())));
                    self.quiet_turn();
                    continue;
                }
                Due::OnOutputOr(wait) => {
                    // Woken by the first frame the guest sends, at the interval, when a heartbeat
                    // is due, or for a look at the dirty pages; looked at again either way (and the
                    // stop flag with it).
                    let beyond = if self.held { self.frames_sealed } else { u64::MAX };
                    let probe = self.schedule.until_probe(&self.cfg, Instant::now()).unwrap_or(wait);
                    self.ack.gate.wait_for_output(beyond, wait.min(self.heartbeat.until_due(monotonic_us())).min(probe));
                    self.quiet_turn();
                    if self.schedule.probe_due(&self.cfg, Instant::now()) {
                        self.look_at_dirty_pages();
                    }
                    continue;
                }
            }
            let why = self.why_now(last_start);
            last_start = Some(Instant::now());
            if !self.backup_still_there() {
                continue;
            }
            if why == Why::Interval && self.nothing_changed() {
                self.schedule.counts.skipped += 1;
                self.status.update(|s| s.checkpoints = self.schedule.counts);
                self.heartbeat_if_due();
                continue;
            }
            if self.in_flight.len() >= self.cfg.max_in_flight {
                // The backup is behind; the ack timeout decides whether it is gone. Meanwhile it
                // must keep hearing from us, or its own slowness looks like our death.
                self.heartbeat_if_due();
                continue;
            }
            match why {
                Why::Output => self.schedule.counts.output += 1,
                Why::Dirty => self.schedule.counts.dirty += 1,
                Why::Interval => self.schedule.counts.interval += 1,
            }
            match self.checkpoint(Resume::Yes)? {
                Ok(()) => self.heartbeat.note_sent(monotonic_us()),
                Err(e) => self.go_simplex(&e),
            }
        }
        Ok(())
    }

    /// Why a checkpoint due now is due (`last_start`: when the last one began).
    fn why_now(&self, last_start: Option<Instant>) -> Why {
        if last_start.is_some_and(|t| t.elapsed() < self.cfg.epoch_interval) {
            if self.output_waiting() {
                return Why::Output;
            }
            if self.schedule.over_bound {
                return Why::Dirty;
            }
        }
        Why::Interval
    }

    /// Harvests the pages dirtied so far, the VM running, for the dirty bound; they go with the
    /// next checkpoint.
    fn look_at_dirty_pages(&mut self) {
        match self.source.harvest_running(&mut self.schedule.pending) {
            Ok(_) => self.schedule.looked(&self.cfg, Instant::now()),
            // The tracker keeps what it could not hand over: the checkpoint's harvest gets it.
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "cannot look at the dirty pages"),
        }
    }

    /// Whether a checkpoint would carry nothing new: no page written (a harvest, the VM running;
    /// what it finds goes with the next checkpoint), no output waiting, no disk write recorded. The
    /// first checkpoint of a protection is never skipped.
    fn nothing_changed(&mut self) -> bool {
        if !self.held || self.output_waiting() || !lock(&self.ack.disk).pending().is_empty() {
            return false;
        }
        // Nothing asked for this checkpoint but the interval: the pages the tracker leaves
        // writable for a busy guest are protected again, so that an idle guest is seen idle from
        // the next interval on (its hot pages go with this one, written or not).
        self.source.cool_tracking();
        self.look_at_dirty_pages();
        self.schedule.pending.is_empty()
    }

    /// Starts protecting the VM over `self.transport`: guest disk writes are recorded and memory
    /// tracked from now on, then the backup gets all of memory and the disk (a failed
    /// synchronisation leaves the VM running alone).
    fn protect(&mut self, stop: &AtomicBool) -> Result<(), EngineError> {
        // A new link: its first state goes whole.
        self.sent_state.clear();
        let io = self.transport.io_name();
        let tracker = self.source.tracker_name().unwrap_or("");
        self.status.update(|s| {
            s.transport = io;
            s.tracker = tracker;
        });
        // The guest's input goes to this backup as it comes; what is taken in before the first
        // checkpoint after the synchronisation belongs to that checkpoint.
        if self.cfg.input_ahead {
            let mirror = self.ingress.mirror();
            self.source.with_devices(|d| d.set_rx_mirror(Some(mirror)));
            self.ingress.set_link(self.transport.ingress_link());
        }
        // Made here, not in `new`: until the engine runs, the builder methods own the
        // acknowledgement side alone (they set its lease and gate).
        let obs: Arc<dyn DiskWriteObserver> = Arc::new(Observer { ack: self.ack.clone() });
        // Before tracking and the image read: no write of the guest can fall between (writes
        // still in flight are shown to the observer as it is installed).
        self.source.with_devices(|d| d.set_disk_write_observer(Some(obs)));
        let since_resume = match self.memory_since_resume() {
            Some(pages) => Some(pages),
            None => {
                // A clean log: the synchronisation copies every page from here on.
                self.schedule.forget();
                self.source.start_tracking().map_err(EngineError::Tracking)?;
                None
            }
        };
        let synced = self.initial_sync(stop, since_resume);
        self.ingress.epoch_paused(self.next_epoch);
        if let Err(e) = synced {
            self.go_simplex(&e);
        }
        Ok(())
    }

    /// The pages written since this VM resumed, when the backup holds exactly the epoch it
    /// resumed from (the host that handed it over, see [`PrimaryEngine::resumed_from`]): they
    /// are all it lacks of memory. `None`: it gets all of memory. Taken once: tracking goes on
    /// from here as for any synchronisation.
    fn memory_since_resume(&mut self) -> Option<PageRangeSet> {
        let (epoch, digest) = self.resumed_from.take()?;
        let peer = self.transport.peer_standby();
        if !(peer.restorable && peer.committed == Some(epoch) && self.transport.peer_standby_digest() == Some(digest)) {
            tracing::info!(resumed_from = epoch.0, backup_holds = ?peer.committed, "the backup does not hold the epoch this VM resumed from: it gets all of memory");
            return None;
        }
        let mut pages = PageRangeSet::new();
        match self.source.harvest_running(&mut pages) {
            Ok(_) => Some(pages),
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "cannot read the pages written since the resume: the backup gets all of memory");
                None
            }
        }
    }

    /// A backup joined a VM that runs alone: its link replaces the dead one, everything the
    /// engine kept about the old backup goes, and the new one is synchronised in full while the
    /// VM runs (see `sync`); the first acknowledged checkpoint makes the pair protected again.
    fn reprotect(&mut self, mut link: Box<dyn CheckpointTransport>, stop: &AtomicBool) {
        let ack = self.ack.clone();
        link.set_ack_listener(Box::new(move |ev| ack.on_event(ev)));
        // Dropping the old link joins its acknowledgement thread: none of its late events can
        // reach the state reset below.
        drop(std::mem::replace(&mut self.transport, link));
        lock(&self.ack.disk).discard_all();
        *lock(&self.ack.down) = None;
        self.ack.disk_lost.store(false, Ordering::SeqCst);
        // Everything the lost backup acknowledged left when the VM went on alone: nothing of it is
        // late to release.
        self.ack.released.fetch_max(self.ack.acked.load(Ordering::Acquire), Ordering::AcqRel);
        self.in_flight.clear();
        self.oldest_since = Instant::now();
        self.simplex = false;
        self.ack.simplex.store(false, Ordering::Release);
        self.status.update(|s| {
            s.disk_replication_lost = false;
            s.epochs_committed = 0;
        });
        tracing::info!(next_epoch = self.next_epoch, "a backup joined: synchronising it to protect the VM again");
        if let Err(e) = self.protect(stop) {
            self.go_simplex(&format_args!("cannot protect the VM again: {}", ErrorChain(&e)));
        }
    }

    /// When the next checkpoint is due, `since` the last one began (see `schedule`).
    fn due(&self, since: Duration) -> Due {
        schedule::due(&self.cfg, since, self.output_waiting(), self.schedule.over_bound)
    }

    /// Whether guest frames wait in the hold for a checkpoint (appended since the last seal).
    fn output_waiting(&self) -> bool {
        self.held && self.ack.gate.frames_in() > self.frames_sealed
    }

    /// One checkpoint. The outer error stops the engine (the machine is gone); the inner one is a
    /// lost backup.
    fn checkpoint(&mut self, resume: Resume) -> Result<Result<(), SendError>, EngineError> {
        let epoch = self.next_epoch;
        if !self.held {
            // Before the first checkpoint's pause: every frame from now on belongs to an epoch
            // the backup will hold.
            match self.source.with_devices(|d| self.ack.gate.hold(d)) {
                Ok(()) => {}
                Err(TxModeError::NoNetDevice) => tracing::debug!("no network device: no output to hold"),
                Err(e) => tracing::warn!(error = %ErrorChain(&e), "cannot hold guest output; it leaves unprotected"),
            }
            self.held = true;
        }
        let span = tracing::debug_span!(
            "epoch",
            epoch,
            pages = tracing::field::Empty,
            bytes = tracing::field::Empty,
            pause_us = tracing::field::Empty,
            ack_us = tracing::field::Empty
        );
        let entered = span.enter();
        let t0 = Instant::now();
        self.source.pause().map_err(|e| {
            // Best effort: a partial pause must not leave vCPUs stopped.
            let _ = self.source.resume();
            EngineError::Pause(e)
        })?;
        // The devices are stopped: what they take in from now on is the next checkpoint's.
        self.ingress.epoch_paused(epoch + 1);
        if self.cfg.input_ahead {
            // And what arrives during the rest of the pause is read ahead, outside the state this
            // checkpoint takes, and goes to the backup at once rather than after the resume.
            self.source.with_devices(|d| d.open_read_ahead());
        }
        let ctx = EpochContext::paused(EpochId(epoch), t0);
        // The pages harvested for the dirty bound, and the rest now.
        let mut pages = self.schedule.take_pending();
        let state = match self.source.capture(&mut pages) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.source.resume();
                return Err(EngineError::Capture(e));
            }
        };
        let timings = self.source.last_timings();
        let hot_pages = self.source.last_harvest().hot_pages;
        // Seals cannot fail here: epoch numbers only increase (a failure is logged, not fatal).
        self.output.clear();
        self.output_frames.clear();
        let frames = self.ack.gate.seal(epoch, &mut self.output, &mut self.output_frames).unwrap_or_else(|e| {
            tracing::error!(error = %e, "output hold seal");
            0
        });
        self.frames_sealed += frames;
        let writes: Vec<DiskWrite> = lock(&self.ack.disk).seal(EpochId(epoch)).unwrap_or_else(|e| {
            tracing::error!(error = %e, "disk write seal");
            Vec::new()
        });
        let mem = self.source.guest_memory();
        if let Some(probe) = self.pause_probe.as_mut() {
            probe(EpochId(epoch), &pages, &mem);
        }
        let tc = Instant::now();
        // A switchover's final checkpoint leaves the VM paused: nothing to protect against.
        let cow = if resume == Resume::Yes { self.arm_cow(&pages) } else { None };
        let (copied, later) = match cow {
            // Copy-on-write: the pages left out of the protection are copied now.
            Some(CowArmed { now, later }) => (self.staging.copy_pages(&now, &mem), Some(later)),
            None => (self.staging.fill(&pages, &mem), None),
        };
        let copy = tc.elapsed();
        let ctx = ctx.captured(pages.page_count(), hot_pages, writes.len() as u64, frames, timings, copy);
        let resumed = if resume == Resume::Yes { self.source.resume() } else { Ok(()) };
        let mut ctx = ctx.resumed();
        let copied = match (copied, &later) {
            (Ok(()), Some(later)) => self.copy_after_resume(later, &mem, &mut ctx),
            (other, _) => other,
        };
        if let Err(pfn) = copied {
            let _ = self.source.remark(&pages);
            return Err(EngineError::Copy { pfn });
        }
        resumed.map_err(EngineError::Resume)?;
        // After the resume: encoding is the engine's work, not the guest's.
        let state = match state.to_bytes() {
            Ok(s) => s,
            Err(e) => {
                let _ = self.source.remark(&pages);
                return Err(EngineError::Encode(e.to_string()));
            }
        };
        if resume == Resume::No {
            // A switchover's final epoch: if the backup takes over from it, this host keeps it.
            self.final_state = Some(state.clone());
        }
        let pause_us = ctx.pause().as_micros() as u64;
        let state_len = state.len() as u64;
        span.record("pages", pages.page_count());
        span.record("pause_us", pause_us);
        let sent = self.send_epoch_with_state(epoch, &pages, state, &writes);
        drop(entered);
        let committed_at = Instant::now();
        let result = match sent {
            Ok(bytes) => {
                span.record("bytes", bytes);
                let ctx = ctx.sent(bytes, state_len);
                self.record(ctx.metrics());
                Ok(())
            }
            Err(e) => Err(e),
        };
        self.in_flight.push_back(InFlight { epoch, committed_at, timeout: self.cfg.ack_timeout, span });
        self.next_epoch = epoch + 1;
        self.status.update(|s| s.last_sent = Some(EpochId(epoch)));
        Ok(result)
    }

    /// In a copy-on-write engine's pause: lays out the staging buffer for `pages` and
    /// write-protects those to copy after the resume: all of them but the pages the dirty tracker
    /// leaves writable (the guest's hot pages, which it is about to write again: protecting them
    /// would only trade each for a fault), to be copied in the pause. `None` when the pages must
    /// all be copied now instead (stop-and-copy, only hot pages, or write protection that cannot
    /// be armed, which then ends copy-on-write for this engine).
    fn arm_cow(&mut self, pages: &PageRangeSet) -> Option<CowArmed> {
        if self.cfg.copy != CheckpointCopy::CopyOnWrite || pages.is_empty() {
            return None;
        }
        let (now, later) = pages.split_by(&self.source.writable_pages());
        if later.is_empty() {
            return None;
        }
        if self.cow.is_none() {
            match cow::CowCopy::new(&self.source.guest_memory()) {
                Ok(c) => self.cow = Some(c),
                Err(e) => {
                    tracing::warn!(error = %ErrorChain(&e), "cannot write-protect guest memory: checkpoints copy in the pause");
                    self.cfg.copy = CheckpointCopy::StopAndCopy;
                    self.status.update(|s| s.copy = CheckpointCopy::StopAndCopy);
                    return None;
                }
            }
        }
        let cow = self.cow.as_mut()?;
        self.staging.lay_out(pages);
        match cow.protect(&later) {
            Ok(_) => Some(CowArmed { now, later }),
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "cannot write-protect the epoch's pages: checkpoints copy in the pause");
                self.cow = None;
                self.cfg.copy = CheckpointCopy::StopAndCopy;
                self.status.update(|s| s.copy = CheckpointCopy::StopAndCopy);
                None
            }
        }
    }

    /// A copy-on-write epoch's copy, the VM running: the staging buffer gets the memory of the
    /// pause and nothing stays write-protected. A failure ends copy-on-write (its userfaultfd is
    /// closed, which lifts whatever protection is left) and fails the epoch.
    fn copy_after_resume(&mut self, pages: &PageRangeSet, mem: &ftvm_vmm::memory::GuestMemory, ctx: &mut EpochContext<super::context::Resumed>) -> Result<(), u64> {
        let Some(cow) = self.cow.as_mut() else {
            return Err(pages.ranges().first().map_or(0, |r| r.start));
        };
        let t = Instant::now();
        match cow.copy(pages, &mut self.staging, mem) {
            Ok(stats) => {
                ctx.copied_after_resume(t.elapsed(), pages.page_count(), stats.faults);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %ErrorChain(&e), "copy-on-write epoch failed; checkpoints copy in the pause from now on");
                self.cow = None;
                self.cfg.copy = CheckpointCopy::StopAndCopy;
                self.status.update(|s| s.copy = CheckpointCopy::StopAndCopy);
                Err(match e {
                    cow::CowError::NoSuchPage(pfn) => pfn,
                    cow::CowError::Uffd(_) => pages.ranges().first().map_or(0, |r| r.start),
                })
            }
        }
    }

    /// Sends the epoch with its machine `state`, as a delta from the last state sent on this link
    /// when the backup takes deltas and the delta is smaller (the first epoch of a link sends it
    /// whole). Remembers it as the base of the next delta once sent.
    fn send_epoch_with_state(&mut self, epoch: u64, pages: &PageRangeSet, state: Vec<u8>, writes: &[DiskWrite]) -> Result<u64, SendError> {
        let delta = !self.sent_state.is_empty() && self.transport.peer_takes_state_deltas() && {
            ftvm_proto::state_delta::encode(&self.sent_state, &state, &mut self.state_delta);
            self.state_delta.len() < state.len()
        };
        let payload = if delta { std::mem::take(&mut self.state_delta) } else { Vec::new() };
        let sent = self.send_epoch(epoch, pages, if delta { &payload } else { &state }, writes);
        self.state_delta = payload;
        // A failed send ends the link: the next one starts from a whole state.
        self.sent_state = if sent.is_ok() { state } else { Vec::new() };
        sent
    }

    fn send_epoch(
        &mut self,
        epoch: u64,
        pages: &PageRangeSet,
        state: &[u8],
        writes: &[DiskWrite],
    ) -> Result<u64, SendError> {
        self.transport.begin_epoch(&EpochBegin {
            epoch: EpochId(epoch),
            page_count: pages.page_count(),
            state_len: state.len() as u64,
            disk_write_count: writes.len() as u64,
            disk_image_bytes: 0,
            initial_sync: false,
        })?;
        let mut bytes = if pages.is_empty() { 0 } else { self.transport.send_pages(pages, &self.staging)? };
        self.transport.send_state(state)?;
        bytes += state.len() as u64;
        if !self.output_frames.is_empty() {
            let frames: Vec<&[u8]> = self.output_frames.iter().filter_map(|r| self.output.get(r.clone())).collect();
            bytes += self.transport.send_output(&frames)?;
        }
        if !writes.is_empty() {
            self.transport.send_disk_writes(writes)?;
            bytes += writes.iter().map(|w| w.data.len() as u64 + 16).sum::<u64>();
        }
        self.transport.commit(EpochId(epoch))?;
        Ok(bytes)
    }

    fn record(&mut self, m: &EpochMetrics) {
        if self.epochs.len() < MAX_REPORTED_EPOCHS {
            self.epochs.push(*m);
        }
        self.window.push(*m);
        self.rate.1 += 1;
        let since = self.rate.0.elapsed();
        let rate = (since >= Duration::from_millis(250)).then(|| {
            let r = self.rate.1 as f64 / since.as_secs_f64();
            self.rate = (Instant::now(), 0);
            r
        });
        if rate.is_some() {
            let (bytes, page_bytes, sending) = self.window.link_totals();
            self.schedule.link_measured(&self.cfg, bytes, page_bytes, sending);
        }
        let (bound, link_rate) = (self.schedule.bound_pages, self.schedule.link_rate);
        let counts = self.schedule.counts;
        let ingress = self.ingress.stats();
        let page_deltas = self.transport.page_deltas();
        let hot_samples = self.source.hot_page_samples();
        // The percentiles cost a sort of the window: only when the rate is refreshed.
        let recent = rate.map(|_| {
            let mut acks: Vec<Duration> = lock(&self.ack.round_trips).iter().map(|(_, d)| *d).collect();
            (self.window.stats(), Percentiles::of(&mut acks))
        });
        self.status.update(|s| {
            s.last_epoch = *m;
            s.link_bytes += m.link_bytes;
            s.dirty_bytes += m.dirty_bytes();
            s.hot_bytes += m.hot_pages * crate::PAGE_SIZE as u64;
            s.hot_samples = hot_samples;
            s.checkpoints = counts;
            s.ingress = ingress;
            s.page_deltas = page_deltas;
            s.dirty_bound_pages = bound;
            s.link_bytes_per_sec = link_rate;
            if let Some(r) = rate {
                s.epochs_per_sec = r;
            }
            if let Some((w, a)) = recent {
                s.recent = w;
                s.recent_ack = a;
            }
        });
    }

    /// A turn of the loop with no checkpoint due: acknowledgements are taken, a lost backup is
    /// noticed, and the backup hears from us (a heartbeat after a quiet stretch).
    fn quiet_turn(&mut self) {
        if self.backup_still_there() {
            self.heartbeat_if_due();
        }
    }

    /// Takes the acknowledgements; false when this turn must not go on: another copy answers for
    /// the VM (`run_until` fences it), or the backup is lost (the VM goes on alone).
    fn backup_still_there(&mut self) -> bool {
        self.collect_acks();
        if lock(&self.ack.superseded).is_some() {
            return false;
        }
        if let Some(reason) = self.link_failure() {
            self.go_simplex(&reason);
            return false;
        }
        true
    }

    /// A heartbeat to the backup after a stretch with nothing sent; a link that fails it is a lost
    /// backup.
    fn heartbeat_if_due(&mut self) {
        match self.heartbeat.send_if_due(monotonic_us(), self.transport.as_mut()) {
            // The engine's liveness for whoever watches it (the heartbeat responder's progress
            // marker): an idle pair takes no checkpoint, its heartbeats are the engine turning.
            Ok(true) => self.status.update(|s| s.heartbeats_sent += 1),
            Ok(false) => {}
            Err(e) => self.go_simplex(&e),
        }
    }

    /// Forgets the epochs the backup holds, recording their round trip on their span.
    fn collect_acks(&mut self) {
        let Some(acked) = self.ack.acked() else { return };
        self.clear_intent_marks(acked);
        while self.in_flight.front().is_some_and(|f| f.epoch <= acked) {
            if let Some(f) = self.in_flight.pop_front() {
                self.oldest_since = Instant::now();
                let rtt = lock(&self.ack.round_trips).iter().find(|(e, _)| *e == f.epoch).map(|(_, d)| *d);
                if let Some(d) = rtt {
                    f.span.record("ack_us", d.as_micros() as u64);
                }
            }
        }
    }

    /// Why the backup is to be considered gone, if it is: its link failed, or the oldest epoch in
    /// flight is overdue.
    fn link_failure(&self) -> Option<String> {
        if let Some(r) = lock(&self.ack.down).clone() {
            return Some(r);
        }
        let oldest = self.in_flight.front()?;
        let waited = oldest.overdue(self.oldest_since, Instant::now())?;
        Some(format!("epoch {} not acknowledged within {waited:?}", oldest.epoch))
    }
}
