//! The payloads of the epoch frames. The frame header (kind, epoch, sequence, tag) is
//! [`crate::frame`]'s; this module defines what follows it. All integers are little-endian;
//! every decoder checks lengths exactly and never panics, whatever the input.
//!
//! One epoch on the wire, primary → backup:
//! ```text
//! EpochBegin                       what the epoch will carry
//! Pages*  MachineState*  DiskWrites*  DiskImage*  HeldOutput*   in any order and interleaving
//! EpochCommit                      totals and digest; the backup applies the epoch, then
//!                                   backup → primary: EpochAck
//! ```
//! Right after the handshake the backup sends `StandbyInfo` (what it holds) or `Goodbye` (refused).
//! From protocol 1.3 a `HostCpu` frame follows the `StandbyInfo` ([`crate::cpu`]): what the backup's
//! KVM can restore, which the primary checks against its guest before it counts the backup.
//!
//! ```text
//! EpochBegin (48 bytes)            EpochCommit (72 bytes)         EpochAck (8 bytes)
//!   0  8 epoch                       0  8 epoch                     0  8 epoch
//!   8  8 page_count                  8  8 pages
//!  16  8 state_len                  16  8 state bytes
//!  24  8 disk_write_count           24  8 disk writes
//!  32  8 disk_image_bytes           32  8 disk image bytes
//!  40  4 flags (1 = initial sync)   40 32 digest
//!  44  4 reserved (0)
//!
//! Pages                            DiskWrites                     DiskImage
//!   0  4 range count n               0  4 entry count n             0  8 byte offset (sector aligned)
//!   4  4 page count p                4  4 reserved (0)              8  … bytes (whole sectors)
//!   8 16n ranges:                    8 16n entries:
//!       u64 first pfn, u32 pages,        u64 sector, u32 bytes,
//!       u32 reserved (0)                 u32 reserved (0)
//!   … zero padding to D              … the entries' bytes, in order
//!   D 4096p page bytes, in range
//!     order
//!
//! MachineState: the VMM's opaque, self-versioned blob, in chunks, concatenated in order.
//!
//! HeldOutput: guest frames sealed with the epoch, as the output hold keeps them (virtio-net
//! header first), each as `u32 length, bytes`; at least one, each 1..=MAX_GUEST_FRAME bytes.
//!
//! StandbyInfo (32 bytes)
//!   0  4 flags (1 = holds a committed epoch, 2 = it is restorable)
//!   4  4 reserved (0)
//!   8  8 committed epoch (0 when none)
//!  16  8 memory bytes
//!  24  8 disk bytes
//! ```
//! In a Pages frame the page bytes start at `D`, the first payload offset at which the frame
//! (its 32-byte header included) has a length that is a multiple of 1 KiB, BLAKE3's chunk size:
//! the sender hashes page after page as separate slices, and chunk-aligned slices are hashed
//! several chunks at a time (SIMD), misaligned ones one 64-byte block at a time. At most 1 KiB of
//! padding per frame.
//!
//! Page ranges inside one Pages frame are ascending and do not overlap; a page may appear again in a
//! later frame of the same epoch, and the later copy wins. Disk writes apply in the order sent.
//!
//! The epoch digest ([`EpochDigest`]) chains the authentication tags of the epoch's frames
//! (EpochBegin through the last frame before EpochCommit, heartbeats excluded). Each tag is already a
//! keyed BLAKE3 of its frame's header and payload, so the digest commits to every byte of the epoch
//! without a second pass over the pages.

use std::sync::Arc;

use crate::frame::HEADER_LEN;
use crate::le::{Cursor, PastTheEnd};
use crate::limits::{MAX_DISK_WRITE_BYTES, MAX_GUEST_FRAME};
use crate::limits::{PAGE_SIZE, SECTOR_SIZE};
use crate::pages::{PageRange, PageRangeSet};
use crate::EpochId;

/// One guest disk write: whole sectors starting at `sector`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    /// First sector (512 bytes each).
    pub sector: u64,
    /// The bytes, a whole number of sectors. Shared, so that an epoch's writes can be kept until
    /// the backup acknowledges it without copying them again.
    pub data: Arc<[u8]>,
}

impl DiskWrite {
    /// A write of `data` at `sector`.
    pub fn new(sector: u64, data: impl Into<Arc<[u8]>>) -> Self {
        Self { sector, data: data.into() }
    }
}
/// Page bytes start at a frame offset that is a multiple of this (BLAKE3's chunk size).
pub const PAGE_DATA_ALIGN: usize = 1024;
/// EpochBegin flag: the epoch is an initial synchronisation (all memory, the whole disk).
pub const BEGIN_FLAG_INITIAL_SYNC: u32 = 1;

const RANGE_LEN: usize = 16;
const LIST_HEADER_LEN: usize = 8;

