//! The pages a link sent in its session, so that the next epoch that carries one again sends only
//! what changed in it (`ftvm_proto::page_delta`, A-Link 1.9).
//!
//! What this keeps for a page is what the backup holds of it: the link sends every epoch whole and
//! in order, the backup applies each one before the next begins, and a link that fails ends the
//! session and this with it (the next backup gets a new link). Synchronisation epochs are not
//! kept: their pages are a running guest's, read while it writes them.
//!
//! The copies are bounded ([`SentPages::new`]): when full, the pages not sent for the longest go.

use std::collections::HashMap;

use ftvm_proto::limits::{MAX_FRAME_PAYLOAD, MAX_PAGES_PER_FRAME};
use ftvm_proto::page_delta;
use ftvm_proto::pages::PageRangeSet;

use super::PageSource;
use crate::PAGE_SIZE;

/// A delta is sent only when it takes at most this share of a page (runs and record head):
/// a page rewritten more than that goes whole, and the backup does less work for it.
const MOST_DELTA_BYTES: usize = PAGE_SIZE / 2;
/// Pages kept by default: 16 MiB of copies.
pub const DEFAULT_KEPT_PAGES: usize = 4096;

/// One kept page.
#[derive(Debug)]
struct Kept {
    data: Box<[u8]>,
    /// The last epoch that carried it.
    epoch: u64,
}

/// An epoch's pages split into whole pages and delta payloads.
#[derive(Debug, Default)]
pub struct Split {
    /// The pages to send whole.
    pub whole: PageRangeSet,
    /// `PageDeltas` payloads, each within a frame's limits.
    pub deltas: Vec<Vec<u8>>,
    /// Pages the payloads carry.
    pub delta_pages: u64,
}

/// The pages a link sent (see the module documentation).
#[derive(Debug)]
pub struct SentPages {
    kept: HashMap<u64, Kept>,
    capacity: usize,
    /// When the copies are full, no sweep for room before this epoch (see [`Self::keep`]).
    next_sweep: u64,
    runs: Vec<u8>,
    /// Totals of the session, for status.
    pub pages_as_deltas: u64,
    /// The A-Link bytes the deltas saved (a whole page's payload less the record's).
    pub bytes_saved: u64,
}

impl SentPages {
    /// Keeps at most `capacity` pages.
    pub fn new(capacity: usize) -> Self {
        Self {
            kept: HashMap::with_capacity(capacity.min(DEFAULT_KEPT_PAGES)),
            capacity,
            next_sweep: 0,
            runs: Vec::with_capacity(PAGE_SIZE),
            pages_as_deltas: 0,
            bytes_saved: 0,
        }
    }

    /// Splits the pages of `epoch` (every one of them in `source`) into those that go whole and
    /// those that go as deltas from the copy kept, and keeps each page's new content.
    pub fn split(&mut self, pages: &PageRangeSet, source: &dyn PageSource, epoch: u64) -> Split {
        let mut split = Split::default();
        let mut payload: Option<Vec<u8>> = None;
        for pfn in pages.pages() {
            let Some(new) = source.page(pfn).filter(|p| p.len() == PAGE_SIZE) else {
                // The transport checked every page before: never here, but whole is always right.
                split.whole.insert(pfn, 1);
                continue;
            };
            let delta = match self.kept.get_mut(&pfn) {
                Some(kept) => {
                    self.runs.clear();
                    ftvm_proto::xor_runs::encode(&kept.data, new, &mut self.runs);
                    kept.epoch = epoch;
                    let small = page_delta::RECORD_HEAD_LEN + self.runs.len() <= MOST_DELTA_BYTES;
                    // The copy becomes the new content: through its few changed bytes when the
                    // runs are small (an unchanged page costs nothing), else whole.
                    if !small || ftvm_proto::xor_runs::apply(&mut kept.data, &self.runs).is_err() {
                        kept.data.copy_from_slice(new);
                    }
                    debug_assert!(*kept.data == *new);
                    small
                }
                None => {
                    self.keep(pfn, new, epoch);
                    false
                }
            };
            if !delta {
                split.whole.insert(pfn, 1);
                continue;
            }
            let full = |p: &Vec<u8>| {
                u64::from(page_delta::count(p)) >= MAX_PAGES_PER_FRAME
                    || p.len() + page_delta::RECORD_HEAD_LEN + self.runs.len() > MAX_FRAME_PAYLOAD as usize
            };
            if payload.as_ref().is_some_and(full) {
                split.deltas.extend(payload.take());
            }
            let p = payload.get_or_insert_with(|| {
                let mut p = Vec::with_capacity(4096);
                page_delta::start(&mut p);
                p
            });
            page_delta::push(p, pfn, new, &self.runs);
            split.delta_pages += 1;
            self.bytes_saved += (PAGE_SIZE - page_delta::RECORD_HEAD_LEN - self.runs.len()) as u64;
        }
        split.deltas.extend(payload);
        self.pages_as_deltas += split.delta_pages;
        split
    }

