//! The backup receiver: accepts the primary on the A-Link, stages each epoch, applies it at its
//! commit, acknowledges it.
//!
//! Threads: one accept thread (waits on the listener and a wake-up socket), one thread per
//! connection while it runs the handshake, and at most one authenticated session at a time (a
//! second authenticated primary is told "busy" and closed). Peers that fail the handshake (wrong
//! secret, other protocol version, garbage) are logged and closed; the receiver keeps waiting.
//!
//! Epoch rules:
//! * an **initial synchronisation** (EpochBegin flag) may carry any epoch number. It replaces the
//!   standby: at its begin the committed epoch is forgotten (a primary that starts over has moved
//!   on, and its old checkpoint must never be resumed), and its pages and disk image chunks are
//!   written straight into the standby as they arrive, so the sync needs no staging the size of the
//!   guest and can stream while the primary runs. Pages captured while the guest ran are fixed up by
//!   the next epoch; the standby becomes *restorable* at the first committed epoch that carries a
//!   machine state;
//! * every other epoch must be the committed epoch + 1 and carry a machine state. Its pages, state
//!   and disk writes are staged, and applied only when its EpochCommit's totals and digest match;
//!   then the EpochAck goes out. A session that ends, or a frame that fails any check, drops the
//!   staging and leaves the committed standby untouched.
//!
//! RDMA (a receiver started with [`ReceiverConfig::rdma`]): the staging ring is registered once, at
//! [`BackupReceiver::bind`]. A primary that asks for RDMA sends its queue pair (`RdmaEndpoint`)
//! right after the set-up frames; the session connects a queue pair to it and answers with its own
//! and the ring. In an incremental epoch `RdmaPages` descriptors then stand in for `Pages` frames:
//! each is checked against the ring when it arrives (bounds, alignment, overlap within the epoch),
//! and at the commit, after the digest matched, every descriptor's pages are copied out of the ring
//! and checked against their hash before anything is applied; one mismatch (a torn, late or stale
//! write) refuses the epoch. A receiver without a ring refuses a primary that asks for RDMA.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ftvm_proto::cpu::HostCpuCaps;
use ftvm_proto::frame::{FrameError, FrameKind, FrameSealer, HEADER_LEN, TAG_LEN};
use ftvm_proto::handshake::{self, MIN_SECRET_LEN};
use ftvm_proto::page_delta;
use ftvm_proto::pages::{PageRange, PageRangeSet};
use ftvm_proto::EpochId;

use crate::disk::intent::{DiskMarks, IntentError, SharedIntent, DEFAULT_REGION_BYTES};
use super::ingress::{decoded_frames, Kept, RecentIngress};
use super::journal::{AppendError, ApplyError, DiskJournal};
use super::standby::{KeptStandby, Standby, StandbyMemory};
use ftvm_proto::epoch::{
    decode_output, DecodeError, DiskImageView, DiskWritesView, EpochAck, EpochBegin, EpochCommit, EpochDigest, PagesView,
    LeaseTerm, StandbyInfo,
};
use crate::ha::heartbeat::{LinkActivity, SessionEnd, StampingReader};
use crate::transport::deadline::DeadlineStream;
use crate::transport::uring_reader::{LinkReader, UringReader};
use crate::transport::rdma::backup::{AcceptedRdma, BackupRdma, PlacementError, RingValidator, StagingRing, ValidPlacement};
use crate::transport::rdma::{RdmaOptions, RdmaSetupError};
use crate::{ErrorChain, PAGE_SIZE, SECTOR_SIZE};
use crate::late_input::LateInbox;
use crate::lock;

/// Whether applied disk writes are made durable before the acknowledgement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskSync {
    /// `fdatasync` the standby disk before acknowledging an epoch that wrote to it.
    #[default]
    DataSync,
    /// Leave it to the page cache (faster; a crash of the backup host loses its standby anyway,
    /// since the standby memory is in RAM).
    NoSync,
}

/// Settings of a [`BackupReceiver`].
#[derive(Clone)]
pub struct ReceiverConfig {
    /// The A-Link address to listen on.
    pub listen: SocketAddr,
    /// The shared secret.
    pub secret: Vec<u8>,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// The standby disk (a raw file, created if missing, sized to `disk_bytes`).
    pub disk_path: PathBuf,
    /// Guest disk size (a multiple of 512).
    pub disk_bytes: u64,
    /// Durability of applied disk writes.
    pub disk_sync: DiskSync,
    /// Longest wait for each read or write of the handshake.
    pub handshake_timeout: Duration,
    /// A session whose primary sends nothing for this long is dropped (the primary sends epochs
    /// continuously, or heartbeats).
    pub link_timeout: Duration,
    /// Most bytes of pages, machine state and disk writes staged for one epoch.
    pub max_staging_bytes: u64,
    /// Most connections in their handshake at once; more are closed at once.
    pub max_pending_handshakes: usize,
    /// Allow listening on `0.0.0.0` or `[::]` (off: the A-Link is a private link, and the receiver
    /// should not be reachable from the business network).
    pub allow_unspecified: bool,
    /// The CPU capabilities announced to the primary (protocol 1.3 and later), so that it can
    /// refuse a backup that could not resume its guest. `None`: read from this host's KVM at
    /// [`BackupReceiver::bind`]. Tests set it (a feature masked) to play an incompatible backup.
    pub cpu_caps: Option<HostCpuCaps>,
    /// The standby disk's write-intent record: its marks go to the primary (protocol 1.5 and
    /// later), so that a rejoin copies only the regions that may differ; the guest's block device
    /// marks it after a takeover. `None`: every synchronisation copies the whole disk.
    pub intent: Option<Arc<SharedIntent>>,
    /// Take page payloads by RDMA from a primary that asks for it (`--alink-rdma-device`): the
    /// device is opened and the staging ring registered at [`BackupReceiver::bind`], which fails
    /// when it cannot be (also in a build without the cargo feature `rdma`). `None`: a primary that
    /// asks for RDMA is refused.
    pub rdma: Option<RdmaOptions>,
    /// Where a dead primary's late input is opened ([`crate::late_input`]): each session binds it
    /// to its primary daemon's id (protocol 1.8 and later). `None`: late input is not taken.
    pub late_input: Option<Arc<LateInbox>>,
    /// Read the A-Link through io_uring ([`crate::transport::uring_reader`]) rather than with
    /// plain reads; [`BackupReceiver::bind`] fails when the kernel cannot.
    pub uring: bool,
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("ReceiverConfig")
            .field("listen", &self.listen)
            .field("memory_bytes", &self.memory_bytes)
            .field("disk_path", &self.disk_path)
            .field("disk_bytes", &self.disk_bytes)
            .field("disk_sync", &self.disk_sync)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("link_timeout", &self.link_timeout)
            .field("max_staging_bytes", &self.max_staging_bytes)
            .field("cpu_caps", &self.cpu_caps)
            .field("rdma", &self.rdma)
            .field("uring", &self.uring)
            .finish_non_exhaustive()
    }
}

