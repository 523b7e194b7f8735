//! Page-range sets (userspace/proto/src/pages.rs) against a plain set of page numbers, and their
//! way over the wire: split into Pages frames (`page_frames`), encoded, decoded by `PagesView`.
//!
//! Input: `base u8 | max_pages u8 (% 16) | op*`, op % 6: insert `off u16, len u8 (% 64)`; add_bitmap
//! `off u16, words u8 (% 5), u64 × words`; union with a set of `off u16, len u8 (% 64)`; drain into another set;
//! contains `off u16`; clear. Page numbers are `base + off` with base 0, 2^40 or 2^64 - 2^17, so
//! the top of the page-number space is covered too (a set's ranges never pass 2^64: callers
//! hand it ranges of guest memory).
#![no_main]

use std::collections::BTreeSet;

use ftvm_fuzz::Input;
use ftvm_proto::pages::{PageRange, PageRangeSet};
use ftvm_proto::epoch::{encode_pages_head, page_frames, PagesView};
use ftvm_proto::limits::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

/// The window of page numbers a run uses: offsets below this.
const WINDOW: u64 = 1 << 17;
/// Frames whose payload is built and decoded in full (each up to 16 pages: the page bytes cost
/// a memset each).
const WIRE_FRAMES: usize = 2;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let base = [0, 1 << 40, u64::MAX - WINDOW][usize::from(input.u8() % 3)];
    let max_pages = u64::from(input.u8() % 16);
    let mut set = PageRangeSet::new();
    let mut reference = BTreeSet::new();
    while !input.is_empty() {
        match input.u8() % 6 {
            0 => {
                let (start, len) = (base + u64::from(input.u16()), u64::from(input.u8() % 64));
                set.insert(start, len);
                reference.extend(start..start + len);
            }
            1 => {
                let first = base + u64::from(input.u16());
                let words: Vec<u64> = (0..input.u8() % 5).map(|_| input.u64()).collect();
                set.add_bitmap(first, &words);
                for (w, &word) in words.iter().enumerate() {
                    reference.extend((0..64).filter(|i| word >> i & 1 == 1).map(|i| first + 64 * w as u64 + i));
                }
            }
            2 => {
                let mut other = PageRangeSet::new();
                let (start, len) = (base + u64::from(input.u16()), u64::from(input.u8() % 64));
                other.insert(start, len);
                reference.extend(start..start + len);
                set.union_with(&other);
            }
            3 => {
                let mut other = PageRangeSet::new();
                let moved = set.drain_into(&mut other);
                assert_eq!(moved, reference.len() as u64);
                assert!(set.is_empty() && set.page_count() == 0);
                set = other;
            }
            4 => {
                let pfn = base + u64::from(input.u16());
                assert_eq!(set.contains(pfn), reference.contains(&pfn), "contains({pfn})");
            }
            _ => {
                set.clear();
                reference.clear();
            }
        }
        check_shape(set.ranges());
        assert_eq!(set.page_count(), reference.len() as u64);
    }
    assert!(set.pages().eq(reference.iter().copied()));
    over_the_wire(&set, max_pages, base + WINDOW);
});

/// Sorted, disjoint, non-adjacent, no empty range.
fn check_shape(ranges: &[PageRange]) {
    for r in ranges {
        assert!(r.len > 0);
    }
    for w in ranges.windows(2) {
        assert!(w[0].start + w[0].len < w[1].start, "{w:?}");
    }
}

fn over_the_wire(set: &PageRangeSet, max_pages: u64, memory_pages: u64) {
    let mut received = PageRangeSet::new();
    let mut head = Vec::new();
    let mut payload = Vec::new();
    for (i, frame) in page_frames(set, max_pages).enumerate() {
        let n: u64 = frame.iter().map(|r| r.len).sum();
        assert!(n >= 1 && n <= max_pages.max(1), "{n} pages in a frame of at most {max_pages}");
        check_shape(&frame);
        if i < WIRE_FRAMES {
            encode_pages_head(&frame, &mut head);
            payload.clear();
            payload.extend_from_slice(&head);
            payload.resize(head.len() + n as usize * PAGE_SIZE, 0);
            let v = PagesView::decode(&payload, memory_pages).expect("a frame from a valid set decodes");
            assert_eq!(v.ranges(), &frame[..]);
        }
        for r in &frame {
            received.insert(r.start, r.len);
        }
    }
    assert_eq!(&received, set, "the frames carry exactly the set");
}
