//! The payloads of the RDMA A-Link (`ftvm-repl`'s cargo feature `rdma`): the TCP link stays the
//! control channel, and only the page bytes of an epoch travel as one-sided RDMA WRITEs into a
//! staging ring that the backup registered.
//!
//! ```text
//! after the backup's StandbyDigest (or its last set-up frame), only when the primary asked for RDMA:
//!   primary → backup  RdmaEndpoint   its queue pair (no ring)
//!   backup → primary  RdmaEndpoint   its queue pair and its staging ring (address, rkey, bytes)
//!                                    (or Goodbye: this backup has no RDMA)
//! in an epoch, instead of Pages:
//!   primary: RDMA WRITE of the pages into the ring, then over TCP
//!   primary → backup  RdmaPages      which guest pages were written where in the ring, and their hash
//! ```
//! Neither frame needs a protocol minor of its own: both sides send them only when their operator
//! asked for RDMA, and a backup that does not know them refuses the session at once (an unknown
//! frame kind), which the primary reports as a refused connection. Nothing changes for links
//! without RDMA.
//!
//! ```text
//! RdmaEndpoint (64 bytes)                 RdmaPages (48 + 16n bytes)
//!   0  4 flags (1 = carries a ring)         0  4 range count n (1..=MAX_RDMA_PAGES_PER_FRAME)
//!   4  4 queue pair number (24 bits)        4  4 page count p (1..=MAX_RDMA_PAGES_PER_FRAME)
//!   8  4 first packet sequence (24 bits)    8  8 ring offset (bytes, a multiple of 4096)
//!  12  2 LID (0 on RoCE)                   16 32 BLAKE3 of the p pages' bytes, in range order
//!  14  1 path MTU (ibv_mtu: 1..=5)         48 16n ranges: u64 first pfn, u32 pages, u32 reserved (0)
//!  15  1 reserved (0)
//!  16 16 GID
//!  32  8 ring address (0 without a ring)
//!  40  4 ring rkey (0 without a ring)
//!  44  4 reserved (0)
//!  48  8 ring bytes (0 without a ring)
//!  56  8 reserved (0)
//! ```
//! The pages of one `RdmaPages` lie back to back in the ring from its offset on, and never across
//! the ring's end (a placement that wraps is two frames). The hash is what makes an RDMA WRITE
//! that is late, torn or stale visible: the frame's tag covers it, the epoch digest covers the
//! tag, and the backup hashes the bytes it finds in its ring at the commit before it applies
//! anything. The backup checks the ring offset against its own ring (bounds, overlap within the
//! epoch) before it reads a byte: an offset from the wire is never trusted.

use crate::epoch::DecodeError;
use crate::le::{u16_at, u32_at, u64_at};
use crate::limits::{MAX_RDMA_PAGES_PER_FRAME, MAX_RDMA_RING_BYTES, MIN_RDMA_RING_BYTES, PAGE_SIZE};
use crate::pages::PageRange;

/// `RdmaEndpoint` flag: the endpoint carries a staging ring (the backup's).
pub const ENDPOINT_FLAG_RING: u32 = 1;
/// Largest queue pair number and packet sequence number (24 bits).
pub const MAX_QPN: u32 = (1 << 24) - 1;
/// The path MTUs of `enum ibv_mtu`: 1 = 256 bytes … 5 = 4096 bytes.
pub const MTU_CODES: std::ops::RangeInclusive<u8> = 1..=5;

/// A staging ring the backup registered for remote writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGrant {
    /// Its virtual address in the backup (what RDMA WRITEs name).
    pub addr: u64,
    /// The remote key of its memory region.
    pub rkey: u32,
    /// Its size: a multiple of 4 KiB between the limits.
    pub bytes: u64,
}

/// One side's reliable-connected queue pair, as the other side needs it to connect to it, and
/// (from the backup) the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaEndpoint {
    /// Queue pair number (24 bits; 0 and 1 are the special QPs and never valid here).
    pub qpn: u32,
    /// The first packet sequence number this side sends with (24 bits).
    pub psn: u32,
    /// Local identifier of the port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The port's active path MTU as an `ibv_mtu` code (1..=5); the link uses the smaller of both.
    pub mtu: u8,
    /// The port's GID at the chosen index (RoCE: the address; InfiniBand: may be zero without GRH).
    pub gid: [u8; 16],
    /// The backup's staging ring; `None` from the primary.
    pub ring: Option<RingGrant>,
}

