//! Dirty-page tracking for checkpoints: which guest pages changed since the last harvest.
//!
//! A page can be written two ways, and a checkpoint must see both:
//! * by the guest, through KVM: logged by KVM, either in a per-slot bitmap
//!   ([`kvm_bitmap::KvmBitmap`], `KVM_GET_DIRTY_LOG`) or in per-vCPU rings
//!   ([`kvm_ring::KvmRing`], `KVM_CAP_DIRTY_LOG_RING`); or, without KVM's log, by the host's page
//!   tables ([`uffd_wp::UffdWp`], userfaultfd asynchronous write-protect read with
//!   `PAGEMAP_SCAN`), which see every write through the mapping, the guest's and the VMM's;
//! * by the VMM itself (device emulation writing used rings, received frames, disk reads):
//!   KVM never sees those, so every write through vm-memory sets a bit in the region's
//!   [`vm_memory::bitmap::AtomicBitmap`] (see [`crate::memory`]). Every backend ORs that bitmap in.
//!
//! Harvesting is get-and-clear on both sources, so a page handed out by [`DirtyTracker::harvest`]
//! is the caller's responsibility: if the epoch that was to carry it fails, the caller gives it
//! back with [`DirtyTracker::remark`], and the next harvest returns it again. No page is ever lost
//! on either path; a harvest that fails half-way folds what it had taken into that same pending
//! set before returning its error.
//!
//! The backend is chosen when the VM is built ([`DirtyTracking`] in
//! [`crate::machine::VmConfig`]): the dirty ring must be enabled before the first vCPU exists.

pub mod hot_pages;
pub mod kvm_bitmap;
pub mod kvm_ring;
pub mod uffd_wp;
mod vmm_bitmap;

use ftvm_proto::pages::PageRangeSet;

pub use kvm_bitmap::KvmBitmap;
pub use kvm_ring::{DirtyRings, KvmRing};
pub use uffd_wp::UffdWp;

use crate::uffd::UffdError;
use crate::vm::{DirtyLogError, MemSlot};

/// Which dirty tracker a VM is built with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyTracking {
    /// No tracking (an unprotected VM, `ftvm run`): nothing is logged, nothing costs.
    #[default]
    Off,
    /// KVM's per-slot dirty bitmap (`KVM_GET_DIRTY_LOG`); harvest cost grows with memory size.
    /// Pages the guest writes in every epoch are left writable where the kernel offers manual
    /// protection ([`hot_pages`]): each harvest then reports them whether written or not, which
    /// saves the guest a fault per hot page per epoch.
    KvmBitmap,
    /// [`Self::KvmBitmap`] protecting every reported page again at each harvest: a harvest is
    /// exactly the pages written since the last one (a fault per page per epoch).
    KvmBitmapExact,
    /// KVM's per-vCPU dirty rings of `entries` entries each (a power of two, at least 256);
    /// harvest cost grows with the number of dirty pages. A ring that fills up mid-epoch is
    /// drained by its vCPU thread into a pending set (see [`kvm_ring`]), so a small ring costs
    /// exits, never pages.
    KvmRing {
        /// Entries per vCPU ring.
        entries: u32,
    },
    /// userfaultfd asynchronous write-protect of guest memory, read and re-armed with
    /// `PAGEMAP_SCAN` ([`uffd_wp`]); KVM's dirty log is not used at all. The host's page tables
    /// see every write through the mapping, the VMM's (devices, io_uring) as well as the guest's.
    /// Each first write to a page in an epoch is a fault (about as costly as KVM's logging on
    /// this machine's nested KVM); the harvest walks all of guest memory's page tables (grows
    /// with memory size) and makes the guest fault its working set back into KVM. Needs Linux
    /// 6.7 or later (`UFFD_FEATURE_WP_ASYNC`, `PAGEMAP_SCAN`): the machine is not built on an
    /// older kernel.
    Uffd,
}

impl DirtyTracking {
    /// Ring entries per vCPU when nothing else is said: 16 384 pages (64 MiB) per epoch before
    /// the ring fills, 256 KiB of ring per vCPU.
    pub const DEFAULT_RING_ENTRIES: u32 = 16 * 1024;

    /// The dirty ring with [`Self::DEFAULT_RING_ENTRIES`].
    pub const fn kvm_ring() -> Self {
        Self::KvmRing {
            entries: Self::DEFAULT_RING_ENTRIES,
        }
    }

    /// Entries per ring to enable on the VM, if this is the ring.
    pub fn ring_entries(self) -> Option<u32> {
        match self {
            Self::KvmRing { entries } => Some(entries),
            _ => None,
        }
    }
}

/// What a tracker is, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// [`KvmBitmap`].
    KvmBitmap,
    /// [`KvmRing`].
    KvmRing,
    /// [`UffdWp`].
    Uffd,
}

/// What one harvest found. Counts overlap (a page the guest and the VMM both wrote is in both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Pages KVM logged (bitmap bits, or ring entries); 0 for [`UffdWp`], which does not use
    /// KVM's log.
    pub kvm_pages: u64,
    /// Pages `PAGEMAP_SCAN` found written ([`UffdWp`] only): the guest's writes and the VMM's
    /// alike.
    pub uffd_pages: u64,
    /// Pages the VMM wrote through vm-memory.
    pub vmm_pages: u64,
    /// Pages reported because the tracker left them writable at an earlier harvest (the guest's
    /// hot pages, see [`hot_pages`]): written or not, they are in the harvest.
    pub hot_pages: u64,
    /// Pages given back by [`DirtyTracker::remark`] or drained from a full ring since the last
    /// harvest.
    pub pending_pages: u64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits since the last harvest (ring only).
    pub ring_full_exits: u64,
}

