//! Where each epoch's pages go in the backup's staging ring, and how a run of the ring is cut into
//! RDMA WRITE work requests. Device-free.
//!
//! The ring is used like a log: each epoch reserves the pages it announced right after the
//! previous epoch's, wrapping at the end (an epoch's reservation may be two pieces), and gives
//! its space back only when the backup has acknowledged it (the backup reads an epoch's pages at
//! its commit, so until the acknowledgement they are still to be read). Positions are counted in
//! bytes since the link came up (`u64`, never wrapping in practice), and the ring offset is the
//! position modulo the ring size.

use std::collections::VecDeque;

use ftvm_proto::EpochId;

use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Why an epoch cannot have ring space (the epoch's pages then go by TCP).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// The epoch is larger than the whole ring.
    #[error("Epoch needs {needed} bytes, the ring has {ring}")]
    TooLarge {
        /// Bytes of the epoch's pages.
        needed: u64,
        /// Ring size.
        ring: u64,
    },
    /// Epochs not yet acknowledged hold too much of the ring.
    #[error("Epoch needs {needed} bytes, {free} are free until acknowledgements come")]
    Full {
        /// Bytes of the epoch's pages.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// Another epoch's reservation is still open.
    #[error("Epoch {0} still holds the open reservation")]
    Open(EpochId),
    /// Epochs reserve in increasing order.
    #[error("Epoch {epoch} cannot reserve after epoch {last}")]
    Order {
        /// Asked for.
        epoch: EpochId,
        /// The last one reserved.
        last: EpochId,
    },
}

/// A contiguous piece of an epoch's reservation: `pages` pages from byte `offset` of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Byte offset in the ring (page aligned).
    pub offset: u64,
    /// Pages.
    pub pages: u64,
}

#[derive(Debug)]
struct Open {
    epoch: EpochId,
    next: u64,
    end: u64,
}

/// The primary's plan of the backup's ring.
#[derive(Debug)]
pub struct RingPlan {
    bytes: u64,
    /// Position of the first byte not yet given back (the oldest unacknowledged epoch's start).
    tail: u64,
    /// Position after the last reservation.
    head: u64,
    /// Reserved epochs, oldest first, with the position after each.
    held: VecDeque<(EpochId, u64)>,
    open: Option<Open>,
}

impl RingPlan {
    /// A plan of a ring of `bytes` (rounded down to whole pages).
    pub fn new(bytes: u64) -> Self {
        Self { bytes: bytes - bytes % PAGE, tail: 0, head: 0, held: VecDeque::new(), open: None }
    }

    /// Ring size.
    pub fn ring_bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes not held by an unacknowledged epoch.
    pub fn free(&self) -> u64 {
        self.bytes - (self.head - self.tail)
    }

    /// Reserves room for `pages` pages of `epoch`, after every earlier reservation. Refuses an
    /// epoch larger than the ring, and one that does not fit until acknowledgements come.
    pub fn reserve(&mut self, epoch: EpochId, pages: u64) -> Result<(), ReserveError> {
        if let Some(o) = &self.open {
            return Err(ReserveError::Open(o.epoch));
        }
        if let Some(&(last, _)) = self.held.back().filter(|&&(last, _)| last >= epoch) {
            return Err(ReserveError::Order { epoch, last });
        }
        let needed = pages.saturating_mul(PAGE);
        if needed > self.bytes {
            return Err(ReserveError::TooLarge { needed, ring: self.bytes });
        }
        if needed > self.free() {
            return Err(ReserveError::Full { needed, free: self.free() });
        }
        let start = self.head;
        self.head += needed;
        self.held.push_back((epoch, self.head));
        self.open = Some(Open { epoch, next: start, end: self.head });
        Ok(())
    }

    /// The next piece of the open reservation: at most `max_pages` pages, never across the ring's
    /// end. `None` when nothing is open or the reservation is used up.
    pub fn next_piece(&mut self, max_pages: u64) -> Option<Piece> {
        let o = self.open.as_mut()?;
        let offset = o.next % self.bytes.max(1);
        let pages = ((o.end - o.next) / PAGE).min((self.bytes - offset) / PAGE).min(max_pages);
        if pages == 0 {
            return None;
        }
        o.next += pages * PAGE;
        Some(Piece { offset, pages })
    }

    /// Pages of the open reservation not placed yet.
    pub fn unplaced_pages(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| (o.end - o.next) / PAGE)
    }

    /// The open epoch is committed: its space stays held until its acknowledgement.
    pub fn close(&mut self) {
        self.open = None;
    }

    /// The backup acknowledged `epoch` (and so every earlier one): their space is free again.
    pub fn release_through(&mut self, epoch: EpochId) {
        while let Some(&(e, end)) = self.held.front() {
            if e > epoch || self.open.as_ref().is_some_and(|o| o.epoch == e) {
                break;
            }
            self.tail = end;
            self.held.pop_front();
        }
    }
}

