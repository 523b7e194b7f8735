//! Guest pages sent as their difference from the copy the backup holds (A-Link 1.9, frame
//! `PageDeltas`).
//!
//! A page an epoch carries was, most of the time, carried by one of the last epochs too, and the
//! guest changed a few dozen bytes of it since (a socket buffer, a ring index, a key's value). The
//! primary keeps the pages it sent in the session; for such a page it sends only the XOR runs
//! ([`crate::xor_runs`]) against what it sent last. The backup applies every epoch it receives, in
//! order, before the next one begins, so what the primary sent last is exactly the backup's
//! committed copy of that page: the base the runs apply to.
//!
//! ```text
//! payload: count u32 (1 ..= MAX_PAGES_PER_FRAME), then count records, page numbers ascending:
//! offset size field
//!      0    8 pfn
//!      8    4 crc      CRC-32 of the page the runs make (the backup checks what it made)
//!     12    2 len      bytes of runs (at most a page)
//!     14    … runs
//! ```
//! The CRC is no authentication (the frame's tag is): it turns a base that differs from the
//! primary's, which would be a bug, into a refused epoch instead of a silently wrong page.

use crate::le::{u16_at, u32_at, u64_at};
use crate::limits::{MAX_PAGES_PER_FRAME, PAGE_SIZE};
use crate::xor_runs;

/// Bytes of a record before its runs.
pub const RECORD_HEAD_LEN: usize = 14;
/// Bytes before the first record.
pub const PAYLOAD_HEAD_LEN: usize = 4;

/// Why a `PageDeltas` payload, or one of its records, is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PageDeltaError {
    /// Cut inside its count or a record.
    #[error("the page deltas are cut short")]
    Short,
    /// No record, or more than a frame may carry.
    #[error("{0} page deltas in one frame")]
    Count(u32),
    /// A page past the end of guest memory.
    #[error("page delta for page {pfn}, outside guest memory ({pages} pages)")]
    Outside {
        /// The page.
        pfn: u64,
        /// Pages of guest memory.
        pages: u64,
    },
    /// Page numbers not ascending (a page twice, or out of order).
    #[error("page delta for page {0} out of order")]
    Order(u64),
    /// Runs longer than a page.
    #[error("page delta for page {pfn} has {len} bytes of runs")]
    RunsTooLong {
        /// The page.
        pfn: u64,
        /// Bytes of runs.
        len: usize,
    },
    /// Bytes after the last record.
    #[error("{0} bytes after the last page delta")]
    Trailing(usize),
    /// Runs that do not fit a page.
    #[error("malformed page delta for page {pfn} at byte {at} of its runs")]
    Malformed {
        /// The page.
        pfn: u64,
        /// Offset of the bad run.
        at: usize,
    },
    /// The page made is not the one the primary had: the base differs.
    #[error("page delta for page {0} makes another page than the primary's (the copies of the page differ)")]
    Mismatch(u64),
}

/// One page's delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageDelta<'a> {
    /// The guest page.
    pub pfn: u64,
    /// CRC-32 of the page it makes.
    pub crc: u32,
    /// XOR runs against the base.
    pub runs: &'a [u8],
}

/// The CRC a record carries for `page`.
pub fn page_crc(page: &[u8]) -> u32 {
    crc32fast::hash(page)
}

/// Starts a payload in `out` (cleared first), with no record yet.
pub fn start(out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&0u32.to_le_bytes());
}

/// Records in a payload begun with [`start`].
pub fn count(payload: &[u8]) -> u32 {
    u32_at(payload, 0)
}

/// Appends the record of page `pfn`, whose new content is `new` and whose `runs` turn the base
/// into it, to a payload begun with [`start`]. Pages must come in ascending order, at most
/// [`MAX_PAGES_PER_FRAME`] of them, with runs of at most a page (the caller sends a bigger change
/// as a whole page).
pub fn push(out: &mut Vec<u8>, pfn: u64, new: &[u8], runs: &[u8]) {
    debug_assert!(runs.len() <= PAGE_SIZE && out.len() >= PAYLOAD_HEAD_LEN);
    out.extend_from_slice(&pfn.to_le_bytes());
    out.extend_from_slice(&page_crc(new).to_le_bytes());
    out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    out.extend_from_slice(runs);
    let n = count(out) + 1;
    out[..4].copy_from_slice(&n.to_le_bytes());
}

/// The records of a payload, checked against a guest memory of `memory_pages` pages.
pub fn decode(payload: &[u8], memory_pages: u64) -> Result<Vec<PageDelta<'_>>, PageDeltaError> {
    let n = count(payload);
    if payload.len() < PAYLOAD_HEAD_LEN {
        return Err(PageDeltaError::Short);
    }
    if n == 0 || u64::from(n) > MAX_PAGES_PER_FRAME {
        return Err(PageDeltaError::Count(n));
    }
    let mut records = Vec::with_capacity(n as usize);
    let mut at = PAYLOAD_HEAD_LEN;
    let mut next_min = 0u64;
    for _ in 0..n {
        let head = payload.get(at..at + RECORD_HEAD_LEN).ok_or(PageDeltaError::Short)?;
        let (pfn, crc, len) = (u64_at(head, 0), u32_at(head, 8), usize::from(u16_at(head, 12)));
        if pfn >= memory_pages {
            return Err(PageDeltaError::Outside { pfn, pages: memory_pages });
        }
        if pfn < next_min {
            return Err(PageDeltaError::Order(pfn));
        }
        if len > PAGE_SIZE {
            return Err(PageDeltaError::RunsTooLong { pfn, len });
        }
        at += RECORD_HEAD_LEN;
        let runs = payload.get(at..at + len).ok_or(PageDeltaError::Short)?;
        at += len;
        records.push(PageDelta { pfn, crc, runs });
        next_min = pfn + 1;
    }
    if at != payload.len() {
        return Err(PageDeltaError::Trailing(payload.len() - at));
    }
    Ok(records)
}

