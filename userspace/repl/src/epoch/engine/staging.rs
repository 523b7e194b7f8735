//! The staging copy: the epoch's dirty pages copied out of guest memory while the VM is paused,
//! so that the VM runs again while the copy is on the wire (see the engine's "Why a staging copy").

use ftvm_proto::pages::{PageRange, PageRangeSet};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use crate::transport::PageSource;
use crate::PAGE_SIZE;

/// Dirty pages copied out of guest memory, in the order of their ranges.
#[derive(Debug, Default)]
pub(super) struct Staging {
    buf: Vec<u8>,
    ranges: Vec<PageRange>,
    /// Page index in `buf` of each range's first page.
    first: Vec<u64>,
}

impl Staging {
    /// Copies `pages` out of `mem`.
    pub(super) fn fill(&mut self, pages: &PageRangeSet, mem: &ftvm_vmm::memory::GuestMemory) -> Result<(), u64> {
        self.lay_out(pages);
        self.copy_pages(pages, mem)
    }

    /// Copies `pages`, all laid out already (a copy-on-write epoch's pause copies some of its
    /// pages, the copy after the resume the others); the first page that fails on error.
    pub(super) fn copy_pages(&mut self, pages: &PageRangeSet, mem: &ftvm_vmm::memory::GuestMemory) -> Result<(), u64> {
        for r in pages.ranges() {
            self.copy_in(mem, r.start, r.len).map_err(|_| r.start)?;
        }
        Ok(())
    }

    /// Pages laid out.
    pub(super) fn page_count(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Makes room for `pages`, in the order of their ranges, copying nothing yet (a copy-on-write
    /// epoch copies them after the resume, see `cow`).
    pub(super) fn lay_out(&mut self, pages: &PageRangeSet) {
        self.ranges.clear();
        self.first.clear();
        let bytes = pages.page_count() as usize * PAGE_SIZE;
        // Grows to the largest epoch seen and stays: no allocation in the pause after warm-up.
        if self.buf.len() < bytes {
            self.buf.resize(bytes, 0);
        }
        let mut at = 0u64;
        for r in pages.ranges() {
            self.ranges.push(*r);
            self.first.push(at);
            at += r.len;
        }
    }

    /// The index in the buffer of staged page `pfn`, if it is one of the epoch's.
    pub(super) fn index_of(&self, pfn: u64) -> Option<u64> {
        let i = self.find(pfn)?;
        Some(self.first[i] + (pfn - self.ranges[i].start))
    }

    /// Copies `len` pages from `pfn` out of `mem` into their places (all in one of the laid-out
    /// ranges).
    pub(super) fn copy_in(&mut self, mem: &ftvm_vmm::memory::GuestMemory, pfn: u64, len: u64) -> Result<(), vm_memory::GuestMemoryError> {
        let i = self.find(pfn).ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(pfn * PAGE_SIZE as u64)))?;
        let r = self.ranges[i];
        assert!(pfn + len <= r.start + r.len, "a copy stays inside one staged range");
        let from = (self.first[i] + (pfn - r.start)) as usize * PAGE_SIZE;
        copy_guest(mem, GuestAddress(pfn * PAGE_SIZE as u64), &mut self.buf[from..from + len as usize * PAGE_SIZE])
    }

    fn find(&self, pfn: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.start <= pfn).checked_sub(1)?;
        let r = self.ranges[i];
        (pfn < r.start + r.len).then_some(i)
    }
}

/// Copies guest memory at `addr` into `dst` with one `memcpy` when the range lies in one region
/// (vm-memory's own copy goes word by word through volatile reads, several times slower, and the
/// copy is inside the pause).
pub(super) fn copy_guest(mem: &ftvm_vmm::memory::GuestMemory, addr: GuestAddress, dst: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
    match mem.get_slice(addr, dst.len()) {
        Ok(src) => {
            let guard = src.ptr_guard();
            // SAFETY: `get_slice` checked that the host mapping covers `dst.len()` bytes from
            // `guard.as_ptr()` and the guard keeps it mapped; `dst` is a distinct Rust buffer, so the
            // two do not overlap. Guest memory is not a Rust object: it is shared with the guest,
            // like any mapping another party writes. In a checkpoint (and after a switchover, which
            // leaves the VM paused) the vCPUs and devices are paused, or (a copy-on-write epoch)
            // the pages are write-protected until copied, so nothing writes them during the copy; during the initial sync the guest may, and a page it changes
            // meanwhile is dirty and sent again with the first checkpoint.
            unsafe { std::ptr::copy_nonoverlapping(guard.as_ptr(), dst.as_mut_ptr(), dst.len()) };
            Ok(())
        }
        // Across a region boundary: the slow, general path.
        Err(_) => mem.read_slice(dst, addr),
    }
}