impl ReceiverConfig {
    /// How the A-Link is read, for logs and status: "socket" or "io_uring".
    pub fn receive_io(&self) -> &'static str {
        if self.uring { "io_uring" } else { "socket" }
    }

    /// A configuration with the default timeouts and limits.
    pub fn new(
        listen: SocketAddr,
        secret: impl Into<Vec<u8>>,
        memory_bytes: u64,
        disk_path: impl Into<PathBuf>,
        disk_bytes: u64,
    ) -> Self {
        Self {
            listen,
            secret: secret.into(),
            memory_bytes,
            disk_path: disk_path.into(),
            disk_bytes,
            disk_sync: DiskSync::DataSync,
            handshake_timeout: Duration::from_secs(2),
            link_timeout: Duration::from_secs(5),
            max_staging_bytes: 1 << 30,
            max_pending_handshakes: 4,
            allow_unspecified: false,
            cpu_caps: None,
            intent: None,
            rdma: None,
            late_input: None,
            uring: false,
        }
    }
}

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// `0.0.0.0` or `[::]` without `allow_unspecified`.
    #[error("Refusing to listen on the unspecified address {0}; give the A-Link address")]
    Unspecified(SocketAddr),
    /// The secret is too short.
    #[error("Shared secret is shorter than {MIN_SECRET_LEN} bytes")]
    WeakSecret,
    /// Memory size zero or not whole pages.
    #[error("Memory size {0} is not a positive multiple of 4 KiB")]
    MemorySize(u64),
    /// Disk size not whole sectors.
    #[error("Disk size {0} is not a multiple of 512")]
    DiskSize(u64),
    /// This host's CPU capabilities could not be read from KVM.
    #[error("Cannot read this host's CPU capabilities")]
    CpuCaps(#[source] ftvm_vmm::compat::CpuCompatError),
    /// The standby memory could not be created.
    #[error("Cannot create the standby memory")]
    Memory(#[source] io::Error),
    /// The standby disk could not be opened or sized.
    #[error("Cannot open the standby disk {path}")]
    Disk {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The listener could not be set up.
    #[error("Cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("Cannot start the receiver thread")]
    Thread(#[source] io::Error),
    /// Reading the A-Link through io_uring was asked for, and this kernel cannot.
    #[error("Cannot read the A-Link through io_uring")]
    Uring(#[source] io::Error),
    /// The RDMA device could not be opened or the staging ring registered, or this build has no
    /// RDMA.
    #[error("Cannot set up RDMA on {device}")]
    Rdma {
        /// The device asked for.
        device: String,
        /// Why.
        #[source]
        source: RdmaSetupError,
    },
}

/// Why stopping could not hand the standby back.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// A receiver thread still holds the standby (it could not be joined).
    #[error("A receiver thread still holds the standby")]
    StillShared,
}

/// Why a session with the primary ended. Logged; the committed standby is untouched by all of them
/// except [`SessionError::Apply`].
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A frame failed a check (tag, sequence, version, length), or the link failed.
    #[error("Frame refused")]
    Frame(#[source] FrameError),
    /// The link closed while an epoch was being received.
    #[error("Link closed in the middle of epoch {0}")]
    ClosedMidEpoch(EpochId),
    /// A page delta that is malformed, or that makes another page than the primary's.
    #[error("Epoch {epoch:?}: a page delta is refused")]
    PageDelta {
        /// The epoch.
        epoch: EpochId,
        /// Why.
        #[source]
        source: page_delta::PageDeltaError,
    },
    /// A payload failed to decode.
    #[error("Malformed {kind:?} payload")]
    Payload {
        /// The frame kind.
        kind: FrameKind,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// A frame that has no place here.
    #[error("Unexpected {kind:?} frame {context}")]
    Unexpected {
        /// The frame kind.
        kind: FrameKind,
        /// Where.
        context: &'static str,
    },
    /// A frame of another epoch than the open one.
    #[error("Frame of epoch {got} inside epoch {open}")]
    WrongEpoch {
        /// The open epoch.
        open: EpochId,
        /// The frame's epoch.
        got: u64,
    },
    /// An incremental epoch that does not follow the committed one.
    #[error("Epoch {epoch} cannot follow the committed epoch {committed:?}")]
    EpochOrder {
        /// The epoch begun.
        epoch: EpochId,
        /// The standby's committed epoch.
        committed: Option<EpochId>,
    },
    /// A handover for another epoch than the one this standby holds, in the middle of an epoch, or
    /// with nothing restorable.
    #[error("Handover at epoch {epoch} refused: this standby holds {committed:?} (restorable: {restorable}), at an epoch boundary only")]
    BadHandover {
        /// The epoch the primary stopped at.
        epoch: EpochId,
        /// The standby's committed epoch.
        committed: Option<EpochId>,
        /// Whether the standby could be resumed.
        restorable: bool,
    },
    /// An EpochBegin that is wrong for its kind of epoch.
    #[error("Invalid epoch announcement: {0}")]
    BadBegin(&'static str),
    /// The epoch needs more staging than allowed.
    #[error("Epoch {epoch} needs more than {max} bytes of staging")]
    StagingFull {
        /// The epoch.
        epoch: EpochId,
        /// The limit.
        max: u64,
    },
    /// More of something than the EpochBegin announced.
    #[error("Epoch {epoch} sent more {what} than the {announced} announced")]
    OverAnnounced {
        /// The epoch.
        epoch: EpochId,
        /// Which total.
        what: &'static str,
        /// Announced.
        announced: u64,
    },
    /// The commit's totals disagree with the announcement or with what arrived.
    #[error("Epoch {epoch} totals do not match: {what} announced {announced}, received {received}, committed {committed}")]
    Totals {
        /// The epoch.
        epoch: EpochId,
        /// Which total.
        what: &'static str,
        /// In EpochBegin.
        announced: u64,
        /// Counted on arrival.
        received: u64,
        /// In EpochCommit.
        committed: u64,
    },
    /// The commit's digest disagrees with the frames received.
    #[error("Epoch {0} digest does not match its frames")]
    Digest(EpochId),
    /// The epoch's machine state is a delta (A-Link 1.6) that does not apply to the state held.
    #[error("Epoch {epoch} machine state delta refused")]
    StateDelta {
        /// The epoch.
        epoch: EpochId,
        /// Why.
        #[source]
        source: ftvm_proto::state_delta::DeltaError,
    },
    /// Writing a disk image chunk failed (initial synchronisation; nothing committed is affected).
    #[error("Writing the standby disk failed")]
    DiskImage(#[source] io::Error),
    /// The standby disk's write-intent record could not be marked incomplete before a full copy
    /// (nothing was written to the disk).
    #[error("Cannot update the standby disk's write-intent record")]
    Intent(#[source] IntentError),
    /// Applying the epoch's disk writes failed: the standby is invalid until the next initial
    /// synchronisation.
    #[error("Applying epoch {epoch} to the standby disk failed; the standby is invalid")]
    Apply {
        /// The epoch.
        epoch: EpochId,
        /// Why.
        #[source]
        source: ApplyError,
    },
    /// The primary asked for RDMA, and this receiver was started without it.
    #[error("This backup has no RDMA (--alink-rdma-device)")]
    NoRdma,
    /// The primary's RDMA endpoint could not be connected to.
    #[error("RDMA set-up failed")]
    Rdma(#[source] RdmaSetupError),
    /// An RDMA placement descriptor does not fit the ring, or the pages it names in the ring do
    /// not match their hash at the commit (nothing of the epoch is applied).
    #[error("Epoch {epoch} RDMA placement refused")]
    Placement {
        /// The epoch.
        epoch: EpochId,
        /// Why.
        #[source]
        source: PlacementError,
    },
    /// Answering the primary failed.
    #[error("Sending to the primary failed")]
    Send(#[source] io::Error),
    /// The receiver is stopping.
    #[error("Receiver is stopping")]
    Stopping,
    /// Another primary's session holds the receiver.
    #[error("Another primary is connected")]
    Busy,
}

/// Progress of an initial synchronisation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncProgress {
    /// The synchronisation epoch.
    pub epoch: EpochId,
    /// Pages received so far.
    pub pages_received: u64,
    /// Pages announced.
    pub pages_total: u64,
    /// Disk image bytes received so far.
    pub disk_bytes_received: u64,
    /// Disk image bytes announced.
    pub disk_bytes_total: u64,
}

/// Counters for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct ReceiverStats {
    /// How the A-Link is read: "socket" or "io_uring".
    pub receive_io: &'static str,
    /// The primary of the current session.
    pub connected: Option<SocketAddr>,
    /// The last epoch applied.
    pub committed: Option<EpochId>,
    /// The standby can be resumed.
    pub restorable: bool,
    /// Epochs applied.
    pub epochs_committed: u64,
    /// Epochs dropped before their commit (link lost, frame refused, mismatch).
    pub epochs_discarded: u64,
    /// Bytes of frames received.
    pub bytes_received: u64,
    /// Pages copied into the standby memory.
    pub pages_applied: u64,
    /// Bytes written to the standby disk.
    pub disk_bytes_applied: u64,
    /// Handshakes that succeeded (a session counts for the failure detector only from the
    /// primary's first authenticated frame).
    pub sessions: u64,
    /// Of those, the ones that ended.
    pub sessions_ended: u64,
    /// Connections refused (handshake failed, busy, too many pending).
    pub refused: u64,
    /// Time to apply the last epoch (disk writes, sync, page copy).
    pub last_apply: Option<Duration>,
    /// When the last epoch was applied.
    pub last_commit: Option<SystemTime>,
    /// The initial synchronisation under way.
    pub sync: Option<SyncProgress>,
    /// The last error that ended a session or refused a peer.
    pub last_error: Option<String>,
    /// Guest input frames the primary sent ahead, kept for a takeover (their epochs are not
    /// committed).
    pub ingress_frames_held: u64,
    /// Ingress payloads that came after their epoch's commit (nothing to keep).
    pub ingress_late: u64,
    /// Ingress payloads not kept: over the limit.
    pub ingress_over_limit: u64,
    /// The lease term of the primary whose epoch made the committed standby (`LeaseTerm` frame;
    /// none from a primary without a quorum, or of protocol 1.1).
    pub standby_term: Option<u64>,
    /// The lease term the connected primary announced.
    pub primary_term: Option<u64>,
}

/// The standby, under the receiver's lock.
#[derive(Debug)]
struct StandbyState {
    memory: StandbyMemory,
    disk: File,
    state: Vec<u8>,
    committed: Option<EpochId>,
    /// The held output of the last committed epochs (HeldOutput payloads), oldest first: the
    /// primary may have died before releasing them, and the restored guest believes them sent.
    recent_output: VecDeque<(EpochId, Vec<Vec<u8>>)>,
    /// The guest input of the epochs not committed yet (Ingress payloads).
    recent_ingress: RecentIngress,
}

impl StandbyState {
    fn info(&self, disk_bytes: u64) -> StandbyInfo {
        StandbyInfo {
            committed: self.committed,
            restorable: self.committed.is_some() && !self.state.is_empty(),
            memory_bytes: self.memory.len() as u64,
            disk_bytes,
        }
    }

    /// Forgets the committed epoch (an initial sync begins, or applying failed half-way).
    fn invalidate(&mut self) {
        self.committed = None;
        self.state.clear();
        self.recent_output.clear();
        self.recent_ingress.clear();
    }

    /// Keeps `epoch`'s held output (just committed), and only as much older output as the primary
    /// can have left unreleased.
    fn keep_output(&mut self, epoch: EpochId, payloads: Vec<Vec<u8>>) {
        if !payloads.is_empty() {
            self.recent_output.push_back((epoch, payloads));
        }
        let oldest = epoch.0.saturating_sub(RECENT_OUTPUT_EPOCHS);
        let mut bytes: usize = self.recent_output.iter().flat_map(|(_, p)| p.iter()).map(Vec::len).sum();
        while let Some((e, p)) = self.recent_output.front() {
            if e.0 >= oldest && bytes <= RECENT_OUTPUT_BYTES {
                break;
            }
            bytes -= p.iter().map(Vec::len).sum::<usize>();
            self.recent_output.pop_front();
        }
    }

    /// The frames to replay at a takeover, oldest first.
    fn unreleased_output(&self) -> Vec<Vec<u8>> {
        decoded_frames(self.recent_output.iter().flat_map(|(_, payloads)| payloads.iter().map(Vec::as_slice)))
    }
}

/// The committed standby, read-locked: the receiver cannot apply an epoch while a view is held.
#[derive(Debug)]
pub struct CommittedView<'a> {
    epoch: EpochId,
    guard: RwLockReadGuard<'a, StandbyState>,
}

impl CommittedView<'_> {
    /// The committed epoch.
    pub fn epoch(&self) -> EpochId {
        self.epoch
    }

    /// The standby memory image.
    pub fn memory(&self) -> &[u8] {
        self.guard.memory.as_slice()
    }

    /// The machine state blob.
    pub fn state(&self) -> &[u8] {
        &self.guard.state
    }

    /// The standby disk.
    pub fn disk(&self) -> &File {
        &self.guard.disk
    }
}

struct Inner {
    config: ReceiverConfig,
    standby: RwLock<StandbyState>,
    /// The RDMA staging ring, registered for the receiver's lifetime ([`ReceiverConfig::rdma`]).
    rdma: Option<BackupRdma>,
    stats: Mutex<ReceiverStats>,
    bytes_received: AtomicU64,
    /// Stamped on every read from an authenticated primary (the failure detector's input).
    activity: LinkActivity,
    stop: AtomicBool,
    /// Set when the receiver stops because this host takes over: the reason is sent to a primary
    /// still connected, which must then stop its copy.
    farewell: Mutex<Option<String>>,
    session_active: AtomicBool,
    pending_handshakes: AtomicUsize,
    next_conn: AtomicU64,
    /// Every open connection, so that stopping can shut them all down.
    conns: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Inner {
    fn read_standby(&self) -> RwLockReadGuard<'_, StandbyState> {
        self.standby.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_standby(&self) -> RwLockWriteGuard<'_, StandbyState> {
        self.standby.write().unwrap_or_else(|e| e.into_inner())
    }

    fn refused(&self, peer: SocketAddr, reason: String) {
        tracing::warn!(%peer, %reason, "A-Link peer refused");
        let mut s = lock(&self.stats);
        s.refused += 1;
        s.last_error = Some(reason);
    }
}

/// The backup's A-Link receiver. See the module documentation.
#[derive(Debug)]
pub struct BackupReceiver {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    wake: UnixStream,
}

impl BackupReceiver {
    /// Creates the standby (zeroed memory image, disk file sized to the guest's) and starts
    /// listening on the A-Link address for the primary.
    pub fn bind(config: ReceiverConfig) -> Result<Self, BindError> {
        Self::bind_keeping(config, None)
    }

    /// [`Self::bind`], the standby starting as `kept` (the VM this host handed over) when its
    /// memory is the guest's size; otherwise blank.
    pub fn bind_keeping(config: ReceiverConfig, kept: Option<KeptStandby>) -> Result<Self, BindError> {
        Self::bind_with(config, kept, None)
    }

    /// **Tests only** (the `ftvm` binary never calls it): [`Self::bind`] with RDMA over `ring`, a
    /// ring without a device that the test's simulated NIC writes into
    /// ([`StagingRing::simulate_nic_write`]); `config.rdma` is ignored.
    #[doc(hidden)]
    pub fn bind_with_simulated_rdma(config: ReceiverConfig, ring: Arc<StagingRing>) -> Result<Self, BindError> {
        Self::bind_with(config, None, Some(BackupRdma::simulated(ring)))
    }

    fn bind_with(config: ReceiverConfig, kept: Option<KeptStandby>, rdma: Option<BackupRdma>) -> Result<Self, BindError> {
        if config.listen.ip().is_unspecified() && !config.allow_unspecified {
            return Err(BindError::Unspecified(config.listen));
        }
        if config.secret.len() < MIN_SECRET_LEN {
            return Err(BindError::WeakSecret);
        }
        let memory_len = usize::try_from(config.memory_bytes)
            .ok()
            .filter(|&m| m > 0 && m % PAGE_SIZE == 0)
            .ok_or(BindError::MemorySize(config.memory_bytes))?;
        if !config.disk_bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(BindError::DiskSize(config.disk_bytes));
        }
        if config.uring {
            UringReader::supported().map_err(BindError::Uring)?;
        }
        let mut config = config;
        if config.cpu_caps.is_none() {
            config.cpu_caps = Some(ftvm_vmm::compat::host_cpu_caps().map_err(BindError::CpuCaps)?);
        }
        if let Some(caps) = &mut config.cpu_caps {
            caps.normalize();
        }
        // Registered once, for the receiver's lifetime: a primary's session only connects a queue
        // pair to it.
        let rdma = match (rdma, &config.rdma) {
            (Some(r), _) => Some(r),
            (None, Some(opts)) => {
                let r = BackupRdma::open(opts).map_err(|source| BindError::Rdma { device: opts.device.clone(), source })?;
                tracing::info!(device = %opts.device, ring_bytes = r.ring().bytes(), "RDMA staging ring registered");
                Some(r)
            }
            (None, None) => None,
        };
        let kept = kept.filter(|k| k.memory.len() == memory_len && !k.state.is_empty());
        let (memory, state, committed) = match kept {
            Some(k) => {
                tracing::info!(epoch = k.epoch.0, "the standby starts as the VM this host handed over");
                (k.memory, k.state, Some(k.epoch))
            }
            None => (StandbyMemory::new(memory_len).map_err(BindError::Memory)?, Vec::new(), None),
        };
        let disk_err = |source| BindError::Disk { path: config.disk_path.clone(), source };
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&config.disk_path)
            .map_err(disk_err)?;
        disk.set_len(config.disk_bytes).map_err(disk_err)?;

        let listen_err = |source| BindError::Listen { addr: config.listen, source };
        let listener = TcpListener::bind(config.listen).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let local_addr = listener.local_addr().map_err(listen_err)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(BindError::Thread)?;

        let receive_io = config.receive_io();
        let inner = Arc::new(Inner {
            config,
            standby: RwLock::new(StandbyState { memory, disk, state, committed, recent_output: VecDeque::new(), recent_ingress: RecentIngress::default() }),
            rdma,
            stats: Mutex::new(ReceiverStats { committed, restorable: committed.is_some(), ..ReceiverStats::default() }),
            bytes_received: AtomicU64::new(0),
            activity: LinkActivity::new(),
            farewell: Mutex::new(None),
            stop: AtomicBool::new(false),
            session_active: AtomicBool::new(false),
            pending_handshakes: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            conns: Mutex::default(),
            workers: Mutex::default(),
        });
        let accept = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("ftvm-backup-accept".into())
                .spawn(move || accept_loop(&inner, &listener, &wake_rx))
                .map_err(BindError::Thread)?
        };
        tracing::info!(%local_addr, io = receive_io, "backup receiver listening");
        Ok(Self { inner, local_addr, accept: Some(accept), wake })
    }

    /// The address the receiver listens on (with the port the system chose, if 0 was given).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The committed standby, when it can be resumed (an epoch committed with a machine state).
    /// While the view is held, the receiver waits before applying the next epoch.
    pub fn committed(&self) -> Option<CommittedView<'_>> {
        let guard = self.inner.read_standby();
        let epoch = guard.committed.filter(|_| !guard.state.is_empty())?;
        Some(CommittedView { epoch, guard })
    }

    /// The time of the last frame from an authenticated primary (heartbeats included), for the
    /// failure detector. The handle stays valid after [`BackupReceiver::stop`].
    pub fn link_activity(&self) -> LinkActivity {
        self.inner.activity.clone()
    }

    /// What the standby holds, as the primary is told on connecting.
    pub fn standby_info(&self) -> StandbyInfo {
        self.inner.read_standby().info(self.inner.config.disk_bytes)
    }

    /// The counters.
    pub fn stats(&self) -> ReceiverStats {
        let mut s = lock(&self.inner.stats).clone();
        s.receive_io = self.inner.config.receive_io();
        s.bytes_received = self.inner.bytes_received.load(Ordering::Relaxed);
        s
    }

    /// Like [`BackupReceiver::stop`], for a takeover: a primary still connected (a live one taken
    /// for dead) is told that this host takes over, so that it stops its copy of the VM.
    pub fn stop_taking_over(self, reason: &str) -> Result<Standby, StopError> {
        *lock(&self.inner.farewell) = Some(reason.to_string());
        self.stop()
    }

    /// Stops accepting, drops the session (discarding any epoch being received), and hands back
    /// the standby for the failover path.
    pub fn stop(mut self) -> Result<Standby, StopError> {
        self.shutdown_threads();
        let inner = Arc::clone(&self.inner);
        drop(self);
        let inner = Arc::try_unwrap(inner).map_err(|_| StopError::StillShared)?;
        let sb = inner.standby.into_inner().unwrap_or_else(|e| e.into_inner());
        let unreleased_output = sb.unreleased_output();
        let replay_ingress = sb.recent_ingress.frames_after(sb.committed);
        Ok(Standby {
            unreleased_output,
            replay_ingress,
            committed: sb.committed,
            memory: sb.memory,
            state: sb.state,
            disk: sb.disk,
            disk_path: inner.config.disk_path,
        })
    }

    fn shutdown_threads(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            // Wakes the accept thread's poll at once (it would notice within a second anyway).
            let _ = (&self.wake).write_all(&[1]);
            let _ = t.join();
        }
        // The accept thread is gone, so no connection can be added after this. With a farewell to
        // send, only the reading side is shut (the session thread's read ends, and it can still
        // write the farewell, within a short timeout).
        let farewell = lock(&self.inner.farewell).is_some();
        for s in lock(&self.inner.conns).values() {
            if farewell {
                let _ = s.set_write_timeout(Some(FAREWELL_WRITE_TIMEOUT));
                let _ = s.shutdown(Shutdown::Read);
            } else {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let workers = std::mem::take(&mut *lock(&self.inner.workers));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for BackupReceiver {
    fn drop(&mut self) {
        self.shutdown_threads();
    }
}

/// Waits for connections until stopped. Bounded waits: poll wakes on a connection, on the stop
/// byte, or after a second at the latest.
fn accept_loop(inner: &Arc<Inner>, listener: &TcpListener, wake: &UnixStream) {
    while !inner.stop.load(Ordering::SeqCst) {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: fds is a valid array of two pollfd for the call, whose descriptors stay open (the
        // listener and the wake socket are borrowed for this function).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "poll on the A-Link listener failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if inner.stop.load(Ordering::SeqCst) {
            break;
        }
        // Several connections may be waiting; take them all (bounded per round).
        for _ in 0..16 {
            match listener.accept() {
                Ok((stream, peer)) => start_connection(inner, stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // For example out of descriptors: back off instead of spinning.
                    tracing::error!(error = %e, "accepting an A-Link connection failed");
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        // Reap finished connection threads so the list stays short.
        let mut workers = lock(&inner.workers);
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *workers).into_iter().partition(|w| w.is_finished());
        *workers = running;
        drop(workers);
        for w in done {
            let _ = w.join();
        }
    }
}

fn start_connection(inner: &Arc<Inner>, stream: TcpStream, peer: SocketAddr) {
    let pending = inner.pending_handshakes.fetch_add(1, Ordering::SeqCst);
    if pending >= inner.config.max_pending_handshakes {
        inner.pending_handshakes.fetch_sub(1, Ordering::SeqCst);
        inner.refused(peer, "too many connections in their handshake".into());
        return;
    }
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    match stream.try_clone() {
        Ok(clone) => {
            lock(&inner.conns).insert(id, clone);
        }
        Err(e) => {
            inner.pending_handshakes.fetch_sub(1, Ordering::SeqCst);
            inner.refused(peer, format!("cannot track the connection: {e}"));
            return;
        }
    }
    let worker = {
        let inner = Arc::clone(inner);
        std::thread::Builder::new().name("ftvm-backup-link".into()).spawn(move || {
            connection(&inner, stream, peer);
            lock(&inner.conns).remove(&id);
        })
    };
    match worker {
        Ok(w) => lock(&inner.workers).push(w),
        Err(e) => {
            inner.pending_handshakes.fetch_sub(1, Ordering::SeqCst);
            lock(&inner.conns).remove(&id);
            inner.refused(peer, format!("cannot start a connection thread: {e}"));
        }
    }
}

/// Decrements the pending-handshake count on every exit path.
struct PendingGuard<'a>(&'a AtomicUsize, bool);

impl PendingGuard<'_> {
    fn done(&mut self) {
        if !self.1 {
            self.1 = true;
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

/// Seals one frame into a buffer and writes it with one system call: small frames (acks, answers)
/// must not leave as three segments with TCP_NODELAY.
fn send_small(stream: &TcpStream, sealer: &mut FrameSealer, kind: FrameKind, epoch: u64, payload: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
    sealer.write(&mut out, kind, 0, epoch, &[payload]).map_err(|e| match e {
        FrameError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    })?;
    (&*stream).write_all(&out)
}

fn connection(inner: &Inner, stream: TcpStream, peer: SocketAddr) {
    let mut pending = PendingGuard(&inner.pending_handshakes, false);
    let cfg = &inner.config;
    let setup = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        return inner.refused(peer, format!("cannot configure the socket: {e}"));
    }
    // One deadline for the whole handshake: a peer cannot hold a slot by dribbling bytes.
    let deadline = Instant::now() + cfg.handshake_timeout.max(Duration::from_millis(1));
    let session = match handshake::respond(&mut DeadlineStream::new(&stream, deadline), &cfg.secret) {
        Ok(s) => s,
        Err(e) => return inner.refused(peer, format!("handshake failed: {}", ErrorChain(&e))),
    };
    pending.done();
    lock(&inner.stats).sessions += 1;
    let session_minor = session.minor;
    // Not yet a session: only the peer's first frame sealed with the session key proves that it
    // derived the keys from this side's fresh nonce (a recorded handshake replayed later cannot);
    // until then it holds no slot and can end nothing.
    let mut session = Session::new(inner, &stream, session.sealer, session.opener, peer);
    session.minor = session_minor;
    let result = session.run();
    let discarded = session.discard();
    session.end(&result);
    let _ = stream.shutdown(Shutdown::Both);
    let committed = inner.read_standby().committed;
    match &result {
        Ok(()) => tracing::info!(%peer, ?committed, "primary disconnected"),
        Err(e) => tracing::warn!(
            %peer,
            reason = %ErrorChain(e),
            discarded_epoch = ?discarded,
            ?committed,
            "A-Link session dropped; the committed standby is kept"
        ),
    }
    // The slot is released under the stats lock, so that "not connected" in the counters means a
    // new primary is accepted, and a new session's "connected" cannot be overwritten by this one.
    let mut s = lock(&inner.stats);
    s.sessions_ended += 1;
    if discarded.is_some() {
        s.epochs_discarded += 1;
    }
    if let Err(e) = &result {
        s.last_error = Some(ErrorChain(e).to_string());
    }
    if session.confirmed {
        s.connected = None;
        s.primary_term = None;
        s.sync = None;
        inner.session_active.store(false, Ordering::SeqCst);
    }
}

/// Pages of one Pages frame, staged: the frame's payload is kept as it arrived.
#[derive(Debug)]
struct StagedPages {
    ranges: Vec<PageRange>,
    data_offset: usize,
    payload: Vec<u8>,
}

/// Pages of one frame of the epoch, in frame order (a later frame's copy of a page wins).
#[derive(Debug)]
enum Staged {
    /// A Pages frame.
    Frame(StagedPages),
    /// An RdmaPages descriptor, checked against the ring: its pages are read out of the ring at
    /// the commit.
    Ring(ValidPlacement),
}

/// The RDMA part of a session: the primary's queue pair, and the checks of its placements.
#[derive(Debug)]
struct SessionRdma {
    /// Kept until the session ends: dropping it ends the primary's access to the ring.
    _accepted: AcceptedRdma,
    validator: RingValidator,
}

/// The epoch being received.
#[derive(Debug)]
struct Staging {
    begin: EpochBegin,
    digest: EpochDigest,
    pages: u64,
    disk_writes: u64,
    image_bytes: u64,
    staged_pages: Vec<Staged>,
    state: Vec<u8>,
    /// HeldOutput payloads, checked.
    output: Vec<Vec<u8>>,
    output_bytes: u64,
    span: tracing::Span,
}

/// Buffers kept between frames.
const POOL_BUFFERS: usize = 16;
/// Committed epochs whose held output is kept for a takeover: more than the primary keeps in flight
/// (an acknowledged epoch's output may still be unreleased when the primary dies).
const RECENT_OUTPUT_EPOCHS: u64 = 64;
/// Most bytes of held output kept (and staged for one epoch).
const RECENT_OUTPUT_BYTES: usize = 32 << 20;
/// Longest wait to hand a takeover notice to a primary's socket.
const FAREWELL_WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// Largest buffer kept between frames.
const POOL_BUFFER_MAX: usize = 8 << 20;
/// After a failed answer, how long to wait for each frame that may carry the primary's goodbye.
const PENDING_GOODBYE_WAIT: Duration = Duration::from_millis(20);
/// After a failed answer, most frames read in search of the primary's goodbye.
const PENDING_GOODBYE_FRAMES: usize = 64;

/// What a session reads its frames through: buffered, stamping the link's activity.
type SessionInput<'a> = BufReader<StampingReader<LinkReader<'a>>>;

struct Session<'a> {
    inner: &'a Inner,
    stream: &'a TcpStream,
    sealer: FrameSealer,
    opener: ftvm_proto::frame::FrameOpener,
    staging: Option<Staging>,
    journal: DiskJournal,
    pool: Vec<Vec<u8>>,
    memory_pages: u64,
    peer: SocketAddr,
    /// The primary sent a frame under the session key: the session counts.
    confirmed: bool,
    /// The lease term the primary announced.
    term: Option<u64>,
    /// The protocol minor both sides use: from 2 on, the primary speaks first (its `LeaseTerm`),
    /// and the standby information answers it.
    minor: u8,
    /// An epoch has begun in this session (the RDMA exchange comes before any).
    began: bool,
    /// The primary's pages come by RDMA (it sent its endpoint, and this side connected to it).
    rdma: Option<SessionRdma>,
}

impl<'a> Session<'a> {
    fn new(
        inner: &'a Inner,
        stream: &'a TcpStream,
        sealer: FrameSealer,
        opener: ftvm_proto::frame::FrameOpener,
        peer: SocketAddr,
    ) -> Self {
        let journal = DiskJournal::new(usize::try_from(inner.config.max_staging_bytes).unwrap_or(usize::MAX));
        let memory_pages = inner.config.memory_bytes / PAGE_SIZE as u64;
        Self {
            inner,
            stream,
            sealer,
            opener,
            staging: None,
            journal,
            pool: Vec::new(),
            memory_pages,
            peer,
            confirmed: false,
            term: None,
            minor: ftvm_proto::frame::PROTOCOL_MINOR,
            began: false,
            rdma: None,
        }
    }

    fn send_standby_info(&mut self) -> Result<(), SessionError> {
        // What the standby holds and (from 1.5) the digest of its state, under one look.
        let (info, digest) = {
            let sb = self.inner.read_standby();
            let info = sb.info(self.inner.config.disk_bytes);
            let digest = (self.minor >= 5 && info.restorable).then(|| *blake3::hash(&sb.state).as_bytes());
            (info, digest)
        };
        send_small(self.stream, &mut self.sealer, FrameKind::StandbyInfo, 0, &info.encode()).map_err(SessionError::Send)?;
        // From 1.3 what this host's KVM can restore follows, for the primary to judge.
        if self.minor >= 3 {
            let caps = self.inner.config.cpu_caps.as_ref().map(HostCpuCaps::encode).unwrap_or_else(|| HostCpuCaps::default().encode());
            send_small(self.stream, &mut self.sealer, FrameKind::HostCpu, 0, &caps).map_err(SessionError::Send)?;
        }
        // From 1.5 the disk's write-intent marks follow: the primary copies only what may differ.
        if self.minor >= 5 {
            let marks = match &self.inner.config.intent {
                Some(intent) => intent.lock().marks(),
                None => DiskMarks::unknown(DEFAULT_REGION_BYTES),
            };
            send_small(self.stream, &mut self.sealer, FrameKind::DiskMarks, 0, &marks.encode()).map_err(SessionError::Send)?;
            let digest = digest.unwrap_or([0; 32]);
            send_small(self.stream, &mut self.sealer, FrameKind::StandbyDigest, 0, &digest).map_err(SessionError::Send)?;
        }
        Ok(())
    }

    /// The primary's first authenticated frame: from now on the session is the primary's, its
    /// end is judged by the failure detector, and it voids an earlier goodbye.
    fn confirm(&mut self) -> Result<(), SessionError> {
        if self.inner.session_active.swap(true, Ordering::SeqCst) {
            self.inner.refused(self.peer, "another primary is connected".into());
            let _ = send_small(self.stream, &mut self.sealer, FrameKind::Goodbye, 0, b"another primary is connected");
            return Err(SessionError::Busy);
        }
        let link_timeout = Some(self.inner.config.link_timeout.max(Duration::from_millis(1)));
        self.stream.set_read_timeout(link_timeout).map_err(SessionError::Send)?;
        self.confirmed = true;
        // Input sent ahead by an earlier session is in whatever this one commits, or was never
        // committed by anyone.
        self.inner.write_standby().recent_ingress.clear();
        lock(&self.inner.stats).connected = Some(self.peer);
        tracing::info!(peer = %self.peer, "primary connected");
        self.inner.activity.session_started(self.stream.try_clone().ok());
        Ok(())
    }

    /// Tells the failure detector how the session ended, and the primary what it must know: that
    /// this host takes over (it must stop), or that its session was refused (it goes on alone, and
    /// this host will not take over).
    fn end(&mut self, result: &Result<(), SessionError>) {
        let activity = &self.inner.activity;
        if !self.confirmed {
            // Nobody proved to be a primary: nothing to judge, nobody to tell.
            tracing::warn!(peer = %self.peer, ?result, "an A-Link session ended before its first authenticated frame (a replayed or broken handshake): ignored");
            return;
        }
        if self.inner.stop.load(Ordering::SeqCst) {
            if let Some(reason) = lock(&self.inner.farewell).clone() {
                match send_small(self.stream, &mut self.sealer, FrameKind::TakingOver, 0, reason.as_bytes()) {
                    Ok(()) => tracing::warn!(%reason, "told the primary that this host takes over"),
                    Err(e) => tracing::info!(error = %e, "could not tell the primary that this host takes over"),
                }
            }
            activity.session_ended(SessionEnd::Refused);
            return;
        }
        let vanished = match result {
            // The link closed between frames (a goodbye was recorded by its own arm first).
            Ok(()) => true,
            // The primary's side of the link closed, reset or fell silent past the link timeout.
            Err(SessionError::ClosedMidEpoch(_) | SessionError::Send(_) | SessionError::Stopping) => true,
            Err(SessionError::Frame(FrameError::Closed | FrameError::Truncated | FrameError::Io(_))) => true,
            Err(_) => false,
        };
        if vanished {
            activity.session_ended(SessionEnd::Vanished);
            return;
        }
        // This side refuses what the primary sent: it must go on alone, and this host must not
        // take over a VM that still runs.
        let reason = match result {
            Err(e) => format!("the backup refused the session: {}", ErrorChain(e)),
            Ok(()) => String::new(),
        };
        let _ = send_small(self.stream, &mut self.sealer, FrameKind::Goodbye, 0, reason.as_bytes());
        activity.session_ended(SessionEnd::Refused);
    }

    /// A planned switchover: the primary stopped its VM at `epoch` and asks this side to take over.
    /// Accepted only at an epoch boundary, for the epoch this standby holds and can resume (the
    /// primary waited for its acknowledgement): anything else would resume a VM the primary did
    /// not stop there, and ends the session as refused (the primary then keeps its VM). Accepted,
    /// the primary is told (it then gives the lease up) and the daemon takes over at once.
    fn on_handover(&mut self, epoch: EpochId) -> Result<(), SessionError> {
        let committed = self.inner.read_standby().committed;
        let restorable = lock(&self.inner.stats).restorable;
        if self.staging.is_some() || committed != Some(epoch) || !restorable {
            return Err(SessionError::BadHandover { epoch, committed, restorable });
        }
        let reason = format!("the backup takes over from epoch {} (switchover)", epoch.0);
        send_small(self.stream, &mut self.sealer, FrameKind::TakingOver, 0, reason.as_bytes()).map_err(SessionError::Send)?;
        tracing::warn!(epoch = epoch.0, "the primary hands the VM over: taking over from its last epoch");
        self.inner.activity.session_ended(SessionEnd::HandedOver);
        Ok(())
    }

    /// Drops the epoch being received, if any; returns its number.
    fn discard(&mut self) -> Option<EpochId> {
        self.journal.discard();
        if let Some(r) = self.rdma.as_mut() {
            r.validator.end();
        }
        let staging = self.staging.take()?;
        Some(staging.begin.epoch)
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        // Keep a few frame-sized buffers; a rare huge one is given back.
        if self.pool.len() < POOL_BUFFERS && buf.capacity() <= POOL_BUFFER_MAX {
            self.pool.push(buf);
        }
    }

    fn run(&mut self) -> Result<(), SessionError> {
        let cfg = &self.inner.config;
        let link_timeout = Some(cfg.link_timeout.max(Duration::from_millis(1)));
        self.stream.set_write_timeout(link_timeout).map_err(SessionError::Send)?;
        // Until the primary's first frame proves the session, one deadline for all of it.
        let confirm_by = Instant::now() + cfg.handshake_timeout.max(Duration::from_millis(1));
        // From 1.2 the primary's first frame (its lease term) comes first and the standby
        // information answers it, once the session holds the slot; a 1.1 primary waits for it.
        let mut info_sent = self.minor < 2;
        if info_sent {
            self.send_standby_info()?;
        }

        // Small: it saves system calls on headers and small frames, while the payload of a large
        // frame is read straight into its buffer (a large read bypasses an empty BufReader) instead
        // of being copied through this one.
        let link = if cfg.uring {
            // Read only once the session is confirmed, and then under the link timeout.
            let mut u = UringReader::new(self.stream).map_err(SessionError::Send)?;
            u.set_read_timeout(link_timeout);
            LinkReader::Uring(Box::new(u))
        } else {
            LinkReader::Socket(self.stream)
        };
        let mut input = BufReader::with_capacity(16 << 10, StampingReader::new(link, self.inner.activity.clone()));
        let result = self.receive(&mut input, confirm_by, &mut info_sent);
        if let Err(SessionError::Send(e)) = &result {
            // A primary that says goodbye and closes at once can make an answer fail before its
            // goodbye is read: look for it among what already arrived before calling this a loss.
            if self.confirmed && self.pending_goodbye(&mut input) {
                tracing::info!(error = %e, "answering the primary failed after its goodbye had arrived");
                return Ok(());
            }
        }
        result
    }

    /// Whether a goodbye from the primary is among the bytes that already arrived (read with a
    /// short deadline and a bound on frames; everything else is passed over, as the session is
    /// over and nothing it would commit could be acknowledged anyway).
    fn pending_goodbye(&mut self, input: &mut SessionInput<'_>) -> bool {
        if input.get_mut().get_mut().set_read_timeout(Some(PENDING_GOODBYE_WAIT)).is_err() {
            return false;
        }
        let mut buf = Vec::new();
        for _ in 0..PENDING_GOODBYE_FRAMES {
            match self.opener.read_into(input, &mut buf) {
                Ok(h) if h.kind == FrameKind::Goodbye => {
                    tracing::info!(reason = %String::from_utf8_lossy(&buf), "primary said goodbye");
                    self.inner.activity.goodbye();
                    return true;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    /// Receives frames until the primary leaves, a frame is refused, the link times out, or the
    /// receiver stops.
    fn receive(&mut self, input: &mut SessionInput<'_>, confirm_by: Instant, info_sent: &mut bool) -> Result<(), SessionError> {
        loop {
            if self.inner.stop.load(Ordering::SeqCst) {
                return Err(SessionError::Stopping);
            }
            let mut buf = self.pool.pop().unwrap_or_default();
            let read = if self.confirmed {
                self.opener.read_into(input, &mut buf)
            } else {
                // Nothing was read through `input` yet, so it holds nothing buffered.
                self.opener.read_into(&mut DeadlineStream::new(self.stream, confirm_by), &mut buf)
            };
            let header = match read {
                Ok(h) => h,
                Err(FrameError::Closed) => {
                    return match &self.staging {
                        Some(s) => Err(SessionError::ClosedMidEpoch(s.begin.epoch)),
                        None => Ok(()),
                    }
                }
                Err(e) => return Err(SessionError::Frame(e)),
            };
            self.inner.bytes_received.fetch_add((HEADER_LEN + buf.len() + TAG_LEN) as u64, Ordering::Relaxed);
            if !self.confirmed {
                self.confirm()?;
            }
            if !*info_sent {
                if header.kind != FrameKind::LeaseTerm {
                    return Err(SessionError::Unexpected { kind: header.kind, context: "before the lease term" });
                }
                self.send_standby_info()?;
                *info_sent = true;
            }
            // The tag of an authenticated frame is always there after read_into succeeded.
            let tag = self.opener.last_tag().unwrap_or_default();
            match header.kind {
                FrameKind::Heartbeat => {
                    if buf.len() > 64 {
                        return Err(SessionError::Unexpected { kind: header.kind, context: "with a payload over 64 bytes" });
                    }
                    send_small(self.stream, &mut self.sealer, FrameKind::HeartbeatReply, header.epoch, &buf)
                        .map_err(SessionError::Send)?;
                    self.recycle(buf);
                }
                FrameKind::Goodbye => {
                    let reason = String::from_utf8_lossy(&buf).into_owned();
                    tracing::info!(%reason, "primary said goodbye");
                    self.inner.activity.goodbye();
                    return match &self.staging {
                        Some(s) => Err(SessionError::ClosedMidEpoch(s.begin.epoch)),
                        None => Ok(()),
                    };
                }
                FrameKind::Handover => {
                    self.on_handover(EpochId(header.epoch))?;
                    return Ok(());
                }
                FrameKind::EpochBegin => {
                    self.on_begin(header.epoch, &buf, &tag)?;
                    self.recycle(buf);
                }
                FrameKind::Pages => self.on_pages(header.epoch, buf, &tag)?,
                FrameKind::PageDeltas if self.minor >= 9 => self.on_page_deltas(header.epoch, buf, &tag)?,
                FrameKind::RdmaEndpoint => {
                    self.on_rdma_endpoint(&buf)?;
                    self.recycle(buf);
                }
                FrameKind::RdmaPages => self.on_rdma_pages(header.epoch, buf, &tag)?,
                FrameKind::MachineState => {
                    self.on_state(header.epoch, &buf, &tag)?;
                    self.recycle(buf);
                }
                FrameKind::DiskWrites => {
                    self.on_disk_writes(header.epoch, &buf, &tag)?;
                    self.recycle(buf);
                }
                FrameKind::DiskImage => {
                    self.on_disk_image(header.epoch, &buf, &tag)?;
                    self.recycle(buf);
                }
                FrameKind::HeldOutput => self.on_output(header.epoch, buf, &tag)?,
                FrameKind::Ingress => self.on_ingress(header.epoch, buf)?,
                FrameKind::LeaseTerm => {
                    let LeaseTerm { term, late_input } = LeaseTerm::decode(&buf).map_err(|_| SessionError::Unexpected {
                        kind: header.kind,
                        context: "whose payload is neither 8 nor 24 bytes",
                    })?;
                    tracing::info!(term, late_input = late_input.is_some(), "the primary's lease term");
                    if let Some(inbox) = &self.inner.config.late_input {
                        inbox.bind(term, late_input);
                    }
                    self.term = Some(term);
                    lock(&self.inner.stats).primary_term = Some(term);
                    self.recycle(buf);
                }
                FrameKind::EpochCommit => {
                    self.on_commit(header.epoch, &buf)?;
                    self.recycle(buf);
                }
                kind => return Err(SessionError::Unexpected { kind, context: "from the primary" }),
            }
        }
    }

    /// The open epoch, checked against the frame's header.
    fn staging_for(&mut self, kind: FrameKind, header_epoch: u64) -> Result<&mut Staging, SessionError> {
        open_epoch(&mut self.staging, kind, header_epoch)
    }

    /// The primary's RDMA queue pair, after the set-up frames and before any epoch (once, and
    /// part of no epoch's digest): with a staging ring, a queue pair connected to it and this
    /// side's endpoint with the ring in answer; without one, the session is refused (the primary's
    /// connect fails with the reason).
    fn on_rdma_endpoint(&mut self, payload: &[u8]) -> Result<(), SessionError> {
        if self.began || self.staging.is_some() || self.rdma.is_some() {
            return Err(SessionError::Unexpected { kind: FrameKind::RdmaEndpoint, context: "after the link's set-up" });
        }
        let peer = ftvm_proto::rdma::RdmaEndpoint::decode(payload)
            .map_err(|source| SessionError::Payload { kind: FrameKind::RdmaEndpoint, source })?;
        let rdma = self.inner.rdma.as_ref().ok_or(SessionError::NoRdma)?;
        let (accepted, reply) = rdma.accept(&peer).map_err(SessionError::Rdma)?;
        send_small(self.stream, &mut self.sealer, FrameKind::RdmaEndpoint, 0, &reply.encode()).map_err(SessionError::Send)?;
        tracing::info!(peer = %self.peer, qpn = peer.qpn, ring_bytes = rdma.ring().bytes(), "the primary's pages come by RDMA");
        self.rdma = Some(SessionRdma { _accepted: accepted, validator: RingValidator::new(rdma.ring().bytes()) });
        Ok(())
    }

    fn on_begin(&mut self, header_epoch: u64, payload: &[u8], tag: &[u8; 32]) -> Result<(), SessionError> {
        if self.staging.is_some() {
            return Err(SessionError::Unexpected { kind: FrameKind::EpochBegin, context: "inside another epoch" });
        }
        let begin = EpochBegin::decode(payload).map_err(|source| SessionError::Payload { kind: FrameKind::EpochBegin, source })?;
        if begin.epoch.0 != header_epoch {
            return Err(SessionError::WrongEpoch { open: begin.epoch, got: header_epoch });
        }
        let cfg = &self.inner.config;
        let max = cfg.max_staging_bytes;
        if begin.state_len > max {
            return Err(SessionError::StagingFull { epoch: begin.epoch, max });
        }
        if begin.initial_sync {
            // A full copy cut halfway leaves a disk that is neither the old copy nor the new one:
            // its record must say it knows nothing before the first byte lands. (An incremental
            // copy cut halfway is covered by the marks both sides keep until it commits.)
            if let Some(intent) = self.inner.config.intent.as_ref().filter(|_| begin.disk_image_bytes >= self.inner.config.disk_bytes) {
                intent.lock().begin_full_copy().map_err(SessionError::Intent)?;
            }
            // The old standby is of no use once the primary starts over (see the module docs).
            self.inner.write_standby().invalidate();
            let mut s = lock(&self.inner.stats);
            s.committed = None;
            s.restorable = false;
            s.sync = Some(SyncProgress {
                epoch: begin.epoch,
                pages_received: 0,
                pages_total: begin.page_count,
                disk_bytes_received: 0,
                disk_bytes_total: begin.disk_image_bytes,
            });
        } else {
            let committed = self.inner.read_standby().committed;
            if committed.and_then(|c| c.0.checked_add(1)) != Some(begin.epoch.0) {
                return Err(SessionError::EpochOrder { epoch: begin.epoch, committed });
            }
            if begin.disk_image_bytes != 0 {
                return Err(SessionError::BadBegin("disk image outside an initial synchronisation"));
            }
            if begin.state_len == 0 {
                return Err(SessionError::BadBegin("an incremental epoch without machine state"));
            }
            let staged = begin.page_count.checked_mul(PAGE_SIZE as u64).and_then(|p| p.checked_add(begin.state_len));
            if staged.is_none_or(|b| b > max) {
                return Err(SessionError::StagingFull { epoch: begin.epoch, max });
            }
        }
        let span = tracing::debug_span!(
            "epoch",
            epoch = begin.epoch.0,
            pages = begin.page_count,
            initial_sync = begin.initial_sync,
            apply_us = tracing::field::Empty
        );
        let mut digest = EpochDigest::new(begin.epoch);
        digest.add_frame(tag);
        self.journal.begin(begin.epoch);
        self.began = true;
        if let Some(r) = self.rdma.as_mut() {
            r.validator.begin(begin.epoch);
        }
        // Reserve up front for a typical state; a larger one grows as it arrives.
        let state = Vec::with_capacity(usize::try_from(begin.state_len.min(16 << 20)).unwrap_or(0));
        self.staging = Some(Staging {
            begin,
            digest,
            pages: 0,
            disk_writes: 0,
            image_bytes: 0,
            staged_pages: Vec::new(),
            state,
            output: Vec::new(),
            output_bytes: 0,
            span,
        });
        Ok(())
    }

    fn on_pages(&mut self, header_epoch: u64, payload: Vec<u8>, tag: &[u8; 32]) -> Result<(), SessionError> {
        let memory_pages = self.memory_pages;
        let inner = self.inner;
        let s = self.staging_for(FrameKind::Pages, header_epoch)?;
        let _entered = s.span.enter();
        let view = PagesView::decode(&payload, memory_pages).map_err(|source| SessionError::Payload { kind: FrameKind::Pages, source })?;
        let n = view.page_count();
        if s.pages.saturating_add(n) > s.begin.page_count {
            return Err(SessionError::OverAnnounced { epoch: s.begin.epoch, what: "pages", announced: s.begin.page_count });
        }
        s.digest.add_frame(tag);
        s.pages += n;
        if s.begin.initial_sync {
            // Nothing committed to protect: straight into the standby.
            let mut sb = inner.write_standby();
            copy_runs(sb.memory.as_mut_slice(), view.runs());
            drop(sb);
            if let Some(p) = lock(&inner.stats).sync.as_mut() {
                p.pages_received = s.pages;
            }
            drop(view);
            drop(_entered);
            self.recycle(payload);
        } else {
            let ranges = view.ranges().to_vec();
            let data_offset = payload.len() - n as usize * PAGE_SIZE;
            drop(view);
            drop(_entered);
            s.staged_pages.push(Staged::Frame(StagedPages { ranges, data_offset, payload }));
        }
        Ok(())
    }

    /// Pages of the epoch as differences from the standby's copies (1.9): each page is made now,
    /// from the committed copy, which is the one the primary made the delta from (the epochs
    /// before were applied in order), and checked against the primary's CRC; the pages made are
    /// staged as a Pages frame's would be.
    fn on_page_deltas(&mut self, header_epoch: u64, payload: Vec<u8>, tag: &[u8; 32]) -> Result<(), SessionError> {
        let memory_pages = self.memory_pages;
        let inner = self.inner;
        let mut made = self.pool.pop().unwrap_or_default();
        made.clear();
        let s = self.staging_for(FrameKind::PageDeltas, header_epoch)?;
        let epoch = s.begin.epoch;
        if s.begin.initial_sync {
            return Err(SessionError::Unexpected { kind: FrameKind::PageDeltas, context: "in a synchronisation" });
        }
        let _entered = s.span.enter();
        let records = page_delta::decode(&payload, memory_pages).map_err(|source| SessionError::PageDelta { epoch, source })?;
        let n = records.len() as u64;
        if s.pages.saturating_add(n) > s.begin.page_count {
            return Err(SessionError::OverAnnounced { epoch, what: "pages", announced: s.begin.page_count });
        }
        let mut made_pages = PageRangeSet::new();
        {
            let sb = inner.read_standby();
            let memory = sb.memory.as_slice();
            made.reserve(records.len() * PAGE_SIZE);
            for d in &records {
                // Decoded against the memory's size: the page is inside it.
                let at = d.pfn as usize * PAGE_SIZE;
                let base = memory.get(at..at + PAGE_SIZE).ok_or(SessionError::PageDelta {
                    epoch,
                    source: page_delta::PageDeltaError::Outside { pfn: d.pfn, pages: memory_pages },
                })?;
                page_delta::make_page(base, d, &mut made).map_err(|source| SessionError::PageDelta { epoch, source })?;
                // Ascending (decode checked it): the set's ranges list the pages in `made`'s order.
                made_pages.insert(d.pfn, 1);
            }
        }
        s.digest.add_frame(tag);
        s.pages += n;
        drop(_entered);
        s.staged_pages.push(Staged::Frame(StagedPages { ranges: made_pages.ranges().to_vec(), data_offset: 0, payload: made }));
        self.recycle(payload);
        Ok(())
    }

    /// Where the primary's NIC put some of the epoch's pages in the ring (instead of a Pages
    /// frame). Checked against the ring now; the ring is read at the commit, not before (the
    /// primary sends its commit once every write has completed).
    fn on_rdma_pages(&mut self, header_epoch: u64, payload: Vec<u8>, tag: &[u8; 32]) -> Result<(), SessionError> {
        let memory_pages = self.memory_pages;
        let s = open_epoch(&mut self.staging, FrameKind::RdmaPages, header_epoch)?;
        let _entered = s.span.enter();
        if s.begin.initial_sync {
            return Err(SessionError::Unexpected { kind: FrameKind::RdmaPages, context: "in an initial synchronisation" });
        }
        let rdma = self.rdma.as_mut().ok_or(SessionError::Unexpected { kind: FrameKind::RdmaPages, context: "on a link without RDMA" })?;
        let desc = ftvm_proto::rdma::RdmaPages::decode(&payload, memory_pages)
            .map_err(|source| SessionError::Payload { kind: FrameKind::RdmaPages, source })?;
        if s.pages.saturating_add(desc.page_count()) > s.begin.page_count {
            return Err(SessionError::OverAnnounced { epoch: s.begin.epoch, what: "pages", announced: s.begin.page_count });
        }
        let epoch = s.begin.epoch;
        let placement = rdma.validator.accept(desc).map_err(|source| SessionError::Placement { epoch, source })?;
        s.digest.add_frame(tag);
        s.pages += placement.page_count();
        s.staged_pages.push(Staged::Ring(placement));
        drop(_entered);
        self.recycle(payload);
        Ok(())
    }

    fn on_state(&mut self, header_epoch: u64, payload: &[u8], tag: &[u8; 32]) -> Result<(), SessionError> {
        let s = self.staging_for(FrameKind::MachineState, header_epoch)?;
        if (s.state.len() as u64).saturating_add(payload.len() as u64) > s.begin.state_len {
            return Err(SessionError::OverAnnounced { epoch: s.begin.epoch, what: "state bytes", announced: s.begin.state_len });
        }
        s.digest.add_frame(tag);
        s.state.extend_from_slice(payload);
        Ok(())
    }

    fn on_output(&mut self, header_epoch: u64, payload: Vec<u8>, tag: &[u8; 32]) -> Result<(), SessionError> {
        let s = self.staging_for(FrameKind::HeldOutput, header_epoch)?;
        if s.begin.initial_sync {
            return Err(SessionError::Unexpected { kind: FrameKind::HeldOutput, context: "in an initial synchronisation" });
        }
        decode_output(&payload).map_err(|source| SessionError::Payload { kind: FrameKind::HeldOutput, source })?;
        s.output_bytes += payload.len() as u64;
        if s.output_bytes > RECENT_OUTPUT_BYTES as u64 {
            return Err(SessionError::StagingFull { epoch: s.begin.epoch, max: RECENT_OUTPUT_BYTES as u64 });
        }
        s.digest.add_frame(tag);
        s.output.push(payload);
        Ok(())
    }

    /// Guest input the primary took in during epoch `epoch` (minor 7 and later; between epoch
    /// frames or among them, outside every digest): kept until that epoch commits.
    fn on_ingress(&mut self, epoch: u64, payload: Vec<u8>) -> Result<(), SessionError> {
        if self.minor < 7 {
            return Err(SessionError::Unexpected { kind: FrameKind::Ingress, context: "before protocol 1.7" });
        }
        let frames =
            decode_output(&payload).map_err(|source| SessionError::Payload { kind: FrameKind::Ingress, source })?.len();
        let (kept, held) = {
            let mut sb = self.inner.write_standby();
            let committed = sb.committed;
            let kept = sb.recent_ingress.keep(epoch, payload, frames, committed);
            (kept, sb.recent_ingress.frame_count() as u64)
        };
        let mut st = lock(&self.inner.stats);
        st.ingress_frames_held = held;
        match kept {
            Kept::Yes => {}
            Kept::Late => st.ingress_late += 1,
            Kept::Full => st.ingress_over_limit += 1,
        }
        Ok(())
    }

    fn on_disk_writes(&mut self, header_epoch: u64, payload: &[u8], tag: &[u8; 32]) -> Result<(), SessionError> {
        let disk_bytes = self.inner.config.disk_bytes;
        let max = self.inner.config.max_staging_bytes;
        let s = self.staging.as_mut().ok_or(SessionError::Unexpected { kind: FrameKind::DiskWrites, context: "outside an epoch" })?;
        if s.begin.epoch.0 != header_epoch {
            return Err(SessionError::WrongEpoch { open: s.begin.epoch, got: header_epoch });
        }
        let view = DiskWritesView::decode(payload, disk_bytes)
            .map_err(|source| SessionError::Payload { kind: FrameKind::DiskWrites, source })?;
        let n = view.entries().len() as u64;
        if s.disk_writes.saturating_add(n) > s.begin.disk_write_count {
            return Err(SessionError::OverAnnounced { epoch: s.begin.epoch, what: "disk writes", announced: s.begin.disk_write_count });
        }
        s.digest.add_frame(tag);
        s.disk_writes += n;
        let epoch = s.begin.epoch;
        for (sector, bytes) in view.entries() {
            self.journal.append(*sector, bytes).map_err(|e| match e {
                AppendError::Full { .. } | AppendError::NotOpen => SessionError::StagingFull { epoch, max },
            })?;
        }
        Ok(())
    }

    fn on_disk_image(&mut self, header_epoch: u64, payload: &[u8], tag: &[u8; 32]) -> Result<(), SessionError> {
        let disk_bytes = self.inner.config.disk_bytes;
        let inner = self.inner;
        let s = self.staging_for(FrameKind::DiskImage, header_epoch)?;
        if !s.begin.initial_sync {
            return Err(SessionError::Unexpected { kind: FrameKind::DiskImage, context: "outside an initial synchronisation" });
        }
        let view =
            DiskImageView::decode(payload, disk_bytes).map_err(|source| SessionError::Payload { kind: FrameKind::DiskImage, source })?;
        let len = view.data.len() as u64;
        if s.image_bytes.saturating_add(len) > s.begin.disk_image_bytes {
            return Err(SessionError::OverAnnounced {
                epoch: s.begin.epoch,
                what: "disk image bytes",
                announced: s.begin.disk_image_bytes,
            });
        }
        s.digest.add_frame(tag);
        s.image_bytes += len;
        // Nothing committed to protect during a sync: straight onto the standby disk.
        inner.read_standby().disk.write_all_at(view.data, view.offset).map_err(SessionError::DiskImage)?;
        if let Some(p) = lock(&inner.stats).sync.as_mut() {
            p.disk_bytes_received = s.image_bytes;
        }
        Ok(())
    }

    fn on_commit(&mut self, header_epoch: u64, payload: &[u8]) -> Result<(), SessionError> {
        let s = self.staging_for(FrameKind::EpochCommit, header_epoch)?;
        let commit =
            EpochCommit::decode(payload).map_err(|source| SessionError::Payload { kind: FrameKind::EpochCommit, source })?;
        let epoch = s.begin.epoch;
        if commit.epoch != epoch {
            return Err(SessionError::WrongEpoch { open: epoch, got: commit.epoch.0 });
        }
        let b = &s.begin;
        for (what, announced, received, committed) in [
            ("pages", b.page_count, s.pages, commit.pages),
            ("state bytes", b.state_len, s.state.len() as u64, commit.state_bytes),
            ("disk writes", b.disk_write_count, s.disk_writes, commit.disk_writes),
            ("disk image bytes", b.disk_image_bytes, s.image_bytes, commit.disk_image_bytes),
        ] {
            if announced != received || received != committed {
                return Err(SessionError::Totals { epoch, what, announced, received, committed });
            }
        }
        // blake3::Hash compares in constant time; not needed for a digest, but it costs nothing.
        if blake3::Hash::from(s.digest.finish()) != blake3::Hash::from(commit.digest) {
            return Err(SessionError::Digest(epoch));
        }
        // Every page of the epoch in hand and checked (RDMA: read out of the ring and hashed)
        // before the standby is touched.
        let staged_pages = self.pages_to_apply(epoch)?;
        if let Some(r) = self.rdma.as_mut() {
            r.validator.end();
        }
        let Some(mut staging) = self.staging.take() else {
            return Err(SessionError::Unexpected { kind: FrameKind::EpochCommit, context: "outside an epoch" });
        };
        // A state sent as a delta from the previous epoch's (1.6) becomes the full state before
        // anything is applied: one that does not fit the state held refuses the epoch whole.
        if ftvm_proto::state_delta::is_delta(&staging.state) {
            let full = ftvm_proto::state_delta::apply(&self.inner.read_standby().state, &staging.state)
                .map_err(|source| SessionError::StateDelta { epoch, source })?;
            staging.state = full;
        }
        let span = staging.span.clone();
        let _entered = span.enter();
        let started = Instant::now();
        let sync = self.inner.config.disk_sync == DiskSync::DataSync;
        let pages_applied;
        let disk_bytes;
        let restorable;
        let ingress_held;
        {
            let mut sb = self.inner.write_standby();
            // The disk first: it is the only part that can fail. If it fails half-way, the standby
            // holds part of an epoch and must not be resumed.
            disk_bytes = match self.journal.apply(epoch, &sb.disk, sync) {
                Ok(n) => n,
                Err(source) => {
                    sb.invalidate();
                    return Err(SessionError::Apply { epoch, source });
                }
            };
            // A synchronisation's image is made durable before the record says the copies are
            // equal (once per synchronisation, whatever the per-epoch setting).
            let intent = self.inner.config.intent.as_ref().filter(|_| staging.begin.initial_sync);
            if (sync || intent.is_some()) && staging.image_bytes > 0 {
                if let Err(e) = sb.disk.sync_data() {
                    sb.invalidate();
                    return Err(SessionError::Apply { epoch, source: ApplyError::Sync(e) });
                }
            }
            let memory = sb.memory.as_mut_slice();
            let mut pages = 0u64;
            for sp in &staged_pages {
                let data = sp.payload.get(sp.data_offset..).unwrap_or_default();
                pages += copy_runs(memory, runs_of(&sp.ranges, data));
            }
            pages_applied = if staging.begin.initial_sync { staging.pages } else { pages };
            if staging.begin.state_len > 0 {
                std::mem::swap(&mut sb.state, &mut staging.state);
            }
            sb.committed = Some(epoch);
            sb.keep_output(epoch, std::mem::take(&mut staging.output));
            sb.recent_ingress.committed(epoch);
            ingress_held = sb.recent_ingress.frame_count() as u64;
            restorable = !sb.state.is_empty();
            if let Some(intent) = intent {
                // Failing leaves the marks (or the incomplete record): a later rejoin copies more.
                if let Err(e) = intent.lock().in_sync() {
                    tracing::warn!(error = %ErrorChain(&e), "cannot record that the standby disk is in sync");
                }
            }
        }
        let apply = started.elapsed();
        span.record("apply_us", apply.as_micros() as u64);
        // Counters before the acknowledgement, so that whoever learns of the ack sees them.
        {
            let mut st = lock(&self.inner.stats);
            st.committed = Some(epoch);
            st.restorable = restorable;
            st.standby_term = self.term;
            st.epochs_committed += 1;
            st.ingress_frames_held = ingress_held;
            st.pages_applied += pages_applied;
            st.disk_bytes_applied += disk_bytes + staging.image_bytes;
            st.last_apply = Some(apply);
            st.last_commit = Some(SystemTime::now());
            st.sync = None;
        }
        send_small(self.stream, &mut self.sealer, FrameKind::EpochAck, epoch.0, &EpochAck { epoch }.encode())
            .map_err(SessionError::Send)?;
        for sp in staged_pages {
            self.recycle(sp.payload);
        }
        if staging.begin.initial_sync {
            tracing::info!(epoch = epoch.0, pages = staging.pages, disk_bytes = staging.image_bytes, "initial synchronisation committed");
        } else {
            tracing::debug!(epoch = epoch.0, apply_us = apply.as_micros() as u64, "epoch applied");
        }
        Ok(())
    }

    /// The open epoch's pages in frame order, as the apply loop takes them: a Pages frame's
    /// payload as it arrived, and each RDMA placement's pages copied out of the ring, whose hash
    /// must match the one its descriptor carried. A mismatch refuses the epoch (nothing applied).
    fn pages_to_apply(&mut self, epoch: EpochId) -> Result<Vec<StagedPages>, SessionError> {
        let staged = self.staging.as_mut().map(|s| std::mem::take(&mut s.staged_pages)).unwrap_or_default();
        let ring = self.inner.rdma.as_ref().map(BackupRdma::ring);
        let mut pages = Vec::with_capacity(staged.len());
        for sp in staged {
            match sp {
                Staged::Frame(sp) => pages.push(sp),
                Staged::Ring(placement) => {
                    // Never without a ring: a placement is only accepted on an RDMA session.
                    let ring = ring.ok_or(SessionError::Unexpected { kind: FrameKind::RdmaPages, context: "without a staging ring" })?;
                    let mut payload = self.pool.pop().unwrap_or_default();
                    ring.copy_out(&placement, &mut payload).map_err(|source| SessionError::Placement { epoch, source })?;
                    pages.push(StagedPages { ranges: placement.ranges().to_vec(), data_offset: 0, payload });
                }
            }
        }
        Ok(pages)
    }
}

/// The open epoch, checked against a frame's header.
fn open_epoch(staging: &mut Option<Staging>, kind: FrameKind, header_epoch: u64) -> Result<&mut Staging, SessionError> {
    let s = staging.as_mut().ok_or(SessionError::Unexpected { kind, context: "outside an epoch" })?;
    if s.begin.epoch.0 != header_epoch {
        return Err(SessionError::WrongEpoch { open: s.begin.epoch, got: header_epoch });
    }
    Ok(s)
}

/// The runs `(range, bytes)` of staged ranges over their page bytes (lengths checked on arrival).
fn runs_of<'d>(ranges: &'d [PageRange], data: &'d [u8]) -> impl Iterator<Item = (PageRange, &'d [u8])> + 'd {
    let mut at = 0usize;
    ranges.iter().map(move |r| {
        let n = r.len as usize * PAGE_SIZE;
        let bytes = data.get(at..at + n).unwrap_or_default();
        at += n;
        (*r, bytes)
    })
}

/// Copies page runs into the memory image; returns the pages copied. Ranges were checked against
/// the memory size when the frame was decoded; a run that would not fit is skipped, never a panic.
fn copy_runs<'d>(memory: &mut [u8], runs: impl Iterator<Item = (PageRange, &'d [u8])>) -> u64 {
    let mut pages = 0;
    for (r, bytes) in runs {
        let start = r.start as usize * PAGE_SIZE;
        if let Some(dst) = memory.get_mut(start..start + bytes.len()) {
            dst.copy_from_slice(bytes);
            pages += (bytes.len() / PAGE_SIZE) as u64;
        }
    }
    pages
}
