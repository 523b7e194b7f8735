//! Dirty tracking with KVM's per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`).
//!
//! Each vCPU has a ring of `struct kvm_dirty_gfn { u32 flags; u32 slot; u64 offset; }` shared
//! with KVM (mmapped from the vCPU fd at `KVM_DIRTY_LOG_PAGE_OFFSET` pages). When the guest first
//! writes a page of a slot registered with `KVM_MEM_LOG_DIRTY_PAGES`, KVM appends an entry with
//! flag DIRTY. Harvesting walks each ring from its fetch index while entries are DIRTY, records
//! them, and flags them RESET (release store after an acquire load of the flags, as the `ACQ_REL`
//! contract asks); `KVM_RESET_DIRTY_RINGS` then write-protects those pages again and recycles
//! the entries. The cost grows with the number of dirty pages, not with memory size.
//!
//! # A full ring
//! When a ring is nearly full, `KVM_RUN` returns `KVM_EXIT_DIRTY_RING_FULL` and will not enter
//! the guest again until entries are recycled. The vCPU thread handles it itself
//! ([`DirtyRings::drain_full`]): it harvests its own ring into a pending set shared with the
//! tracker, resets the rings and carries on. The next [`super::DirtyTracker::harvest`] returns
//! those pages with the rest, so a ring too small for an epoch costs an exit and a few
//! microseconds, never a page, and the engine does not have to be woken. (Exiting to the engine
//! instead would turn a full ring into an unplanned checkpoint, which the epoch engine has no
//! reason to want: the ring only has to hold one epoch's pages between harvests.)
//!
//! The ring must be enabled on the VM before any vCPU exists ([`crate::vm::Vm::create`]), which
//! is why the backend is chosen in [`crate::machine::VmConfig`] and not at checkpoint time.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ftvm_proto::pages::PageRangeSet;
use kvm_bindings::{kvm_dirty_gfn, KVMIO, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl_io_nr;

use super::vmm_bitmap;
use super::{
    first_pfn, DirtyTracker, HarvestError, HarvestStats, TrackStartError, TrackStopError,
    TrackerKind,
};
use crate::devices::bus::lock;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::vm::{self, MemSlot, Vm, DIRTY_GFN_SIZE};

/// The kernel has logged this entry (uapi `KVM_DIRTY_GFN_F_DIRTY`).
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// User space has harvested this entry (uapi `KVM_DIRTY_GFN_F_RESET`).
const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;

// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)` on the VM fd. kvm-ioctls has no wrapper.
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Why the rings could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum RingMapError {
    /// The VM was created without a dirty ring.
    #[error("the VM has no dirty ring")]
    NoRing,
    /// `mmap` of a vCPU's ring failed.
    #[error("cannot map the dirty ring of vCPU {vcpu}")]
    Mmap {
        /// The vCPU index.
        vcpu: usize,
        /// The mmap error.
        #[source]
        source: std::io::Error,
    },
}

/// One vCPU's ring, mapped.
struct RingMap {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Next entry to look at (free-running; the slot is `fetch & (entries - 1)`).
    fetch: u32,
}

// SAFETY: the mapping belongs to this `RingMap` alone (unmapped in Drop) and outlives any use of
// `base`; user space only touches it through `&mut self` (every RingMap lives in a Mutex), and
// the kernel's concurrent writes are the documented ring protocol (flags read with acquire,
// written with release).
unsafe impl Send for RingMap {}

impl RingMap {
    /// Maps the dirty ring of `vcpu` (`entries` entries, as enabled on its VM).
    fn map(vcpu: &VcpuFd, entries: u32) -> std::io::Result<Self> {
        let len = entries as usize * DIRTY_GFN_SIZE as usize;
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a new shared mapping of the vCPU fd's dirty-ring pages, of exactly the ring's
        // size; nothing else in this process is mapped there. The mapping keeps the vCPU file
        // referenced, so it stays valid even after the vCPU fd is closed, until `Drop` unmaps it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(p.cast()).expect("mmap does not return null on success"),
            entries,
            fetch: 0,
        })
    }

    /// Hands every dirty entry from the fetch index on to `f(slot, offset)` and flags it RESET.
    /// Returns how many there were. Stops at the first entry that is not DIRTY, so it visits at
    /// most one full turn of the ring (harvested entries stay RESET until KVM recycles them).
    fn collect(&mut self, mut f: impl FnMut(u32, u64)) -> u64 {
        let mask = self.entries - 1;
        let mut n = 0;
        loop {
            let i = (self.fetch & mask) as usize;
            // SAFETY: `i < entries`, so the entry is inside the mapping.
            let e = unsafe { self.base.as_ptr().add(i) };
            // SAFETY: `flags` is a 4-byte-aligned u32 inside the mapping, which the kernel only
            // accesses with atomic operations too.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return n;
            }
            // SAFETY: inside the mapping; the acquire load above orders these reads after the
            // kernel's writes of the entry, which it does not change again until recycled.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
                )
            };
            f(slot, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        let len = self.entries as usize * DIRTY_GFN_SIZE as usize;
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing uses any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
    }
}