/// Appends to `out` the page `delta` makes from `base` (a page), once its CRC matches. On an
/// error `out` is as it was.
pub fn make_page(base: &[u8], delta: &PageDelta<'_>, out: &mut Vec<u8>) -> Result<(), PageDeltaError> {
    let from = out.len();
    out.extend_from_slice(&base[..PAGE_SIZE.min(base.len())]);
    out.resize(from + PAGE_SIZE, 0);
    let made = xor_runs::apply(&mut out[from..], delta.runs)
        .map_err(|bad| PageDeltaError::Malformed { pfn: delta.pfn, at: bad.0 })
        .and_then(|()| {
            if page_crc(&out[from..]) == delta.crc {
                Ok(())
            } else {
                Err(PageDeltaError::Mismatch(delta.pfn))
            }
        });
    if made.is_err() {
        out.truncate(from);
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn runs(base: &[u8], new: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        xor_runs::encode(base, new, &mut r);
        r
    }

    /// Two pages written a little each, in one payload: the backup makes both from its copies.
    #[test]
    fn deltas_round_trip_and_are_small() {
        let (base_a, base_b) = (page(1), page(2));
        let (mut new_a, mut new_b) = (base_a.clone(), base_b.clone());
        new_a[10..20].fill(0xee);
        new_b[4000] = 0;
        let mut p = Vec::new();
        start(&mut p);
        push(&mut p, 3, &new_a, &runs(&base_a, &new_a));
        push(&mut p, 9, &new_b, &runs(&base_b, &new_b));
        assert_eq!(count(&p), 2);
        assert!(p.len() < 64, "{} bytes", p.len());
        let records = decode(&p, 16).unwrap();
        assert_eq!(records.iter().map(|r| r.pfn).collect::<Vec<_>>(), [3, 9]);
        let mut out = Vec::new();
        make_page(&base_a, &records[0], &mut out).unwrap();
        make_page(&base_b, &records[1], &mut out).unwrap();
        assert_eq!(out, [new_a, new_b].concat());
    }

    /// A base other than the primary's is found by the CRC, and nothing is appended.
    #[test]
    fn another_base_is_refused() {
        let base = page(1);
        let mut new = base.clone();
        new[100] ^= 1;
        let mut p = Vec::new();
        start(&mut p);
        push(&mut p, 0, &new, &runs(&base, &new));
        let records = decode(&p, 1).unwrap();
        let mut other = base.clone();
        other[2000] ^= 4;
        let mut out = vec![7u8];
        assert_eq!(make_page(&other, &records[0], &mut out), Err(PageDeltaError::Mismatch(0)));
        assert_eq!(out, [7]);
    }

    #[test]
    fn bad_payloads_are_refused() {
        let base = page(5);
        let mut new = base.clone();
        new[1] = 0;
        let mut p = Vec::new();
        start(&mut p);
        push(&mut p, 2, &new, &runs(&base, &new));
        push(&mut p, 4, &new, &runs(&base, &new));
        assert_eq!(decode(&p, 4), Err(PageDeltaError::Outside { pfn: 4, pages: 4 }));
        for cut in 0..p.len() {
            assert!(decode(&p[..cut], 8).is_err(), "cut at {cut}");
        }
        let mut trailing = p.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing, 8), Err(PageDeltaError::Trailing(1)));
        let mut empty = Vec::new();
        start(&mut empty);
        assert_eq!(decode(&empty, 8), Err(PageDeltaError::Count(0)));
        let mut twice = Vec::new();
        start(&mut twice);
        push(&mut twice, 2, &new, &runs(&base, &new));
        push(&mut twice, 2, &new, &runs(&base, &new));
        assert_eq!(decode(&twice, 8), Err(PageDeltaError::Order(2)));
        let mut long = Vec::new();
        start(&mut long);
        long.extend_from_slice(&1u64.to_le_bytes());
        long.extend_from_slice(&0u32.to_le_bytes());
        long.extend_from_slice(&(PAGE_SIZE as u16 + 1).to_le_bytes());
        long[..4].copy_from_slice(&1u32.to_le_bytes());
        long.resize(long.len() + PAGE_SIZE + 1, 0);
        assert_eq!(decode(&long, 8), Err(PageDeltaError::RunsTooLong { pfn: 1, len: PAGE_SIZE + 1 }));
        // Runs that reach past the page.
        let mut past = Vec::new();
        start(&mut past);
        push(&mut past, 0, &new, &[0xff, 0x3f, 2, 1, 1]);
        let records = decode(&past, 1).unwrap();
        assert!(matches!(make_page(&base, &records[0], &mut Vec::new()), Err(PageDeltaError::Malformed { pfn: 0, .. })));
    }
}
