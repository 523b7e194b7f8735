//! The primary's checkpoint epoch engine: pause → harvest → save state → seal → copy → resume →
//! send → release on ack.
//!
//! # Life of the engine
//! 1. **Initial synchronisation**, while the VM runs: the disk write observer is installed, dirty
//!    tracking starts, then every page of guest memory and the whole disk image stream to the backup
//!    as one initial-sync epoch. Pages and disk sectors the guest changes meanwhile are caught by
//!    the tracker and the observer and go with the first checkpoint.
//! 2. **First checkpoint**: guest transmit switches to [`TxMode::Held`], then the first incremental
//!    epoch carries the pages dirtied during the sync, the machine state and the disk writes; its
//!    acknowledgement makes the backup restorable.
//! 3. **Epoch loop**: a checkpoint starts when guest output waits in the hold and
//!    [`EngineConfig::min_epoch_gap`] has passed since the last one began (held output is latency
//!    a client sees, so it is checkpointed at once), and at the latest
//!    [`EngineConfig::epoch_interval`] after the last one (which bounds the work of the next
//!    epoch and keeps the backup hearing from us). Each checkpoint: pause, capture (harvest + state),
//!    seal the output hold and the disk writes as epoch N, copy the dirty pages into a staging
//!    buffer, resume, then send and commit. The acknowledgement thread releases the held frames
//!    and forgets the disk writes of N. Epoch N+1 may start before N is acknowledged.
//! 4. **Failure** (a send, commit or ack timeout): the pages of every unacknowledged epoch are
//!    re-marked dirty, their disk writes requeued, every held frame released and transmit goes
//!    back to [`TxMode::Direct`]: the engine is simplex and the VM carries on unprotected. When
//!    the link still works the backup is told first (a goodbye), so that it does not take over a
//!    VM that still runs.
//! 5. **Fenced**: the backup says it takes over (it declared this primary dead), the quorum
//!    refuses to let this primary run alone, or the lease is lost (another host holds it now). The VM is paused at once and nothing held is
//!    released: the other copy resumes from the last committed epoch, and two copies must never
//!    serve. The engine ends; its owner stops the machine.
//!
//! While the epochs in flight are at their limit (a slow backup) the engine sends nothing else,
//! so it sends heartbeats: the backup must hear a live primary even when it is the slow one.
//!
//! # Why a staging copy
//! The transport may read the pages until `commit` returns (the zero-copy invariant of
//! [`PageSource`]), and the VM should run while the epoch is on the wire. Copying the dirty pages
//! while paused is the simplest correct way to have both; it costs one `memcpy` of the dirty bytes
//! inside the pause (about 0.3 µs per page here). Copy-on-write write protection would take it out
//! of the pause; not done yet.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_proto::pages::{PageRange, PageRangeSet};
use ftvm_proto::EpochId;
use ftvm_vmm::devices::virtio::block::DiskWriteObserver;
use ftvm_vmm::devices::virtio::net::TxModeError;
use ftvm_vmm::machine::{CaptureError, CheckpointSource, MachineControlError, TrackingControlError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::output::gate::{HoldGate, OutputGate};
use crate::output::hold::OutputHold;
use super::context::{EpochContext, EpochMetrics, EpochWindow, EpochWindowStats, Percentiles};
use ftvm_proto::epoch::EpochBegin;
use ftvm_proto::limits::MAX_CHUNK_BYTES;
use crate::disk::{DiskReplicator, DiskWrite, MemoryDiskReplicator};
use crate::ha::heartbeat::{monotonic_us, IdleHeartbeat};
use crate::ha::lease::{Lease, LeaseConfig, ACK_AUTHORITY};
use crate::ha::quorum::{Claim, QuorumClient};
use crate::transport::{
    AckEvent, BeginEpochError, CheckpointTransport, CommitError, PageSource, SendDiskImageError, SendDiskWritesError,
    SendOutputError, SendPagesError, SendStateError,
};
use crate::{ErrorChain, PAGE_SIZE};
use crate::lock;

/// Pages copied and sent per step of the initial synchronisation (4 MiB).
const SYNC_CHUNK_PAGES: u64 = 1024;

/// Settings of a [`PrimaryEngine`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Longest time from the start of one checkpoint to the start of the next. 1 ms by default:
    /// this machine sustains it with the small test guests (see the engine tests' printed figures).
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            epoch_interval: Duration::from_millis(1),
            min_epoch_gap: Some(Duration::from_micros(200)),
            ack_timeout: Duration::from_millis(500),
            sync_ack_timeout: Duration::from_secs(30),
            hold_capacity: crate::output::hold::DEFAULT_HOLD_CAPACITY,
            disk_backlog: 256 << 20,
            max_in_flight: 32,
            heartbeat_interval: Duration::from_millis(5),
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
}