/// Why a payload was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A fixed-size payload of the wrong size, or a list whose bytes do not add up.
    #[error("Payload is {got} bytes, expected {expected}")]
    Length {
        /// Bytes the payload should have.
        expected: u64,
        /// Bytes it has.
        got: usize,
    },
    /// Too short to hold its own header.
    #[error("Payload is shorter than its header")]
    Short,
    /// Flags this version does not know.
    #[error("Unknown flags {0:#x}")]
    UnknownFlags(u32),
    /// A reserved field is not zero.
    #[error("Reserved field is not zero")]
    Reserved,
    /// A list frame with nothing in it.
    #[error("Empty list")]
    Empty,
    /// A held output frame of no bytes or too many.
    #[error("Held output frame of {0} bytes")]
    BadOutputFrame(usize),
    /// A page range of no pages, or one that wraps around.
    #[error("Page range {start}+{len} is empty or overflows")]
    BadRange {
        /// First page.
        start: u64,
        /// Pages.
        len: u64,
    },
    /// Ranges not ascending, or overlapping.
    #[error("Page ranges are not ascending and disjoint")]
    RangeOrder,
    /// A range past the end of guest memory.
    #[error("Page range {start}+{len} lies outside guest memory ({pages} pages)")]
    RangeOutside {
        /// First page.
        start: u64,
        /// Pages.
        len: u64,
        /// Pages of guest memory.
        pages: u64,
    },
    /// The header's page count disagrees with its ranges.
    #[error("Header counts {declared} pages, its ranges hold {actual}")]
    PageCount {
        /// Pages the header announces.
        declared: u64,
        /// Pages the ranges hold.
        actual: u64,
    },
    /// An empty, unaligned or oversized disk write entry.
    #[error("Disk write of {len} bytes at sector {sector} is empty, not whole sectors, or too large")]
    BadWrite {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: u64,
    },
    /// Disk bytes past the end of the disk.
    #[error("Disk bytes {offset}+{len} lie outside the disk ({disk} bytes)")]
    DiskOutside {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Disk size.
        disk: u64,
    },
    /// A disk image chunk that is empty or not made of whole, aligned sectors.
    #[error("Disk image chunk {offset}+{len} is empty or not sector aligned")]
    BadImageChunk {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// A write-intent region size that is not a power of two of at least a sector.
    #[error("Write-intent region size {0} is not a power of two of at least 512 bytes")]
    BadRegionSize(u64),
    /// A write-intent region out of order or past the end of the disk.
    #[error("Write-intent region {region} is out of order or past the disk's {count} regions")]
    BadRegion {
        /// The region.
        region: u64,
        /// Regions the disk has.
        count: u64,
    },
    /// An RDMA endpoint with a queue pair or sequence number over 24 bits, a special queue pair,
    /// or an unknown path MTU.
    #[error("Malformed RDMA endpoint")]
    BadEndpoint,
    /// An RDMA staging ring of a size out of bounds or not whole pages, at address 0, or wrapping.
    #[error("RDMA ring of {bytes} bytes at {addr:#x} is not valid")]
    BadRing {
        /// Its address.
        addr: u64,
        /// Its size.
        bytes: u64,
    },
    /// More pages (or ranges) in one frame than the limit.
    #[error("{0} pages or ranges in one frame is over the limit")]
    TooManyPages(u64),
    /// A ring offset that is not 4 KiB aligned, or whose pages would overflow.
    #[error("Ring offset {0:#x} is not page aligned or overflows")]
    RingOffset(u64),
    /// An EpochCommit or EpochAck whose payload names another epoch than its header.
    #[error("Payload names epoch {payload}, its header epoch {header}")]
    EpochMismatch {
        /// Epoch in the frame header.
        header: u64,
        /// Epoch in the payload.
        payload: u64,
    },
}

impl From<PastTheEnd> for DecodeError {
    fn from(_: PastTheEnd) -> Self {
        Self::Short
    }
}

/// A reserved `u32` that must be zero.
fn zero32(r: &mut Cursor<'_>) -> Result<(), DecodeError> {
    if r.u32()? != 0 {
        return Err(DecodeError::Reserved);
    }
    Ok(())
}

fn exact(payload: &[u8], len: usize) -> Result<Cursor<'_>, DecodeError> {
    if payload.len() != len {
        return Err(DecodeError::Length { expected: len as u64, got: payload.len() });
    }
    Ok(Cursor::new(payload))
}

/// An epoch starts: what it will carry, so the backup can size its staging and show progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochBegin {
    /// The epoch.
    pub epoch: EpochId,
    /// Pages the epoch carries (a page sent twice counts twice).
    pub page_count: u64,
    /// Bytes of machine state.
    pub state_len: u64,
    /// Disk write entries.
    pub disk_write_count: u64,
    /// Bytes of disk image (initial synchronisation only).
    pub disk_image_bytes: u64,
    /// The epoch is an initial synchronisation: it replaces whatever the standby held.
    pub initial_sync: bool,
}

impl EpochBegin {
    /// Payload size.
    pub const LEN: usize = 48;

    /// The payload bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[8..16].copy_from_slice(&self.page_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.state_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_write_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.disk_image_bytes.to_le_bytes());
        let flags = if self.initial_sync { BEGIN_FLAG_INITIAL_SYNC } else { 0 };
        b[40..44].copy_from_slice(&flags.to_le_bytes());
        b
    }

    /// Decodes and checks a payload.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = exact(payload, Self::LEN)?;
        let epoch = EpochId(r.u64()?);
        let (page_count, state_len, disk_write_count, disk_image_bytes) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let flags = r.u32()?;
        if flags & !BEGIN_FLAG_INITIAL_SYNC != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        zero32(&mut r)?;
        Ok(Self {
            epoch,
            page_count,
            state_len,
            disk_write_count,
            disk_image_bytes,
            initial_sync: flags & BEGIN_FLAG_INITIAL_SYNC != 0,
        })
    }
}

/// Everything of the epoch has been sent: the totals to cross-check, and the digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochCommit {
    /// The epoch.
    pub epoch: EpochId,
    /// Pages sent.
    pub pages: u64,
    /// Machine state bytes sent.
    pub state_bytes: u64,
    /// Disk write entries sent.
    pub disk_writes: u64,
    /// Disk image bytes sent.
    pub disk_image_bytes: u64,
    /// [`EpochDigest`] of the epoch's frames.
    pub digest: [u8; 32],
}

impl EpochCommit {
    /// Payload size.
    pub const LEN: usize = 72;

    /// The payload bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[8..16].copy_from_slice(&self.pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.state_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_writes.to_le_bytes());
        b[32..40].copy_from_slice(&self.disk_image_bytes.to_le_bytes());
        b[40..72].copy_from_slice(&self.digest);
        b
    }

    /// Decodes a payload.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = exact(payload, Self::LEN)?;
        let epoch = EpochId(r.u64()?);
        let (pages, state_bytes, disk_writes, disk_image_bytes) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(r.take(32)?);
        Ok(Self { epoch, pages, state_bytes, disk_writes, disk_image_bytes, digest })
    }
}

/// The backup holds the epoch (and every one before it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochAck {
    /// The epoch.
    pub epoch: EpochId,
}

impl EpochAck {
    /// Payload size.
    pub const LEN: usize = 8;

    /// The payload bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        self.epoch.0.to_le_bytes()
    }

    /// Decodes a payload.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = exact(payload, Self::LEN)?;
        Ok(Self { epoch: EpochId(r.u64()?) })
    }
}

/// The primary's first frame of a session (`LeaseTerm`): the lease term its copy is current for
/// (0 without a quorum) and, from minor 8, the id its lease watchdog tags late input with
/// ([`crate::late_input`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseTerm {
    /// The term.
    pub term: u64,
    /// The daemon's late input id, if it has a watchdog that forwards late input.
    pub late_input: Option<crate::late_input::LateInputId>,
}

