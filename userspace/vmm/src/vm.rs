//! The KVM VM: `/dev/kvm`, the VM fd, the in-kernel irqchip and guest memory slots.
//!
//! Guest RAM is one region `[0, mem_size)` (the layout in [`ftvm_guest_abi`] keeps everything
//! below the MMIO window), registered as one KVM memory slot per vm-memory region. The slots can
//! be re-registered with `KVM_MEM_LOG_DIRTY_PAGES` for checkpointing.
//!
//! The KVM dirty ring is a property of the VM that must be chosen before the first vCPU exists
//! (`KVM_CAP_DIRTY_LOG_RING` is refused afterwards), so it is an argument of [`Vm::create`]
//! rather than something a checkpoint engine switches on later.

use std::os::fd::RawFd;
use std::sync::Arc;

use ftvm_guest_abi::MAX_MEM_SIZE;
use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::memory::GuestMemory;

/// Guest RAM must be a whole number of these (the guest maps it with 2 MiB pages).
pub const MEM_ALIGN: u64 = 2 << 20;
/// Smallest guest RAM accepted: page tables, image, heap and stack need room.
pub const MIN_MEM_SIZE: u64 = 16 << 20;

/// `KVM_SET_TSS_ADDR`: three pages Intel's real-mode emulation may use. Above RAM and above the
/// MMIO devices, below the 4 GiB boundary, where QEMU and Firecracker put it too.
const TSS_ADDR: u64 = 0xfffb_d000;
/// `KVM_SET_IDENTITY_MAP_ADDR`: one page just below the TSS pages.
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Why [`Vm::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VmCreateError {
    /// `/dev/kvm` could not be opened; the message names the usual causes.
    #[error("cannot open /dev/kvm: {}", describe_open_error(.0))]
    OpenKvm(#[source] std::io::Error),
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (expected 12)")]
    ApiVersion(i32),
    /// A capability the VMM relies on is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] std::io::Error),
    /// `KVM_SET_TSS_ADDR` or `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("cannot set the VM's TSS or identity-map address")]
    SystemAddresses(#[source] std::io::Error),
    /// The requested RAM size does not fit the layout.
    #[error(transparent)]
    MemSize(#[from] MemSizeError),
    /// The guest memory mapping could not be made.
    #[error("cannot allocate {size:#x} bytes of guest memory")]
    AllocMemory {
        /// Requested size.
        size: u64,
        /// What the mapping code said.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot register guest memory with KVM")]
    RegisterMemory(#[source] std::io::Error),
    /// The dirty ring was asked for but cannot be had.
    #[error(transparent)]
    DirtyRing(#[from] DirtyRingEnableError),
}

/// Why the KVM dirty ring could not be enabled on a new VM.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingEnableError {
    /// Neither `KVM_CAP_DIRTY_LOG_RING` nor `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` is offered.
    #[error("KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    Unsupported,
    /// The ring size is not a power of two of at least one page, or exceeds KVM's maximum.
    #[error(
        "dirty ring of {entries} entries is not possible (power of two, {min} to {max} entries)"
    )]
    BadSize {
        /// Entries asked for.
        entries: u32,
        /// Fewest entries (one page of 16-byte entries).
        min: u32,
        /// Most entries KVM offers.
        max: u32,
    },
    /// `KVM_ENABLE_CAP` refused.
    #[error("cannot enable the KVM dirty ring")]
    Enable(#[source] std::io::Error),
}

/// The dirty ring enabled on a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyRingConfig {
    /// Entries per vCPU ring (a power of two).
    pub entries: u32,
    /// Whether the ring was enabled through `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (user space must
    /// read an entry's flags with acquire and write them with release; this VMM always does).
    pub acq_rel: bool,
}

/// Size of one `struct kvm_dirty_gfn`.
pub const DIRTY_GFN_SIZE: u32 = 16;

/// A guest RAM size that the layout cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemSizeError {
    /// Not a multiple of 2 MiB.
    #[error("guest memory size {0:#x} is not a multiple of 2 MiB")]
    Unaligned(u64),
    /// Below [`MIN_MEM_SIZE`].
    #[error("guest memory size {0} MiB is below the minimum of 16 MiB")]
    TooSmall(u64),
    /// Above [`MAX_MEM_SIZE`].
    #[error("guest memory size {0} MiB is above the maximum of {max} MiB", max = MAX_MEM_SIZE >> 20)]
    TooLarge(u64),
}

/// Why [`Vm::set_dirty_logging`] failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {} dirty logging on memory slot {slot}", if *.enable { "enable" } else { "disable" })]
pub struct DirtyLogError {
    /// The slot that refused.
    pub slot: u32,
    /// What was asked.
    pub enable: bool,
    /// The ioctl error.
    #[source]
    pub source: std::io::Error,
}