/// How far the initial synchronisation is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncProgress {
    /// Pages sent.
    pub pages_sent: u64,
    /// Pages of guest memory.
    pub pages_total: u64,
    /// Disk image bytes sent.
    pub disk_bytes_sent: u64,
    /// Disk bytes.
    pub disk_bytes_total: u64,
}

/// Whether the VM is protected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// The initial synchronisation (and the first checkpoint) are under way.
    Syncing(SyncProgress),
    /// The backup holds a restorable checkpoint and receives epochs.
    Protected,
    /// No backup: the VM runs unprotected.
    Simplex {
        /// Why, for status.
        reason: String,
    },
    /// Another copy runs this VM (the backup took over, or the quorum gave the other side the
    /// right to run it): this copy is paused, its held output dropped, and must stop.
    Fenced {
        /// Why.
        reason: String,
    },
    /// The engine failed (it could not capture, copy or resume the machine, or it panicked): the
    /// VM is paused and must stop, nothing unacknowledged is released and the backup is not told
    /// goodbye, so that it resumes the VM from the last committed epoch.
    Failed {
        /// Why.
        reason: String,
    },
    /// The engine ended (stopped, or its machine did).
    Stopped,
}

/// A copy of the engine's status.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusSnapshot {
    /// Protected or not.
    pub state: EngineState,
    /// Epochs the backup acknowledged (the initial synchronisation not counted).
    pub epochs_committed: u64,
    /// Epochs sent per second, over the last quarter second or so.
    pub epochs_per_sec: f64,
    /// The last epoch sent.
    pub last_sent: Option<EpochId>,
    /// The last epoch the backup acknowledged.
    pub last_acked: Option<EpochId>,
    /// The last epoch's figures (pause and its parts, pages, bytes).
    pub last_epoch: EpochMetrics,
    /// Percentiles of the pause and its parts over the last epochs, refreshed a few times a second.
    pub recent: EpochWindowStats,
    /// Percentiles of the acknowledgement round trip over the last epochs.
    pub recent_ack: Percentiles,
    /// The last acknowledgement's round trip (commit to ack).
    pub last_ack_round_trip: Option<Duration>,
    /// Bytes on the A-Link and dirty bytes, over all incremental epochs.
    pub link_bytes: u64,
    /// Dirty guest memory bytes over all incremental epochs.
    pub dirty_bytes: u64,
    /// A guest disk write could not be recorded (backlog full): the backup's disk lacks it, and
    /// only a new initial synchronisation makes it whole again.
    pub disk_replication_lost: bool,
}

impl StatusSnapshot {
    /// Epochs sent and not acknowledged.
    pub fn lag_epochs(&self) -> u64 {
        match (self.last_sent, self.last_acked) {
            (Some(s), Some(a)) => s.0.saturating_sub(a.0),
            (Some(s), None) => s.0 + 1,
            _ => 0,
        }
    }

    /// A-Link bytes per dirty byte (framing, state and disk writes make it > 1).
    pub fn link_per_dirty_byte(&self) -> Option<f64> {
        (self.dirty_bytes > 0).then(|| self.link_bytes as f64 / self.dirty_bytes as f64)
    }
}

/// The engine's status, shared with whoever reports it. Reading costs one short lock.
#[derive(Debug)]
pub struct EngineStatus {
    inner: Mutex<StatusSnapshot>,
}

