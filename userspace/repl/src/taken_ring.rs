//! The last frames the primary's VM took in, kept where its lease watchdog can read them after the
//! primary's death.
//!
//! Input sent ahead ([`crate::ingress`]) leaves the primary at the end of the device's receive
//! pass, or later, from the forwarder thread, when the A-Link is busy with an epoch. A request the
//! VM took in just before the primary died may not have left: the TAP no longer has it, the backup
//! never had it, and its client waits for its retransmission timeout (once in 20 failovers here).
//!
//! So each frame taken is also written, as it is taken, into a ring in a memfd that the watchdog
//! maps too ([`TakenRing::record`]), and the forwarder notes how far it has sent
//! ([`TakenRing::mark_sent`]). After the death, the watchdog sends the frames past that mark to the
//! backup as late input ([`TakenRing::unsent`]), before what reaches the TAP. A frame sent ahead
//! just before the death, before its mark, goes twice; the guest's TCP drops the copy, as it drops
//! a segment the network duplicated.
//!
//! Layout (native endianness: both processes run on the same host, from the same binary):
//! ```text
//! magic u64 | slots u32 | slot bytes u32 | next u64 | sent u64 | (pad to 64)
//! slot: stamp u64 (2n+1 while frame n is written, 2n+2 once whole) | len u32 | 0 u32 | frame
//! ```
//! Frames longer than a slot's room are not kept (requests are small; a frame cut short would be
//! worse than none).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The ring's first bytes.
const MAGIC: u64 = u64::from_le_bytes(*b"FTVMRING");
/// Bytes of the header.
const HEADER: usize = 64;
/// Where the header's fields are (see the layout above).
const MAGIC_AT: usize = 0;
const SLOTS_AT: usize = 8;
const SLOT_BYTES_AT: usize = 12;
/// The number of the next frame to record.
const NEXT_AT: usize = 16;
/// Frames numbered below this were sent ahead.
const SENT_AT: usize = 24;
/// Where a slot's length is, after its stamp (at the slot's start).
const SLOT_LEN_AT: usize = 8;
/// Bytes of a slot's own header (stamp, length, padding).
const SLOT_HEADER: usize = 16;
/// Frames kept: the last this many.
pub const SLOTS: usize = 256;
/// Bytes of a slot, header included: a frame of up to `SLOT_BYTES - 16` bytes is kept.
pub const SLOT_BYTES: usize = 2048;

/// Why a ring could not be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum TakenRingError {
    /// The memfd could not be made or sized.
    #[error("cannot make the taken-input ring's memory")]
    Create(#[source] io::Error),
    /// It could not be mapped.
    #[error("cannot map the taken-input ring")]
    Map(#[source] io::Error),
    /// What was handed over is no ring of this version.
    #[error("not a taken-input ring ({0})")]
    NotARing(&'static str),
}

/// A ring of the last frames taken in (see the module documentation).
#[derive(Debug)]
pub struct TakenRing {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
}

// SAFETY: `base` is a shared mapping owned by this value for its whole life; every access to it
// goes through atomics (the header, the stamps) or through copies bracketed by a stamp (the
// seqlock protocol of `record` and `unsent`), so concurrent use from several threads is sound.
unsafe impl Send for TakenRing {}
// SAFETY: as above.
unsafe impl Sync for TakenRing {}

impl TakenRing {
    /// A new, empty ring in a fresh memfd.
    pub fn create() -> Result<Self, TakenRingError> {
        let len = HEADER + SLOTS * SLOT_BYTES;
        let fd = ftvm_vmm::memory::sized_memfd(c"ftvm-taken-input", 0, len).map_err(TakenRingError::Create)?;
        let ring = Self::map(fd, len)?;
        ring.u32_at(SLOTS_AT).store(SLOTS as u32, Ordering::Relaxed);
        ring.u32_at(SLOT_BYTES_AT).store(SLOT_BYTES as u32, Ordering::Relaxed);
        ring.u64_at(MAGIC_AT).store(MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// The ring another process made, from a duplicate of its descriptor.
    pub fn open(fd: OwnedFd) -> Result<Self, TakenRingError> {
        let len = HEADER + SLOTS * SLOT_BYTES;
        // SAFETY: all zeroes is a valid `stat` to be written into.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, on a descriptor this function owns.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(TakenRingError::Map(io::Error::last_os_error()));
        }
        if usize::try_from(st.st_size).ok() != Some(len) {
            return Err(TakenRingError::NotARing("wrong size"));
        }
        let ring = Self::map(fd, len)?;
        if ring.u64_at(MAGIC_AT).load(Ordering::Acquire) != MAGIC {
            return Err(TakenRingError::NotARing("bad magic"));
        }
        let slots = ring.u32_at(SLOTS_AT).load(Ordering::Relaxed) as usize;
        let slot_bytes = ring.u32_at(SLOT_BYTES_AT).load(Ordering::Relaxed) as usize;
        if (slots, slot_bytes) != (SLOTS, SLOT_BYTES) {
            return Err(TakenRingError::NotARing("another geometry"));
        }
        Ok(ring)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Self, TakenRingError> {
        // SAFETY: a shared read-write mapping of `len` bytes of a memfd at least that long; the
        // result is checked, and unmapped only in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(TakenRingError::Map(io::Error::last_os_error()));
        }
        Ok(Self { fd, base: base.cast(), len })
    }

    /// The memfd, to hand to the watchdog.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.len);
        // SAFETY: `offset` is 8-aligned and inside the page-aligned mapping, which lives as long
        // as `self`; the word is only ever accessed atomically.
        unsafe { AtomicU64::from_ptr(self.base.add(offset).cast()) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset.is_multiple_of(4) && offset + 4 <= self.len);
        // SAFETY: as for `u64_at`, 4-aligned.
        unsafe { AtomicU32::from_ptr(self.base.add(offset).cast()) }
    }

    fn slot(n: u64) -> usize {
        HEADER + (n % SLOTS as u64) as usize * SLOT_BYTES
    }

    /// Keeps `frame`, taken in now; returns its number, or `None` if it is too long to keep.
    /// Frames are recorded by one thread at a time (the device's receive pass).
    pub fn record(&self, frame: &[u8]) -> Option<u64> {
        if frame.len() > SLOT_BYTES - SLOT_HEADER {
            return None;
        }
        let n = self.u64_at(NEXT_AT).load(Ordering::Relaxed);
        let slot = Self::slot(n);
        let stamp = self.u64_at(slot);
        stamp.store(2 * n + 1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.u32_at(slot + SLOT_LEN_AT).store(frame.len() as u32, Ordering::Relaxed);
        // SAFETY: the slot's frame area has room for `frame` (checked above) and lies inside the
        // mapping; a reader copies it only between two equal, even stamps.
        unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), self.base.add(slot + SLOT_HEADER), frame.len()) };
        stamp.store(2 * n + 2, Ordering::Release);
        self.u64_at(NEXT_AT).store(n + 1, Ordering::Release);
        Some(n)
    }

    /// Frames numbered below `through` have been sent ahead to the backup.
    pub fn mark_sent(&self, through: u64) {
        self.u64_at(SENT_AT).fetch_max(through, Ordering::AcqRel);
    }

    /// The frames kept and not marked sent, oldest first (in the watchdog, after the death: the
    /// recording process writes no more, but a frame it was writing is left out).
    pub fn unsent(&self) -> Vec<Vec<u8>> {
        let next = self.u64_at(NEXT_AT).load(Ordering::Acquire);
        let sent = self.u64_at(SENT_AT).load(Ordering::Acquire);
        let first = sent.max(next.saturating_sub(SLOTS as u64));
        let mut frames = Vec::new();
        for n in first..next {
            let slot = Self::slot(n);
            let stamp = self.u64_at(slot);
            if stamp.load(Ordering::Acquire) != 2 * n + 2 {
                continue;
            }
            let len = (self.u32_at(slot + SLOT_LEN_AT).load(Ordering::Relaxed) as usize).min(SLOT_BYTES - SLOT_HEADER);
            let mut frame = vec![0u8; len];
            // SAFETY: `len` bytes from the slot's frame area, inside the mapping.
            unsafe { std::ptr::copy_nonoverlapping(self.base.add(slot + SLOT_HEADER), frame.as_mut_ptr(), len) };
            std::sync::atomic::fence(Ordering::Acquire);
            if stamp.load(Ordering::Relaxed) == 2 * n + 2 {
                frames.push(frame);
            }
        }
        frames
    }
}