/// Why [`Vm::create_vcpu`] failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot create vCPU {id}")]
pub struct VcpuFdCreateError {
    /// The vCPU index.
    pub id: u64,
    /// The ioctl error.
    #[source]
    pub source: std::io::Error,
}

fn describe_open_error(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "No such file or directory (is the kvm module loaded?)".into(),
        Some(libc::EACCES) => "Permission denied (run as root or join the kvm group)".into(),
        _ => e.to_string(),
    }
}

/// One KVM memory slot and the host mapping behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSlot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
}

/// A KVM VM with its guest memory.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    /// Shared with the dirty trackers, which read the dirty log from the checkpoint thread
    /// while the machine's own thread is blocked in [`crate::machine::Machine::run`].
    fd: Arc<VmFd>,
    mem: GuestMemory,
    slots: Vec<MemSlot>,
    irqchip: bool,
    dirty_logging: bool,
    dirty_ring: Option<DirtyRingConfig>,
}

/// Checks a guest RAM size against the layout in [`ftvm_guest_abi`].
pub fn check_mem_size(mem_size: u64) -> Result<(), MemSizeError> {
    if !mem_size.is_multiple_of(MEM_ALIGN) {
        return Err(MemSizeError::Unaligned(mem_size));
    }
    if mem_size < MIN_MEM_SIZE {
        return Err(MemSizeError::TooSmall(mem_size >> 20));
    }
    if mem_size > MAX_MEM_SIZE {
        return Err(MemSizeError::TooLarge(mem_size >> 20));
    }
    Ok(())
}

/// Allocates guest RAM `[0, mem_size)` as one private anonymous mapping (a restore may instead
/// map an existing memfd: [`crate::memory::adopt_guest_memory`]).
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemory, VmCreateError> {
    check_mem_size(mem_size)?;
    let size = usize::try_from(mem_size).map_err(|_| MemSizeError::TooLarge(mem_size >> 20))?;
    let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        // NORESERVE: RAM the guest never touches costs nothing.
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|source| VmCreateError::AllocMemory {
            size: mem_size,
            source,
        })?;
    crate::memory::advise_huge_pages(region.as_ptr(), size);
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .expect("a region at address 0 below MAX_MEM_SIZE cannot overflow");
    Ok(GuestMemory::from_regions(vec![region]).expect("a single region cannot overlap"))
}

impl Vm {
    /// Opens `/dev/kvm`, creates a VM with `mem_size` bytes of RAM at address 0 and, where the
    /// kernel allows it, an in-kernel irqchip.
    pub fn new(mem_size: u64) -> Result<Self, VmCreateError> {
        Self::create(mem_size, None)
    }

    /// Like [`Vm::new`]; with `dirty_ring_entries`, also enables the KVM dirty ring with that
    /// many entries per vCPU (before any vCPU exists, as KVM requires).
    pub fn create(mem_size: u64, dirty_ring_entries: Option<u32>) -> Result<Self, VmCreateError> {
        check_mem_size(mem_size)?;
        Self::create_with_memory(create_guest_memory(mem_size)?, dirty_ring_entries)
    }