impl EngineStatus {
    fn new() -> Self {
        Self {
            inner: Mutex::new(StatusSnapshot {
                state: EngineState::Syncing(SyncProgress::default()),
                epochs_committed: 0,
                epochs_per_sec: 0.0,
                last_sent: None,
                last_acked: None,
                last_epoch: EpochMetrics::default(),
                recent: EpochWindowStats::default(),
                recent_ack: Percentiles::default(),
                last_ack_round_trip: None,
                link_bytes: 0,
                dirty_bytes: 0,
                disk_replication_lost: false,
            }),
        }
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> StatusSnapshot {
        lock(&self.inner).clone()
    }

    fn update<R>(&self, f: impl FnOnce(&mut StatusSnapshot) -> R) -> R {
        f(&mut lock(&self.inner))
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

/// When the next checkpoint is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// Now.
    Now,
    /// After this long, whatever happens.
    After(Duration),
    /// As soon as guest output waits, at the latest after this long.
    OnOutputOr(Duration),
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

/// Feeds guest disk writes to the replicator (the device's submission path calls it).
#[derive(Debug)]
struct Observer {
    ack: Arc<AckSide>,
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

/// What the acknowledgement thread and the engine share.
#[derive(Debug)]
struct AckSide {
    gate: Arc<dyn OutputGate>,
    disk: Arc<Mutex<MemoryDiskReplicator>>,
    status: Arc<EngineStatus>,
    /// Last acknowledged epoch + 1 (0: none).
    acked: AtomicU64,
    /// The initial-sync epoch (its acknowledgement commits no disk writes).
    sync_epoch: AtomicU64,
    /// Set when the link went down; the engine goes simplex at its next step.
    down: Mutex<Option<String>>,
    /// A guest disk write could not be recorded for the backup: no acknowledgement may release
    /// output any more (it could depend on that write), only the switch to simplex does.
    disk_lost: AtomicBool,
    /// After the switch to simplex, late acknowledgements change nothing.
    simplex: AtomicBool,
    /// Set when the backup said it takes over: nothing is released any more.
    superseded: Mutex<Option<String>>,
    /// The right to let output out: while it is valid, any acknowledged epoch's output leaves;
    /// without it, only output whose acknowledgement came within [`ACK_AUTHORITY`] of the epoch's
    /// send (see [`crate::ha::lease`]).
    lease: Lease,
    /// Last epoch whose output was released + 1 (0: none).
    released: AtomicU64,
    /// (epoch, round trip) of recent acknowledgements, for the epoch spans.
    round_trips: Mutex<VecDeque<(u64, Duration)>>,
}

impl AckSide {
    fn on_event(&self, ev: AckEvent) {
        match ev {
            AckEvent::Acked { epoch, round_trip } => {
                if self.simplex.load(Ordering::Acquire) || lock(&self.superseded).is_some() {
                    return;
                }
                self.acked.store(epoch.0 + 1, Ordering::Release);
                let authority = round_trip < ACK_AUTHORITY || self.lease.is_valid(monotonic_us());
                if authority && !self.disk_lost.load(Ordering::SeqCst) {
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

    fn acked(&self) -> Option<u64> {
        self.acked.load(Ordering::Acquire).checked_sub(1)
    }

    fn release_through(&self, epoch: u64) {
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
    fn release_late(&self) {
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
struct InFlight {
    epoch: u64,
    pages: PageRangeSet,
    committed_at: Instant,
    /// Longest wait for its acknowledgement.
    timeout: Duration,
    span: tracing::Span,
}

/// Dirty pages copied out of guest memory, in the order of their ranges.
#[derive(Debug, Default)]
struct Staging {
    buf: Vec<u8>,
    ranges: Vec<PageRange>,
    /// Page index in `buf` of each range's first page.
    first: Vec<u64>,
}

impl Staging {
    /// Copies `pages` out of `mem`.
    fn fill(&mut self, pages: &PageRangeSet, mem: &ftvm_vmm::memory::GuestMemory) -> Result<(), u64> {
        self.ranges.clear();
        self.first.clear();
        let bytes = pages.page_count() as usize * PAGE_SIZE;
        // Grows to the largest epoch seen and stays: no allocation in the pause after warm-up.
        if self.buf.len() < bytes {
            self.buf.resize(bytes, 0);
        }
        let mut at = 0u64;
        for r in pages.ranges() {
            let from = at as usize * PAGE_SIZE;
            let n = r.len as usize * PAGE_SIZE;
            copy_guest(mem, GuestAddress(r.start * PAGE_SIZE as u64), &mut self.buf[from..from + n])
                .map_err(|_| r.start)?;
            self.ranges.push(*r);
            self.first.push(at);
            at += r.len;
        }
        Ok(())
    }

    fn find(&self, pfn: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.start <= pfn).checked_sub(1)?;
        let r = self.ranges[i];
        (pfn < r.start + r.len).then_some(i)
    }
}

/// Copies guest memory at `addr` into `dst` with one `memcpy` when the range lies in one region
/// (vm-memory's own copy goes word by word through volatile reads, several times slower, and the
/// copy is inside the pause).
fn copy_guest(mem: &ftvm_vmm::memory::GuestMemory, addr: GuestAddress, dst: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
    match mem.get_slice(addr, dst.len()) {
        Ok(src) => {
            let guard = src.ptr_guard();
            // SAFETY: `get_slice` checked that the host mapping covers `dst.len()` bytes from
            // `guard.as_ptr()` and the guard keeps it mapped; `dst` is a distinct Rust buffer, so the
            // two do not overlap. Guest memory is not a Rust object: it is shared with the guest,
            // like any mapping another party writes. In a checkpoint the vCPUs and devices are
            // paused, so nothing writes those pages during the copy; during the initial sync the
            // guest may, and a page it changes meanwhile is dirty and sent again with the first
            // checkpoint.
            unsafe { std::ptr::copy_nonoverlapping(guard.as_ptr(), dst.as_mut_ptr(), dst.len()) };
            Ok(())
        }
        // Across a region boundary: the slow, general path.
        Err(_) => mem.read_slice(dst, addr),
    }
}

impl PageSource for Staging {
    fn page(&self, pfn: u64) -> Option<&[u8]> {
        self.run(pfn, 1)
    }

    fn run(&self, start: u64, len: u64) -> Option<&[u8]> {
        let i = self.find(start)?;
        let r = self.ranges[i];
        if start.checked_add(len)? > r.start + r.len {
            return None;
        }
        let from = (self.first[i] + (start - r.start)) as usize * PAGE_SIZE;
        self.buf.get(from..from + len as usize * PAGE_SIZE)
    }

    fn packed(&self, ranges: &[PageRange]) -> Option<&[u8]> {
        // The buffer holds the epoch's ranges back to back in order: ranges (or parts of them)
        // that follow each other there are one slice.
        let mut start: Option<u64> = None;
        let mut next = 0u64;
        for r in ranges {
            let i = self.find(r.start)?;
            let held = self.ranges[i];
            if r.start.checked_add(r.len)? > held.start + held.len {
                return None;
            }
            let at = self.first[i] + (r.start - held.start);
            match start {
                None => start = Some(at),
                Some(_) if at != next => return None,
                Some(_) => {}
            }
            next = at + r.len;
        }
        let from = start? as usize * PAGE_SIZE;
        let pages = next - start?;
        self.buf.get(from..from + pages as usize * PAGE_SIZE)
    }
}

/// How [`PrimaryEngine::run_until`] ended.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineReport {
    /// The status at the end.
    pub status: StatusSnapshot,
    /// Pause length of every incremental epoch, in order (for percentiles).
    pub pauses: Vec<Duration>,
    /// The figures of every incremental epoch sent (bounded: the last 100 000).
    pub epochs: Vec<EpochMetrics>,
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
    staging: Staging,
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
    epochs: Vec<EpochMetrics>,
    window: EpochWindow,
    rate: (Instant, u64),
}

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
        let gate: Arc<dyn OutputGate> = Arc::new(HoldGate(hold.clone()));
        let disk_bytes = disk.as_ref().map_or(0, |d| d.bytes);
        let replicator = Arc::new(Mutex::new(MemoryDiskReplicator::new(disk_bytes, cfg.disk_backlog)));
        let status = Arc::new(EngineStatus::new());
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
            released: AtomicU64::new(0),
            round_trips: Mutex::new(VecDeque::new()),
        });
        let heartbeat = IdleHeartbeat::new(cfg.heartbeat_interval);
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
            staging: Staging::default(),
            held: false,
            simplex: false,
            frames_sealed: 0,
            output: Vec::new(),
            output_frames: Vec::new(),
            heartbeat,
            lease_paused: false,
            epochs: Vec::new(),
            window: EpochWindow::default(),
            rate: (Instant::now(), 0),
        })
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
        Ok(EngineHandle { stop, status, hold, thread })
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
            if !matches!(s.state, EngineState::Simplex { .. } | EngineState::Fenced { .. } | EngineState::Failed { .. }) {
                s.state = EngineState::Stopped;
            }
        });
        result.map(|()| EngineReport {
            status: self.status.snapshot(),
            pauses: self.epochs.iter().map(|m| m.pause).collect(),
            epochs: std::mem::take(&mut self.epochs),
        })
    }

    fn run_inner(&mut self, stop: &AtomicBool) -> Result<(), EngineError> {
        // Made here, not in `new`: until the engine runs, the builder methods own the
        // acknowledgement side alone (they set its lease and gate).
        let obs: Arc<dyn DiskWriteObserver> = Arc::new(Observer { ack: self.ack.clone() });
        // Before tracking and the image read: no write of the guest can fall between.
        self.source.with_devices(|d| d.set_disk_write_observer(Some(obs)));
        self.source.start_tracking().map_err(EngineError::Tracking)?;
        if let Err(e) = self.initial_sync(stop) {
            self.go_simplex(&e);
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
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            self.ack.release_late();
            match last_start.map_or(Due::Now, |t| self.due(t.elapsed())) {
                Due::Now => {}
                Due::After(wait) => {
                    std::thread::sleep(wait);
                    continue;
                }
                Due::OnOutputOr(wait) => {
                    // Woken by the first frame the guest sends, or at the interval; looked at again
                    // either way (and the stop flag with it).
                    let beyond = if self.held { self.frames_sealed } else { u64::MAX };
                    self.ack.gate.wait_for_output(beyond, wait);
                    continue;
                }
            }
            last_start = Some(Instant::now());
            self.collect_acks();
            if lock(&self.ack.superseded).is_some() {
                continue;
            }
            if let Some(reason) = self.link_failure() {
                self.go_simplex(&reason);
                continue;
            }
            if self.in_flight.len() >= self.cfg.max_in_flight {
                // The backup is behind; the ack timeout decides whether it is gone. Meanwhile it
                // must keep hearing from us, or its own slowness looks like our death.
                if let Err(e) = self.heartbeat.send_if_due(monotonic_us(), self.transport.as_mut()) {
                    self.go_simplex(&e);
                }
                continue;
            }
            match self.checkpoint()? {
                Ok(()) => self.heartbeat.note_sent(monotonic_us()),
                Err(e) => self.go_simplex(&e),
            }
        }
        Ok(())
    }

    /// When the next checkpoint is due, `since` the last one began (see the module documentation).
    fn due(&self, since: Duration) -> Due {
        let interval = self.cfg.epoch_interval;
        let Some(to_interval) = interval.checked_sub(since).filter(|d| !d.is_zero()) else {
            return Due::Now;
        };
        let Some(gap) = self.cfg.min_epoch_gap.filter(|g| *g < interval) else {
            return Due::After(to_interval);
        };
        if let Some(to_gap) = gap.checked_sub(since).filter(|d| !d.is_zero()) {
            return Due::After(to_gap);
        }
        if self.output_waiting() {
            return Due::Now;
        }
        Due::OnOutputOr(to_interval)
    }

    /// Whether guest frames wait in the hold for a checkpoint (appended since the last seal).
    fn output_waiting(&self) -> bool {
        self.held && self.ack.gate.frames_in() > self.frames_sealed
    }

    /// Streams all of guest memory and the disk image as one initial-sync epoch while the VM runs.
    fn initial_sync(&mut self, stop: &AtomicBool) -> Result<(), SendError> {
        let epoch = self.transport.peer_standby().committed.map_or(0, |c| c.0 + 1);
        let mem = self.source.guest_memory();
        let regions: Vec<(u64, u64)> =
            mem.iter().map(|r| (r.start_addr().0 / PAGE_SIZE as u64, r.len() / PAGE_SIZE as u64)).collect();
        let pages_total: u64 = regions.iter().map(|r| r.1).sum();
        let disk_total = self.disk_source.as_ref().map_or(0, |d| d.bytes);
        let mut progress = SyncProgress { pages_total, disk_bytes_total: disk_total, ..SyncProgress::default() };
        self.status.update(|s| s.state = EngineState::Syncing(progress));
        self.ack.sync_epoch.store(epoch, Ordering::Release);
        let span = tracing::info_span!("initial_sync", epoch, pages = pages_total, disk_bytes = disk_total);
        let _e = span.enter();
        tracing::info!("initial synchronisation started");
        let t0 = Instant::now();
        self.transport.begin_epoch(&EpochBegin {
            epoch: EpochId(epoch),
            page_count: pages_total,
            state_len: 0,
            disk_write_count: 0,
            disk_image_bytes: disk_total,
            initial_sync: true,
        })?;
        let mut last_log = Instant::now();
        let mut chunk = PageRangeSet::new();
        for (start, len) in regions {
            let mut pfn = start;
            while pfn < start + len {
                if stop.load(Ordering::Relaxed) {
                    // Leave the epoch open: the link is dropped with the engine.
                    return Ok(());
                }
                let n = SYNC_CHUNK_PAGES.min(start + len - pfn);
                chunk.clear();
                chunk.insert(pfn, n);
                // A copy, not the live pages: the guest runs, and the transport hashes a page
                // before the kernel copies it; a change in between would fail the frame's tag.
                // The staging buffer is reused chunk after chunk: the TCP transport is done with
                // the bytes when send_pages returns (a zero-copy transport would need a buffer
                // per chunk until commit; not handled yet).
                self.staging.fill(&chunk, &mem).map_err(SendError::MemoryRead)?;
                self.transport.send_pages(&chunk, &self.staging)?;
                pfn += n;
                progress.pages_sent += n;
                self.status.update(|s| s.state = EngineState::Syncing(progress));
                if last_log.elapsed() >= Duration::from_secs(1) {
                    last_log = Instant::now();
                    tracing::info!(pages_sent = progress.pages_sent, pages_total, "initial synchronisation: memory");
                }
            }
        }
        if let Some(d) = self.disk_source.clone() {
            let file = File::open(&d.path).map_err(SendError::DiskRead)?;
            let mut buf = vec![0u8; MAX_CHUNK_BYTES.min(d.bytes as usize).max(512)];
            let mut off = 0u64;
            while off < d.bytes {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let n = (d.bytes - off).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], off).map_err(SendError::DiskRead)?;
                self.transport.send_disk_image(off, &buf[..n])?;
                off += n as u64;
                progress.disk_bytes_sent = off;
                self.status.update(|s| s.state = EngineState::Syncing(progress));
                if last_log.elapsed() >= Duration::from_secs(1) {
                    last_log = Instant::now();
                    tracing::info!(disk_bytes_sent = off, disk_total, "initial synchronisation: disk");
                }
            }
        }
        self.transport.commit(EpochId(epoch))?;
        self.in_flight.push_back(InFlight {
            epoch,
            // Nothing to re-mark if the sync is lost: a new backup needs a new sync anyway.
            pages: PageRangeSet::new(),
            committed_at: Instant::now(),
            timeout: self.cfg.sync_ack_timeout,
            span: tracing::Span::none(),
        });
        self.next_epoch = epoch + 1;
        self.status.update(|s| s.last_sent = Some(EpochId(epoch)));
        // The epoch rate counts checkpoints, not the sync.
        self.rate = (Instant::now(), 0);
        tracing::info!(elapsed_ms = t0.elapsed().as_millis() as u64, "initial synchronisation sent");
        Ok(())
    }

    /// One checkpoint. The outer error stops the engine (the machine is gone); the inner one is a
    /// lost backup.
    fn checkpoint(&mut self) -> Result<Result<(), SendError>, EngineError> {
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
        let ctx = EpochContext::paused(EpochId(epoch), t0);
        let mut pages = PageRangeSet::new();
        let state = match self.source.capture(&mut pages) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.source.resume();
                return Err(EngineError::Capture(e));
            }
        };
        let timings = self.source.last_timings();
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
        let tc = Instant::now();
        let copied = self.staging.fill(&pages, &self.source.guest_memory());
        let copy = tc.elapsed();
        let ctx = ctx.captured(pages.page_count(), writes.len() as u64, frames, timings, copy);
        let resumed = self.source.resume();
        let ctx = ctx.resumed();
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
        let pause_us = ctx.pause().as_micros() as u64;
        span.record("pages", pages.page_count());
        span.record("pause_us", pause_us);
        let sent = self.send_epoch(epoch, &pages, &state, &writes);
        // Sent or not, its pages are accounted for: re-marked if it never gets acknowledged.
        drop(entered);
        let committed_at = Instant::now();
        let result = match sent {
            Ok(bytes) => {
                span.record("bytes", bytes);
                let ctx = ctx.sent(bytes, state.len() as u64);
                self.record(ctx.metrics());
                Ok(())
            }
            Err(e) => Err(e),
        };
        self.in_flight.push_back(InFlight { epoch, pages, committed_at, timeout: self.cfg.ack_timeout, span });
        self.next_epoch = epoch + 1;
        self.status.update(|s| s.last_sent = Some(EpochId(epoch)));
        Ok(result)
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
        // The percentiles cost a sort of the window: only when the rate is refreshed.
        let recent = rate.map(|_| {
            let mut acks: Vec<Duration> = lock(&self.ack.round_trips).iter().map(|(_, d)| *d).collect();
            (self.window.stats(), Percentiles::of(&mut acks))
        });
        self.status.update(|s| {
            s.last_epoch = *m;
            s.link_bytes += m.link_bytes;
            s.dirty_bytes += m.dirty_bytes();
            if let Some(r) = rate {
                s.epochs_per_sec = r;
            }
            if let Some((w, a)) = recent {
                s.recent = w;
                s.recent_ack = a;
            }
        });
    }

    /// Forgets the epochs the backup holds, recording their round trip on their span.
    fn collect_acks(&mut self) {
        let Some(acked) = self.ack.acked() else { return };
        while self.in_flight.front().is_some_and(|f| f.epoch <= acked) {
            if let Some(f) = self.in_flight.pop_front() {
                let rtt = lock(&self.ack.round_trips).iter().find(|(e, _)| *e == f.epoch).map(|(_, d)| *d);
                if let Some(d) = rtt {
                    f.span.record("ack_us", d.as_micros() as u64);
                }
            }
        }
    }

    /// Why the backup is to be considered gone, if it is.
    fn link_failure(&self) -> Option<String> {
        if let Some(r) = lock(&self.ack.down).clone() {
            return Some(r);
        }
        let oldest = self.in_flight.front()?;
        let waited = oldest.committed_at.elapsed();
        (waited > oldest.timeout).then(|| format!("epoch {} not acknowledged within {:?}", oldest.epoch, waited))
    }

    /// Another copy runs the VM: pause this one for good and release nothing more. The machine's
    /// owner sees [`EngineState::Fenced`] and stops it.
    fn fence(&mut self, reason: String) {
        tracing::error!(%reason, held_epochs = self.in_flight.len(), "another copy runs the VM: this one is paused and its held output dropped (fenced)");
        self.stop_for_good(EngineState::Fenced { reason });
    }

    /// The engine cannot go on: pause the VM for good and release nothing unacknowledged, without
    /// a goodbye (the backup takes over). The machine's owner sees [`EngineState::Failed`].
    fn fail(&mut self, reason: String) {
        tracing::error!(%reason, held_epochs = self.in_flight.len(), "the engine failed: the VM is paused and its unacknowledged output dropped");
        self.stop_for_good(EngineState::Failed { reason });
    }

    fn stop_for_good(&mut self, state: EngineState) {
        self.ack.simplex.store(true, Ordering::Release);
        if let Err(e) = self.source.pause() {
            tracing::error!(error = %ErrorChain(&e), "cannot pause the VM");
        }
        self.in_flight.clear();
        self.status.update(|s| s.state = state);
    }

    /// The backup is gone: no page or disk write is lost, every held frame leaves, the VM goes on.
    fn go_simplex(&mut self, why: &dyn std::fmt::Display) {
        if self.simplex || lock(&self.ack.superseded).is_some() {
            return;
        }
        if let Err(refusal) = self.ack.lease.claim(Claim::RunAlone) {
            // The other side holds the right to run the VM: this copy must stop, not serve.
            let reason = format!("the quorum refused to let this primary run alone ({why}): {refusal}");
            *lock(&self.ack.superseded) = Some(reason);
            return;
        }
        self.simplex = true;
        self.ack.simplex.store(true, Ordering::Release);
        // Before anything held leaves: a backup that still hears us must not take over.
        self.transport.abandon(&why.to_string());
        let acked = self.ack.acked();
        let mut remark = PageRangeSet::new();
        for f in self.in_flight.drain(..) {
            if acked.is_none_or(|a| f.epoch > a) {
                remark.union_with(&f.pages);
            }
        }
        if let Err(e) = self.source.remark(&remark) {
            tracing::error!(error = %ErrorChain(&e), "cannot re-mark the pages of the lost epochs");
        }
        let requeued = lock(&self.ack.disk).requeue_unacked();
        self.unhold();
        let reason = why.to_string();
        tracing::warn!(%reason, remarked_pages = remark.page_count(), requeued_disk_writes = requeued, "backup lost: running unprotected (simplex)");
        self.status.update(|s| s.state = EngineState::Simplex { reason });
    }

    /// A VM running alone emits without any hold: it may run only while its lease is valid. When
    /// the lease runs out (the quorum unreachable) it is paused, and resumed if a renewal comes
    /// back before anyone else claimed the VM; a lost lease fences it (at the loop's next turn).
    fn police_simplex(&mut self) {
        let valid = self.ack.lease.is_valid(monotonic_us());
        if !valid && !self.lease_paused {
            if let Err(e) = self.source.pause() {
                tracing::error!(error = %ErrorChain(&e), "cannot pause the VM whose lease ran out");
                return;
            }
            self.lease_paused = true;
            tracing::error!("the lease ran out while running alone: the VM is paused until the quorum renews it");
            self.status.update(|s| {
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
                if let EngineState::Simplex { reason } = &mut s.state {
                    if let Some(rest) = reason.strip_prefix("paused: the lease ran out and the quorum cannot be reached (") {
                        *reason = rest.trim_end_matches(')').to_string();
                    }
                }
            });
        }
    }

    /// Transmit goes back to direct, and every frame still held leaves, in order.
    fn unhold(&mut self) {
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
        if paused.is_ok() {
            if let Err(e) = self.source.resume() {
                tracing::error!(error = %ErrorChain(&e), "cannot resume the machine after releasing its output");
            }
        }
    }
}