    /// Keeps a copy of `pfn`, making room if the copies are full (or not keeping it, when every
    /// kept page was sent recently).
    fn keep(&mut self, pfn: u64, data: &[u8], epoch: u64) {
        if self.kept.len() >= self.capacity {
            if epoch < self.next_sweep {
                return;
            }
            // The pages not sent in the last quarter of the copies' worth of epochs go; at most one
            // sweep per that many epochs, so a working set larger than the copies costs little.
            let span = (self.capacity as u64 / 4).max(1);
            let before = epoch.saturating_sub(span);
            self.kept.retain(|_, k| k.epoch >= before);
            self.next_sweep = epoch + span;
            if self.kept.len() >= self.capacity {
                return;
            }
        }
        self.kept.insert(pfn, Kept { data: data.into(), epoch });
    }

    /// Pages kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.kept.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::FlatMemory;

    fn memory(pages: usize) -> Vec<u8> {
        (0..pages * PAGE_SIZE).map(|i| (i / 7) as u8).collect()
    }

    fn set(pfns: &[u64]) -> PageRangeSet {
        let mut s = PageRangeSet::new();
        for &p in pfns {
            s.insert(p, 1);
        }
        s
    }

    /// Makes the backup's copy from what a split sent, as the receiver does.
    fn apply(backup: &mut [u8], split: &Split, primary: &[u8], memory_pages: u64) {
        for pfn in split.whole.pages() {
            let at = pfn as usize * PAGE_SIZE;
            backup[at..at + PAGE_SIZE].copy_from_slice(&primary[at..at + PAGE_SIZE]);
        }
        for payload in &split.deltas {
            for d in page_delta::decode(payload, memory_pages).unwrap() {
                let at = d.pfn as usize * PAGE_SIZE;
                let mut made = Vec::new();
                page_delta::make_page(&backup[at..at + PAGE_SIZE], &d, &mut made).unwrap();
                backup[at..at + PAGE_SIZE].copy_from_slice(&made);
            }
        }
    }

    /// Epoch after epoch of small writes: the first sends whole pages, the next ones deltas, and
    /// the backup's copy is the primary's memory every time.
    #[test]
    fn pages_sent_again_go_as_deltas_and_the_copies_stay_equal() {
        let n = 64usize;
        let mut primary = memory(n);
        let mut backup = primary.clone();
        let mut sent = SentPages::new(DEFAULT_KEPT_PAGES);
        let mut seen = std::collections::HashSet::new();
        for epoch in 1..=20u64 {
            let dirty: Vec<u64> = (0..8).map(|i| (epoch * 5 + i * 7) % n as u64).collect();
            for &p in &dirty {
                let at = p as usize * PAGE_SIZE + (epoch as usize * 13) % PAGE_SIZE;
                primary[at] = primary[at].wrapping_add(epoch as u8 | 1);
            }
            let split = sent.split(&set(&dirty), &FlatMemory(&primary), epoch);
            assert_eq!(split.whole.page_count() + split.delta_pages, set(&dirty).page_count());
            // Each page goes whole the first time only.
            let first_time = set(&dirty).pages().filter(|&p| seen.insert(p)).count() as u64;
            assert_eq!(split.whole.page_count(), first_time, "epoch {epoch}");
            apply(&mut backup, &split, &primary, n as u64);
            assert!(backup == primary, "epoch {epoch}");
        }
        assert_eq!(sent.pages_as_deltas, 20 * 8 - seen.len() as u64);
    }

    /// A page rewritten whole goes whole, and is still kept for the next epoch.
    #[test]
    fn a_page_mostly_rewritten_goes_whole() {
        let mut primary = memory(2);
        let mut sent = SentPages::new(8);
        let split = sent.split(&set(&[1]), &FlatMemory(&primary), 1);
        assert_eq!((split.whole.page_count(), split.delta_pages), (1, 0));
        for b in &mut primary[PAGE_SIZE..] {
            *b ^= 0x55;
        }
        let split = sent.split(&set(&[1]), &FlatMemory(&primary), 2);
        assert_eq!((split.whole.page_count(), split.delta_pages), (1, 0));
        primary[PAGE_SIZE + 3] ^= 1;
        let split = sent.split(&set(&[1]), &FlatMemory(&primary), 3);
        assert_eq!((split.whole.page_count(), split.delta_pages), (0, 1));
    }

    /// Full copies: pages not sent lately make room; recent ones stay.
    #[test]
    fn the_copies_are_bounded() {
        let primary = memory(32);
        let mut sent = SentPages::new(8);
        for epoch in 0..32u64 {
            sent.split(&set(&[epoch]), &FlatMemory(&primary), epoch);
            assert!(sent.kept() <= 8);
        }
        // The last page sent is kept: sent again unchanged, it is a delta.
        let split = sent.split(&set(&[31]), &FlatMemory(&primary), 32);
        assert_eq!(split.delta_pages, 1);
    }

    /// More delta pages than a frame carries: several payloads.
    #[test]
    fn many_deltas_fill_several_frames() {
        let n = 600usize;
        let primary = memory(n);
        let all: Vec<u64> = (0..n as u64).collect();
        let mut sent = SentPages::new(DEFAULT_KEPT_PAGES);
        sent.split(&set(&all), &FlatMemory(&primary), 1);
        let split = sent.split(&set(&all), &FlatMemory(&primary), 2);
        assert_eq!(split.delta_pages, n as u64);
        assert_eq!(split.deltas.len(), n.div_ceil(MAX_PAGES_PER_FRAME as usize));
        let mut backup = primary.clone();
        apply(&mut backup, &split, &primary, n as u64);
        assert!(backup == primary);
    }
}
