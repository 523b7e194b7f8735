//! The backup's side of the RDMA A-Link, device-free: the staging ring's memory, the checks of
//! every placement descriptor (`RdmaPages`) against it, and reading a checked descriptor's pages
//! out of the ring at the commit. The receiver calls these; registering the ring with a device
//! and connecting the queue pair is [`super::verbs`] (feature `rdma`).
//!
//! The ring is written by the NIC, on the primary's behalf, at any time: this side never makes a
//! Rust reference to it. It copies a descriptor's bytes out with a raw copy, then hashes the copy
//! and compares it with the hash the primary sent; only a copy that matches is applied. A write
//! that is late, torn, or left over from another epoch therefore refuses the epoch, and a write
//! racing the copy can at worst make it refuse too (a correct primary never writes into an
//! unacknowledged epoch's space).
//!
//! [`BackupRdma`] is what the receiver keeps for its lifetime: the ring registered with a device
//! (feature `rdma`), or, for the device-free end-to-end tests only, a ring that a test's
//! simulated NIC writes into.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Arc;

use ftvm_proto::pages::PageRange;
use ftvm_proto::rdma::{pages_hasher, RdmaEndpoint, RdmaPages, RingGrant};
use ftvm_proto::EpochId;

use super::exchange::{backup_accepts, random_psn};
use super::{RdmaOptions, RdmaSetupError};
use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Why a placement descriptor, or the pages it names, is refused (the session drops, the epoch is
/// discarded, the standby stays as it was).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// A descriptor outside an epoch.
    #[error("Placement descriptor outside an epoch")]
    NoEpoch,
    /// Not page aligned.
    #[error("Ring offset {0:#x} is not page aligned")]
    Unaligned(u64),
    /// Past the end of the ring (or across it: a placement never wraps).
    #[error("Ring bytes {offset:#x}+{len:#x} lie outside the {ring:#x}-byte ring")]
    OutsideRing {
        /// Offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Ring size.
        ring: u64,
    },
    /// Overlaps a placement already accepted in this epoch.
    #[error("Ring bytes {offset:#x}+{len:#x} overlap an earlier placement of epoch {epoch}")]
    Overlap {
        /// Offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The epoch.
        epoch: EpochId,
    },
    /// The bytes in the ring do not hash to what the primary sent: a write torn, late or stale.
    #[error("Ring bytes {offset:#x}+{len:#x} do not match their hash (torn or stale RDMA write)")]
    HashMismatch {
        /// Offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// The backup's staging ring: page-aligned anonymous memory that the NIC writes into. Owned here,
/// unmapped on drop (after the memory region registered on it, which must be dropped first: the
/// verbs types that register it keep it alive).
#[derive(Debug)]
pub struct StagingRing {
    ptr: NonNull<u8>,
    bytes: usize,
}

// SAFETY: the ring is plain memory owned by this value; it hands out no references to it, only
// copies made under `&self` (reads) or `&mut self` (test writes), so moving or sharing the owner
// between threads is sound.
unsafe impl Send for StagingRing {}
// SAFETY: as above: `&self` methods only read through raw copies, except the unsafe
// `simulate_nic_write`, whose callers promise that no read of those bytes runs meanwhile.
unsafe impl Sync for StagingRing {}

impl StagingRing {
    /// Maps `bytes` (whole pages, at least one) of zeroed memory, populated up front so that
    /// registering it does not fault it in page by page.
    pub fn new(bytes: u64) -> Result<Self, RdmaSetupError> {
        let map_err = |source| RdmaSetupError::Map { bytes, source };
        let len = usize::try_from(bytes)
            .ok()
            .filter(|&b| b > 0 && b % PAGE_SIZE == 0)
            .ok_or_else(|| map_err(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a fresh private anonymous mapping: no address hint, no file; the result is
        // checked for MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| map_err(std::io::ErrorKind::OutOfMemory.into()))?;
        Ok(Self { ptr, bytes: len })
    }

    /// Ring size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes as u64
    }

    /// The ring's address, for registering it with a device (the NIC writes through it).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies the pages of a checked placement out of the ring into `out` (replacing its content)
    /// and checks them against the placement's hash. On success `out` holds the pages, in the
    /// placement's range order ([`ValidPlacement::ranges`]), ready to apply.
    pub fn copy_out(&self, placement: &ValidPlacement, out: &mut Vec<u8>) -> Result<(), PlacementError> {
        let (offset, len) = (placement.offset, placement.len);
        // Checked against this ring's size when the placement was accepted; checked again here
        // because a placement is not tied to one ring by its type.
        let end = offset.checked_add(len).filter(|&e| e <= self.bytes());
        if end.is_none() {
            return Err(PlacementError::OutsideRing { offset, len, ring: self.bytes() });
        }
        out.clear();
        out.reserve(len as usize);
        // SAFETY: offset + len lies inside the mapping (checked above), and `out` has room for
        // len bytes (reserved above); the ring may be written by the NIC concurrently, which is
        // why it is copied with a raw copy and never referenced: a racing write can only make the
        // hash check below fail.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset as usize), out.as_mut_ptr(), len as usize);
            out.set_len(len as usize);
        }
        let mut h = pages_hasher();
        h.update(out);
        if blake3::Hash::from(*h.finalize().as_bytes()) != blake3::Hash::from(placement.hash) {
            return Err(PlacementError::HashMismatch { offset, len });
        }
        Ok(())
    }

    /// **Tests only** (the device-free end-to-end tests' simulated NIC; nothing in the `ftvm`
    /// binary calls it): writes `bytes` at `offset` of a shared ring, as the primary's NIC would.
    /// Refused outside the ring.
    ///
    /// # Safety
    ///
    /// No other thread may read or write these bytes while this runs. The receiver reads a
    /// placement's bytes only once the epoch's `EpochCommit` has arrived, so a simulated primary
    /// that writes before it sends that frame (as a real one waits for its writes' completions)
    /// keeps this promise.
    #[doc(hidden)]
    pub unsafe fn simulate_nic_write(&self, offset: u64, bytes: &[u8]) -> Result<(), PlacementError> {
        let len = bytes.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.bytes()) {
            return Err(PlacementError::OutsideRing { offset, len, ring: self.bytes() });
        }
        // SAFETY: offset + len lies inside the mapping (checked above); the caller promises that
        // nothing else touches these bytes meanwhile, and no reference to the ring exists.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(offset as usize), bytes.len()) };
        Ok(())
    }

    /// Writes `bytes` at `offset`, as the NIC would (for tests and device-free simulations of a
    /// primary). Panics outside the ring.
    #[cfg(test)]
    pub(crate) fn write_at(&mut self, offset: u64, bytes: &[u8]) {
        assert!(offset as usize + bytes.len() <= self.bytes);
        // SAFETY: inside the mapping (asserted), and `&mut self` excludes every other access.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(offset as usize), bytes.len()) };
    }
}

impl Drop for StagingRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// The backup's RDMA, kept by the receiver for its lifetime: the staging ring registered with a
/// device when the receiver starts, and the queue pair it connects for each primary's session.
#[derive(Debug)]
pub struct BackupRdma(Backend);

#[derive(Debug)]
enum Backend {
    /// A device (feature `rdma`).
    #[cfg(feature = "rdma")]
    Verbs(super::verbs::RdmaBackup),
    /// No device: a ring that a test's simulated NIC writes into ([`BackupRdma::simulated`]).
    Simulated(Arc<StagingRing>),
}

/// A primary's queue pair, connected for one session: keep it until the session ends; dropping
/// it ends the primary's access to the ring (its writes then fail).
#[derive(Debug)]
pub struct AcceptedRdma {
    #[cfg(feature = "rdma")]
    _qp: Option<super::verbs::BackupSession>,
}

impl BackupRdma {
    /// Opens `opts.device` and registers a staging ring of `opts.ring_bytes` with it. Without the
    /// cargo feature `rdma`: [`RdmaSetupError::NotBuilt`].
    pub fn open(opts: &RdmaOptions) -> Result<Self, RdmaSetupError> {
        #[cfg(feature = "rdma")]
        {
            super::verbs::RdmaBackup::open(opts).map(|b| Self(Backend::Verbs(b)))
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = opts;
            Err(RdmaSetupError::NotBuilt)
        }
    }

    /// **Tests only** (nothing in the `ftvm` binary makes one): RDMA without a device, over a ring
    /// the test shares with its simulated NIC ([`StagingRing::simulate_nic_write`]). Its endpoint
    /// names a made-up queue pair; everything after the exchange is the real receiver's path.
    #[doc(hidden)]
    pub fn simulated(ring: Arc<StagingRing>) -> Self {
        Self(Backend::Simulated(ring))
    }

    /// The staging ring (for [`StagingRing::copy_out`] at each commit).
    pub fn ring(&self) -> &StagingRing {
        match &self.0 {
            #[cfg(feature = "rdma")]
            Backend::Verbs(b) => b.ring(),
            Backend::Simulated(r) => r,
        }
    }

    /// Answers a primary's endpoint: its queue pair connected for the session, and this side's
    /// endpoint (with the ring) to send back.
    pub fn accept(&self, peer: &RdmaEndpoint) -> Result<(AcceptedRdma, RdmaEndpoint), RdmaSetupError> {
        match &self.0 {
            #[cfg(feature = "rdma")]
            Backend::Verbs(b) => b.accept(peer).map(|(qp, local)| (AcceptedRdma { _qp: Some(qp) }, local)),
            Backend::Simulated(ring) => {
                let grant = RingGrant { addr: ring.as_mut_ptr() as u64, rkey: 0, bytes: ring.bytes() };
                // A RoCE-like endpoint (a link-local GID), so that the exchange's checks run as on
                // a device.
                let mut gid = [0u8; 16];
                gid[..2].copy_from_slice(&[0xfe, 0x80]);
                gid[15] = 2;
                let local = RdmaEndpoint { qpn: 2, psn: random_psn(), lid: 0, mtu: 5, gid, ring: Some(grant) };
                backup_accepts(&local, peer)?;
                Ok((AcceptedRdma { #[cfg(feature = "rdma")] _qp: None }, local))
            }
        }
    }
}

/// A descriptor checked against the ring: the only way to name ring bytes to [`StagingRing::copy_out`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidPlacement {
    offset: u64,
    len: u64,
    hash: [u8; 32],
    ranges: Vec<PageRange>,
}

impl ValidPlacement {
    /// The guest page ranges, ascending (checked against guest memory by the descriptor's decoder).
    pub fn ranges(&self) -> &[PageRange] {
        &self.ranges
    }

    /// Pages.
    pub fn page_count(&self) -> u64 {
        self.len / PAGE
    }

    /// Where in the ring (for logs).
    pub fn ring_bytes(&self) -> (u64, u64) {
        (self.offset, self.len)
    }
}

/// Checks the placement descriptors of one epoch against a ring: page aligned, inside the ring
/// (never across its end), and not overlapping one another, so that the pages of one descriptor
/// cannot be rewritten by another of the same epoch. Never trusts an offset from the wire.
#[derive(Debug)]
pub struct RingValidator {
    ring: u64,
    epoch: Option<EpochId>,
    /// Accepted placements of the epoch: start → end.
    taken: BTreeMap<u64, u64>,
}

impl RingValidator {
    /// A validator for a ring of `ring_bytes`.
    pub fn new(ring_bytes: u64) -> Self {
        Self { ring: ring_bytes, epoch: None, taken: BTreeMap::new() }
    }

    /// An epoch starts (at its `EpochBegin`): placements of earlier epochs are forgotten.
    pub fn begin(&mut self, epoch: EpochId) {
        self.epoch = Some(epoch);
        self.taken.clear();
    }

    /// The epoch ended (committed or discarded).
    pub fn end(&mut self) {
        self.epoch = None;
        self.taken.clear();
    }

    /// Checks a decoded descriptor (its ranges were checked against guest memory by
    /// [`RdmaPages::decode`]) and records its ring bytes as taken for the epoch.
    pub fn accept(&mut self, d: RdmaPages) -> Result<ValidPlacement, PlacementError> {
        let epoch = self.epoch.ok_or(PlacementError::NoEpoch)?;
        let (offset, len) = (d.ring_offset, d.byte_len());
        if !offset.is_multiple_of(PAGE) {
            return Err(PlacementError::Unaligned(offset));
        }
        let end = offset.checked_add(len).filter(|&e| e <= self.ring && len > 0);
        let Some(end) = end else {
            return Err(PlacementError::OutsideRing { offset, len, ring: self.ring });
        };
        // The nearest placement starting before `end` must end at or before `offset`.
        if self.taken.range(..end).next_back().is_some_and(|(_, &e)| e > offset) {
            return Err(PlacementError::Overlap { offset, len, epoch });
        }
        self.taken.insert(offset, end);
        Ok(ValidPlacement { offset, len, hash: d.hash, ranges: d.ranges })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(offset: u64, pages: u64, hash: [u8; 32]) -> RdmaPages {
        RdmaPages { ring_offset: offset, hash, ranges: vec![PageRange { start: 100, len: pages }] }
    }

    fn hash_of(b: &[u8]) -> [u8; 32] {
        let mut h = pages_hasher();
        h.update(b);
        *h.finalize().as_bytes()
    }

    #[test]
    fn descriptors_are_checked_against_the_ring() {
        let ring = 16 * PAGE;
        let mut v = RingValidator::new(ring);
        assert_eq!(v.accept(desc(0, 1, [0; 32])), Err(PlacementError::NoEpoch));
        v.begin(EpochId(3));
        assert_eq!(v.accept(desc(100, 1, [0; 32])), Err(PlacementError::Unaligned(100)));
        assert_eq!(v.accept(desc(15 * PAGE, 2, [0; 32])), Err(PlacementError::OutsideRing { offset: 15 * PAGE, len: 2 * PAGE, ring }));
        assert!(matches!(v.accept(desc(16 * PAGE, 1, [0; 32])), Err(PlacementError::OutsideRing { .. })));
        assert!(matches!(v.accept(desc(u64::MAX - 4095, 1, [0; 32])), Err(PlacementError::OutsideRing { .. })));
        let ok = v.accept(desc(4 * PAGE, 4, [1; 32])).unwrap();
        assert_eq!((ok.ring_bytes(), ok.page_count()), ((4 * PAGE, 4 * PAGE), 4));
        // Overlaps: inside, straddling either end, enclosing.
        for (o, n) in [(5, 1), (3, 2), (7, 3), (2, 10), (4, 4)] {
            assert!(matches!(v.accept(desc(o * PAGE, n, [0; 32])), Err(PlacementError::Overlap { .. })), "{o}+{n}");
        }
        // Touching is fine, on both sides.
        v.accept(desc(8 * PAGE, 8, [0; 32])).unwrap();
        v.accept(desc(0, 4, [0; 32])).unwrap();
        // A new epoch may reuse the space (the primary reuses it only after the acknowledgement).
        v.begin(EpochId(4));
        v.accept(desc(4 * PAGE, 4, [0; 32])).unwrap();
        v.end();
        assert_eq!(v.accept(desc(0, 1, [0; 32])), Err(PlacementError::NoEpoch));
    }

    #[test]
    fn pages_come_out_only_when_they_match_their_hash() {
        let mut ring = StagingRing::new(8 * PAGE).unwrap();
        let pages: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i / 7) as u8).collect();
        ring.write_at(2 * PAGE, &pages);
        let mut v = RingValidator::new(ring.bytes());
        v.begin(EpochId(1));
        let good = v.accept(desc(2 * PAGE, 3, hash_of(&pages))).unwrap();
        let mut out = vec![0xee; 10];
        ring.copy_out(&good, &mut out).unwrap();
        assert!(out == pages);
        // A torn write: the last page still holds older bytes.
        ring.write_at(4 * PAGE, &[9; PAGE_SIZE]);
        assert_eq!(ring.copy_out(&good, &mut out), Err(PlacementError::HashMismatch { offset: 2 * PAGE, len: 3 * PAGE }));
        // A placement accepted against a larger ring is refused by a smaller one, not read past it.
        let mut big = RingValidator::new(64 * PAGE);
        big.begin(EpochId(1));
        let far = big.accept(desc(32 * PAGE, 1, [0; 32])).unwrap();
        assert!(matches!(ring.copy_out(&far, &mut out), Err(PlacementError::OutsideRing { .. })));
    }

    #[test]
    fn ring_sizes_are_whole_pages() {
        assert!(StagingRing::new(0).is_err());
        assert!(StagingRing::new(PAGE + 1).is_err());
        let r = StagingRing::new(PAGE).unwrap();
        assert_eq!(r.bytes(), PAGE);
        assert!(!r.as_mut_ptr().is_null());
    }
}