impl RdmaEndpoint {
    /// Payload size.
    pub const LEN: usize = 64;

    /// The payload bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let flags = if self.ring.is_some() { ENDPOINT_FLAG_RING } else { 0 };
        b[0..4].copy_from_slice(&flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.qpn.to_le_bytes());
        b[8..12].copy_from_slice(&self.psn.to_le_bytes());
        b[12..14].copy_from_slice(&self.lid.to_le_bytes());
        b[14] = self.mtu;
        b[16..32].copy_from_slice(&self.gid);
        if let Some(r) = &self.ring {
            b[32..40].copy_from_slice(&r.addr.to_le_bytes());
            b[40..44].copy_from_slice(&r.rkey.to_le_bytes());
            b[48..56].copy_from_slice(&r.bytes.to_le_bytes());
        }
        b
    }

    /// Decodes and checks a payload: known flags, reserved bytes zero, 24-bit numbers, a known MTU,
    /// and a ring of a valid size that does not wrap the address space (or no ring fields at all).
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let b: &[u8; Self::LEN] = payload.try_into().map_err(|_| DecodeError::Length { expected: Self::LEN as u64, got: payload.len() })?;
        let (le32, le64) = (|i| u32_at(b, i), |i| u64_at(b, i));
        let flags = le32(0);
        if flags & !ENDPOINT_FLAG_RING != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        if b[15] != 0 || le32(44) != 0 || le64(56) != 0 {
            return Err(DecodeError::Reserved);
        }
        let (qpn, psn, mtu) = (le32(4), le32(8), b[14]);
        if !(2..=MAX_QPN).contains(&qpn) || psn > MAX_QPN || !MTU_CODES.contains(&mtu) {
            return Err(DecodeError::BadEndpoint);
        }
        let (addr, rkey, bytes) = (le64(32), le32(40), le64(48));
        let ring = if flags & ENDPOINT_FLAG_RING != 0 {
            let size_ok = (MIN_RDMA_RING_BYTES..=MAX_RDMA_RING_BYTES).contains(&bytes) && bytes.is_multiple_of(PAGE_SIZE as u64);
            if !size_ok || addr == 0 || addr.checked_add(bytes).is_none() {
                return Err(DecodeError::BadRing { addr, bytes });
            }
            Some(RingGrant { addr, rkey, bytes })
        } else {
            if addr != 0 || rkey != 0 || bytes != 0 {
                return Err(DecodeError::Reserved);
            }
            None
        };
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        Ok(Self { qpn, psn, lid: u16_at(b, 12), mtu, gid, ring })
    }
}

/// Where the pages of one `RdmaPages` frame were written: guest page ranges, back to back in the
/// ring from `ring_offset`, and the BLAKE3 hash of their bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaPages {
    /// Byte offset in the backup's ring (a multiple of 4096; checked against the ring by the
    /// backup, not here: this decoder does not know the ring).
    pub ring_offset: u64,
    /// BLAKE3 of the page bytes, in range order.
    pub hash: [u8; 32],
    /// The guest page ranges, ascending and disjoint.
    pub ranges: Vec<PageRange>,
}

const RDMA_PAGES_HEAD: usize = 48;
const RANGE_LEN: usize = 16;

