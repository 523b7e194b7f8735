//! Sets of guest page frame numbers, kept as sorted, disjoint, non-adjacent ranges.
//!
//! Dirty tracking produces bitmaps (one bit per 4 KiB page); checkpoints send runs of pages. The set
//! converts between the two and merges sets (the KVM log OR the VMM's own bitmap, or a failed
//! epoch's pages folded back into the next one).

/// A half-open range of page frame numbers `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    /// First page frame number.
    pub start: u64,
    /// Number of pages (never 0 inside a set).
    pub len: u64,
}

impl PageRange {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Sorted, disjoint, non-adjacent page ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRangeSet {
    ranges: Vec<PageRange>,
}

impl PageRangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The ranges, in ascending order.
    pub fn ranges(&self) -> &[PageRange] {
        &self.ranges
    }

    /// True when no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of pages in the set.
    pub fn page_count(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Every page frame number, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|r| r.start..r.end())
    }

    /// Adds the pages of a bitmap (bit `i` of word `w` is page `first_pfn + 64 * w + i`). Fast when
    /// the set is empty or the bitmap lies after every range already in the set, which is how
    /// harvesting memory slots in address order uses it.
    pub fn add_bitmap(&mut self, first_pfn: u64, words: &[u64]) {
        let mut run: Option<PageRange> = None;
        let mut pending = Vec::new();
        for (w, &word) in words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            let mut bits = word;
            while bits != 0 {
                let i = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let pfn = first_pfn + 64 * w as u64 + i;
                match &mut run {
                    Some(r) if r.end() == pfn => r.len += 1,
                    _ => {
                        if let Some(r) = run.take() {
                            pending.push(r);
                        }
                        run = Some(PageRange { start: pfn, len: 1 });
                    }
                }
            }
        }
        pending.extend(run);
        for r in pending {
            self.insert(r.start, r.len);
        }
    }

    /// Adds `[start, start + len)`. The range must end at or below 2^64 (a set holds guest page
    /// frame numbers, which come from a dirty bitmap or a checked frame, never wrap).
    pub fn insert(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start + len;
        // Fast path: appending after the last range.
        match self.ranges.last_mut() {
            None => {
                self.ranges.push(PageRange { start, len });
                return;
            }
            Some(last) if last.end() < start => {
                self.ranges.push(PageRange { start, len });
                return;
            }
            Some(last) if last.start <= start => {
                last.len = last.len.max(end - last.start);
                return;
            }
            Some(_) => {}
        }
        // General case: merge every range that overlaps or touches [start, end).
        let first = self.ranges.partition_point(|r| r.end() < start);
        let last = self.ranges.partition_point(|r| r.start <= end);
        let (mut new_start, mut new_end) = (start, end);
        if first < last {
            new_start = new_start.min(self.ranges[first].start);
            new_end = new_end.max(self.ranges[last - 1].end());
        }
        self.ranges.splice(first..last, [PageRange { start: new_start, len: new_end - new_start }]);
    }

    /// Adds every page of `other`.
    pub fn union_with(&mut self, other: &PageRangeSet) {
        for r in &other.ranges {
            self.insert(r.start, r.len);
        }
    }

    /// Moves every page into `out` and leaves this set empty; returns how many pages moved
    /// (counted before the union, so pages `out` already had count too).
    pub fn drain_into(&mut self, out: &mut PageRangeSet) -> u64 {
        let moved = self.page_count();
        out.union_with(self);
        self.clear();
        moved
    }

    /// True when `pfn` is in the set.
    pub fn contains(&self, pfn: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end() <= pfn);
        self.ranges.get(i).is_some_and(|r| r.start <= pfn)
    }

    /// Splits this set by `by`: `(pages also in by, pages not in by)`.
    pub fn split_by(&self, by: &PageRangeSet) -> (PageRangeSet, PageRangeSet) {
        let (mut inside, mut outside) = (PageRangeSet::new(), PageRangeSet::new());
        let mut j = 0;
        for r in &self.ranges {
            let mut at = r.start;
            // Ranges of `by` that end at or before `at` can be of no use to this or later ranges.
            while j < by.ranges.len() && by.ranges[j].end() <= at {
                j += 1;
            }
            let mut k = j;
            while at < r.end() {
                match by.ranges.get(k) {
                    Some(b) if b.start < r.end() => {
                        let from = b.start.max(at);
                        outside.insert(at, from - at);
                        let to = b.end().min(r.end());
                        inside.insert(from, to - from);
                        at = to;
                        k += 1;
                    }
                    _ => {
                        outside.insert(at, r.end() - at);
                        at = r.end();
                    }
                }
            }
        }
        (inside, outside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_by_another_set() {
        let set = |rs: &[(u64, u64)]| {
            let mut s = PageRangeSet::new();
            for &(start, len) in rs {
                s.insert(start, len);
            }
            s
        };
        let pages = set(&[(10, 10), (30, 5), (100, 1)]);
        let by = set(&[(0, 12), (15, 2), (19, 13), (100, 1), (200, 5)]);
        let (inside, outside) = pages.split_by(&by);
        assert_eq!(inside.ranges(), set(&[(10, 2), (15, 2), (19, 1), (30, 2), (100, 1)]).ranges());
        assert_eq!(outside.ranges(), set(&[(12, 3), (17, 2), (32, 3)]).ranges());
        assert_eq!(inside.page_count() + outside.page_count(), pages.page_count());
        let (all, none) = pages.split_by(&pages);
        assert_eq!((all.ranges(), none.is_empty()), (pages.ranges(), true));
        let (none, all) = pages.split_by(&PageRangeSet::new());
        assert_eq!((none.is_empty(), all.ranges()), (true, pages.ranges()));
    }

    #[test]
    fn bitmap_to_ranges() {
        let mut s = PageRangeSet::new();
        // Pages 0,1,2 and 63 of word 0, page 64 of word 1 (adjacent to 63), page 130.
        s.add_bitmap(1000, &[0b111 | 1 << 63, 1, 1 << 2]);
        assert_eq!(
            s.ranges(),
            &[PageRange { start: 1000, len: 3 }, PageRange { start: 1063, len: 2 }, PageRange { start: 1130, len: 1 }]
        );
        assert_eq!(s.page_count(), 6);
        assert!(s.contains(1064) && !s.contains(1065) && !s.contains(999));
    }

    #[test]
    fn inserts_merge_overlaps_and_neighbours() {
        let mut s = PageRangeSet::new();
        s.insert(10, 5); // 10..15
        s.insert(20, 5); // 20..25
        s.insert(0, 2); // 0..2 (before everything)
        s.insert(15, 5); // touches both: 10..25
        assert_eq!(s.ranges(), &[PageRange { start: 0, len: 2 }, PageRange { start: 10, len: 15 }]);
        s.insert(1, 30); // swallows all
        assert_eq!(s.ranges(), &[PageRange { start: 0, len: 31 }]);
        s.insert(5, 0);
        assert_eq!(s.page_count(), 31);
    }

    #[test]
    fn drain_into_moves_everything_and_counts_it() {
        let mut pending = PageRangeSet::new();
        pending.insert(10, 3);
        let mut out = PageRangeSet::new();
        out.insert(11, 5);
        assert_eq!(pending.drain_into(&mut out), 3);
        assert!(pending.is_empty());
        assert_eq!(out.ranges(), &[PageRange { start: 10, len: 6 }]);
    }

    #[test]
    fn union_matches_a_reference_set() {
        use std::collections::BTreeSet;
        let mut reference = BTreeSet::new();
        let mut s = PageRangeSet::new();
        let mut x: u64 = 12345;
        for _ in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let start = (x >> 33) % 500;
            let len = (x >> 20) % 7;
            s.insert(start, len);
            reference.extend(start..start + len);
            let mut other = PageRangeSet::new();
            other.insert(start / 2, 1);
            reference.insert(start / 2);
            s.union_with(&other);
        }
        assert_eq!(s.pages().collect::<Vec<_>>(), reference.into_iter().collect::<Vec<_>>());
        for w in s.ranges().windows(2) {
            assert!(w[0].start + w[0].len < w[1].start, "ranges must stay disjoint and non-adjacent");
        }
    }
}
