//! The primary's side of the A-Link: sending checkpoint epochs and learning when the backup holds
//! them.
//!
//! One epoch is `begin_epoch`, then any number of `send_pages`, `send_state`, `send_disk_writes`
//! and (initial synchronisation only) `send_disk_image`, then `commit`, which returns at once with
//! an [`AckToken`]. The next epoch may begin before the previous one is acknowledged (pipelining);
//! acknowledgements arrive in epoch order, on the transport's own thread, which calls the
//! [`AckListener`] (the output-commit release hangs there) and wakes [`CheckpointTransport::wait_ack`].
//!
//! Any failure of the link is an error of the call that met it, and of every call after it: the
//! engine then re-marks the pages of every unacknowledged epoch dirty, requeues their disk writes,
//! and goes on unprotected (simplex) until a backup is connected again.

pub mod deadline;
pub mod detached;
pub mod rdma;
mod sent_pages;
pub mod tcp;
mod uring;
pub(crate) mod uring_reader;
mod writer;

use std::time::{Duration, Instant};

use ftvm_proto::frame::FrameKind;
use ftvm_proto::pages::{PageRange, PageRangeSet};
use ftvm_proto::EpochId;

use crate::disk::DiskWrite;
use ftvm_proto::epoch::{DecodeError, DiskMarks, EpochBegin, StandbyInfo};
use crate::PAGE_SIZE;

/// Where the transport reads guest pages from.
///
/// # Zero-copy invariant
/// The transport may read the slices it gets from a page source at any time until
/// [`CheckpointTransport::commit`] returns for the epoch (a zero-copy transport hands them to the
/// kernel or the NIC, which reads them later). Until then the engine keeps those pages unchanged:
/// vCPUs paused, the pages write-protected (copy-on-write checkpoints), or the pages copied into
/// buffers that the engine owns. A page that changes before `commit` returns may reach the backup
/// half old, half new, and the backup cannot tell.
///
/// One exception: in an initial synchronisation epoch ([`EpochBegin::initial_sync`]) the
/// transport is done with the slices when `send_pages` returns, because the engine streams the
/// memory of a running guest through one staging buffer that it refills call after call. A
/// zero-copy transport waits there for the kernel, once per call (a synchronisation is long, and
/// bandwidth-bound anyway).
pub trait PageSource {
    /// The 4 KiB of page frame `pfn`, or `None` when the page is not in guest memory.
    fn page(&self, pfn: u64) -> Option<&[u8]>;

    /// The `len` pages from `start` on as one slice, when they are contiguous in the host's memory
    /// (`None` otherwise, and the transport asks page by page). An optimisation: one I/O vector per
    /// run instead of one per page.
    fn run(&self, start: u64, len: u64) -> Option<&[u8]> {
        let _ = (start, len);
        None
    }

    /// The pages of `ranges` (ascending, disjoint), in order, as one slice, when the source keeps
    /// them back to back (a staging buffer does); `None` otherwise. An optimisation: one slice is
    /// hashed many chunks at a time and written as one I/O vector.
    fn packed(&self, ranges: &[PageRange]) -> Option<&[u8]> {
        let _ = ranges;
        None
    }
}

/// Pages a link sent as deltas (see `ftvm_proto::page_delta`), over its session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageDeltaStats {
    /// Pages sent as deltas.
    pub pages: u64,
    /// The A-Link bytes that saved, against sending those pages whole.
    pub bytes_saved: u64,
}

/// A guest memory that is one contiguous host mapping: page `pfn` is at byte `pfn * 4096`.
#[derive(Clone, Copy, Debug)]
pub struct FlatMemory<'a>(pub &'a [u8]);

impl PageSource for FlatMemory<'_> {
    fn page(&self, pfn: u64) -> Option<&[u8]> {
        self.run(pfn, 1)
    }

    fn run(&self, start: u64, len: u64) -> Option<&[u8]> {
        let from = usize::try_from(start).ok()?.checked_mul(PAGE_SIZE)?;
        let n = usize::try_from(len).ok()?.checked_mul(PAGE_SIZE)?;
        self.0.get(from..from.checked_add(n)?)
    }
}

/// Proof that an epoch was committed on this transport; redeem it with
/// [`CheckpointTransport::wait_ack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckToken {
    /// The epoch committed.
    pub epoch: EpochId,
    pub(crate) link: u64,
}

