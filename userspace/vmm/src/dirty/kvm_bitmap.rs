//! Dirty tracking with KVM's per-slot bitmap (`KVM_GET_DIRTY_LOG`).
//!
//! Each slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`, which write-protects guest memory;
//! the first guest write to a page faults into KVM, which sets the page's bit and lets the write
//! through. `KVM_GET_DIRTY_LOG` returns the bitmap and, atomically with that, clears it and
//! write-protects the pages it reported again. The cost of a harvest is the bitmap walk (grows
//! with memory size) plus re-protecting the dirty pages (grows with dirty pages).

use std::sync::Arc;

use ftvm_proto::pages::PageRangeSet;
use kvm_ioctls::VmFd;

use super::vmm_bitmap;
use super::{
    first_pfn, DirtyTracker, HarvestError, HarvestStats, TrackStartError, TrackStopError,
    TrackerKind,
};
use crate::memory::GuestMemory;
use crate::vm::{self, MemSlot, Vm};

/// KVM's dirty bitmap, ORed with the VMM's.
#[derive(Debug)]
pub struct KvmBitmap {
    vm: Arc<VmFd>,
    slots: Vec<MemSlot>,
    /// Keeps the slots' mappings alive while the tracker re-registers them, and holds the VMM
    /// bitmaps.
    mem: GuestMemory,
    pending: PageRangeSet,
    started: bool,
}

impl KvmBitmap {
    /// A tracker for `vm` (not started).
    pub fn new(vm: &Vm) -> Self {
        Self {
            vm: vm.shared_fd(),
            slots: vm.mem_slots().to_vec(),
            mem: vm.memory().clone(),
            pending: PageRangeSet::new(),
            started: false,
        }
    }

    fn set_logging(&self, enable: bool) -> Result<(), vm::DirtyLogError> {
        // SAFETY: `slots` are the VM's own slots, over the mappings of `mem`, a clone of the VM's
        // memory that this tracker keeps alive; only their flags change.
        unsafe { vm::set_dirty_logging(&self.vm, &self.slots, enable) }
    }
}

impl DirtyTracker for KvmBitmap {
    fn start(&mut self) -> Result<(), TrackStartError> {
        // Re-registering with the flag gives a clean KVM log; the VMM bitmap is cleared by hand.
        self.set_logging(true)?;
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
        for (i, slot) in self.slots.iter().enumerate() {
            let size = usize::try_from(slot.size).expect("a slot fits the address space");
            let kvm = match self.vm.get_dirty_log(slot.slot, size) {
                Ok(words) => words,
                Err(e) => {
                    // The slots harvested so far are in `out`, which the caller will drop with
                    // the error: keep them (and the caller's own pages, harmlessly) pending.
                    self.pending.union_with(out);
                    return Err(HarvestError::GetDirtyLog {
                        slot: slot.slot,
                        source: e.into(),
                    });
                }
            };
            stats.kvm_pages += vmm_bitmap::count(&kvm);
            let mut words = vmm_bitmap::take_words(&self.mem, i);
            stats.vmm_pages += vmm_bitmap::count(&words);
            if words.len() < kvm.len() {
                words.resize(kvm.len(), 0);
            }
            for (w, k) in words.iter_mut().zip(&kvm) {
                *w |= *k;
            }
            out.add_bitmap(first_pfn(slot), &words);
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
        self.set_logging(false)?;
        Ok(())
    }

    fn kind(&self) -> TrackerKind {
        TrackerKind::KvmBitmap
    }

    fn is_started(&self) -> bool {
        self.started
    }
}
