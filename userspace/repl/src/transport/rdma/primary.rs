//! The primary's RDMA epoch logic, device-free: which epochs go by RDMA, where their pages go in
//! the ring, copying and hashing them into the registered mirror, the work requests, and the
//! descriptors the TCP link carries. The device is behind [`RemoteWriter`] (the verbs one is
//! [`super::verbs::VerbsWriter`]; the tests use one that writes into a [`StagingRing`] directly).
//!
//! [`StagingRing`]: super::backup::StagingRing

use std::time::Duration;

use ftvm_proto::epoch::EpochBegin;
use ftvm_proto::limits::MAX_RDMA_PAGES_PER_FRAME;
use ftvm_proto::pages::{PageRange, PageRangeSet};
use ftvm_proto::rdma::{pages_hasher, RdmaPages};
use ftvm_proto::EpochId;

use super::plan::{work_requests, RingPlan, Segment, WorkRequest};
use super::{RdmaIoError, RdmaStats, MAX_WRITE_BYTES};
use crate::transport::PageSource;
use crate::PAGE_SIZE;

/// What the primary writes through: a registered local buffer that mirrors the backup's ring
/// (same size; a page goes to the same offset in both), and RDMA WRITEs from it.
pub trait RemoteWriter: Send + std::fmt::Debug {
    /// The registered local mirror of the ring. The writer may read the bytes of a posted write
    /// until [`settle`](Self::settle) returns.
    fn mirror(&mut self) -> &mut [u8];

    /// Most scatter-gather entries per work request.
    fn max_sge(&self) -> usize;

    /// Posts one RDMA WRITE of `wr.segments` of the mirror to ring offset `wr.remote` (waiting
    /// for room in the send queue when it is full).
    fn post(&mut self, wr: &WorkRequest) -> Result<(), RdmaIoError>;

    /// Returns once every posted write has completed successfully, or fails (an error completion,
    /// or the timeout).
    fn settle(&mut self, timeout: Duration) -> Result<(), RdmaIoError>;

    /// The link failed: no more waiting for completions.
    fn forsake(&mut self) {}

    /// The device, for status and logs.
    fn device(&self) -> &str;
}

/// The primary's RDMA state on one link.
#[derive(Debug)]
pub struct RdmaPrimary {
    writer: Box<dyn RemoteWriter>,
    plan: RingPlan,
    /// The epoch whose pages go by RDMA, while it is open.
    open: Option<EpochId>,
    stats: RdmaStats,
}

/// Walks page ranges, handing out the next `n` pages as ranges.
struct RangeCursor<'a> {
    ranges: &'a [PageRange],
    idx: usize,
    offset: u64,
}

impl RangeCursor<'_> {
    fn remaining(&self) -> u64 {
        self.ranges.get(self.idx).map_or(0, |r| r.len - self.offset) + self.ranges.iter().skip(self.idx + 1).map(|r| r.len).sum::<u64>()
    }

    fn take(&mut self, mut n: u64, out: &mut Vec<PageRange>) {
        out.clear();
        while n > 0 {
            let Some(r) = self.ranges.get(self.idx) else { break };
            let take = (r.len - self.offset).min(n);
            out.push(PageRange { start: r.start + self.offset, len: take });
            n -= take;
            self.offset += take;
            if self.offset == r.len {
                self.idx += 1;
                self.offset = 0;
            }
        }
    }
}

impl RdmaPrimary {
    /// RDMA through `writer` into a ring of `ring_bytes`.
    pub fn new(writer: Box<dyn RemoteWriter>, ring_bytes: u64) -> Self {
        Self { writer, plan: RingPlan::new(ring_bytes), open: None, stats: RdmaStats::default() }
    }

    /// The device written through.
    pub fn device(&self) -> &str {
        self.writer.device()
    }

    /// Counters.
    pub fn stats(&self) -> RdmaStats {
        self.stats
    }

    /// Whether the open epoch's pages go by RDMA.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// An epoch begins; `acked` is the latest epoch the backup acknowledged (its ring space, and
    /// every earlier epoch's, is free again). Returns whether its pages go by RDMA: not for an
    /// initial synchronisation (all of memory, and written straight into the standby), nor for an
    /// epoch the ring cannot hold now; those go by TCP `Pages` frames.
    pub fn begin(&mut self, begin: &EpochBegin, acked: Option<EpochId>) -> bool {
        if let Some(a) = acked {
            self.plan.release_through(a);
        }
        self.open = None;
        if begin.initial_sync || begin.page_count == 0 {
            self.stats.tcp_epochs += 1;
            return false;
        }
        match self.plan.reserve(begin.epoch, begin.page_count) {
            Ok(()) => {
                self.open = Some(begin.epoch);
                self.stats.rdma_epochs += 1;
                true
            }
            Err(reason) => {
                tracing::debug!(epoch = begin.epoch.0, %reason, "epoch pages go by TCP");
                self.stats.tcp_epochs += 1;
                false
            }
        }
    }