    /// Like [`Vm::create`], with guest RAM that already exists: `mem` must be one region at
    /// address 0 of a size [`check_mem_size`] accepts, as [`create_guest_memory`] and
    /// [`crate::memory::adopt_guest_memory`] build it.
    pub fn create_with_memory(
        mem: GuestMemory,
        dirty_ring_entries: Option<u32>,
    ) -> Result<Self, VmCreateError> {
        check_mem_size(mem.iter().map(|r| r.len()).sum())?;
        let kvm = Kvm::new().map_err(|e| VmCreateError::OpenKvm(e.into()))?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmCreateError::ApiVersion(api));
        }
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmCreateError::MissingCap(name));
            }
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmCreateError::CreateVm(e.into()))?;
        fd.set_tss_address(TSS_ADDR as usize)
            .map_err(|e| VmCreateError::SystemAddresses(e.into()))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            fd.set_identity_map_address(IDENTITY_MAP_ADDR)
                .map_err(|e| VmCreateError::SystemAddresses(e.into()))?;
        }
        let dirty_ring = match dirty_ring_entries {
            Some(entries) => Some(enable_dirty_ring(&fd, entries)?),
            None => None,
        };
        let mut vm = Vm {
            kvm,
            fd: Arc::new(fd),
            mem,
            slots: Vec::new(),
            irqchip: false,
            dirty_logging: false,
            dirty_ring,
        };
        // KVM_CREATE_IRQCHIP (its default IRQ routing) and KVM_SET_USER_MEMORY_REGION each wait
        // for an SRCU grace period: 2 to 8 ms each on this host, on the failover's critical
        // path. Side by side they mostly share one wait.
        let fd = Arc::clone(&vm.fd);
        vm.irqchip = std::thread::scope(|s| {
            let chip = std::thread::Builder::new()
                .name("ftvm-irqchip".into())
                .spawn_scoped(s, || create_irqchip(&fd));
            let registered = vm.register_memory();
            let irqchip = match chip {
                Ok(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                Err(_) => create_irqchip(&fd),
            };
            registered.map(|()| irqchip)
        })?;
        Ok(vm)
    }

    fn register_memory(&mut self) -> Result<(), VmCreateError> {
        let mut slots = Vec::new();
        for (i, region) in self.mem.iter().enumerate() {
            let host_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("offset 0 of a mapped region has a host address");
            slots.push(MemSlot {
                slot: i as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: host_addr as u64,
            });
        }
        for s in &slots {
            self.set_slot(s, 0).map_err(VmCreateError::RegisterMemory)?;
        }
        self.slots = slots;
        Ok(())
    }

    fn set_slot(&self, s: &MemSlot, flags: u32) -> std::io::Result<()> {
        // SAFETY: `s` describes a mapping owned by `self.mem`, which lives as long as the VM fd
        // (both are fields of `self`, and the mapping is reference-counted by every clone of the
        // memory). Slots do not overlap: one per vm-memory region, and vm-memory refuses
        // overlapping regions.
        unsafe { register_slot(&self.fd, s, flags) }
    }

    /// Turns KVM's dirty page log on or off for every memory slot (re-registers the slots with
    /// or without `KVM_MEM_LOG_DIRTY_PAGES`). Turning it on clears the log. The dirty trackers
    /// of [`crate::dirty`] do this themselves (and [`Self::dirty_logging`] does not see it): use
    /// one or the other on a VM.
    pub fn set_dirty_logging(&mut self, enable: bool) -> Result<(), DirtyLogError> {
        // SAFETY: the slots are this VM's, over `self.mem`, which `self` keeps mapped.
        unsafe { set_dirty_logging(&self.fd, &self.slots, enable) }?;
        self.dirty_logging = enable;
        Ok(())
    }

    /// The dirty ring, if the VM was created with one.
    pub fn dirty_ring(&self) -> Option<DirtyRingConfig> {
        self.dirty_ring
    }

    /// The VM fd, shared (for the dirty trackers and the checkpoint thread).
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// Whether the slots are registered for dirty logging.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// The memory slots, in guest address order.
    pub fn mem_slots(&self) -> &[MemSlot] {
        &self.slots
    }

    /// Guest memory (a cheap clone of it is shared with devices).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Bytes of guest RAM.
    pub fn mem_size(&self) -> u64 {
        self.slots.iter().map(|s| s.size).sum()
    }

    /// Whether an in-kernel irqchip (and so an in-kernel LAPIC per vCPU) exists.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// The `/dev/kvm` handle (for CPUID, MSR lists and other system ioctls).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd, VcpuFdCreateError> {
        self.fd.create_vcpu(id).map_err(|e| VcpuFdCreateError {
            id,
            source: e.into(),
        })
    }
}

/// Registers memory slot `s` with `flags` (or changes the flags of a slot already registered at
/// the same place).
///
/// # Safety
///
/// `s.host_addr..s.host_addr + s.size` must be a mapping that stays valid for as long as the VM
/// may use it, and must not overlap another slot of the VM.
pub unsafe fn register_slot(fd: &VmFd, s: &MemSlot, flags: u32) -> std::io::Result<()> {
    let region = kvm_userspace_memory_region {
        slot: s.slot,
        flags,
        guest_phys_addr: s.guest_addr,
        memory_size: s.size,
        userspace_addr: s.host_addr,
    };
    // SAFETY: the caller guarantees the mapping and the absence of overlaps.
    unsafe { fd.set_user_memory_region(region) }.map_err(Into::into)
}

