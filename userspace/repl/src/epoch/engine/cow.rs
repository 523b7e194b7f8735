//! Copy-on-write checkpoints: the epoch's dirty pages are write-protected in the pause instead of
//! copied, the VM resumes at once, and the engine copies them into the staging buffer afterwards.
//! A write to a page not copied yet (a vCPU through KVM, a device thread, the kernel on behalf of
//! io_uring or the TAP) stops the writer in the kernel and queues a userfaultfd message; the copy
//! loop serves those first: it copies the page as it was at the pause, then lifts its protection,
//! which lets the write through. So the staging buffer holds exactly the memory of the pause, as
//! with a stop-and-copy, and the pause holds only the arming.
//!
//! Arming costs one `UFFDIO_WRITEPROTECT` per span (about 0.7 µs here, nested) and a few ns per
//! page in it, so dirty ranges closer than [`MERGE_GAP`] pages are protected as one span: a clean
//! page in a span that the guest writes before its span is lifted costs a fault and nothing else.
//! The whole of memory is never protected (about 3 ms per GiB).
//!
//! # Why nothing can hang
//! Every span is lifted before [`CowCopy::copy`] returns, whatever happens: on an error, the
//! remaining spans are lifted in one go, and if even that fails the userfaultfd is closed, which
//! wakes every waiter and unregisters the memory. The copy loop runs on the engine's thread, which
//! touches neither guest memory (it only reads it) nor any lock a faulting writer may hold.

use ftvm_proto::pages::PageRangeSet;
use ftvm_vmm::memory::{GuestMemory, PAGE_SIZE};
use ftvm_vmm::uffd::{HostRange, UffdError, Userfault, WpMode};

use super::staging::Staging;

/// Dirty ranges this close (in pages) are write-protected as one span.
const MERGE_GAP: u64 = 32;
/// Most pages copied between two looks at the fault queue: a faulting writer waits at most this
/// long (about 20 µs here) for its page.
const PIECE: u64 = 64;

/// What a copy-on-write epoch's copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CowStats {
    /// Spans write-protected in the pause.
    pub spans: u64,
    /// Writes that hit a protected page and waited for the copy.
    pub faults: u64,
}

/// Why a copy-on-write epoch failed (every page's protection is lifted by then).
#[derive(Debug, thiserror::Error)]
pub(super) enum CowError {
    /// The userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A dirty page lies outside guest memory.
    #[error("page {0} is not in guest memory")]
    NoSuchPage(u64),
}

/// A span of pages `[start, end)` write-protected together, in region `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    region: usize,
    start: u64,
    end: u64,
}

/// The write protection and copy of copy-on-write epochs, for one VM's memory.
#[derive(Debug)]
pub(super) struct CowCopy {
    uffd: Userfault,
    regions: Vec<HostRange>,
    /// The spans of the epoch being copied.
    spans: Vec<Span>,
    /// Bit per staged page: copied already (by a fault, ahead of its turn).
    copied: Vec<u64>,
    faults: Vec<u64>,
}

impl CowCopy {
    /// Registers `mem` for synchronous write-protect (nothing is protected yet).
    pub(super) fn new(mem: &GuestMemory) -> Result<Self, UffdError> {
        let uffd = Userfault::new(WpMode::Sync)?;
        uffd.register(mem)?;
        Ok(Self { uffd, regions: HostRange::of(mem), spans: Vec::new(), copied: Vec::new(), faults: Vec::new() })
    }

    fn region_of(&self, pfn: u64) -> Option<usize> {
        self.regions.iter().position(|r| r.host_of(pfn).is_some())
    }

    fn host(&self, span: &Span, pfn: u64) -> u64 {
        self.regions[span.region].host_of(pfn).expect("a span lies in its region")
    }

    /// The spans that cover `pages`, merged across small gaps, never across regions.
    fn plan(&mut self, pages: &PageRangeSet) -> Result<(), CowError> {
        self.spans.clear();
        for r in pages.ranges() {
            let region = self.region_of(r.start).ok_or(CowError::NoSuchPage(r.start))?;
            let end = r.start + r.len;
            if self.region_of(end - 1) != Some(region) {
                return Err(CowError::NoSuchPage(end - 1));
            }
            match self.spans.last_mut() {
                Some(s) if s.region == region && r.start - s.end <= MERGE_GAP => s.end = end,
                _ => self.spans.push(Span { region, start: r.start, end }),
            }
        }
        Ok(())
    }