impl LeaseTerm {
    /// Payload size without the id (minor 2 to 7, or no id).
    pub const LEN: usize = 8;
    /// Payload size with the id.
    pub const LEN_WITH_ID: usize = 8 + crate::late_input::LATE_INPUT_ID_LEN;

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = self.term.to_le_bytes().to_vec();
        if let Some(id) = &self.late_input {
            p.extend_from_slice(&id.0);
        }
        p
    }

    /// Decodes a payload of either size.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        match payload.len() {
            Self::LEN => Ok(Self { term: exact(payload, Self::LEN)?.u64()?, late_input: None }),
            Self::LEN_WITH_ID => {
                let (term, id) = payload.split_at(Self::LEN);
                let id = id.try_into().map_err(|_| DecodeError::Short)?;
                Ok(Self { term: exact(term, Self::LEN)?.u64()?, late_input: Some(crate::late_input::LateInputId(id)) })
            }
            got => Err(DecodeError::Length { expected: Self::LEN_WITH_ID as u64, got }),
        }
    }
}

/// What the backup's standby holds, sent right after the handshake so that the primary can choose
/// between continuing with the next epoch and starting an initial synchronisation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StandbyInfo {
    /// The last epoch applied, if any since the last initial synchronisation began.
    pub committed: Option<EpochId>,
    /// The standby can be resumed (it holds a machine state consistent with its memory and disk).
    pub restorable: bool,
    /// Size of the standby memory.
    pub memory_bytes: u64,
    /// Size of the standby disk.
    pub disk_bytes: u64,
}

impl StandbyInfo {
    /// Payload size.
    pub const LEN: usize = 32;
    const HAS_COMMITTED: u32 = 1;
    const RESTORABLE: u32 = 2;

    /// The payload bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let mut flags = 0;
        if self.committed.is_some() {
            flags |= Self::HAS_COMMITTED;
        }
        if self.restorable {
            flags |= Self::RESTORABLE;
        }
        b[0..4].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.committed.map_or(0, |e| e.0).to_le_bytes());
        b[16..24].copy_from_slice(&self.memory_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_bytes.to_le_bytes());
        b
    }

    /// Decodes and checks a payload.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = exact(payload, Self::LEN)?;
        let flags = r.u32()?;
        if flags & !(Self::HAS_COMMITTED | Self::RESTORABLE) != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        zero32(&mut r)?;
        let epoch = r.u64()?;
        let has = flags & Self::HAS_COMMITTED != 0;
        // Canonical form: no epoch without the flag, and nothing restorable without an epoch.
        if !has && (epoch != 0 || flags & Self::RESTORABLE != 0) {
            return Err(DecodeError::Reserved);
        }
        Ok(Self {
            committed: has.then_some(EpochId(epoch)),
            restorable: flags & Self::RESTORABLE != 0,
            memory_bytes: r.u64()?,
            disk_bytes: r.u64()?,
        })
    }
}

/// What the backup's copy of the disk may differ in from the copy it was last in sync with (its
/// write-intent record), sent after its `HostCpu` (minor 5 and later): the primary then copies only
/// the union of both sides' marked regions instead of the whole disk.
///
/// ```text
///  0  8 region bytes (a power of two, at least a sector)
///  8  4 flags: 1 = the record is complete (it knows every region written since the last sync)
/// 12  4 reserved, 0
/// 16  8 n: marked regions (0 when incomplete)
/// 24  8n the marked regions, ascending, each below the disk's region count
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskMarks {
    /// Bytes per region.
    pub region_bytes: u64,
    /// The marked regions, ascending; `None`: the record does not know the past (a full copy).
    pub regions: Option<Vec<u64>>,
}

impl DiskMarks {
    const COMPLETE: u32 = 1;
    const HEAD_LEN: usize = 24;
    /// Most regions one frame names; a record with more marks is sent as incomplete (a copy of
    /// nearly everything is close to a full one anyway).
    pub const MAX_REGIONS: usize = 1 << 20;

    /// Marks that ask for a full copy.
    pub fn unknown(region_bytes: u64) -> Self {
        Self { region_bytes, regions: None }
    }

    /// The payload bytes; too many marks are sent as an incomplete record.
    pub fn encode(&self) -> Vec<u8> {
        let regions = self.regions.as_ref().filter(|r| r.len() <= Self::MAX_REGIONS);
        let mut b = Vec::with_capacity(Self::HEAD_LEN + regions.map_or(0, |r| r.len() * 8));
        b.extend_from_slice(&self.region_bytes.to_le_bytes());
        b.extend_from_slice(&(if regions.is_some() { Self::COMPLETE } else { 0 }).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(regions.map_or(0, |r| r.len()) as u64).to_le_bytes());
        for r in regions.into_iter().flatten() {
            b.extend_from_slice(&r.to_le_bytes());
        }
        b
    }

    /// Decodes and checks a payload for a disk of `disk_bytes`.
    pub fn decode(payload: &[u8], disk_bytes: u64) -> Result<Self, DecodeError> {
        let mut r = Cursor::new(payload);
        let region_bytes = r.u64()?;
        let flags = r.u32()?;
        if flags & !Self::COMPLETE != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        zero32(&mut r)?;
        let n = r.u64()?;
        if region_bytes < SECTOR_SIZE || !region_bytes.is_power_of_two() {
            return Err(DecodeError::BadRegionSize(region_bytes));
        }
        let expected = usize::try_from(n).ok().filter(|&n| n <= Self::MAX_REGIONS).and_then(|n| n.checked_mul(8)).map(|b| b + Self::HEAD_LEN);
        if expected != Some(payload.len()) {
            return Err(DecodeError::Length { expected: n.saturating_mul(8).saturating_add(Self::HEAD_LEN as u64), got: payload.len() });
        }
        if flags & Self::COMPLETE == 0 {
            if n != 0 {
                return Err(DecodeError::Reserved);
            }
            return Ok(Self::unknown(region_bytes));
        }
        let count = disk_bytes.div_ceil(region_bytes);
        let mut regions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let region = r.u64()?;
            if region >= count || regions.last().is_some_and(|&last| last >= region) {
                return Err(DecodeError::BadRegion { region, count });
            }
            regions.push(region);
        }
        Ok(Self { region_bytes, regions: Some(regions) })
    }
}