    /// Copies the pages of `pages` from `source` into the mirror at their ring places, hashes
    /// them, and posts their RDMA WRITEs. Returns the descriptors to send on the TCP link, in
    /// order, one per ring piece of at most [`MAX_RDMA_PAGES_PER_FRAME`] pages. The caller has
    /// checked that every page is in `source` and that the epoch announced them; `source` is free
    /// when this returns (the pages were copied).
    pub fn write_pages(&mut self, pages: &PageRangeSet, source: &dyn PageSource) -> Result<Vec<RdmaPages>, RdmaIoError> {
        let mut cursor = RangeCursor { ranges: pages.ranges(), idx: 0, offset: 0 };
        let mut out = Vec::new();
        let max_sge = self.writer.max_sge();
        let mut ranges = Vec::new();
        while cursor.remaining() > 0 {
            let want = cursor.remaining().min(MAX_RDMA_PAGES_PER_FRAME);
            let piece = self.plan.next_piece(want).ok_or(RdmaIoError::Reservation)?;
            cursor.take(piece.pages, &mut ranges);
            let len = piece.pages as usize * PAGE_SIZE;
            let mirror = self.writer.mirror();
            let base = piece.offset as usize;
            let dst = mirror.get_mut(base..base + len).ok_or(RdmaIoError::Reservation)?;
            let mut at = 0usize;
            for r in &ranges {
                let n = r.len as usize * PAGE_SIZE;
                match source.run(r.start, r.len).filter(|s| s.len() == n) {
                    Some(run) => dst[at..at + n].copy_from_slice(run),
                    None => {
                        for (i, pfn) in (r.start..r.start + r.len).enumerate() {
                            let page = source.page(pfn).filter(|p| p.len() == PAGE_SIZE).ok_or(RdmaIoError::MissingPage(pfn))?;
                            dst[at + i * PAGE_SIZE..at + (i + 1) * PAGE_SIZE].copy_from_slice(page);
                        }
                    }
                }
                at += n;
            }
            // Hashed from the mirror, while it is in cache: exactly the bytes the NIC sends.
            let mut h = pages_hasher();
            h.update(dst);
            let hash = *h.finalize().as_bytes();
            let segment = Segment { local: piece.offset, len: len as u64 };
            for wr in work_requests(piece.offset, &[segment], max_sge, MAX_WRITE_BYTES) {
                self.writer.post(&wr)?;
                self.stats.writes += 1;
            }
            self.stats.bytes += len as u64;
            out.push(RdmaPages { ring_offset: piece.offset, hash, ranges: std::mem::take(&mut ranges) });
        }
        Ok(out)
    }

    /// The open epoch commits: returns once every write of it has completed (the backup reads
    /// the ring after the commit frame, which follows). Its ring space stays held until its
    /// acknowledgement.
    pub fn commit(&mut self, timeout: Duration) -> Result<(), RdmaIoError> {
        self.open = None;
        self.plan.close();
        self.writer.settle(timeout)
    }

    /// Waits for writes still in flight (an epoch left open by an error that did not fail the link).
    pub fn settle(&mut self, timeout: Duration) -> Result<(), RdmaIoError> {
        self.writer.settle(timeout)
    }

    /// The link failed.
    pub fn forsake(&mut self) {
        self.open = None;
        self.writer.forsake();
    }
}