/// A range of the local registered buffer, one scatter-gather entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset in the local buffer.
    pub local: u64,
    /// Bytes.
    pub len: u64,
}

/// One RDMA WRITE: the segments, gathered in order, land back to back from `remote` in the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkRequest {
    /// Byte offset in the ring.
    pub remote: u64,
    /// Scatter-gather list (at most the device's limit).
    pub segments: Vec<Segment>,
}

impl WorkRequest {
    /// Bytes written.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Whether it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cuts the write of `segments` (gathered in order) to ring offset `remote` into work requests of
/// at most `max_sge` segments and `max_bytes` bytes each (a segment longer than what is left of a
/// request is split). Empty segments are skipped; limits of 0 are taken as 1.
pub fn work_requests(remote: u64, segments: &[Segment], max_sge: usize, max_bytes: u64) -> Vec<WorkRequest> {
    let (max_sge, max_bytes) = (max_sge.max(1), max_bytes.max(1));
    let mut out = Vec::new();
    let mut cur = WorkRequest { remote, segments: Vec::new() };
    let mut cur_len = 0u64;
    let mut at = remote;
    for s in segments {
        let (mut local, mut left) = (s.local, s.len);
        while left > 0 {
            if cur.segments.len() == max_sge || cur_len == max_bytes {
                let next = WorkRequest { remote: at, segments: Vec::new() };
                out.push(std::mem::replace(&mut cur, next));
                cur_len = 0;
            }
            let take = left.min(max_bytes - cur_len);
            cur.segments.push(Segment { local, len: take });
            cur_len += take;
            at += take;
            local += take;
            left -= take;
        }
    }
    if !cur.segments.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pieces(plan: &mut RingPlan, max: u64) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| plan.next_piece(max)).map(|p| (p.offset, p.pages)).collect()
    }

    #[test]
    fn epochs_follow_each_other_and_wrap_at_the_end() {
        let mut plan = RingPlan::new(16 * PAGE);
        plan.reserve(EpochId(1), 10).unwrap();
        assert_eq!(pieces(&mut plan, 4), vec![(0, 4), (4 * PAGE, 4), (8 * PAGE, 2)]);
        plan.close();
        assert_eq!(plan.free(), 6 * PAGE);
        // Does not fit before epoch 1 is acknowledged.
        assert_eq!(plan.reserve(EpochId(2), 8), Err(ReserveError::Full { needed: 8 * PAGE, free: 6 * PAGE }));
        plan.release_through(EpochId(1));
        assert_eq!(plan.free(), 16 * PAGE);
        // Epoch 2 starts at page 10 and wraps: 6 pages at the end, 2 at the start.
        plan.reserve(EpochId(2), 8).unwrap();
        assert_eq!(pieces(&mut plan, 100), vec![(10 * PAGE, 6), (0, 2)]);
        plan.close();
        plan.reserve(EpochId(3), 8).unwrap();
        assert_eq!(pieces(&mut plan, 100), vec![(2 * PAGE, 8)]);
        assert_eq!(plan.unplaced_pages(), 0);
        plan.close();
        assert_eq!(plan.free(), 0);
    }

    #[test]
    fn space_is_given_back_only_through_the_acknowledged_epoch() {
        let mut plan = RingPlan::new(8 * PAGE);
        for e in 1..=4 {
            plan.reserve(EpochId(e), 2).unwrap();
            plan.close();
        }
        assert_eq!(plan.free(), 0);
        plan.release_through(EpochId(2));
        assert_eq!(plan.free(), 4 * PAGE);
        // An epoch that went by TCP (no reservation) acknowledges the ones before it too.
        plan.release_through(EpochId(9));
        assert_eq!(plan.free(), 8 * PAGE);
        // The open reservation is never released, even by a later acknowledgement.
        plan.reserve(EpochId(10), 3).unwrap();
        plan.release_through(EpochId(10));
        assert_eq!(plan.free(), 5 * PAGE);
    }

    #[test]
    fn refusals() {
        let mut plan = RingPlan::new(4 * PAGE + 100);
        assert_eq!(plan.ring_bytes(), 4 * PAGE);
        assert_eq!(plan.reserve(EpochId(1), 5), Err(ReserveError::TooLarge { needed: 5 * PAGE, ring: 4 * PAGE }));
        assert_eq!(plan.reserve(EpochId(1), u64::MAX), Err(ReserveError::TooLarge { needed: u64::MAX, ring: 4 * PAGE }));
        plan.reserve(EpochId(1), 1).unwrap();
        assert_eq!(plan.reserve(EpochId(2), 1), Err(ReserveError::Open(EpochId(1))));
        plan.close();
        assert_eq!(plan.reserve(EpochId(1), 1), Err(ReserveError::Order { epoch: EpochId(1), last: EpochId(1) }));
        // Pieces beyond the reservation: none.
        assert_eq!(pieces(&mut plan, 8), vec![]);
        plan.reserve(EpochId(2), 0).unwrap();
        assert_eq!(plan.next_piece(8), None);
    }

    #[test]
    fn a_long_run_of_epochs_never_overlaps_an_unacknowledged_one() {
        // Epochs of varying size with acknowledgements lagging three epochs behind: every byte
        // placed must lie outside the pieces of epochs still held.
        let ring = 64 * PAGE;
        let mut plan = RingPlan::new(ring);
        let mut held: VecDeque<(u64, Vec<(u64, u64)>)> = VecDeque::new();
        let mut refused = 0;
        for e in 1..2000u64 {
            let pages = (e * 7919) % 30 + 1;
            if let Some(&(acked, _)) = held.iter().rev().nth(3) {
                plan.release_through(EpochId(acked));
                held.retain(|(h, _)| *h > acked);
            }
            match plan.reserve(EpochId(e), pages) {
                Ok(()) => {
                    let ps = pieces(&mut plan, 5);
                    assert_eq!(ps.iter().map(|p| p.1).sum::<u64>(), pages);
                    for &(off, n) in &ps {
                        assert!(off % PAGE == 0 && off + n * PAGE <= ring);
                        for (_, other) in &held {
                            for &(o2, n2) in other {
                                assert!(off + n * PAGE <= o2 || o2 + n2 * PAGE <= off, "epoch {e} overlaps");
                            }
                        }
                    }
                    plan.close();
                    held.push_back((e, ps));
                }
                Err(ReserveError::Full { .. }) => {
                    // That epoch goes by TCP; meanwhile the backup acknowledges everything held.
                    refused += 1;
                    if let Some(&(last, _)) = held.back() {
                        plan.release_through(EpochId(last));
                        held.clear();
                    }
                }
                Err(other) => panic!("{other}"),
            }
        }
        assert!(refused > 0 && refused < 1000, "{refused}");
    }

    #[test]
    fn work_requests_respect_both_limits_and_cover_every_byte_in_order() {
        let segs = [
            Segment { local: 0, len: 3 * MIB },
            Segment { local: 10 * MIB, len: 4096 },
            Segment { local: 20 * MIB, len: 0 },
            Segment { local: 30 * MIB, len: 8192 },
            Segment { local: 40 * MIB, len: 4096 },
        ];
        for (max_sge, max_bytes) in [(1, MIB), (2, MIB), (4, 2 * MIB), (30, 64 * MIB)] {
            let wrs = work_requests(5 * PAGE, &segs, max_sge, max_bytes);
            let mut at = 5 * PAGE;
            let mut gathered = Vec::new();
            for wr in &wrs {
                assert_eq!(wr.remote, at, "contiguous in the ring");
                assert!(!wr.is_empty() && wr.segments.len() <= max_sge.max(1) && wr.len() <= max_bytes.max(1));
                at += wr.len();
                gathered.extend(wr.segments.iter().copied());
            }
            assert_eq!(at - 5 * PAGE, segs.iter().map(|s| s.len).sum::<u64>());
            // Re-joining adjacent pieces gives back the non-empty input segments.
            let mut joined: Vec<Segment> = Vec::new();
            for s in gathered {
                match joined.last_mut() {
                    Some(l) if l.local + l.len == s.local => l.len += s.len,
                    _ => joined.push(s),
                }
            }
            let want: Vec<Segment> = segs.iter().copied().filter(|s| s.len > 0).collect();
            assert_eq!(joined, want, "{max_sge} {max_bytes}");
        }
        assert_eq!(work_requests(0, &[Segment { local: 0, len: 3 * MIB }], 1, MIB).len(), 3);
        assert_eq!(work_requests(0, &[Segment { local: 0, len: 4096 }; 5], 2, MIB).len(), 3);
        assert!(work_requests(0, &[], 4, MIB).is_empty());
        // Limits of 0 are 1: one byte per request.
        assert_eq!(work_requests(0, &[Segment { local: 0, len: 3 }], 0, 0).len(), 3);
    }
}