impl PageSource for Staging {
    fn page(&self, pfn: u64) -> Option<&[u8]> {
        self.run(pfn, 1)
    }

    fn run(&self, start: u64, len: u64) -> Option<&[u8]> {
        let i = self.find(start)?;
        let r = self.ranges[i];
        if start.checked_add(len)? > r.start + r.len {
            return None;
        }
        let from = (self.first[i] + (start - r.start)) as usize * PAGE_SIZE;
        self.buf.get(from..from + len as usize * PAGE_SIZE)
    }

    fn packed(&self, ranges: &[PageRange]) -> Option<&[u8]> {
        // The buffer holds the epoch's ranges back to back in order: ranges (or parts of them)
        // that follow each other there are one slice.
        let mut start: Option<u64> = None;
        let mut next = 0u64;
        for r in ranges {
            let i = self.find(r.start)?;
            let held = self.ranges[i];
            if r.start.checked_add(r.len)? > held.start + held.len {
                return None;
            }
            let at = self.first[i] + (r.start - held.start);
            match start {
                None => start = Some(at),
                Some(_) if at != next => return None,
                Some(_) => {}
            }
            next = at + r.len;
        }
        let from = start? as usize * PAGE_SIZE;
        let pages = next - start?;
        self.buf.get(from..from + pages as usize * PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_pages_are_found_by_page_and_by_run() {
        let mut st = Staging::default();
        let mut pages = PageRangeSet::new();
        pages.insert(2, 3);
        pages.insert(10, 1);
        // A fake memory: each page holds its own number.
        st.ranges = pages.ranges().to_vec();
        st.first = vec![0, 3];
        st.buf = [2u8, 3, 4, 10].iter().flat_map(|&p| std::iter::repeat_n(p, PAGE_SIZE)).collect();
        for pfn in [2, 3, 4, 10] {
            assert_eq!(st.page(pfn).map(|p| (p.len(), p[0])), Some((PAGE_SIZE, pfn as u8)));
        }
        for pfn in [0, 1, 5, 9, 11, u64::MAX] {
            assert_eq!(st.page(pfn), None, "page {pfn}");
        }
        assert_eq!(st.run(3, 2).map(|r| (r.len(), r[0], r[PAGE_SIZE])), Some((2 * PAGE_SIZE, 3, 4)));
        assert_eq!(st.run(3, 3), None, "past the end of its range");
        assert_eq!(st.run(4, u64::MAX), None);
        // Ranges back to back in the buffer are one slice, parts of ranges included; a gap or an
        // order other than the buffer's is not.
        let r = |start, len| PageRange { start, len };
        let bytes = |s: Option<&[u8]>| s.map(|b| b.chunks(PAGE_SIZE).map(|p| p[0]).collect::<Vec<u8>>());
        assert_eq!(bytes(st.packed(&[r(2, 3), r(10, 1)])), Some(vec![2, 3, 4, 10]));
        assert_eq!(bytes(st.packed(&[r(4, 1), r(10, 1)])), Some(vec![4, 10]));
        assert_eq!(bytes(st.packed(&[r(3, 1)])), Some(vec![3]));
        assert_eq!(st.packed(&[r(2, 1), r(4, 1)]), None, "page 3 lies between them");
        assert_eq!(st.packed(&[r(10, 1), r(2, 1)]), None);
        assert_eq!(st.packed(&[r(4, 2)]), None, "past the end of its range");
        assert_eq!(st.packed(&[]), None);
    }
}
