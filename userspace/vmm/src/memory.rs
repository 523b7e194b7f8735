//! Guest memory: anonymous mappings wrapped by vm-memory, with a VMM-side dirty bitmap.
//!
//! Every write the VMM makes into guest memory through the vm-memory API (used rings, received
//! frames, data read from disk) sets a bit in the region's [`AtomicBitmap`]. KVM's dirty log does not
//! see those writes, so checkpointing ORs this bitmap with KVM's. Code that writes guest memory
//! through a raw pointer must mark the pages itself with [`mark_dirty`].

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryRegion};

/// Guest memory as every part of the VMM sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The guest page size used by the dirty bitmaps.
pub const PAGE_SIZE: u64 = 4096;

/// Records that the VMM wrote `len` bytes at `addr` by a path that bypasses vm-memory's accessors.
pub fn mark_dirty(mem: &GuestMemory, addr: GuestAddress, len: usize) {
    use vm_memory::GuestMemoryBackend as _;
    if let Some(region) = mem.find_region(addr) {
        let offset = addr.0 - region.start_addr().0;
        region.bitmap().mark_dirty(offset as usize, len);
    }
}