/// Re-registers every slot of `slots` with or without `KVM_MEM_LOG_DIRTY_PAGES`. Turning the
/// log on write-protects all of guest memory and starts from a clean log (bitmap or ring).
///
/// # Safety
///
/// As [`register_slot`], for every slot (normally: the slots of the VM behind `fd`, as
/// [`Vm::mem_slots`] lists them, while a clone of its memory is alive).
pub unsafe fn set_dirty_logging(
    fd: &VmFd,
    slots: &[MemSlot],
    enable: bool,
) -> Result<(), DirtyLogError> {
    let flags = if enable { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    for s in slots {
        // SAFETY: the caller's guarantee, slot by slot.
        unsafe { register_slot(fd, s, flags) }.map_err(|source| DirtyLogError {
            slot: s.slot,
            enable,
            source,
        })?;
    }
    Ok(())
}

/// Creates the in-kernel irqchip; false if the kernel refuses it. The in-kernel LAPIC (part of
/// the irqchip) carries vCPU state the checkpoints save. The reference guest takes no interrupts,
/// so a kernel that refuses it only costs that state.
fn create_irqchip(fd: &VmFd) -> bool {
    match fd.create_irq_chip() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "KVM_CREATE_IRQCHIP failed; running without an in-kernel irqchip");
            false
        }
    }
}

/// Enables the dirty ring with `entries` entries per vCPU; the `_ACQ_REL` flavour when offered
/// (it is the one whose memory-ordering contract is written down for every architecture).
fn enable_dirty_ring(fd: &VmFd, entries: u32) -> Result<DirtyRingConfig, DirtyRingEnableError> {
    let acq_rel_max = fd.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL));
    let plain_max = fd.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING));
    let (cap, max_bytes, acq_rel) = if acq_rel_max > 0 {
        (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, acq_rel_max, true)
    } else if plain_max > 0 {
        (KVM_CAP_DIRTY_LOG_RING, plain_max, false)
    } else {
        return Err(DirtyRingEnableError::Unsupported);
    };
    let min = 4096 / DIRTY_GFN_SIZE;
    let max = u32::try_from(max_bytes).unwrap_or(u32::MAX) / DIRTY_GFN_SIZE;
    if !entries.is_power_of_two() || entries < min || entries > max {
        return Err(DirtyRingEnableError::BadSize { entries, min, max });
    }
    let mut args = [0u64; 4];
    args[0] = u64::from(entries) * u64::from(DIRTY_GFN_SIZE);
    let enable = kvm_enable_cap {
        cap,
        args,
        ..Default::default()
    };
    fd.enable_cap(&enable)
        .map_err(|e| DirtyRingEnableError::Enable(e.into()))?;
    Ok(DirtyRingConfig { entries, acq_rel })
}

impl std::os::fd::AsRawFd for Vm {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn mem_size_limits() {
        assert_eq!(check_mem_size(16 << 20), Ok(()));
        assert_eq!(check_mem_size(MAX_MEM_SIZE), Ok(()));
        assert_eq!(
            check_mem_size((16 << 20) + 4096),
            Err(MemSizeError::Unaligned((16 << 20) + 4096))
        );
        assert_eq!(check_mem_size(14 << 20), Err(MemSizeError::TooSmall(14)));
        assert_eq!(
            check_mem_size(MAX_MEM_SIZE + MEM_ALIGN),
            Err(MemSizeError::TooLarge((MAX_MEM_SIZE >> 20) + 2))
        );
        assert_eq!(
            MemSizeError::TooSmall(14).to_string(),
            "guest memory size 14 MiB is below the minimum of 16 MiB"
        );
    }

    #[test]
    fn open_errors_read_well() {
        let e = VmCreateError::OpenKvm(std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(
            e.to_string()
                .starts_with("cannot open /dev/kvm: Permission denied"),
            "{e}"
        );
        let e = VmCreateError::OpenKvm(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert!(
            e.to_string()
                .starts_with("cannot open /dev/kvm: No such file"),
            "{e}"
        );
    }

    #[test]
    fn creates_vm_and_toggles_dirty_logging() {
        let mut vm = Vm::new(32 << 20).unwrap();
        assert_eq!(vm.mem_size(), 32 << 20);
        assert_eq!(vm.mem_slots().len(), 1);
        // Without dirty logging the log cannot be read.
        assert!(vm.fd().get_dirty_log(0, 32 << 20).is_err());
        vm.set_dirty_logging(true).unwrap();
        assert!(vm.dirty_logging());
        let log = vm.fd().get_dirty_log(0, 32 << 20).unwrap();
        assert_eq!(log.len(), (32 << 20) / 4096 / 64);
        vm.set_dirty_logging(false).unwrap();
        assert!(vm.fd().get_dirty_log(0, 32 << 20).is_err());
        // The memory is usable from the VMM side.
        vm.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            vm.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn refuses_bad_sizes_before_touching_kvm() {
        assert!(matches!(
            Vm::new(15 << 20),
            Err(VmCreateError::MemSize(MemSizeError::Unaligned(_)))
        ));
        assert!(matches!(
            Vm::new(8 << 20),
            Err(VmCreateError::MemSize(MemSizeError::TooSmall(8)))
        ));
    }
}