/// Every vCPU's ring of one VM, plus the pages drained from full rings. Shared between the
/// tracker (on the checkpoint thread) and the vCPU threads (which drain their own ring when it is
/// full).
pub struct DirtyRings {
    vm: Arc<VmFd>,
    slots: Vec<MemSlot>,
    rings: Vec<Mutex<RingMap>>,
    /// Pages drained by vCPU threads at `KVM_EXIT_DIRTY_RING_FULL`, for the next harvest.
    drained: Mutex<PageRangeSet>,
    full_exits: AtomicU64,
    /// Entries naming a slot or offset outside guest memory (never expected; counted, skipped).
    bogus: AtomicU64,
}

impl std::fmt::Debug for DirtyRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRings")
            .field("vcpus", &self.rings.len())
            .field("full_exits", &self.full_exits)
            .finish_non_exhaustive()
    }
}

impl DirtyRings {
    /// Maps the ring of every vCPU in `vcpus` (index = vCPU id) of `vm`, which must have been
    /// created with a dirty ring.
    pub fn new(vm: &Vm, vcpus: &[&VcpuFd]) -> Result<Self, RingMapError> {
        let cfg = vm.dirty_ring().ok_or(RingMapError::NoRing)?;
        let rings = vcpus
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                RingMap::map(fd, cfg.entries)
                    .map(Mutex::new)
                    .map_err(|source| RingMapError::Mmap { vcpu: i, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            vm: vm.shared_fd(),
            slots: vm.mem_slots().to_vec(),
            rings,
            drained: Mutex::new(PageRangeSet::new()),
            full_exits: AtomicU64::new(0),
            bogus: AtomicU64::new(0),
        })
    }

    /// An all-clear bitmap per slot.
    fn empty_words(&self) -> Vec<Vec<u64>> {
        self.slots.iter().map(|s| vec![0; slot_words(s)]).collect()
    }

    /// Sets a bit in `words` for every dirty entry of the rings (all, or only `only`). Returns
    /// the number of entries.
    fn collect_into(&self, words: &mut [Vec<u64>], only: Option<usize>) -> u64 {
        let mut n = 0;
        let mut bogus = 0;
        for (i, ring) in self.rings.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            n += lock(ring).collect(|slot, offset| {
                // `slot` is `as_id << 16 | id`; this VMM only uses address space 0.
                let found = self.slots.iter().position(|s| s.slot == slot);
                match found.and_then(|k| words.get_mut(k)) {
                    Some(w) if (offset / 64) < w.len() as u64 => {
                        w[(offset / 64) as usize] |= 1 << (offset % 64);
                    }
                    _ => bogus += 1,
                }
            });
        }
        if bogus > 0 {
            tracing::warn!(
                bogus,
                "dirty ring entries outside guest memory were skipped"
            );
            self.bogus.fetch_add(bogus, Ordering::Relaxed);
        }
        n
    }

    /// `KVM_RESET_DIRTY_RINGS`: KVM write-protects the harvested pages again and recycles the
    /// entries.
    fn reset(&self) -> std::io::Result<()> {
        // SAFETY: an argument-less ioctl on our own VM fd; it reads only kernel-side state and
        // the rings' flags, which this process keeps mapped.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&*self.vm, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// On the vCPU thread, at `KVM_EXIT_DIRTY_RING_FULL`: moves the entries of vCPU `vcpu`'s ring
    /// into the pending set and recycles them, so that `KVM_RUN` can go on.
    pub fn drain_full(&self, vcpu: u32) -> std::io::Result<()> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let mut words = self.empty_words();
        self.collect_into(&mut words, Some(vcpu as usize));
        // Park the pages before the reset: if the reset fails, they are still in the next harvest.
        {
            let mut drained = lock(&self.drained);
            for (slot, w) in self.slots.iter().zip(&words) {
                drained.add_bitmap(first_pfn(slot), w);
            }
        }
        self.reset()
    }

    /// Forgets every entry and drained page (before logging starts or after it stops).
    fn discard(&self) -> std::io::Result<()> {
        let mut words = self.empty_words();
        if self.collect_into(&mut words, None) > 0 {
            self.reset()?;
        }
        lock(&self.drained).clear();
        self.full_exits.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Number of vCPU rings.
    pub fn vcpus(&self) -> usize {
        self.rings.len()
    }
}