impl Drop for TakenRing {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring as the watchdog sees it: another mapping of the same memfd.
    fn reader(ring: &TakenRing) -> TakenRing {
        TakenRing::open(ring.fd().try_clone_to_owned().unwrap()).unwrap()
    }

    #[test]
    fn the_frames_not_marked_sent_are_read_through_another_mapping() {
        let ring = TakenRing::create().unwrap();
        let watchdog = reader(&ring);
        assert!(watchdog.unsent().is_empty());
        for i in 0..5u8 {
            assert_eq!(ring.record(&[i; 60]), Some(u64::from(i)));
        }
        ring.mark_sent(3);
        assert_eq!(watchdog.unsent(), vec![vec![3u8; 60], vec![4u8; 60]]);
        // Marks only go forward.
        ring.mark_sent(1);
        assert_eq!(watchdog.unsent().len(), 2);
        ring.mark_sent(5);
        assert!(watchdog.unsent().is_empty());
    }

    #[test]
    fn only_the_last_slots_frames_are_kept_and_long_frames_not_at_all() {
        let ring = TakenRing::create().unwrap();
        for i in 0..(SLOTS as u64 + 10) {
            ring.record(&i.to_le_bytes()).unwrap();
        }
        assert_eq!(ring.record(&vec![1u8; SLOT_BYTES]), None);
        assert_eq!(ring.record(&vec![1u8; SLOT_BYTES - SLOT_HEADER]), Some(SLOTS as u64 + 10));
        let frames = reader(&ring).unsent();
        assert_eq!(frames.len(), SLOTS);
        assert_eq!(frames[0], 11u64.to_le_bytes());
        assert_eq!(frames[SLOTS - 1].len(), SLOT_BYTES - SLOT_HEADER);
    }

    #[test]
    fn a_frame_being_written_is_left_out() {
        let ring = TakenRing::create().unwrap();
        ring.record(b"whole").unwrap();
        ring.record(b"cut short").unwrap();
        // As if the recording process died in the middle of frame 1: its stamp is odd.
        ring.u64_at(TakenRing::slot(1)).store(3, Ordering::Relaxed);
        assert_eq!(reader(&ring).unsent(), vec![b"whole".to_vec()]);
    }

    #[test]
    fn anything_else_is_refused() {
        let ring = TakenRing::create().unwrap();
        let copy = reader(&ring);
        copy.u64_at(MAGIC_AT).store(7, Ordering::Relaxed);
        assert!(matches!(TakenRing::open(ring.fd().try_clone_to_owned().unwrap()), Err(TakenRingError::NotARing(_))));
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(matches!(TakenRing::open(OwnedFd::from(file)), Err(TakenRingError::NotARing("wrong size"))));
    }
}