/// A [`RemoteWriter`] without a device: writes go straight into a [`StagingRing`], as the NIC
/// would put them, so the primary's and the backup's halves can be tested together here.
///
/// [`StagingRing`]: super::backup::StagingRing
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::transport::rdma::backup::StagingRing;

    #[derive(Debug)]
    pub(crate) struct RingWriter {
        pub mirror: Vec<u8>,
        pub ring: Arc<Mutex<StagingRing>>,
        pub max_sge: usize,
        /// Posted and not yet "completed" (applied at settle, as a NIC would finish them).
        pub pending: Vec<WorkRequest>,
        /// Drop the next this many writes (a torn epoch).
        pub lose: usize,
        pub posted: usize,
    }

    impl RingWriter {
        pub(crate) fn new(ring: Arc<Mutex<StagingRing>>) -> Self {
            let bytes = ring.lock().map(|r| r.bytes()).unwrap_or(0) as usize;
            Self { mirror: vec![0; bytes], ring, max_sge: 1, pending: Vec::new(), lose: 0, posted: 0 }
        }
    }

    impl RemoteWriter for RingWriter {
        fn mirror(&mut self) -> &mut [u8] {
            &mut self.mirror
        }
        fn max_sge(&self) -> usize {
            self.max_sge
        }
        fn post(&mut self, wr: &WorkRequest) -> Result<(), RdmaIoError> {
            self.posted += 1;
            self.pending.push(wr.clone());
            Ok(())
        }
        fn settle(&mut self, _timeout: Duration) -> Result<(), RdmaIoError> {
            let mut ring = self.ring.lock().map_err(|_| RdmaIoError::Reservation)?;
            for wr in self.pending.drain(..) {
                if self.lose > 0 {
                    self.lose -= 1;
                    continue;
                }
                let mut at = wr.remote;
                for s in &wr.segments {
                    ring.write_at(at, &self.mirror[s.local as usize..(s.local + s.len) as usize]);
                    at += s.len;
                }
            }
            Ok(())
        }
        fn device(&self) -> &str {
            "fake"
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::fake::RingWriter;
    use super::*;
    use crate::transport::rdma::backup::{PlacementError, RingValidator, StagingRing};
    use crate::transport::FlatMemory;

    const PAGE: u64 = PAGE_SIZE as u64;
    const MEM_PAGES: u64 = 256;

    fn begin(epoch: u64, pages: u64) -> EpochBegin {
        EpochBegin { epoch: EpochId(epoch), page_count: pages, state_len: 1, ..EpochBegin::default() }
    }

    fn set(ranges: &[(u64, u64)]) -> PageRangeSet {
        let mut s = PageRangeSet::new();
        for &(start, len) in ranges {
            s.insert(start, len);
        }
        s
    }

    /// The backup's half: every descriptor through the wire format and the validator, the pages
    /// copied out of the ring at the commit and applied to `memory`.
    fn backup_applies(ring: &StagingRing, epoch: u64, descs: &[RdmaPages], memory: &mut [u8]) -> Result<u64, PlacementError> {
        let mut v = RingValidator::new(ring.bytes());
        v.begin(EpochId(epoch));
        let placed: Vec<_> = descs
            .iter()
            .map(|d| v.accept(RdmaPages::decode(&d.encode(), MEM_PAGES).expect("valid descriptor")))
            .collect::<Result<_, _>>()?;
        let mut copies = Vec::new();
        for p in &placed {
            let mut buf = Vec::new();
            ring.copy_out(p, &mut buf)?;
            copies.push(buf);
        }
        // All checked before anything is applied.
        let mut pages = 0;
        for (p, buf) in placed.iter().zip(&copies) {
            let mut at = 0;
            for r in p.ranges() {
                let n = (r.len * PAGE) as usize;
                memory[(r.start * PAGE) as usize..][..n].copy_from_slice(&buf[at..at + n]);
                at += n;
                pages += r.len;
            }
        }
        Ok(pages)
    }

    fn memory(seed: u8) -> Vec<u8> {
        (0..MEM_PAGES as usize * PAGE_SIZE).map(|i| (i / PAGE_SIZE) as u8 ^ (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn epochs_reach_the_backup_through_the_ring_across_wraps_and_acknowledgements() {
        let ring = Arc::new(Mutex::new(StagingRing::new(40 * PAGE).unwrap()));
        let mut writer = RingWriter::new(Arc::clone(&ring));
        writer.max_sge = 2;
        let mut primary = RdmaPrimary::new(Box::new(writer), 40 * PAGE);
        let mut backup_mem = vec![0u8; MEM_PAGES as usize * PAGE_SIZE];
        let mut acked = None;
        for epoch in 1..=50u64 {
            let mem = memory(epoch as u8);
            let s = (epoch * 37) % 100;
            let pages = set(&[(s, 3 + epoch % 5), (s + 20, 1), (s + 100, epoch % 9 + 1)]);
            assert!(primary.begin(&begin(epoch, pages.page_count()), acked), "epoch {epoch}");
            let descs = primary.write_pages(&pages, &FlatMemory(&mem)).unwrap();
            assert_eq!(descs.iter().map(RdmaPages::page_count).sum::<u64>(), pages.page_count());
            primary.commit(Duration::from_secs(1)).unwrap();
            let applied = backup_applies(&ring.lock().unwrap(), epoch, &descs, &mut backup_mem).unwrap();
            assert_eq!(applied, pages.page_count());
            for pfn in pages.pages() {
                let r = (pfn * PAGE) as usize..((pfn + 1) * PAGE) as usize;
                assert!(backup_mem[r.clone()] == mem[r], "epoch {epoch} page {pfn}");
            }
            acked = Some(EpochId(epoch));
        }
        let st = primary.stats();
        assert_eq!((st.rdma_epochs, st.tcp_epochs), (50, 0));
        assert!(st.writes >= 50);
    }

    #[test]
    fn a_torn_epoch_is_refused_by_the_backup() {
        let ring = Arc::new(Mutex::new(StagingRing::new(16 * PAGE).unwrap()));
        let mut writer = RingWriter::new(Arc::clone(&ring));
        writer.lose = 1;
        let mut primary = RdmaPrimary::new(Box::new(writer), 16 * PAGE);
        let mem = memory(1);
        let pages = set(&[(10, 4)]);
        assert!(primary.begin(&begin(1, 4), None));
        let descs = primary.write_pages(&pages, &FlatMemory(&mem)).unwrap();
        primary.commit(Duration::from_secs(1)).unwrap();
        let mut backup_mem = vec![0u8; MEM_PAGES as usize * PAGE_SIZE];
        let r = backup_applies(&ring.lock().unwrap(), 1, &descs, &mut backup_mem);
        assert!(matches!(r, Err(PlacementError::HashMismatch { .. })), "{r:?}");
        assert!(backup_mem.iter().all(|&b| b == 0), "nothing applied");
    }

    #[test]
    fn large_epochs_initial_syncs_and_a_full_ring_go_by_tcp() {
        let ring = Arc::new(Mutex::new(StagingRing::new(8 * PAGE).unwrap()));
        let mut primary = RdmaPrimary::new(Box::new(RingWriter::new(ring)), 8 * PAGE);
        let sync = EpochBegin { initial_sync: true, ..begin(0, 4) };
        assert!(!primary.begin(&sync, None));
        assert!(!primary.begin(&begin(1, 9), None), "larger than the ring");
        assert!(primary.begin(&begin(2, 6), None));
        let mem = memory(0);
        primary.write_pages(&set(&[(0, 6)]), &FlatMemory(&mem)).unwrap();
        primary.commit(Duration::from_secs(1)).unwrap();
        assert!(!primary.begin(&begin(3, 3), Some(EpochId(1))), "epoch 2 not acknowledged: the ring is full");
        assert!(primary.begin(&begin(4, 3), Some(EpochId(3))), "acknowledged: its space is free again");
        // More pages than reserved is a reservation error, not a write past the reservation.
        assert!(matches!(primary.write_pages(&set(&[(0, 4)]), &FlatMemory(&mem)), Err(RdmaIoError::Reservation)));
        let st = primary.stats();
        assert_eq!((st.rdma_epochs, st.tcp_epochs), (2, 3));
    }

    #[test]
    fn descriptors_hold_at_most_the_frame_limit_and_never_cross_the_ring_end() {
        let ring_bytes = 3 * MAX_RDMA_PAGES_PER_FRAME * PAGE;
        let ring = Arc::new(Mutex::new(StagingRing::new(ring_bytes).unwrap()));
        let mut primary = RdmaPrimary::new(Box::new(RingWriter::new(ring)), ring_bytes);
        let big = vec![7u8; (2 * MAX_RDMA_PAGES_PER_FRAME as usize + 10) * PAGE_SIZE];
        let n = 2 * MAX_RDMA_PAGES_PER_FRAME + 10;
        let pages = set(&[(0, n)]);
        assert!(primary.begin(&begin(1, n), None));
        let d = primary.write_pages(&pages, &FlatMemory(&big)).unwrap();
        assert_eq!(d.iter().map(RdmaPages::page_count).collect::<Vec<_>>(), vec![4096, 4096, 10]);
        primary.commit(Duration::from_secs(1)).unwrap();
        // The next epoch starts 10 pages before the end of the ring and wraps.
        let n2 = MAX_RDMA_PAGES_PER_FRAME - 10 + 5;
        assert!(primary.begin(&begin(2, n2), Some(EpochId(1))));
        let d = primary.write_pages(&set(&[(0, n2)]), &FlatMemory(&big)).unwrap();
        let places: Vec<(u64, u64)> = d.iter().map(|x| (x.ring_offset / PAGE, x.page_count())).collect();
        assert_eq!(places, vec![(2 * MAX_RDMA_PAGES_PER_FRAME + 10, MAX_RDMA_PAGES_PER_FRAME - 10), (0, 5)]);
        assert_eq!(d[0].ranges, vec![PageRange { start: 0, len: MAX_RDMA_PAGES_PER_FRAME - 10 }]);
        assert_eq!(d[1].ranges, vec![PageRange { start: MAX_RDMA_PAGES_PER_FRAME - 10, len: 5 }]);
    }
}
