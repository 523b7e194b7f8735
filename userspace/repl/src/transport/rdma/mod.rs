//! The RDMA A-Link: page payloads as one-sided RDMA WRITEs into the backup's registered staging
//! ring, everything else on the TCP link as before (DESIGN.md part 3).
//!
//! **Why TCP stays.** The handshake, the epoch's begin, machine state, disk writes, held output,
//! commit, acknowledgements and heartbeats are small, ordered and authenticated frames: the TCP
//! link already carries them with tags, sequence numbers and the epoch digest. What costs is the
//! page payload (a few MiB per epoch), and that is what RDMA moves without the backup's CPU.
//!
//! **Set-up, when the pair forms** (never at failover): after the backup's last set-up frame the
//! primary sends its queue pair (`RdmaEndpoint`), the backup answers with its own and with its
//! staging ring (address, rkey, bytes; registered once when the receiver starts), and both move
//! their reliable-connected queue pair INIT → RTR → RTS with the other's data
//! ([`exchange`] checks it, [`verbs`] does it). A side that asked for RDMA and cannot have it fails
//! the connect with an error that names why: there is no silent fallback to TCP for a whole link.
//!
//! **One epoch.** `begin_epoch` reserves the epoch's pages in the ring ([`plan::RingPlan`]); an
//! initial synchronisation, an epoch larger than the ring, or one that does not fit the space not
//! yet acknowledged goes by TCP `Pages` frames as before (counted, never an error). `send_pages`
//! copies the pages into the primary's registered mirror of the ring (same offsets), hashes them,
//! posts RDMA WRITEs ([`plan::work_requests`]: at most N scatter-gather entries and M bytes each)
//! and sends one `RdmaPages` descriptor per ring piece on the TCP link. `commit` waits for every
//! write's completion, then sends `EpochCommit`: the backup reads its ring only after that frame,
//! so it never reads a write in flight. The ring space of an epoch is reused only after the
//! epoch's acknowledgement.
//!
//! **Trust.** The descriptor's tag covers its hash; the commit's digest covers the tag. The
//! backup checks every descriptor against its own ring (bounds, alignment, overlap within the
//! epoch: [`backup::RingValidator`]) before it reads a byte, and at the commit copies each
//! descriptor's pages out of the ring and hashes the copy ([`backup::StagingRing::copy_out`]): a
//! write that was torn, late, or left from an older epoch refuses the epoch before anything is
//! applied, and the standby stays as it was.
//!
//! **Zero copy.** None on the primary today: the pages are copied into the registered mirror, so
//! the [`PageSource`](super::PageSource) slices are free when `send_pages` returns (registering
//! guest memory itself would remove that copy; see the README's RDMA section).
//!
//! Device-free parts (placement, work-request splitting, the exchange's checks, the backup's
//! validation and hash check, the primary's epoch logic over a [`primary::RemoteWriter`]) build
//! and are tested everywhere. The verbs ([`verbs`]) build only with the cargo feature `rdma`
//! (libibverbs through rdma-sys) and have never run on these machines, which have no RDMA.

pub mod backup;
pub mod exchange;
pub mod plan;
pub mod primary;
#[cfg(feature = "rdma")]
pub mod verbs;

use std::time::Duration;

/// Default size of the backup's staging ring: 64 MiB, 16 epochs of 1 000 pages in flight.
pub const DEFAULT_RING_BYTES: u64 = 64 << 20;
/// Most bytes one RDMA WRITE carries (longer runs are split): large enough to amortise a work
/// request, small enough that the NIC interleaves the epoch's writes with other traffic.
pub const MAX_WRITE_BYTES: u64 = 1 << 20;
/// Send queue depth of the primary's queue pair (and its completion queue's size).
pub const SEND_QUEUE_DEPTH: u32 = 256;