/// Payload offset of the page bytes in a Pages frame of `ranges` ranges: the head, padded so that
/// the frame up to there is a whole number of [`PAGE_DATA_ALIGN`]s. `None` on overflow.
pub fn pages_data_offset(ranges: usize) -> Option<usize> {
    let head = ranges.checked_mul(RANGE_LEN)?.checked_add(LIST_HEADER_LEN + HEADER_LEN)?;
    Some(head.checked_next_multiple_of(PAGE_DATA_ALIGN)? - HEADER_LEN)
}

/// Bytes of a Pages payload carrying `ranges`.
pub fn pages_payload_len(ranges: &[PageRange]) -> usize {
    let pages: u64 = ranges.iter().map(|r| r.len).sum();
    pages_data_offset(ranges.len()).unwrap_or(usize::MAX) + pages as usize * PAGE_SIZE
}

/// Writes the head of a Pages payload (counts, ranges, padding; the page bytes follow it on the
/// wire) into `out`, replacing its content. Returns the number of pages.
pub fn encode_pages_head(ranges: &[PageRange], out: &mut Vec<u8>) -> u64 {
    out.clear();
    let pages: u64 = ranges.iter().map(|r| r.len).sum();
    // Frames are built from at most MAX_PAGES_PER_FRAME pages, so both counts fit in u32.
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    out.extend_from_slice(&(pages as u32).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.start.to_le_bytes());
        out.extend_from_slice(&(r.len as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    // A frame holds at most a few thousand ranges: no overflow.
    out.resize(pages_data_offset(ranges.len()).unwrap_or(out.len()), 0);
    pages
}

/// The `n` ranges of a page list's table (`start u64 | len u32 | zero u32` each): ascending,
/// disjoint, non-empty, inside a guest memory of `memory_pages` pages, and `declared` pages in all.
/// Shared by every payload that lists pages (Pages, and RDMA's descriptors).
pub(crate) fn decode_range_table(table: &[u8], n: usize, declared: u64, memory_pages: u64) -> Result<Vec<PageRange>, DecodeError> {
    let mut t = Cursor::new(table);
    let mut ranges = Vec::with_capacity(n);
    let mut actual: u64 = 0;
    let mut prev_end = 0u64;
    for i in 0..n {
        let start = t.u64()?;
        let len = u64::from(t.u32()?);
        zero32(&mut t)?;
        let end = start.checked_add(len).filter(|_| len > 0).ok_or(DecodeError::BadRange { start, len })?;
        if i > 0 && start < prev_end {
            return Err(DecodeError::RangeOrder);
        }
        if end > memory_pages {
            return Err(DecodeError::RangeOutside { start, len, pages: memory_pages });
        }
        prev_end = end;
        // Cannot overflow: every range lies inside memory_pages and they are disjoint.
        actual += len;
        ranges.push(PageRange { start, len });
    }
    if actual != declared {
        return Err(DecodeError::PageCount { declared, actual });
    }
    Ok(ranges)
}

/// A checked Pages payload.
#[derive(Debug)]
pub struct PagesView<'a> {
    ranges: Vec<PageRange>,
    data: &'a [u8],
}

impl<'a> PagesView<'a> {
    /// Decodes and checks a payload against a guest memory of `memory_pages` pages.
    pub fn decode(payload: &'a [u8], memory_pages: u64) -> Result<Self, DecodeError> {
        let mut r = Cursor::new(payload);
        let n = r.u32()? as usize;
        let declared = u64::from(r.u32()?);
        if n == 0 {
            return Err(DecodeError::Empty);
        }
        // The range table must fit before anything is allocated for it.
        let table = n.checked_mul(RANGE_LEN).ok_or(DecodeError::Short)?;
        let ranges = decode_range_table(r.take(table)?, n, declared, memory_pages)?;
        let actual = declared;
        let offset = pages_data_offset(n).ok_or(DecodeError::Short)?;
        if r.take(offset - LIST_HEADER_LEN - table)?.iter().any(|&b| b != 0) {
            return Err(DecodeError::Reserved);
        }
        let data = r.rest();
        let expected = actual.checked_mul(PAGE_SIZE as u64).ok_or(DecodeError::Short)?;
        if data.len() as u64 != expected {
            return Err(DecodeError::Length { expected: (offset as u64).saturating_add(expected), got: payload.len() });
        }
        Ok(Self { ranges, data })
    }

    /// The ranges, ascending.
    pub fn ranges(&self) -> &[PageRange] {
        &self.ranges
    }

    /// Pages in the frame.
    pub fn page_count(&self) -> u64 {
        (self.data.len() / PAGE_SIZE) as u64
    }

    /// Each range with its bytes.
    pub fn runs(&self) -> impl Iterator<Item = (PageRange, &'a [u8])> + '_ {
        let mut at = 0usize;
        self.ranges.iter().map(move |r| {
            let n = r.len as usize * PAGE_SIZE;
            let bytes = &self.data[at..at + n];
            at += n;
            (*r, bytes)
        })
    }
}

/// Splits a page set into the ranges of successive Pages frames, at most `max_pages` pages each.
pub fn page_frames(set: &PageRangeSet, max_pages: u64) -> PageFrames<'_> {
    PageFrames { ranges: set.ranges(), idx: 0, offset: 0, max: max_pages.max(1) }
}

/// Iterator of [`page_frames`].
#[derive(Debug)]
pub struct PageFrames<'a> {
    ranges: &'a [PageRange],
    idx: usize,
    offset: u64,
    max: u64,
}

impl Iterator for PageFrames<'_> {
    type Item = Vec<PageRange>;

    fn next(&mut self) -> Option<Vec<PageRange>> {
        if self.idx >= self.ranges.len() {
            return None;
        }
        let mut out = Vec::new();
        let mut budget = self.max;
        while budget > 0 {
            let Some(r) = self.ranges.get(self.idx) else { break };
            let left = r.len - self.offset;
            let take = left.min(budget);
            out.push(PageRange { start: r.start + self.offset, len: take });
            budget -= take;
            if take == left {
                self.idx += 1;
                self.offset = 0;
            } else {
                self.offset += take;
            }
        }
        Some(out)
    }
}