    /// In the pause: write-protects `pages` (and the small gaps between them). On an error nothing
    /// stays protected.
    pub(super) fn protect(&mut self, pages: &PageRangeSet) -> Result<u64, CowError> {
        self.plan(pages)?;
        for i in 0..self.spans.len() {
            let s = self.spans[i];
            if let Err(e) = self.uffd.protect(self.host(&s, s.start), (s.end - s.start) * PAGE_SIZE) {
                self.spans.truncate(i);
                self.lift_all();
                return Err(e.into());
            }
        }
        Ok(self.spans.len() as u64)
    }

    /// After the resume: copies `pages` (protected by [`Self::protect`]) into `staging` (laid out
    /// for them, and perhaps for more pages copied in the pause), serving the writers that wait for a page first, and lifts the protection piece by
    /// piece. Returns with nothing protected, on success or not; on an error the staging buffer is
    /// not the pause's memory and the epoch must not be sent. A `Self` whose lifting failed must
    /// be dropped (closing the userfaultfd lifts everything).
    pub(super) fn copy(&mut self, pages: &PageRangeSet, staging: &mut Staging, mem: &GuestMemory) -> Result<CowStats, CowError> {
        let mut stats = CowStats { spans: self.spans.len() as u64, faults: 0 };
        // Indexed by the page's place in the staging buffer, which may hold more than `pages`.
        let words = staging.page_count().div_ceil(64) as usize;
        self.copied.clear();
        self.copied.resize(words, 0);
        let result = self.copy_pieces(pages, staging, mem, &mut stats);
        if result.is_err() {
            self.lift_all();
        }
        self.spans.clear();
        result.map(|()| stats)
    }

    fn copy_pieces(&mut self, pages: &PageRangeSet, staging: &mut Staging, mem: &GuestMemory, stats: &mut CowStats) -> Result<(), CowError> {
        let mut span = 0usize;
        // Lifted up to here in `spans[span]`.
        let mut lifted = self.spans.first().map_or(0, |s| s.start);
        for r in pages.ranges() {
            while self.spans[span].end <= r.start {
                let s = self.spans[span];
                self.lift(&s, lifted, s.end)?;
                span += 1;
                lifted = self.spans[span].start;
            }
            let mut at = r.start;
            while at < r.start + r.len {
                let end = (at + PIECE).min(r.start + r.len);
                stats.faults += self.serve_faults(pages, staging, mem)?;
                self.copy_uncopied(staging, mem, at, end)?;
                let s = self.spans[span];
                self.lift(&s, lifted, end)?;
                lifted = end;
                at = end;
            }
        }
        if let Some(s) = self.spans.get(span).copied() {
            self.lift(&s, lifted, s.end)?;
        }
        // Faults already served, or woken by the lifting: their messages are stale.
        self.faults.clear();
        self.uffd.read_faults(&mut self.faults)?;
        Ok(())
    }