/// A [`PrimaryEngine`] running on its own thread.
#[derive(Debug)]
pub struct EngineHandle {
    stop: Arc<AtomicBool>,
    status: Arc<EngineStatus>,
    hold: Option<Arc<OutputHold>>,
    thread: JoinHandle<Result<EngineReport, EngineError>>,
}

/// Why [`EngineHandle::stop`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineStopError {
    /// The engine ended with an error.
    #[error("The epoch engine failed")]
    Engine(#[from] EngineError),
    /// The engine thread panicked.
    #[error("The epoch engine thread panicked")]
    Panicked,
}

impl EngineHandle {
    /// The engine's status.
    pub fn status(&self) -> Arc<EngineStatus> {
        self.status.clone()
    }

    /// The default gate's output-commit hold (none when another gate replaced it).
    pub fn output_hold(&self) -> Option<Arc<OutputHold>> {
        self.hold.clone()
    }

    /// Whether the engine thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops the engine (no final checkpoint) and waits for it.
    pub fn stop(self) -> Result<EngineReport, EngineStopError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| EngineStopError::Panicked)?.map_err(EngineStopError::Engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_pages_are_found_by_page_and_by_run() {
        let mut st = Staging::default();
        let mut pages = PageRangeSet::new();
        pages.insert(2, 3);
        pages.insert(10, 1);
        // A fake memory: each page holds its own number.
        st.ranges = pages.ranges().to_vec();
        st.first = vec![0, 3];
        st.buf = [2u8, 3, 4, 10].iter().flat_map(|&p| std::iter::repeat_n(p, PAGE_SIZE)).collect();
        for pfn in [2, 3, 4, 10] {
            assert_eq!(st.page(pfn).map(|p| (p.len(), p[0])), Some((PAGE_SIZE, pfn as u8)));
        }
        for pfn in [0, 1, 5, 9, 11, u64::MAX] {
            assert_eq!(st.page(pfn), None, "page {pfn}");
        }
        assert_eq!(st.run(3, 2).map(|r| (r.len(), r[0], r[PAGE_SIZE])), Some((2 * PAGE_SIZE, 3, 4)));
        assert_eq!(st.run(3, 3), None, "past the end of its range");
        assert_eq!(st.run(4, u64::MAX), None);
        // Ranges back to back in the buffer are one slice, parts of ranges included; a gap or an
        // order other than the buffer's is not.
        let r = |start, len| PageRange { start, len };
        let bytes = |s: Option<&[u8]>| s.map(|b| b.chunks(PAGE_SIZE).map(|p| p[0]).collect::<Vec<u8>>());
        assert_eq!(bytes(st.packed(&[r(2, 3), r(10, 1)])), Some(vec![2, 3, 4, 10]));
        assert_eq!(bytes(st.packed(&[r(4, 1), r(10, 1)])), Some(vec![4, 10]));
        assert_eq!(bytes(st.packed(&[r(3, 1)])), Some(vec![3]));
        assert_eq!(st.packed(&[r(2, 1), r(4, 1)]), None, "page 3 lies between them");
        assert_eq!(st.packed(&[r(10, 1), r(2, 1)]), None);
        assert_eq!(st.packed(&[r(4, 2)]), None, "past the end of its range");
        assert_eq!(st.packed(&[]), None);
    }

    #[test]
    fn lag_and_link_ratio() {
        let mut s = EngineStatus::new().snapshot();
        assert_eq!(s.lag_epochs(), 0);
        assert_eq!(s.link_per_dirty_byte(), None);
        s.last_sent = Some(EpochId(9));
        s.last_acked = Some(EpochId(6));
        s.link_bytes = 150;
        s.dirty_bytes = 100;
        assert_eq!(s.lag_epochs(), 3);
        assert_eq!(s.link_per_dirty_byte(), Some(1.5));
    }
}