impl RdmaPages {
    /// Pages the frame names.
    pub fn page_count(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Bytes the pages take in the ring.
    pub fn byte_len(&self) -> u64 {
        self.page_count() * PAGE_SIZE as u64
    }

    /// Payload bytes of a frame naming `ranges` ranges.
    pub fn payload_len(ranges: usize) -> usize {
        RDMA_PAGES_HEAD + RANGE_LEN * ranges
    }

    /// Writes the payload into `out`, replacing its content. The sender builds frames of at most
    /// [`MAX_RDMA_PAGES_PER_FRAME`] pages, so both counts fit in u32.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.page_count() as u32).to_le_bytes());
        out.extend_from_slice(&self.ring_offset.to_le_bytes());
        out.extend_from_slice(&self.hash);
        for r in &self.ranges {
            out.extend_from_slice(&r.start.to_le_bytes());
            out.extend_from_slice(&(r.len as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::payload_len(self.ranges.len()));
        self.encode_into(&mut out);
        out
    }

    /// Decodes and checks a payload against a guest memory of `memory_pages` pages: exact length,
    /// 1..=[`MAX_RDMA_PAGES_PER_FRAME`] pages, ranges ascending, disjoint, non-empty and inside
    /// memory, the page count matching them, a 4 KiB aligned offset whose pages do not overflow.
    pub fn decode(payload: &[u8], memory_pages: u64) -> Result<Self, DecodeError> {
        if payload.len() < RDMA_PAGES_HEAD {
            return Err(DecodeError::Short);
        }
        let (le32, le64) = (|i| u32_at(payload, i), |i| u64_at(payload, i));
        let n = le32(0) as usize;
        let declared = u64::from(le32(4));
        if n == 0 {
            return Err(DecodeError::Empty);
        }
        // The range count is bounded before the length is computed or anything is allocated.
        if n as u64 > MAX_RDMA_PAGES_PER_FRAME || declared > MAX_RDMA_PAGES_PER_FRAME {
            return Err(DecodeError::TooManyPages(declared.max(n as u64)));
        }
        if payload.len() != Self::payload_len(n) {
            return Err(DecodeError::Length { expected: Self::payload_len(n) as u64, got: payload.len() });
        }
        let ring_offset = le64(8);
        if !ring_offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(DecodeError::RingOffset(ring_offset));
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&payload[16..48]);
        let ranges = crate::epoch::decode_range_table(&payload[RDMA_PAGES_HEAD..], n, declared, memory_pages)?;
        let actual = declared;
        if ring_offset.checked_add(actual * PAGE_SIZE as u64).is_none() {
            return Err(DecodeError::RingOffset(ring_offset));
        }
        Ok(Self { ring_offset, hash, ranges })
    }
}

/// The hash an `RdmaPages` frame carries: BLAKE3 of the page bytes, fed in any pieces.
pub fn pages_hasher() -> blake3::Hasher {
    blake3::Hasher::new_derive_key("ftvm a-link 2026 rdma pages")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM_PAGES: u64 = 1 << 20;

    fn endpoint(ring: Option<RingGrant>) -> RdmaEndpoint {
        RdmaEndpoint { qpn: 0x1234, psn: 0xab_cdef, lid: 7, mtu: 5, gid: [0xfe; 16], ring }
    }

    fn grant() -> RingGrant {
        RingGrant { addr: 0x7f00_0000_0000, rkey: 0x55aa, bytes: 64 << 20 }
    }

    fn descriptor() -> RdmaPages {
        RdmaPages {
            ring_offset: 3 * 4096,
            hash: [9; 32],
            ranges: vec![PageRange { start: 1, len: 2 }, PageRange { start: 10, len: 1 }, PageRange { start: 500, len: 7 }],
        }
    }

    #[test]
    fn endpoints_round_trip() {
        for e in [endpoint(None), endpoint(Some(grant()))] {
            assert_eq!(RdmaEndpoint::decode(&e.encode()), Ok(e));
        }
    }

    #[test]
    fn endpoint_checks() {
        let good = endpoint(Some(grant())).encode();
        let with = |i: usize, v: u8| {
            let mut b = good;
            b[i] = v;
            RdmaEndpoint::decode(&b)
        };
        assert_eq!(with(0, 3), Err(DecodeError::UnknownFlags(3)));
        assert_eq!(with(15, 1), Err(DecodeError::Reserved));
        assert_eq!(with(44, 1), Err(DecodeError::Reserved));
        assert_eq!(with(63, 1), Err(DecodeError::Reserved));
        assert_eq!(with(7, 1), Err(DecodeError::BadEndpoint)); // QPN over 24 bits
        assert_eq!(with(11, 1), Err(DecodeError::BadEndpoint)); // PSN over 24 bits
        assert_eq!(with(14, 0), Err(DecodeError::BadEndpoint));
        assert_eq!(with(14, 6), Err(DecodeError::BadEndpoint));
        let mut special = endpoint(None);
        special.qpn = 1;
        assert_eq!(RdmaEndpoint::decode(&special.encode()), Err(DecodeError::BadEndpoint));
        // Rings: too small, too large, unaligned, at address 0, wrapping the address space.
        for (addr, bytes) in [
            (4096, MIN_RDMA_RING_BYTES - 4096),
            (4096, MAX_RDMA_RING_BYTES + 4096),
            (4096, MIN_RDMA_RING_BYTES + 1),
            (0, MIN_RDMA_RING_BYTES),
            (u64::MAX - 4095, MIN_RDMA_RING_BYTES),
        ] {
            let e = endpoint(Some(RingGrant { addr, rkey: 1, bytes }));
            assert_eq!(RdmaEndpoint::decode(&e.encode()), Err(DecodeError::BadRing { addr, bytes }), "{addr:#x} {bytes}");
        }
        // Ring fields without the flag.
        let mut b = endpoint(None).encode();
        b[40] = 1;
        assert_eq!(RdmaEndpoint::decode(&b), Err(DecodeError::Reserved));
        assert!(matches!(RdmaEndpoint::decode(&good[..63]), Err(DecodeError::Length { expected: 64, got: 63 })));
    }

    #[test]
    fn descriptors_round_trip() {
        let d = descriptor();
        let p = d.encode();
        assert_eq!(p.len(), RdmaPages::payload_len(3));
        let back = RdmaPages::decode(&p, MEM_PAGES).unwrap();
        assert_eq!(back, d);
        assert_eq!((back.page_count(), back.byte_len()), (10, 40960));
    }

    #[test]
    fn descriptor_checks() {
        let p = descriptor().encode();
        let with = |i: usize, v: u8| {
            let mut b = p.clone();
            b[i] = v;
            RdmaPages::decode(&b, MEM_PAGES)
        };
        assert_eq!(with(0, 0).unwrap_err(), DecodeError::Empty);
        assert!(matches!(with(0, 4), Err(DecodeError::Length { .. })));
        assert!(matches!(with(3, 1), Err(DecodeError::TooManyPages(_))));
        assert_eq!(with(4, 11).unwrap_err(), DecodeError::PageCount { declared: 11, actual: 10 });
        assert!(matches!(with(7, 1), Err(DecodeError::TooManyPages(_))));
        assert_eq!(with(8, 1).unwrap_err(), DecodeError::RingOffset(3 * 4096 + 1));
        assert_eq!(with(48 + 12, 1).unwrap_err(), DecodeError::Reserved);
        assert_eq!(with(48 + 16, 2).unwrap_err(), DecodeError::RangeOrder); // second range starts inside the first
        assert_eq!(with(48 + 16, 0).unwrap_err(), DecodeError::RangeOrder); // descending
        assert!(matches!(with(48 + 8, 0), Err(DecodeError::BadRange { .. })));
        assert!(matches!(RdmaPages::decode(&p, 506), Err(DecodeError::RangeOutside { .. })));
        let mut wrap = descriptor();
        wrap.ring_offset = u64::MAX - 4095;
        assert!(matches!(RdmaPages::decode(&wrap.encode(), MEM_PAGES), Err(DecodeError::RingOffset(_))));
        let mut huge = p.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(RdmaPages::decode(&huge, MEM_PAGES), Err(DecodeError::TooManyPages(_))));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused_or_decodes_to_its_own_bytes() {
        let e = endpoint(Some(grant())).encode();
        let d = descriptor().encode();
        for n in 0..e.len() {
            assert!(RdmaEndpoint::decode(&e[..n]).is_err());
        }
        for n in 0..d.len() {
            assert!(RdmaPages::decode(&d[..n], MEM_PAGES).is_err());
        }
        // Canonical formats: whatever a flipped bit decodes to encodes back to the same bytes.
        for bit in 0..e.len() * 8 {
            let mut b = e;
            b[bit / 8] ^= 1 << (bit % 8);
            if let Ok(v) = RdmaEndpoint::decode(&b) {
                assert_eq!(v.encode(), b);
            }
        }
        for bit in 0..d.len() * 8 {
            let mut b = d.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            if let Ok(v) = RdmaPages::decode(&b, MEM_PAGES) {
                assert_eq!(v.encode(), b);
            }
        }
    }

    #[test]
    fn the_pages_hash_is_keyed_apart_from_plain_blake3() {
        let mut h = pages_hasher();
        h.update(&[1; 4096]);
        assert_ne!(h.finalize(), blake3::hash(&[1; 4096]));
    }
}