/// Writes the head of a DiskWrites payload (count and entry table; the entries' bytes follow it on
/// the wire) into `out`, replacing its content.
pub fn encode_disk_writes_head(writes: &[DiskWrite], out: &mut Vec<u8>) {
    out.clear();
    // Frames hold at most MAX_CHUNK_BYTES of writes of at least one sector each: the count fits.
    out.extend_from_slice(&(writes.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for w in writes {
        out.extend_from_slice(&w.sector.to_le_bytes());
        // Entries are at most MAX_DISK_WRITE_BYTES (checked by the sender before encoding).
        out.extend_from_slice(&(w.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
}

/// Bytes of a DiskWrites payload carrying `writes`.
pub fn disk_writes_payload_len(writes: &[DiskWrite]) -> usize {
    LIST_HEADER_LEN + RANGE_LEN * writes.len() + writes.iter().map(|w| w.data.len()).sum::<usize>()
}

/// Splits disk writes into the groups of successive DiskWrites frames: each group holds at most
/// `max_bytes` of data, or one entry when a single entry is larger.
pub fn disk_write_frames(writes: &[DiskWrite], max_bytes: usize) -> impl Iterator<Item = &[DiskWrite]> {
    let mut rest = writes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0usize;
        let mut n = 0;
        for w in rest {
            if n > 0 && bytes + w.data.len() > max_bytes {
                break;
            }
            bytes += w.data.len();
            n += 1;
        }
        let (group, tail) = rest.split_at(n);
        rest = tail;
        Some(group)
    })
}

/// Checks that `len` bytes at byte `offset` lie inside a disk of `disk_bytes`.
fn on_disk(offset: u64, len: u64, disk_bytes: u64) -> Result<(), DecodeError> {
    match offset.checked_add(len) {
        Some(end) if end <= disk_bytes => Ok(()),
        _ => Err(DecodeError::DiskOutside { offset, len, disk: disk_bytes }),
    }
}

/// Appends one guest frame to a HeldOutput payload being built.
pub fn encode_output_frame(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    out.extend_from_slice(frame);
}

/// The frames of a checked HeldOutput payload, in order.
pub fn decode_output(payload: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    let mut r = Cursor::new(payload);
    let mut frames = Vec::new();
    while !r.rest().is_empty() {
        let len = r.u32()? as usize;
        if len == 0 || len > MAX_GUEST_FRAME {
            return Err(DecodeError::BadOutputFrame(len));
        }
        frames.push(r.take(len)?);
    }
    if frames.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(frames)
}

/// A checked DiskWrites payload.
#[derive(Debug)]
pub struct DiskWritesView<'a> {
    entries: Vec<(u64, &'a [u8])>,
}

impl<'a> DiskWritesView<'a> {
    /// Decodes and checks a payload against a disk of `disk_bytes`.
    pub fn decode(payload: &'a [u8], disk_bytes: u64) -> Result<Self, DecodeError> {
        let mut r = Cursor::new(payload);
        let n = r.u32()? as usize;
        zero32(&mut r)?;
        if n == 0 {
            return Err(DecodeError::Empty);
        }
        let table = n.checked_mul(RANGE_LEN).ok_or(DecodeError::Short)?;
        let mut t = Cursor::new(r.take(table)?);
        let mut data = r.rest();
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let sector = t.u64()?;
            let len = t.u32()? as usize;
            zero32(&mut t)?;
            if len == 0 || !(len as u64).is_multiple_of(SECTOR_SIZE) || len > MAX_DISK_WRITE_BYTES {
                return Err(DecodeError::BadWrite { sector, len: len as u64 });
            }
            let offset = sector.checked_mul(SECTOR_SIZE).ok_or(DecodeError::DiskOutside {
                offset: u64::MAX,
                len: len as u64,
                disk: disk_bytes,
            })?;
            on_disk(offset, len as u64, disk_bytes)?;
            if data.len() < len {
                return Err(DecodeError::Short);
            }
            let (bytes, rest) = data.split_at(len);
            data = rest;
            entries.push((sector, bytes));
        }
        if !data.is_empty() {
            let got = payload.len();
            return Err(DecodeError::Length { expected: (got - data.len()) as u64, got });
        }
        Ok(Self { entries })
    }

    /// The entries, `(sector, bytes)`, in the order they apply.
    pub fn entries(&self) -> &[(u64, &'a [u8])] {
        &self.entries
    }
}

/// The 8-byte head of a DiskImage payload (the chunk's bytes follow it on the wire).
pub fn encode_disk_image_head(offset: u64) -> [u8; 8] {
    offset.to_le_bytes()
}

/// A checked DiskImage payload.
#[derive(Debug)]
pub struct DiskImageView<'a> {
    /// Byte offset on the disk.
    pub offset: u64,
    /// The bytes.
    pub data: &'a [u8],
}

impl<'a> DiskImageView<'a> {
    /// Decodes and checks a payload against a disk of `disk_bytes`.
    pub fn decode(payload: &'a [u8], disk_bytes: u64) -> Result<Self, DecodeError> {
        let mut r = Cursor::new(payload);
        let offset = r.u64()?;
        let data = r.rest();
        let len = data.len() as u64;
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) || !offset.is_multiple_of(SECTOR_SIZE) {
            return Err(DecodeError::BadImageChunk { offset, len });
        }
        on_disk(offset, len, disk_bytes)?;
        Ok(Self { offset, data })
    }
}

/// The running digest of one epoch's frames (see the module documentation).
#[derive(Clone, Debug)]
pub struct EpochDigest(blake3::Hasher);

impl EpochDigest {
    /// A digest for `epoch`.
    pub fn new(epoch: EpochId) -> Self {
        let mut h = blake3::Hasher::new_derive_key("ftvm a-link 2026 epoch digest");
        h.update(&epoch.0.to_le_bytes());
        Self(h)
    }

    /// Adds the next frame, by its authentication tag.
    pub fn add_frame(&mut self, tag: &[u8; 32]) {
        self.0.update(tag);
    }

    /// The digest so far.
    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic, dependency-free randomness for the tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    #[test]
    fn disk_marks_round_trip_and_bad_ones_are_refused() {
        const MIB: u64 = 1 << 20;
        let marks = DiskMarks { region_bytes: MIB, regions: Some(vec![0, 3, 63]) };
        assert_eq!(DiskMarks::decode(&marks.encode(), 64 * MIB).unwrap(), marks);
        let unknown = DiskMarks::unknown(MIB);
        assert_eq!(DiskMarks::decode(&unknown.encode(), 64 * MIB).unwrap(), unknown);
        // A region past the disk, out of order, repeated; a bad region size; a short or long list.
        for (regions, disk) in [(vec![64], 64 * MIB), (vec![3, 1], 64 * MIB), (vec![2, 2], 64 * MIB)] {
            let bytes = DiskMarks { region_bytes: MIB, regions: Some(regions) }.encode();
            assert!(matches!(DiskMarks::decode(&bytes, disk), Err(DecodeError::BadRegion { .. })));
        }
        let bad_size = DiskMarks { region_bytes: 3000, regions: Some(vec![]) }.encode();
        assert_eq!(DiskMarks::decode(&bad_size, 64 * MIB), Err(DecodeError::BadRegionSize(3000)));
        let good = marks.encode();
        assert!(matches!(DiskMarks::decode(&good[..good.len() - 1], 64 * MIB), Err(DecodeError::Length { .. })));
        let mut long = good.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(matches!(DiskMarks::decode(&long, 64 * MIB), Err(DecodeError::Length { .. })));
        // A count that would not fit is a length error, not an allocation.
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(DiskMarks::decode(&huge, 64 * MIB), Err(DecodeError::Length { .. })));
        let mut flags = good;
        flags[8] = 2;
        assert_eq!(DiskMarks::decode(&flags, 64 * MIB), Err(DecodeError::UnknownFlags(2)));
        // Too many marks for one frame are sent as "unknown": a full copy.
        let many = DiskMarks { region_bytes: 512, regions: Some((0..DiskMarks::MAX_REGIONS as u64 + 1).collect()) };
        assert_eq!(DiskMarks::decode(&many.encode(), 1 << 40).unwrap(), DiskMarks::unknown(512));
    }

    const MEM_PAGES: u64 = 4096;
    const DISK: u64 = 1 << 20;

    fn pages_payload(ranges: &[PageRange]) -> Vec<u8> {
        let mut p = Vec::new();
        let n = encode_pages_head(ranges, &mut p);
        for i in 0..n * PAGE_SIZE as u64 {
            p.push(i as u8);
        }
        p
    }

    fn writes_payload(writes: &[DiskWrite]) -> Vec<u8> {
        let mut p = Vec::new();
        encode_disk_writes_head(writes, &mut p);
        for w in writes {
            p.extend_from_slice(&w.data);
        }
        p
    }

    /// Every decoder, on the same bytes; none may panic.
    fn decode_all(b: &[u8]) -> usize {
        let mut ok = 0;
        ok += usize::from(EpochBegin::decode(b).is_ok());
        ok += usize::from(EpochCommit::decode(b).is_ok());
        ok += usize::from(EpochAck::decode(b).is_ok());
        ok += usize::from(StandbyInfo::decode(b).is_ok());
        ok += usize::from(PagesView::decode(b, MEM_PAGES).is_ok());
        ok += usize::from(DiskWritesView::decode(b, DISK).is_ok());
        ok += usize::from(DiskImageView::decode(b, DISK).is_ok());
        ok
    }

    #[test]
    fn fixed_payloads_round_trip() {
        let b = EpochBegin {
            epoch: EpochId(7),
            page_count: 3,
            state_len: 99,
            disk_write_count: 2,
            disk_image_bytes: 4096,
            initial_sync: true,
        };
        assert_eq!(EpochBegin::decode(&b.encode()), Ok(b));
        let c = EpochCommit { epoch: EpochId(7), pages: 3, state_bytes: 99, disk_writes: 2, disk_image_bytes: 1, digest: [5; 32] };
        assert_eq!(EpochCommit::decode(&c.encode()), Ok(c));
        let a = EpochAck { epoch: EpochId(u64::MAX) };
        assert_eq!(EpochAck::decode(&a.encode()), Ok(a));
        for info in [
            StandbyInfo { committed: None, restorable: false, memory_bytes: 1 << 30, disk_bytes: 8 << 20 },
            StandbyInfo { committed: Some(EpochId(0)), restorable: false, memory_bytes: 4096, disk_bytes: 0 },
            StandbyInfo { committed: Some(EpochId(12)), restorable: true, memory_bytes: 4096, disk_bytes: 512 },
        ] {
            assert_eq!(StandbyInfo::decode(&info.encode()), Ok(info));
        }
    }

    #[test]
    fn fixed_payload_checks() {
        let mut b = EpochBegin::default().encode();
        b[40] = 2;
        assert_eq!(EpochBegin::decode(&b), Err(DecodeError::UnknownFlags(2)));
        let mut b = EpochBegin::default().encode();
        b[47] = 1;
        assert_eq!(EpochBegin::decode(&b), Err(DecodeError::Reserved));
        let mut s = StandbyInfo::default().encode();
        s[8] = 1; // an epoch without the flag
        assert_eq!(StandbyInfo::decode(&s), Err(DecodeError::Reserved));
        assert!(matches!(EpochAck::decode(&[0; 9]), Err(DecodeError::Length { expected: 8, got: 9 })));
    }

    #[test]
    fn pages_round_trip_and_checks() {
        let ranges = [PageRange { start: 1, len: 2 }, PageRange { start: 3, len: 1 }, PageRange { start: 100, len: 3 }];
        let p = pages_payload(&ranges);
        assert_eq!(p.len(), pages_payload_len(&ranges));
        let v = PagesView::decode(&p, MEM_PAGES).unwrap();
        assert_eq!(v.ranges(), &ranges);
        assert_eq!(v.page_count(), 6);
        let runs: Vec<_> = v.runs().map(|(r, b)| (r.start, b.len(), b[0])).collect();
        assert_eq!(runs, vec![(1, 8192, 0), (3, 4096, 0), (100, 3 * 4096, 0)]);
        // Outside memory, overlapping, descending, empty range, empty list.
        assert!(matches!(PagesView::decode(&p, 102), Err(DecodeError::RangeOutside { .. })));
        let bad = pages_payload(&[PageRange { start: 1, len: 2 }, PageRange { start: 2, len: 1 }]);
        assert_eq!(PagesView::decode(&bad, MEM_PAGES).unwrap_err(), DecodeError::RangeOrder);
        let bad = pages_payload(&[PageRange { start: 5, len: 1 }, PageRange { start: 2, len: 1 }]);
        assert_eq!(PagesView::decode(&bad, MEM_PAGES).unwrap_err(), DecodeError::RangeOrder);
        let bad = pages_payload(&[PageRange { start: 5, len: 0 }]);
        assert!(matches!(PagesView::decode(&bad, MEM_PAGES), Err(DecodeError::BadRange { .. })));
        let bad = pages_payload(&[PageRange { start: u64::MAX, len: 1 }]);
        assert!(matches!(PagesView::decode(&bad, u64::MAX), Err(DecodeError::BadRange { .. })));
        assert_eq!(PagesView::decode(&pages_payload(&[]), MEM_PAGES).unwrap_err(), DecodeError::Empty);
        // Page bytes start chunk-aligned within the frame, after zero padding.
        assert_eq!((HEADER_LEN + pages_data_offset(3).unwrap()) % PAGE_DATA_ALIGN, 0);
        assert_eq!(pages_data_offset(0), Some(1024 - 32));
        assert_eq!(pages_data_offset(61), Some(1024 - 32));
        assert_eq!(pages_data_offset(62), Some(2048 - 32));
        assert_eq!(pages_data_offset(usize::MAX), None);
        let mut bad = p.clone();
        bad[8 + 3 * 16] = 1;
        assert_eq!(PagesView::decode(&bad, MEM_PAGES).unwrap_err(), DecodeError::Reserved);
        // A page count that disagrees with the ranges, and extra bytes.
        let mut bad = p.clone();
        bad[4] = 5;
        assert_eq!(PagesView::decode(&bad, MEM_PAGES).unwrap_err(), DecodeError::PageCount { declared: 5, actual: 6 });
        let mut bad = p.clone();
        bad.push(0);
        assert!(matches!(PagesView::decode(&bad, MEM_PAGES), Err(DecodeError::Length { .. })));
        // A huge range count with a short payload is refused without allocating for it.
        let mut bad = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        bad.extend_from_slice(&[0; 32]);
        assert_eq!(PagesView::decode(&bad, MEM_PAGES).unwrap_err(), DecodeError::Short);
    }

    #[test]
    fn page_sets_split_into_bounded_frames() {
        let mut set = PageRangeSet::new();
        set.insert(0, 10);
        set.insert(20, 3);
        set.insert(30, 1);
        let frames: Vec<_> = page_frames(&set, 4).collect();
        let counts: Vec<u64> = frames.iter().map(|f| f.iter().map(|r| r.len).sum()).collect();
        assert_eq!(counts, vec![4, 4, 4, 2]);
        let all: Vec<u64> = frames.iter().flatten().flat_map(|r| r.start..r.start + r.len).collect();
        assert_eq!(all, set.pages().collect::<Vec<_>>());
        assert_eq!(page_frames(&PageRangeSet::new(), 4).count(), 0);
        // max 0 is treated as 1 rather than looping forever.
        assert_eq!(page_frames(&set, 0).count(), 14);
    }

    #[test]
    fn disk_writes_round_trip_and_checks() {
        let writes = vec![DiskWrite::new(0, vec![1; 512]), DiskWrite::new(2047, vec![2; 512]), DiskWrite::new(8, vec![3; 1024])];
        let p = writes_payload(&writes);
        assert_eq!(p.len(), disk_writes_payload_len(&writes));
        let v = DiskWritesView::decode(&p, DISK).unwrap();
        let got: Vec<(u64, Vec<u8>)> = v.entries().iter().map(|(s, b)| (*s, b.to_vec())).collect();
        let want: Vec<(u64, Vec<u8>)> = writes.iter().map(|w| (w.sector, w.data.to_vec())).collect();
        assert_eq!(got, want);
        // Past the end of the disk, unaligned, empty.
        assert!(matches!(DiskWritesView::decode(&p, DISK - 512), Err(DecodeError::DiskOutside { .. })));
        let bad = writes_payload(&[DiskWrite::new(0, vec![0; 100])]);
        assert!(matches!(DiskWritesView::decode(&bad, DISK), Err(DecodeError::BadWrite { .. })));
        let bad = writes_payload(&[DiskWrite::new(u64::MAX / 2, vec![0; 512])]);
        assert!(matches!(DiskWritesView::decode(&bad, DISK), Err(DecodeError::DiskOutside { .. })));
        assert_eq!(DiskWritesView::decode(&writes_payload(&[]), DISK).unwrap_err(), DecodeError::Empty);
        let mut bad = p.clone();
        bad.push(0);
        assert!(matches!(DiskWritesView::decode(&bad, DISK), Err(DecodeError::Length { .. })));
    }

    #[test]
    fn disk_writes_split_into_bounded_frames() {
        let writes: Vec<_> = (0..10).map(|i| DiskWrite::new(i, vec![0; 512 * (1 + i as usize % 3)])).collect();
        let groups: Vec<_> = disk_write_frames(&writes, 2048).collect();
        assert!(groups.iter().all(|g| !g.is_empty() && g.iter().map(|w| w.data.len()).sum::<usize>() <= 2048));
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 10);
        // One entry bigger than the budget travels alone.
        let big = vec![DiskWrite::new(0, vec![0; 4096]), DiskWrite::new(8, vec![0; 512])];
        assert_eq!(disk_write_frames(&big, 1024).map(|g| g.len()).collect::<Vec<_>>(), vec![1, 1]);
    }

    #[test]
    fn disk_image_checks() {
        let mut p = encode_disk_image_head(1024).to_vec();
        p.extend_from_slice(&[9; 1024]);
        let v = DiskImageView::decode(&p, DISK).unwrap();
        assert_eq!((v.offset, v.data.len()), (1024, 1024));
        assert!(matches!(DiskImageView::decode(&p, 1536), Err(DecodeError::DiskOutside { .. })));
        assert!(matches!(DiskImageView::decode(&p[..8], DISK), Err(DecodeError::BadImageChunk { .. })));
        let mut bad = encode_disk_image_head(100).to_vec();
        bad.extend_from_slice(&[0; 512]);
        assert!(matches!(DiskImageView::decode(&bad, DISK), Err(DecodeError::BadImageChunk { .. })));
        let mut bad = encode_disk_image_head(u64::MAX - 511).to_vec();
        bad.extend_from_slice(&[0; 512]);
        assert!(matches!(DiskImageView::decode(&bad, u64::MAX), Err(DecodeError::DiskOutside { .. })));
    }

    #[test]
    fn every_truncation_of_a_valid_payload_is_refused() {
        type Accepts = fn(&[u8]) -> bool;
        let valid: Vec<(Vec<u8>, Accepts)> = vec![
            (EpochBegin::default().encode().to_vec(), |b| EpochBegin::decode(b).is_ok()),
            (EpochCommit::default().encode().to_vec(), |b| EpochCommit::decode(b).is_ok()),
            (EpochAck::default().encode().to_vec(), |b| EpochAck::decode(b).is_ok()),
            (StandbyInfo::default().encode().to_vec(), |b| StandbyInfo::decode(b).is_ok()),
            (pages_payload(&[PageRange { start: 3, len: 2 }, PageRange { start: 9, len: 1 }]), |b| {
                PagesView::decode(b, MEM_PAGES).is_ok()
            }),
            (writes_payload(&[DiskWrite::new(1, vec![1; 512]), DiskWrite::new(5, vec![2; 1024])]), |b| {
                DiskWritesView::decode(b, DISK).is_ok()
            }),
        ];
        for (payload, decodes) in valid {
            assert!(decodes(&payload));
            for n in 0..payload.len() {
                assert!(!decodes(&payload[..n]), "truncation to {n} of {} accepted", payload.len());
            }
        }
        // Whole sectors of image data remain valid when cut at a sector boundary, but nothing else.
        let mut img = encode_disk_image_head(0).to_vec();
        img.extend_from_slice(&[1; 1024]);
        for n in 0..img.len() {
            let ok = DiskImageView::decode(&img[..n], DISK).is_ok();
            assert_eq!(ok, n == 8 + 512, "image truncated to {n}");
        }
    }

    #[test]
    fn random_bytes_never_panic_any_decoder() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for round in 0..20_000u32 {
            let len = match round % 4 {
                0 => rng.below(16) as usize,
                1 => rng.below(80) as usize,
                2 => 8 + 16 * rng.below(4) as usize + rng.below(2) as usize * 512,
                _ => rng.below(9000) as usize,
            };
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Bias some inputs towards plausible headers so the deeper checks run too.
            if round % 3 == 0 && len >= 8 {
                b[0] = (rng.below(3)) as u8;
                b[1..4].fill(0);
                b[4..8].fill(0);
                b[4] = rng.below(3) as u8;
            }
            accepted += decode_all(&b);
        }
        // A sanity check that the generator is not trivially rejected everywhere is not needed: what
        // matters is that nothing panicked. Print for the curious.
        println!("random payloads accepted by some decoder: {accepted}");
    }

    #[test]
    fn mutating_valid_payloads_never_panics() {
        let mut rng = Rng(42);
        let seeds = [
            pages_payload(&[PageRange { start: 3, len: 2 }, PageRange { start: 9, len: 1 }]),
            writes_payload(&[DiskWrite::new(1, vec![1; 512]), DiskWrite::new(5, vec![2; 1024])]),
            EpochBegin::default().encode().to_vec(),
            StandbyInfo::default().encode().to_vec(),
        ];
        for seed in &seeds {
            for _ in 0..3000 {
                let mut b = seed.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] = rng.next() as u8;
                }
                if rng.below(4) == 0 {
                    b.truncate(rng.below(b.len() as u64 + 1) as usize);
                }
                decode_all(&b);
            }
        }
    }

    #[test]
    fn digest_depends_on_epoch_and_every_tag() {
        let mut a = EpochDigest::new(EpochId(1));
        a.add_frame(&[1; 32]);
        a.add_frame(&[2; 32]);
        let mut b = EpochDigest::new(EpochId(1));
        b.add_frame(&[1; 32]);
        assert_ne!(a.finish(), b.finish());
        b.add_frame(&[2; 32]);
        assert_eq!(a.finish(), b.finish());
        let mut c = EpochDigest::new(EpochId(2));
        c.add_frame(&[1; 32]);
        c.add_frame(&[2; 32]);
        assert_ne!(a.finish(), c.finish());
    }

    #[test]
    fn held_output_round_trips_and_bad_payloads_are_refused() {
        let mut p = Vec::new();
        encode_output_frame(&[1u8; 70], &mut p);
        encode_output_frame(&[2u8; 12], &mut p);
        let frames = decode_output(&p).unwrap();
        assert_eq!(frames, vec![&[1u8; 70][..], &[2u8; 12][..]]);
        assert!(matches!(decode_output(&[]), Err(DecodeError::Empty)));
        assert!(matches!(decode_output(&p[..p.len() - 1]), Err(DecodeError::Short)));
        assert!(matches!(decode_output(&0u32.to_le_bytes()), Err(DecodeError::BadOutputFrame(0))));
        let mut huge = ((MAX_GUEST_FRAME + 1) as u32).to_le_bytes().to_vec();
        huge.resize(MAX_GUEST_FRAME + 5, 0);
        assert!(matches!(decode_output(&huge), Err(DecodeError::BadOutputFrame(_))));
        assert!(matches!(decode_output(&[1, 0]), Err(DecodeError::Short)));
    }

    #[test]
    fn a_lease_term_decodes_with_or_without_the_late_input_id() {
        let plain = LeaseTerm { term: 42, late_input: None };
        assert_eq!(plain.encode().len(), LeaseTerm::LEN);
        assert_eq!(LeaseTerm::decode(&plain.encode()), Ok(plain));
        let with = LeaseTerm { term: 7, late_input: Some(crate::late_input::LateInputId([3; 16])) };
        assert_eq!(with.encode().len(), LeaseTerm::LEN_WITH_ID);
        assert_eq!(LeaseTerm::decode(&with.encode()), Ok(with));
        for len in [0, 7, 9, 23, 25] {
            assert!(LeaseTerm::decode(&vec![0; len]).is_err(), "{len} bytes");
        }
    }
}