/// What an RDMA A-Link uses on this host (`ftvm primary/backup --alink-rdma-device …`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaOptions {
    /// The verbs device by name, as `ibv_devices` lists it (`mlx5_0`, `rxe0`, …).
    pub device: String,
    /// Its port (1 on most NICs).
    pub port: u8,
    /// The GID table index to address the peer with: on RoCE v2 the index whose type is "RoCE v2"
    /// and whose address is the A-Link's IP (`show_gids`); on InfiniBand 0.
    pub gid_index: u8,
    /// The backup's staging ring size (the primary's mirror takes the size the backup grants).
    pub ring_bytes: u64,
}

impl RdmaOptions {
    /// Options for `device` with port 1, GID index 0 and the default ring.
    pub fn new(device: impl Into<String>) -> Self {
        Self { device: device.into(), port: 1, gid_index: 0, ring_bytes: DEFAULT_RING_BYTES }
    }
}

/// Why setting up the RDMA part of a link failed (at connect, or when the backup registers its
/// ring).
#[derive(Debug, thiserror::Error)]
pub enum RdmaSetupError {
    /// This build has no RDMA (cargo feature `rdma`).
    #[error("This build has no RDMA support (build ftvm-repl with the cargo feature `rdma`)")]
    NotBuilt,
    /// No verbs device of that name (the ones found are listed).
    #[error("No RDMA device {name:?} (found: {found:?})")]
    NoDevice {
        /// The name asked for.
        name: String,
        /// The devices libibverbs lists (empty on a kernel without RDMA).
        found: Vec<String>,
    },
    /// The port is not active.
    #[error("RDMA port {port} of {device} is not active (state {state})")]
    PortDown {
        /// Device.
        device: String,
        /// Port.
        port: u8,
        /// `ibv_port_state` value.
        state: u32,
    },
    /// A verbs call failed (named).
    #[error("{call} failed")]
    Verbs {
        /// The libibverbs function.
        call: &'static str,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// The peer's RDMA endpoint is not usable.
    #[error("The peer's RDMA endpoint is not usable")]
    Exchange(#[from] exchange::ExchangeError),
    /// The staging ring's memory could not be mapped.
    #[error("Cannot map {bytes} bytes for the RDMA staging ring")]
    Map {
        /// Bytes asked for.
        bytes: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why RDMA writes failed (the link fails with it).
#[derive(Debug, thiserror::Error)]
pub enum RdmaIoError {
    /// Posting a work request failed.
    #[error("Posting an RDMA WRITE failed")]
    Post(#[source] std::io::Error),
    /// Polling the completion queue failed.
    #[error("Polling the RDMA completion queue failed")]
    Poll(#[source] std::io::Error),
    /// A write completed with an error status (the queue pair is in the error state after it).
    #[error("RDMA WRITE completed with status {status} ({text}), vendor error {vendor:#x}")]
    Completion {
        /// `ibv_wc_status`.
        status: u32,
        /// `ibv_wc_status_str`.
        text: String,
        /// Vendor syndrome.
        vendor: u32,
    },
    /// Writes were still outstanding after the timeout.
    #[error("{pending} RDMA WRITEs not completed within {waited:?}")]
    TimedOut {
        /// Work requests still outstanding.
        pending: u32,
        /// How long it waited.
        waited: Duration,
    },
    /// The epoch's pages do not fit the ring piece reserved for them (a bug: the reservation
    /// counts the pages announced).
    #[error("Epoch pages overflow their ring reservation")]
    Reservation,
    /// The page source has no 4 KiB page for a page frame number.
    #[error("Page source has no 4 KiB page {0}")]
    MissingPage(u64),
}

/// Counters of an RDMA link, for status and the bench.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RdmaStats {
    /// Epochs whose pages went by RDMA.
    pub rdma_epochs: u64,
    /// Epochs whose pages went by TCP (initial synchronisation, larger than the ring, ring full).
    pub tcp_epochs: u64,
    /// RDMA WRITE work requests posted.
    pub writes: u64,
    /// Page bytes written by RDMA.
    pub bytes: u64,
}