impl crate::vcpu::DirtyRingFullHandler for DirtyRings {
    fn ring_full(&self, vcpu: u32) -> std::io::Result<()> {
        self.drain_full(vcpu)
    }
}

fn slot_words(s: &MemSlot) -> usize {
    usize::try_from((s.size / PAGE_SIZE).div_ceil(64)).expect("a slot fits the address space")
}

/// The dirty rings, ORed with the VMM's bitmap.
#[derive(Debug)]
pub struct KvmRing {
    rings: Arc<DirtyRings>,
    /// Keeps the slots' mappings alive while the tracker re-registers them, and holds the VMM
    /// bitmaps.
    mem: GuestMemory,
    pending: PageRangeSet,
    started: bool,
}

impl KvmRing {
    /// A tracker over `rings`, the rings of the VM whose memory is `mem` (not started).
    pub fn new(rings: Arc<DirtyRings>, mem: GuestMemory) -> Self {
        Self {
            rings,
            mem,
            pending: PageRangeSet::new(),
            started: false,
        }
    }

    /// The rings (the vCPU threads hold them too).
    pub fn rings(&self) -> &Arc<DirtyRings> {
        &self.rings
    }

    fn set_logging(&self, enable: bool) -> Result<(), vm::DirtyLogError> {
        // SAFETY: the slots are the VM's own, over the mappings of `mem`, a clone of the VM's
        // memory that this tracker keeps alive; only their flags change.
        unsafe { vm::set_dirty_logging(&self.rings.vm, &self.rings.slots, enable) }
    }
}

impl DirtyTracker for KvmRing {
    fn start(&mut self) -> Result<(), TrackStartError> {
        // Forget first, then log: every write after the VMM bitmap reset and the slot flags is
        // recorded, and the caller's full copy (after this returns) covers anything earlier.
        self.rings.discard().map_err(TrackStartError::ResetRings)?;
        vmm_bitmap::reset_all(&self.mem);
        self.pending.clear();
        self.set_logging(true)?;
        self.started = true;
        Ok(())
    }

    fn harvest(&mut self, out: &mut PageRangeSet) -> Result<HarvestStats, HarvestError> {
        if !self.started {
            return Err(HarvestError::NotStarted);
        }
        let mut stats = HarvestStats::default();
        let mut words: Vec<Vec<u64>> = Vec::with_capacity(self.rings.slots.len());
        for (i, slot) in self.rings.slots.iter().enumerate() {
            let mut w = vmm_bitmap::take_words(&self.mem, i);
            stats.vmm_pages += vmm_bitmap::count(&w);
            w.resize(slot_words(slot), 0);
            words.push(w);
        }
        stats.kvm_pages = self.rings.collect_into(&mut words, None);
        for (slot, w) in self.rings.slots.iter().zip(&words) {
            out.add_bitmap(first_pfn(slot), w);
        }
        if stats.kvm_pages > 0 {
            if let Err(e) = self.rings.reset() {
                // The entries are harvested (flagged RESET); keep their pages for next time.
                self.pending.union_with(out);
                return Err(HarvestError::ResetRings(e));
            }
        }
        stats.pending_pages = lock(&self.rings.drained).drain_into(out);
        stats.ring_full_exits = self.rings.full_exits.swap(0, Ordering::Relaxed);
        stats.pending_pages += self.pending.drain_into(out);
        Ok(stats)
    }

    fn remark(&mut self, pages: &PageRangeSet) {
        self.pending.union_with(pages);
    }

    fn stop(&mut self) -> Result<(), TrackStopError> {
        self.started = false;
        self.pending.clear();
        self.set_logging(false)?;
        if let Err(e) = self.rings.discard() {
            // Logging is off; stale entries only cost the next start a reset.
            tracing::warn!(error = %e, "cannot recycle dirty ring entries after stopping");
        }
        Ok(())
    }

    fn kind(&self) -> TrackerKind {
        TrackerKind::KvmRing
    }

    fn name(&self) -> &'static str {
        "ring"
    }

    fn is_started(&self) -> bool {
        self.started
    }
}
