//! Dirty tracking with userfaultfd asynchronous write-protect and `PAGEMAP_SCAN`, without KVM's
//! dirty log.
//!
//! Guest memory is registered with a userfaultfd in [`WpMode::Async`] and write-protected in the
//! host's page tables. The first write to a protected page, by anyone (the guest through KVM,
//! a device thread, the kernel on behalf of io_uring or a TAP read), faults; the kernel lifts the
//! protection of that page by itself, without a message, and the page is "written". A harvest is
//! one `PAGEMAP_SCAN` per region ([`Pagemap::take_written`]): it reports the written pages and
//! protects them again in the same page-table walk, so get-and-clear is atomic per page, and a
//! write that lands after its page was scanned faults again and is in the next harvest. KVM's
//! slots stay registered without `KVM_MEM_LOG_DIRTY_PAGES`; the protection reaches KVM's own
//! mappings through the MMU notifiers.
//!
//! Costs: each first write to a page in an epoch is a fault (on this machine's nested KVM about
//! what KVM's own logging costs); a harvest walks the page tables of all guest memory (grows with
//! memory size) and invalidates KVM's mappings of the range, so the guest faults its working set
//! in again after each checkpoint. The VMM's bitmap is ORed in as with the other backends, into
//! the same per-region bitmap as the scan's pages (so its duplicates cost nothing): the scan
//! already sees the VMM's writes through the mapping, and the bitmap keeps the contract the same
//! for every backend.
//!
//! Only writes through this process's mapping of guest memory are seen: a write through another
//! mapping of an adopted memfd is not (as KVM's log does not see it either). And on shared memory
//! (an adopted memfd), the kernel keeps no protection state for a page whose mapping it drops: a
//! written page swapped out before the harvest would read as not written. Guest memory is not
//! meant to be swapped (this machine has no swap).
//!
//! Needs Linux 6.7 or later (`UFFD_FEATURE_WP_ASYNC`, `PAGEMAP_SCAN`): [`UffdWp::new`] fails on
//! an older kernel, so a machine asked to use this tracker is not built at all.

use ftvm_proto::pages::PageRangeSet;

use super::vmm_bitmap;
use super::{
    DirtyTracker, HarvestError, HarvestStats, TrackStartError, TrackStopError, TrackerKind,
};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::uffd::{sys, HostRange, Pagemap, UffdError, Userfault, WpMode};

/// Page regions one `PAGEMAP_SCAN` call can answer: 1 000 scattered pages fit in one call.
const SCAN_REGIONS: usize = 4096;

/// Written pages from userfaultfd write-protect, ORed with the VMM's bitmap.
#[derive(Debug)]
pub struct UffdWp {
    /// Keeps the registered mappings alive, and holds the VMM bitmaps.
    mem: GuestMemory,
    /// `mem`'s regions, in its order (the VMM bitmaps' indexes).
    ranges: Vec<HostRange>,
    /// The userfaultfd every region is registered with; `None` once stopped (closing it
    /// unregisters the memory), made again by the next start.
    uffd: Option<Userfault>,
    pagemap: Pagemap,
    /// Scratch space for the kernel's answers.
    buf: Vec<sys::PageRegion>,
    /// Written host ranges of the region being harvested.
    written: Vec<(u64, u64)>,
    pending: PageRangeSet,
    started: bool,
}

impl UffdWp {
    /// A tracker for guest memory `mem` (not started): the userfaultfd is made and every region
    /// registered now, so that a kernel without asynchronous write-protect or `PAGEMAP_SCAN`
    /// refuses the tracker before the machine runs.
    pub fn new(mem: GuestMemory) -> Result<Self, UffdError> {
        let uffd = Some(register(&mem)?);
        Ok(Self {
            ranges: HostRange::of(&mem),
            mem,
            uffd,
            pagemap: Pagemap::open()?,
            buf: vec![sys::PageRegion::default(); SCAN_REGIONS],
            written: Vec::new(),
            pending: PageRangeSet::new(),
            started: false,
        })
    }

    /// Checks that this host can run the tracker (a throw-away userfaultfd in asynchronous
    /// write-protect mode, and `/proc/self/pagemap`): for a host that builds the machine later,
    /// at a takeover, and must not learn only then.
    pub fn check_host() -> Result<(), UffdError> {
        Userfault::new(WpMode::Async)?;
        Pagemap::open()?;
        Ok(())
    }