    /// Copies the pages of `[start, end)` (staged consecutively) that no fault copied yet.
    fn copy_uncopied(&mut self, staging: &mut Staging, mem: &GuestMemory, start: u64, end: u64) -> Result<(), CowError> {
        let first = staging.index_of(start).ok_or(CowError::NoSuchPage(start))?;
        let mut run: Option<u64> = None;
        for pfn in start..=end {
            let done = pfn == end || self.is_copied(first + (pfn - start));
            match (done, run) {
                (false, None) => run = Some(pfn),
                (true, Some(from)) => {
                    staging.copy_in(mem, from, pfn - from).map_err(|_| CowError::NoSuchPage(from))?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Copies each page a writer waits for (if it is the epoch's and not copied yet) and lets the
    /// writer go; how many waited.
    fn serve_faults(&mut self, pages: &PageRangeSet, staging: &mut Staging, mem: &GuestMemory) -> Result<u64, CowError> {
        self.faults.clear();
        if self.uffd.read_faults(&mut self.faults)? == 0 {
            return Ok(0);
        }
        let faults = std::mem::take(&mut self.faults);
        for &host in &faults {
            let Some(pfn) = self.regions.iter().find_map(|r| r.pfn_of(host)) else { continue };
            if pages.contains(pfn) {
                let i = staging.index_of(pfn).ok_or(CowError::NoSuchPage(pfn))?;
                if !self.is_copied(i) {
                    staging.copy_in(mem, pfn, 1).map_err(|_| CowError::NoSuchPage(pfn))?;
                    self.copied[(i / 64) as usize] |= 1 << (i % 64);
                }
            }
            // A clean page of a span, or one just copied: let the write through.
            self.uffd.unprotect(host, PAGE_SIZE)?;
        }
        let n = faults.len() as u64;
        self.faults = faults;
        Ok(n)
    }

    fn is_copied(&self, index: u64) -> bool {
        self.copied.get((index / 64) as usize).is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Lifts `[from, to)` of `span`, waking the writers waiting there.
    fn lift(&self, span: &Span, from: u64, to: u64) -> Result<(), UffdError> {
        if to <= from {
            return Ok(());
        }
        self.uffd.unprotect(self.host(span, from), (to - from) * PAGE_SIZE)
    }

    /// Lifts every span of the epoch (the error path).
    fn lift_all(&self) {
        for s in &self.spans {
            if let Err(e) = self.lift(s, s.start, s.end) {
                tracing::error!(error = %crate::ErrorChain(&e), "cannot lift the write protection of a copy-on-write epoch");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    use crate::transport::PageSource;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn fill_pages(mem: &GuestMemory, pages: &PageRangeSet, value: u8) {
        for pfn in pages.pages() {
            mem.write_slice(&[value; PAGE_SIZE as usize], GuestAddress(pfn * PAGE_SIZE)).unwrap();
        }
    }

    #[test]
    fn spans_merge_small_gaps_only() {
        let mem = memory();
        let mut cow = CowCopy::new(&mem).unwrap();
        let mut pages = PageRangeSet::new();
        pages.insert(10, 2);
        pages.insert(12 + MERGE_GAP, 1);
        pages.insert(13 + 2 * MERGE_GAP + 1, 3);
        cow.plan(&pages).unwrap();
        let spans: Vec<(u64, u64)> = cow.spans.iter().map(|s| (s.start, s.end)).collect();
        assert_eq!(spans, [(10, 13 + MERGE_GAP), (13 + 2 * MERGE_GAP + 1, 16 + 2 * MERGE_GAP + 1)]);
        let mut outside = PageRangeSet::new();
        outside.insert(4095, 2);
        assert!(matches!(cow.plan(&outside), Err(CowError::NoSuchPage(4096))));
    }

    /// The staging buffer gets the pages as they were at the protection, while writers (as a
    /// device thread would, through vm-memory) rewrite them during the copy; every write lands
    /// afterwards, and nothing stays protected.
    #[test]
    fn the_copy_is_the_memory_of_the_pause_under_writes() {
        let mem = memory();
        let mut cow = CowCopy::new(&mem).unwrap();
        let mut pages = PageRangeSet::new();
        // Runs, a lone page, ranges longer than a piece, and gaps inside and between spans.
        pages.insert(1, 3);
        pages.insert(20, 1);
        pages.insert(100, 300);
        pages.insert(2000, 1);
        for round in 1..=5u8 {
            fill_pages(&mem, &pages, round);
            let mut staging = Staging::default();
            staging.lay_out(&pages);
            cow.protect(&pages).unwrap();
            // Writers hit the protected pages from the end backwards (so most writes come before
            // the copy reaches them), and a clean page inside a span.
            let stop = Arc::new(AtomicBool::new(false));
            let writer = {
                let (mem, stop) = (mem.clone(), stop.clone());
                let mut targets: Vec<u64> = pages.pages().step_by(7).collect();
                targets.reverse();
                targets.push(10);
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    for &pfn in &targets {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        mem.write_obj(0xdead_0000_u64 + pfn, GuestAddress(pfn * PAGE_SIZE + 8)).unwrap();
                        n += 1;
                    }
                    n
                })
            };
            std::thread::sleep(Duration::from_millis(2));
            let stats = cow.copy(&pages, &mut staging, &mem).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !writer.is_finished() {
                assert!(Instant::now() < deadline, "a writer still waits: a page stayed protected");
                std::thread::sleep(Duration::from_millis(1));
            }
            stop.store(true, Ordering::Relaxed);
            let written = writer.join().unwrap();
            assert!(stats.faults >= 1 && stats.faults <= written, "round {round}: {stats:?}, {written} writes");
            for pfn in pages.pages() {
                let p = staging.page(pfn).unwrap();
                assert!(p.iter().all(|&b| b == round), "round {round}: page {pfn} is not as at the protection");
            }
            for pfn in [1, 10] {
                assert_eq!(mem.read_obj::<u64>(GuestAddress(pfn * PAGE_SIZE + 8)).unwrap(), 0xdead_0000 + pfn, "round {round}: the write landed");
            }
            // Nothing protected any more: a write goes straight through.
            mem.write_obj(1u64, GuestAddress(2000 * PAGE_SIZE)).unwrap();
            assert!(!cow.uffd.wait(Duration::ZERO));
        }
    }
}