/// What the acknowledgement thread reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckEvent {
    /// The backup holds `epoch` and every epoch before it.
    Acked {
        /// The epoch.
        epoch: EpochId,
        /// From the `commit` call that sent it to its acknowledgement.
        round_trip: Duration,
    },
    /// The link is down; no further acknowledgement will come.
    LinkDown {
        /// Why, for logs and status.
        reason: String,
    },
    /// The backup declared this primary dead and resumes the VM itself: this copy must stop at
    /// once, releasing nothing more (fencing). The link goes down right after.
    Superseded {
        /// The backup's reason.
        reason: String,
    },
}

/// Called on the acknowledgement thread for each [`AckEvent`], in order. It must be quick (it delays
/// the next acknowledgement) and must not call back into the transport.
pub type AckListener = Box<dyn FnMut(AckEvent) + Send>;

/// Why the link failed. Once it has, every later call fails with [`LinkError::Down`].
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Writing to the socket failed.
    #[error("Writing to the A-Link failed")]
    Write(#[source] std::io::Error),
    /// The socket accepted nothing for the write timeout.
    #[error("A-Link write timed out")]
    WriteTimedOut,
    /// An RDMA write of page payloads failed (RDMA links only).
    #[error("RDMA write on the A-Link failed")]
    Rdma(#[source] rdma::RdmaIoError),
    /// The link had already failed (or was closed).
    #[error("A-Link is down: {reason}")]
    Down {
        /// The first failure.
        reason: String,
    },
}

/// Why connecting to the backup failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection failed or timed out.
    #[error("Cannot connect to the backup at {addr}")]
    Connect {
        /// The backup's A-Link address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A socket option could not be set.
    #[error("Cannot configure the A-Link socket")]
    Socket(#[source] std::io::Error),
    /// The handshake failed (wrong secret, other protocol version, refused, timed out).
    #[error("A-Link handshake failed")]
    Handshake(#[from] ftvm_proto::handshake::HandshakeError),
    /// Reading the backup's standby information failed.
    #[error("Reading the backup's standby information failed")]
    Info(#[source] ftvm_proto::frame::FrameError),
    /// The backup sent something else than its standby information.
    #[error("Backup sent {0:?} instead of its standby information")]
    Unexpected(FrameKind),
    /// The standby information is malformed.
    #[error("Malformed standby information")]
    MalformedInfo(#[source] DecodeError),
    /// The backup's write-intent marks are malformed.
    #[error("Malformed write-intent marks from the backup")]
    MalformedMarks(#[source] DecodeError),
    /// The backup's standby digest is not 32 bytes.
    #[error("Malformed standby digest from the backup ({0} bytes)")]
    MalformedDigest(usize),
    /// The backup authenticated us but refused the session (for example: another primary is
    /// connected).
    #[error("Backup refused the session: {0}")]
    Refused(String),
    /// The backup's standby memory has another size than the guest's.
    #[error("Backup memory is {backup} bytes, the guest has {guest}")]
    MemoryMismatch {
        /// Backup's standby memory.
        backup: u64,
        /// Guest memory.
        guest: u64,
    },
    /// The backup's standby disk has another size than the guest's.
    #[error("Backup disk is {backup} bytes, the guest's is {guest}")]
    DiskMismatch {
        /// Backup's standby disk.
        backup: u64,
        /// Guest disk.
        guest: u64,
    },
    /// The backup's CPU capabilities (protocol 1.3) are malformed.
    #[error("Malformed CPU capabilities from the backup")]
    MalformedCpu(#[source] ftvm_proto::cpu::HostCpuDecodeError),
    /// The backup's KVM could not restore this guest's CPU state: it cannot take over, so it is
    /// no place to protect the VM (retrying will not help).
    #[error("Backup cannot resume this guest")]
    CpuIncompatible(#[source] ftvm_proto::cpu::Incompatibility),
    /// The acknowledgement thread could not be started.
    #[error("Cannot start the acknowledgement thread")]
    Thread(#[source] std::io::Error),
    /// The io_uring writer asked for could not be set up (io_uring disabled by
    /// `kernel.io_uring_disabled`, or refused by a seccomp or container policy).
    #[error("Cannot set up io_uring for the A-Link")]
    Uring(#[source] std::io::Error),
    /// The backup's RDMA endpoint is malformed.
    #[error("Malformed RDMA endpoint from the backup")]
    MalformedRdma(#[source] DecodeError),
    /// The RDMA part asked for could not be set up (no such device, a build without the `rdma`
    /// feature, a backup that refused it or sent an unusable endpoint).
    #[error("Cannot set up RDMA for the A-Link")]
    Rdma(#[source] rdma::RdmaSetupError),
    /// The io_uring writer asked for needs an operation or feature this kernel lacks (named).
    #[error("This kernel's io_uring lacks {0}, which the A-Link's io_uring writer needs")]
    UringUnsupported(&'static str),
}

impl ConnectError {
    /// Whether trying again may succeed: nobody answers yet, the connection timed out, or a
    /// refusal that does not answer this side's Hello (replayed by someone on the path).
    pub fn is_transient(&self) -> bool {
        use ftvm_proto::handshake::HandshakeError as H;
        match self {
            Self::Connect { .. } => true,
            Self::Handshake(H::ForgedRefusal(_)) => true,
            Self::Handshake(H::Frame(ftvm_proto::frame::FrameError::Io(e))) => {
                matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
            }
            _ => false,
        }
    }
}

/// Why an epoch could not begin.
#[derive(Debug, thiserror::Error)]
pub enum BeginEpochError {
    /// The previous epoch was not committed.
    #[error("Epoch {0} is still open")]
    EpochOpen(EpochId),
    /// Epochs must increase, by one except for an initial synchronisation.
    #[error("Epoch {epoch} cannot follow epoch {last}")]
    OutOfOrder {
        /// The epoch asked for.
        epoch: EpochId,
        /// The last epoch begun on this link (or the backup's committed one).
        last: EpochId,
    },
    /// The backup holds no epoch to continue from: the first epoch must be an initial
    /// synchronisation.
    #[error("Backup holds no committed epoch; an initial synchronisation is needed")]
    NeedsInitialSync,
    /// The announcement itself is wrong for this kind of epoch.
    #[error("Invalid epoch announcement: {0}")]
    Invalid(&'static str),
    /// Too many epochs are waiting for their acknowledgement.
    #[error("{0} epochs are already waiting for their acknowledgement")]
    TooManyInFlight(usize),
    /// The link failed.
    #[error("Sending the epoch start failed")]
    Link(#[source] LinkError),
}

/// Why pages could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendPagesError {
    /// No epoch is open.
    #[error("No epoch is open")]
    NoEpoch,
    /// A page past the end of guest memory.
    #[error("Page {0} lies outside guest memory")]
    OutsideMemory(u64),
    /// The page source has no page (or a short one) for a page frame number.
    #[error("Page source has no 4 KiB page {0}")]
    MissingPage(u64),
    /// More pages than the epoch announced.
    #[error("Epoch announced {announced} pages, this would send {would_send}")]
    OverAnnounced {
        /// Pages announced in EpochBegin.
        announced: u64,
        /// Pages sent with this call.
        would_send: u64,
    },
    /// The link failed.
    #[error("Sending pages failed")]
    Link(#[source] LinkError),
}

/// Why the machine state could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendStateError {
    /// No epoch is open.
    #[error("No epoch is open")]
    NoEpoch,
    /// More bytes than the epoch announced.
    #[error("Epoch announced {announced} state bytes, this would send {would_send}")]
    OverAnnounced {
        /// Bytes announced.
        announced: u64,
        /// Bytes sent with this call.
        would_send: u64,
    },
    /// The link failed.
    #[error("Sending the machine state failed")]
    Link(#[source] LinkError),
}

/// Why held guest output could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendOutputError {
    /// No epoch is open.
    #[error("No epoch is open")]
    NoEpoch,
    /// A frame is empty or larger than a guest frame can be.
    #[error("Held output frame of {0} bytes")]
    BadFrame(usize),
    /// The link failed.
    #[error("Sending held output failed")]
    Link(#[source] LinkError),
}

/// Why disk writes could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendDiskWritesError {
    /// No epoch is open.
    #[error("No epoch is open")]
    NoEpoch,
    /// An entry that is empty, not whole sectors, too large, or outside the disk.
    #[error("Disk write at sector {sector} of {len} bytes is not valid for the backup's disk")]
    BadWrite {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: usize,
    },
    /// More writes than the epoch announced.
    #[error("Epoch announced {announced} disk writes, this would send {would_send}")]
    OverAnnounced {
        /// Writes announced.
        announced: u64,
        /// Writes sent with this call.
        would_send: u64,
    },
    /// The link failed.
    #[error("Sending disk writes failed")]
    Link(#[source] LinkError),
}

/// Why a disk image chunk could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendDiskImageError {
    /// No epoch is open.
    #[error("No epoch is open")]
    NoEpoch,
    /// Disk image chunks belong to an initial synchronisation only.
    #[error("Disk image chunks need an initial synchronisation epoch")]
    NotInitialSync,
    /// Empty, unaligned or outside the disk.
    #[error("Disk image chunk {offset}+{len} is not valid for the backup's disk")]
    BadChunk {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// More bytes than the epoch announced.
    #[error("Epoch announced {announced} disk image bytes, this would send {would_send}")]
    OverAnnounced {
        /// Bytes announced.
        announced: u64,
        /// Bytes sent with this call.
        would_send: u64,
    },
    /// The link failed.
    #[error("Sending the disk image failed")]
    Link(#[source] LinkError),
}

/// Why an epoch could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// No epoch is open, or another one.
    #[error("Epoch {0} is not the open epoch")]
    NotOpen(EpochId),
    /// Less was sent than the epoch announced (nothing was sent; the epoch stays open).
    #[error("Epoch {epoch} is incomplete: {what} sent {sent} of {announced}")]
    Incomplete {
        /// The epoch.
        epoch: EpochId,
        /// Which total.
        what: &'static str,
        /// Sent so far.
        sent: u64,
        /// Announced.
        announced: u64,
    },
    /// The link failed.
    #[error("Sending the epoch commit failed")]
    Link(#[source] LinkError),
}

/// Why waiting for an acknowledgement failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitAckError {
    /// The token belongs to another (earlier) link.
    #[error("Token of epoch {0} belongs to another link")]
    ForeignToken(EpochId),
    /// The deadline passed first.
    #[error("No acknowledgement of epoch {epoch} within {waited:?}")]
    TimedOut {
        /// The epoch waited for.
        epoch: EpochId,
        /// How long.
        waited: Duration,
    },
    /// The link failed before the acknowledgement came.
    #[error("A-Link failed before epoch {epoch} was acknowledged")]
    Link {
        /// The epoch waited for.
        epoch: EpochId,
        /// Why.
        #[source]
        source: LinkError,
    },
}

/// Why [`CheckpointTransport::hand_over`] failed.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    /// The backup's protocol has no switchover.
    #[error("The backup speaks protocol 1.{0}, which has no switchover (1.4 and later)")]
    Unsupported(u8),
    /// An epoch is being sent.
    #[error("Epoch {0} is open: a handover goes between epochs")]
    EpochOpen(EpochId),
    /// The link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Sends the frames the guest took in (see [`ftvm_proto::frame::FrameKind::Ingress`]) on a link
/// whose epochs another thread sends: each call is one whole frame, placed between two of the
/// epoch's frames. It may block for the socket like any write on the link; a failure marks the
/// link down, as a failed epoch write does.
pub trait IngressLink: Send + Sync + std::fmt::Debug {
    /// Sends `payload` (frames in the `HeldOutput` payload layout), all taken in during `epoch`
    /// (after the pause of the epoch before it).
    fn send_ingress(&self, epoch: u64, payload: &[u8]) -> Result<(), LinkError>;

    /// [`Self::send_ingress`] only if it can be done at once, without waiting for the link (another
    /// frame being written) or the socket (full); `None` otherwise, and nothing was sent. Lets the
    /// thread that takes the input in send it itself, a thread hop earlier.
    fn try_send_ingress(&self, epoch: u64, payload: &[u8]) -> Option<Result<(), LinkError>> {
        let _ = (epoch, payload);
        None
    }
}

/// Sends checkpoint epochs to the backup. See the module documentation for the call order.
pub trait CheckpointTransport: Send {
    /// What the backup held when the link came up: its committed epoch (an incremental epoch must
    /// follow it), whether it is restorable, and its memory and disk sizes.
    fn peer_standby(&self) -> StandbyInfo;

    /// The write-intent marks of the backup's disk (minor 5 and later), or `None`: the backup
    /// gets the whole disk.
    fn peer_disk_marks(&self) -> Option<DiskMarks> {
        None
    }

    /// The digest of the machine state the backup's standby holds (minor 5 and later), or `None`.
    fn peer_standby_digest(&self) -> Option<[u8; 32]> {
        None
    }

    /// Whether the backup takes an epoch's machine state as a delta from the previous epoch's
    /// (minor 6 and later, see [`ftvm_proto::state_delta`]).
    fn peer_takes_state_deltas(&self) -> bool {
        false
    }

    /// A handle for sending the guest's input to the backup from another thread, between this
    /// transport's own frames (minor 7 and later; `None` when the backup does not take it).
    fn ingress_link(&self) -> Option<std::sync::Arc<dyn IngressLink>> {
        None
    }

    /// Sets the function called on the acknowledgement thread for each acknowledgement and for the
    /// link going down. Replaces any earlier one.
    fn set_ack_listener(&mut self, listener: AckListener);

    /// Starts an epoch. `begin` announces everything it will carry; the backup checks the totals
    /// at the commit. Fails at once when too many epochs wait for their acknowledgement.
    fn begin_epoch(&mut self, begin: &EpochBegin) -> Result<(), BeginEpochError>;

    /// Sends the pages of `pages`, read from `source`, in frames of at most
    /// [`ftvm_proto::limits::MAX_PAGES_PER_FRAME`] pages. Returns the bytes put on the link.
    ///
    /// **Zero-copy invariant:** the bytes that `source` returns for these pages must not change
    /// until [`commit`](Self::commit) returns for this epoch (see [`PageSource`]). A zero-copy
    /// transport (io_uring `SEND_ZC`, RDMA) hands the page slices to the kernel or the NIC, which
    /// may read them after this call returns, until its notification; `commit` returns only once
    /// every such notification of the epoch has arrived. So the engine keeps the pages unchanged
    /// (vCPUs paused, pages write-protected) or sends copies it owns, until `commit` returns.
    /// In an initial synchronisation epoch this call waits for the kernel itself, and the slices
    /// are free when it returns (the engine reuses one staging buffer for the whole sync).
    /// When the link fails first, the transport stops waiting and the engine may change the pages
    /// at once: bytes changed under a send still in the kernel no longer match the tag the frame
    /// was sealed with, so the backup drops the frame and its session rather than apply them.
    fn send_pages(&mut self, pages: &PageRangeSet, source: &dyn PageSource) -> Result<u64, SendPagesError>;

    /// Sends (part of) the machine state, an opaque blob; several calls append.
    fn send_state(&mut self, state: &[u8]) -> Result<(), SendStateError>;

    /// Sends disk writes of the epoch, applied on the backup in the order given.
    fn send_disk_writes(&mut self, writes: &[DiskWrite]) -> Result<(), SendDiskWritesError>;

    /// Sends guest frames sealed with the epoch (its held output), so that the backup can replay
    /// them if it takes over before the primary released them. Returns the bytes put on the link.
    fn send_output(&mut self, frames: &[&[u8]]) -> Result<u64, SendOutputError>;

    /// Sends a chunk of the whole disk image, at byte `offset` (initial synchronisation only).
    fn send_disk_image(&mut self, offset: u64, data: &[u8]) -> Result<(), SendDiskImageError>;

    /// Ends the epoch: sends the totals and digest, and returns without waiting for the
    /// acknowledgement.
    fn commit(&mut self, epoch: EpochId) -> Result<AckToken, CommitError>;

    /// Waits until the backup has acknowledged the token's epoch (or a later one), or the deadline.
    /// Returns the latest epoch acknowledged.
    fn wait_ack(&self, token: AckToken, deadline: Instant) -> Result<EpochId, WaitAckError>;

    /// The latest epoch acknowledged on this link, without waiting.
    fn acked(&self) -> Option<EpochId>;

    /// The pages this link sent as deltas from the backup's copy, over its session (none on a
    /// link that sends every page whole).
    fn page_deltas(&self) -> PageDeltaStats {
        PageDeltaStats::default()
    }

    /// How this transport writes to the link, for status and logs ("socket", "io_uring",
    /// "io_uring+zc", and with page payloads by RDMA "rdma+socket", …). Transports that wrap
    /// another one should forward it.
    fn io_name(&self) -> &'static str {
        "unknown"
    }

    /// Sends a liveness frame (between epochs only), so that a backup that hears no epoch for a
    /// while (the epochs in flight are at their limit) does not take the primary for dead.
    fn heartbeat(&mut self) -> Result<(), LinkError>;

    /// The primary goes on without this backup (simplex): tells it so when the link still works,
    /// so that it does not take over a VM that still runs, then closes the link. Best effort.
    fn abandon(&mut self, reason: &str);

    /// The link failed: waits, at most `within`, until everything the backup sent before the
    /// failure has reached the acknowledgement listener. A backup that takes over sends
    /// `TakingOver` and closes its end, and this side's write can fail on the close before its
    /// reader has passed the notice on.
    fn drain_after_failure(&mut self, within: Duration) {
        let _ = within;
    }

    /// A planned switchover: tells the backup that the VM is stopped at `epoch` (acknowledged)
    /// and that it is to take over from there. Its answer comes as [`AckEvent::Superseded`].
    fn hand_over(&mut self, epoch: EpochId) -> Result<(), HandOverError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_memory_is_a_page_source() {
        let mem: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i / PAGE_SIZE) as u8).collect();
        let src = FlatMemory(&mem);
        assert_eq!(src.page(2).map(|p| (p.len(), p[0])), Some((PAGE_SIZE, 2)));
        assert_eq!(src.page(4), None);
        assert_eq!(src.run(1, 3).map(<[u8]>::len), Some(3 * PAGE_SIZE));
        assert_eq!(src.run(1, 4), None);
        assert_eq!(src.run(u64::MAX, 2), None);
    }
}