    /// Sets in `words` (bit `i` of word `w`: page `64 * w + i` of `range`, as in the VMM bitmap)
    /// the pages of the host ranges in `self.written`, which lie in `range`; returns how many
    /// pages those ranges hold. One bitmap for both sources: a page written by the VMM, which the
    /// scan reports too, is not merged into the set twice.
    fn mark_written(&self, range: &HostRange, words: &mut Vec<u64>) -> u64 {
        let pages = range.len / PAGE_SIZE;
        words.resize(words.len().max(pages.div_ceil(64) as usize), 0);
        let mut n = 0;
        for &(start, end) in &self.written {
            // The scan only reports pages inside the range it was asked about; clamp anyway, so
            // that a page is never made up.
            let first = start.saturating_sub(range.host) / PAGE_SIZE;
            let end = end
                .saturating_sub(range.host)
                .div_ceil(PAGE_SIZE)
                .min(pages);
            for p in first..end {
                words[(p / 64) as usize] |= 1 << (p % 64);
            }
            n += end.saturating_sub(first);
        }
        n
    }
}

/// A userfaultfd in asynchronous write-protect mode with every region of `mem` registered.
fn register(mem: &GuestMemory) -> Result<Userfault, UffdError> {
    let uffd = Userfault::new(WpMode::Async)?;
    uffd.register(mem)?;
    Ok(uffd)
}

impl DirtyTracker for UffdWp {
    fn start(&mut self) -> Result<(), TrackStartError> {
        let uffd = match &mut self.uffd {
            Some(u) => u,
            slot @ None => slot.insert(register(&self.mem).map_err(TrackStartError::Uffd)?),
        };
        // Protecting a page clears its "written" state: what was written before is forgotten.
        // Protect first, then clear the VMM bitmap: a VMM write in between is in the next scan.
        for r in &self.ranges {
            uffd.protect(r.host, r.len).map_err(TrackStartError::Uffd)?;
        }
        vmm_bitmap::reset_all(&self.mem);
        self.pending.clear();
        self.started = true;
        Ok(())
    }

    fn harvest(&mut self, out: &mut PageRangeSet) -> Result<HarvestStats, HarvestError> {
        if !self.started {
            return Err(HarvestError::NotStarted);
        }
        let mut stats = HarvestStats::default();
        for (i, r) in self.ranges.iter().enumerate() {
            self.written.clear();
            let scan = self
                .pagemap
                .take_written(r.host, r.len, &mut self.buf, &mut self.written);
            if let Err(e) = scan {
                // A failed scan may have protected pages again before failing: they are in
                // `written`. They and the regions harvested so far (in `out`, which the caller
                // will drop with the error) stay pending, with the caller's own pages, harmlessly.
                // This region's VMM bitmap and the next ones keep their bits.
                let mut words = Vec::new();
                self.mark_written(r, &mut words);
                out.add_bitmap(r.guest / PAGE_SIZE, &words);
                self.pending.union_with(out);
                return Err(HarvestError::Scan(e));
            }
            let mut words = vmm_bitmap::take_words(&self.mem, i);
            stats.vmm_pages += vmm_bitmap::count(&words);
            stats.uffd_pages += self.mark_written(r, &mut words);
            out.add_bitmap(r.guest / PAGE_SIZE, &words);
        }
        stats.pending_pages = self.pending.drain_into(out);
        Ok(stats)
    }

    fn remark(&mut self, pages: &PageRangeSet) {
        self.pending.union_with(pages);
    }

    fn stop(&mut self) -> Result<(), TrackStopError> {
        self.started = false;
        self.pending.clear();
        // Dropped even when lifting fails: closing the userfaultfd unregisters the memory, and a
        // protected page of memory no longer registered faults like any other page.
        let Some(uffd) = self.uffd.take() else {
            return Ok(());
        };
        for r in &self.ranges {
            uffd.unprotect(r.host, r.len)
                .map_err(TrackStopError::Uffd)?;
        }
        Ok(())
    }