/// Why a tracker could not start.
#[derive(Debug, thiserror::Error)]
pub enum TrackStartError {
    /// KVM refused to log a memory slot.
    #[error(transparent)]
    Logging(#[from] DirtyLogError),
    /// Stale ring entries could not be handed back to KVM.
    #[error("cannot reset the dirty rings")]
    ResetRings(#[source] std::io::Error),
    /// The userfaultfd could not be made, or guest memory not write-protected.
    #[error("cannot write-protect guest memory for the userfaultfd dirty tracker")]
    Uffd(#[source] UffdError),
}

/// Why a harvest failed. Whatever it had taken is pending again (the next harvest returns it).
#[derive(Debug, thiserror::Error)]
pub enum HarvestError {
    /// [`DirtyTracker::start`] was not called (or [`DirtyTracker::stop`] was).
    #[error("dirty tracking is not started")]
    NotStarted,
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("cannot read KVM's dirty log of memory slot {slot}")]
    GetDirtyLog {
        /// The slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` failed (the pages it was to protect stay reported).
    #[error("cannot protect the written pages of memory slot {slot} again")]
    ClearDirtyLog {
        /// The slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("cannot reset the dirty rings")]
    ResetRings(#[source] std::io::Error),
    /// `PAGEMAP_SCAN` failed.
    #[error("cannot scan guest memory for written pages")]
    Scan(#[source] UffdError),
}

/// Why a tracker could not stop.
#[derive(Debug, thiserror::Error)]
pub enum TrackStopError {
    /// KVM refused to stop logging a memory slot.
    #[error(transparent)]
    Logging(#[from] DirtyLogError),
    /// The write protection of guest memory could not be lifted (the userfaultfd is closed
    /// anyway, which unregisters the memory).
    #[error("cannot lift the write protection of guest memory")]
    Uffd(#[source] UffdError),
}

/// Tracks the guest pages dirtied between checkpoints.
///
/// Only [`DirtyTracker::harvest`] needs the vCPUs paused (so that the pages it returns are all
/// the pages written up to the pause); the engine's [`crate::machine::CheckpointSource`] makes
/// sure they are.
pub trait DirtyTracker: Send + std::fmt::Debug {
    /// Starts logging: from now on every page written (by the guest or the VMM) is reported by
    /// the next harvest. Forgets what was written before, and anything pending: the caller copies
    /// all of guest memory after starting (the initial synchronisation).
    fn start(&mut self) -> Result<(), TrackStartError>;

    /// Adds to `out` every page dirtied since the previous harvest (or since `start`), by the
    /// guest or by the VMM, plus the pages given back by [`Self::remark`], and clears them all.
    fn harvest(&mut self, out: &mut PageRangeSet) -> Result<HarvestStats, HarvestError>;

    /// Gives back pages a failed epoch could not deliver: the next harvest returns them again.
    fn remark(&mut self, pages: &PageRangeSet);

    /// The guest went quiet: the next harvest write-protects every page it reports, including
    /// pages a tracker leaves writable because the guest writes them in every epoch (see
    /// [`hot_pages`]), so that an idle guest's next harvest finds nothing. Nothing to do for a
    /// tracker that protects every reported page anyway.
    fn cool(&mut self) {}

    /// Pages left writable that were sampled (protected again once) and, of those, how many the
    /// guest wrote within the next epoch, since the tracker was made (see
    /// [`hot_pages::HotPages::samples`]); `(0, 0)` for a tracker that leaves none writable.
    fn hot_samples(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Adds to `out` the pages the tracker leaves writable now (every harvest reports them):
    /// a copy-on-write checkpoint copies these in the pause rather than write-protecting pages
    /// the guest is about to write again. Nothing for a tracker that leaves none writable.
    fn writable_pages(&self, _out: &mut PageRangeSet) {}

    /// Stops logging (guest writes run at full speed again) and forgets everything pending.
    fn stop(&mut self) -> Result<(), TrackStopError>;

    /// Which backend this is.
    fn kind(&self) -> TrackerKind;

    /// The name of the tracker as it runs, as `--dirty-tracker` spells it: `bitmap` (hot pages
    /// left writable), `bitmap-exact` (asked for, or the hot pages unavailable or useless on this
    /// host), `ring` or `uffd`.
    fn name(&self) -> &'static str;

    /// Between [`Self::start`] and [`Self::stop`].
    fn is_started(&self) -> bool;
}

/// First page frame number of a slot.
fn first_pfn(slot: &MemSlot) -> u64 {
    slot.guest_addr / crate::memory::PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_entries_only_for_the_ring() {
        assert_eq!(DirtyTracking::default(), DirtyTracking::Off);
        assert_eq!(DirtyTracking::Off.ring_entries(), None);
        assert_eq!(DirtyTracking::KvmBitmap.ring_entries(), None);
        assert_eq!(DirtyTracking::Uffd.ring_entries(), None);
        assert_eq!(
            DirtyTracking::kvm_ring().ring_entries(),
            Some(DirtyTracking::DEFAULT_RING_ENTRIES)
        );
    }
}
