//! Dirty tracking with KVM's per-slot bitmap (`KVM_GET_DIRTY_LOG`).
//!
//! Each slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`, which write-protects guest memory;
//! the first guest write to a page faults into KVM, which sets the page's bit and lets the write
//! through. The cost of a harvest is the bitmap walk (grows with memory size) plus re-protecting
//! the dirty pages (grows with dirty pages).
//!
//! Where the kernel offers manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, Linux 5.8),
//! `KVM_GET_DIRTY_LOG` only reads the bitmap and `KVM_CLEAR_DIRTY_LOG` clears and re-protects the
//! pages the harvest chooses: all it reported but the guest's hot pages ([`HotPages`]), which
//! stay writable and are reported again by every harvest. Without it, `KVM_GET_DIRTY_LOG` clears
//! and re-protects everything it reports, atomically.
//!
//! Manual protection leaves a gap between the read and the clear. A page written in that gap
//! either was reported (its bit was set at the read: it goes with the next checkpoint, which
//! copies it later than that write) or was not (then it is not cleared either, and the next
//! harvest reports it). No write is lost.

use std::sync::Arc;

use ftvm_proto::pages::PageRangeSet;
use kvm_bindings::{kvm_clear_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use super::hot_pages::HotPages;
use super::vmm_bitmap;
use super::{
    first_pfn, DirtyTracker, HarvestError, HarvestStats, TrackStartError, TrackStopError,
    TrackerKind,
};
use crate::memory::GuestMemory;
use crate::vm::{self, MemSlot, Vm};

// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)` on the VM fd.
// kvm-ioctls has no wrapper.
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: the flag of `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` that
/// makes `KVM_GET_DIRTY_LOG` read without clearing.
const MANUAL_PROTECT_ENABLE: u64 = 1;

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
    /// The pages left writable, when KVM protects manually (`None`: every harvest protects all
    /// it reports, the kernel lacks manual protection or it was not asked for).
    hot: Option<HotPages>,
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
            hot: None,
        }
    }

    /// A tracker for `vm` that leaves the guest's hot pages writable ([`HotPages`]) where that
    /// saves faults: the kernel offers manual protection and KVM logs writes by write-protecting
    /// pages. With Intel's page-modification logging (PML), KVM logs a page's first write without
    /// a fault and clears it without protecting it, so hot pages would only cost link bytes: every
    /// reported page is cleared again, as otherwise (logged).
    pub fn with_hot_pages(vm: &Vm) -> Self {
        let mut tracker = Self::new(vm);
        if kvm_logs_with_pml() {
            tracing::info!("KVM logs dirty pages with PML (no fault per first write): no hot pages left writable");
            return tracker;
        }
        match enable_manual_protect(&tracker.vm) {
            Ok(()) => tracker.hot = Some(HotPages::new(tracker.slots.len())),
            Err(e) => tracing::info!(error = %e, "KVM has no manual dirty-log protection: every written page is protected again at each harvest"),
        }
        tracker
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
        if let Some(hot) = &mut self.hot {
            hot.reset();
        }
        self.started = true;
        Ok(())
    }

    fn harvest(&mut self, out: &mut PageRangeSet) -> Result<HarvestStats, HarvestError> {
        if !self.started {
            return Err(HarvestError::NotStarted);
        }
        let mut stats = HarvestStats::default();
        let cooling = self.hot.as_mut().is_some_and(HotPages::begin_harvest);
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
            if let Some(hot) = &mut self.hot {
                let plan = hot.plan(i, &kvm, cooling);
                if let Err(e) = clear_dirty_log(&self.vm, slot, &plan.protect) {
                    // Nothing was cleared: every bit stays set and every page writable, so the
                    // next harvest reports them all again; this one's pages go out as usual.
                    // Keep the caller's pages pending too, as for a failed read.
                    hot.reset();
                    out.add_bitmap(first_pfn(slot), &kvm);
                    self.pending.union_with(out);
                    return Err(HarvestError::ClearDirtyLog { slot: slot.slot, source: e });
                }
                stats.hot_pages += plan.kept_writable;
            }
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

    fn cool(&mut self) {
        if let Some(hot) = &mut self.hot {
            hot.cool();
        }
    }

    fn hot_samples(&self) -> (u64, u64) {
        self.hot.as_ref().map_or((0, 0), HotPages::samples)
    }

    fn writable_pages(&self, out: &mut PageRangeSet) {
        let Some(hot) = &self.hot else { return };
        for (i, slot) in self.slots.iter().enumerate() {
            out.add_bitmap(first_pfn(slot), hot.slot_words(i));
        }
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

    fn name(&self) -> &'static str {
        if self.hot.is_some() {
            "bitmap"
        } else {
            "bitmap-exact"
        }
    }

    fn is_started(&self) -> bool {
        self.started
    }
}

/// Whether KVM logs dirty pages with Intel's page-modification logging (`kvm_intel`'s `pml`
/// parameter): then a first write after a harvest costs no fault.
fn kvm_logs_with_pml() -> bool {
    std::fs::read_to_string("/sys/module/kvm_intel/parameters/pml").is_ok_and(|v| v.trim() == "Y")
}

/// Turns on manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) for the VM: from now on
/// `KVM_GET_DIRTY_LOG` reads without clearing. Refused by kernels before 5.8.
fn enable_manual_protect(vm: &VmFd) -> std::io::Result<()> {
    let offered = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if offered < 0 || (offered as u64) & MANUAL_PROTECT_ENABLE == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not offered"));
    }
    let mut args = [0u64; 4];
    args[0] = MANUAL_PROTECT_ENABLE;
    vm.enable_cap(&kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args, ..Default::default() })
        .map_err(Into::into)
}

/// Clears (and write-protects again) the pages of `slot` whose bits are set in `protect` (bit `i`
/// of word `w`: page `64 * w + i` of the slot). Nothing to do for an empty mask.
fn clear_dirty_log(vm: &VmFd, slot: &MemSlot, protect: &[u64]) -> std::io::Result<()> {
    let Some(last) = protect.iter().rposition(|&w| w != 0) else {
        return Ok(());
    };
    let first = protect.iter().position(|&w| w != 0).unwrap_or(last);
    let slot_pages = slot.size / crate::memory::PAGE_SIZE;
    let first_page = 64 * first as u64;
    // A multiple of 64 pages, or up to the slot's end: what the kernel accepts.
    let num_pages = (64 * (last + 1) as u64).min(slot_pages) - first_page;
    let range = &protect[first..=last];
    let mut log = kvm_clear_dirty_log {
        slot: slot.slot,
        num_pages: u32::try_from(num_pages).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?,
        first_page,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = range.as_ptr().cast_mut().cast();
    // SAFETY: KVM_CLEAR_DIRTY_LOG reads `log` and `num_pages` bits of the bitmap it points to,
    // which `range` holds (at least `num_pages` bits: `last + 1 - first` words), and writes
    // nothing back. The VM fd is valid for `vm`'s lifetime.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &log) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