    fn kind(&self) -> TrackerKind {
        TrackerKind::Uffd
    }

    fn name(&self) -> &'static str {
        "uffd"
    }

    fn is_started(&self) -> bool {
        self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

    fn pages(set: &PageRangeSet) -> Vec<u64> {
        set.pages().collect()
    }

    /// Without a VM: writes through vm-memory are reported once (by the scan and the VMM bitmap
    /// alike), writes through a raw pointer (which the VMM bitmap misses) too, remark gives pages
    /// back, and stop then start forgets what was written in between.
    #[test]
    fn reports_every_write_through_the_mapping_once() {
        let mem = crate::vm::create_guest_memory(16 << 20).unwrap();
        let mut t = UffdWp::new(mem.clone()).unwrap();
        let mut out = PageRangeSet::new();
        assert!(matches!(t.harvest(&mut out), Err(HarvestError::NotStarted)));
        mem.write_obj(1u64, GuestAddress(0x5000)).unwrap();
        t.start().unwrap();
        t.harvest(&mut out).unwrap();
        assert!(out.is_empty(), "written before start: {:x?}", pages(&out));

        mem.write_obj(2u64, GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[7u8; 16], GuestAddress(0x41000 - 8))
            .unwrap();
        let raw = mem.get_host_address(GuestAddress(0x80_0000)).unwrap();
        // SAFETY: a u64 inside guest memory, which `mem` keeps mapped; nothing else uses it.
        unsafe { raw.cast::<u64>().write_volatile(3) };
        let stats = t.harvest(&mut out).unwrap();
        assert_eq!(pages(&out), [0x5, 0x40, 0x41, 0x800]);
        assert_eq!(
            (stats.uffd_pages, stats.vmm_pages, stats.kvm_pages),
            (4, 3, 0)
        );

        let mut again = PageRangeSet::new();
        t.harvest(&mut again).unwrap();
        assert!(again.is_empty(), "harvested twice: {:x?}", pages(&again));
        t.remark(&out);
        mem.write_obj(4u64, GuestAddress(0x9000)).unwrap();
        let stats = t.harvest(&mut again).unwrap();
        assert_eq!(pages(&again), [0x5, 0x9, 0x40, 0x41, 0x800]);
        assert_eq!(stats.pending_pages, 4);

        t.stop().unwrap();
        assert!(!t.is_started());
        mem.write_obj(5u64, GuestAddress(0xa000)).unwrap();
        t.start().unwrap();
        let mut after = PageRangeSet::new();
        t.harvest(&mut after).unwrap();
        assert!(
            after.is_empty(),
            "written while stopped: {:x?}",
            pages(&after)
        );
        mem.write_obj(6u64, GuestAddress(0xb000)).unwrap();
        t.harvest(&mut after).unwrap();
        assert_eq!(pages(&after), [0xb]);
        assert_eq!(t.kind(), TrackerKind::Uffd);
    }

    /// A scan that fails (here: the memory is no longer registered, which `PAGEMAP_SCAN` refuses
    /// with `PM_SCAN_CHECK_WPASYNC`) keeps the pages given back and the caller's, and leaves the
    /// VMM bitmap alone: the next harvest returns them all.
    #[test]
    fn a_failed_scan_loses_nothing() {
        let mem = crate::vm::create_guest_memory(16 << 20).unwrap();
        let mut t = UffdWp::new(mem.clone()).unwrap();
        t.start().unwrap();
        let mut given_back = PageRangeSet::new();
        given_back.insert(0x20, 2);
        t.remark(&given_back);
        mem.write_obj(1u64, GuestAddress(0x7000)).unwrap();
        t.uffd = None;
        let mut out = PageRangeSet::new();
        out.insert(0x100, 1);
        assert!(matches!(t.harvest(&mut out), Err(HarvestError::Scan(_))));

        // Registered and protected again (as a new start would, without forgetting).
        let uffd = register(&mem).unwrap();
        for r in &t.ranges {
            uffd.protect(r.host, r.len).unwrap();
        }
        t.uffd = Some(uffd);
        let mut out = PageRangeSet::new();
        t.harvest(&mut out).unwrap();
        assert_eq!(pages(&out), [0x7, 0x20, 0x21, 0x100]);
    }
}
