//! The VMM's own dirty bitmap: one [`AtomicBitmap`] per guest memory region, set by every write
//! the VMM makes through vm-memory (see [`crate::memory`]). Every tracker ORs it in.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::GuestMemoryBackend as _;

use crate::memory::GuestMemory;

fn region_bitmap(mem: &GuestMemory, index: usize) -> Option<&AtomicBitmap> {
    // The inherent `MmapRegion::bitmap` gives the whole bitmap (the region trait's `bitmap()`
    // only gives a slice view without get-and-reset).
    mem.iter().nth(index).map(|r| {
        let mapping: &MmapRegion<AtomicBitmap> = r;
        mapping.bitmap()
    })
}

/// Takes (gets and clears) the VMM bitmap of region `index`: bit `i` of word `w` is page
/// `64 * w + i` of the region. Empty if there is no such region.
pub(super) fn take_words(mem: &GuestMemory, index: usize) -> Vec<u64> {
    region_bitmap(mem, index).map_or_else(Vec::new, AtomicBitmap::get_and_reset)
}

/// Clears every region's VMM bitmap.
pub(super) fn reset_all(mem: &GuestMemory) {
    for i in 0..mem.num_regions() {
        if let Some(b) = region_bitmap(mem, i) {
            b.reset();
        }
    }
}

/// Number of set bits.
pub(super) fn count(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn vm_memory_writes_set_bits_and_take_clears_them() {
        let mem = create_guest_memory(16 << 20).unwrap();
        reset_all(&mem);
        mem.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        // Straddles pages 0x40 and 0x41.
        mem.write_slice(&[1u8; 16], GuestAddress(0x41000 - 8))
            .unwrap();
        let words = take_words(&mem, 0);
        assert_eq!(words.len(), (16 << 20) / 4096 / 64);
        assert_eq!(words[0], 1 << 3);
        assert_eq!(words[1], 0b11);
        assert_eq!(count(&words), 3);
        assert_eq!(count(&take_words(&mem, 0)), 0);
        assert!(take_words(&mem, 1).is_empty());
    }
}
