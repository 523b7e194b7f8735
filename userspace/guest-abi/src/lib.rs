//! The contract between the ftvm VMM and the reference guest.
//!
//! The guest runs entirely at CPL 3 in 64-bit mode, with no interrupts and no IDT. The VMM builds
//! everything the guest needs before its first instruction:
//!
//! * guest physical memory starts at 0 and is `BootInfo::mem_size` bytes long;
//! * page tables at [`PAGE_TABLES_GPA`] identity-map the first 4 GiB with 2 MiB pages, user bit
//!   set at every level (RAM and the MMIO window alike), so virtual address == physical address;
//! * the guest ELF is loaded from its program headers (the linker script places it at
//!   [`GUEST_LOAD_GPA`]); the vCPU starts at the ELF entry with `rdi` = [`BOOT_INFO_GPA`] and
//!   `rsp` = `BootInfo::stack_top` (16-byte aligned);
//! * SSE is enabled (CR4.OSFXSR | CR4.OSXMMEXCPT, CR0.MP), RFLAGS.IOPL = 3 so `in`/`out` work, and
//!   CR4.TSD = 0 so `rdtsc` works; `BootInfo::tsc_khz` gives the TSC frequency;
//! * virtio-mmio (virtio 1.x, "version 2" register layout) devices sit at the bases named in
//!   [`BootInfo`]; the guest polls their used rings (no interrupts are ever delivered).
//!
//! When it has nothing to do, the guest writes a timeout to [`PORT_WAIT`]; the VMM returns from
//! that port write as soon as a device has put something in a used ring (a received frame, a disk
//! completion) or the timeout has passed, whichever is first. A device event that arrives while the
//! guest is running is remembered, so the next wait returns at once: no wake-up is lost.
#![no_std]
#![deny(missing_docs)]

/// Guest physical address of the first page-table page (PML4). The PDPT follows at +0x1000 and
/// four page directories at +0x2000..+0x6000 (4 GiB of 2 MiB pages).
pub const PAGE_TABLES_GPA: u64 = 0x1000;
/// Guest physical address of the [`BootInfo`] page.
pub const BOOT_INFO_GPA: u64 = 0x8000;
/// Where the guest's linker script places its image (2 MiB, the first large page after the
/// VMM-owned low pages).
pub const GUEST_LOAD_GPA: u64 = 0x20_0000;
/// Size of the stack the VMM reserves at the top of RAM.
pub const STACK_SIZE: u64 = 1 << 20;
/// Lowest address the virtio-mmio window may use; RAM must end below it.
pub const MMIO_WINDOW_GPA: u64 = 0xd000_0000;
/// Size of one virtio-mmio device's register window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Largest RAM size the layout allows (everything below the MMIO window).
pub const MAX_MEM_SIZE: u64 = MMIO_WINDOW_GPA;

/// `out dx, al`: one console byte (the legacy COM1 data port, so early code can use it as is).
pub const PORT_CONSOLE: u16 = 0x3f8;
/// `out dx, eax` with the guest physical address of a [`ConsoleWrite`]: a whole line at once, one
/// exit instead of one per byte.
pub const PORT_CONSOLE_WRITE: u16 = 0x502;
/// `out dx, eax` with a timeout in microseconds ([`WAIT_FOREVER`] for none): block until a device
/// event or the timeout.
pub const PORT_WAIT: u16 = 0x500;
/// `out dx, eax` with an exit code: the guest is finished; the VMM stops the VM and reports the
/// code (0 = clean).
pub const PORT_EXIT: u16 = 0x501;
/// `out dx, eax` with a [`GuestStatus`] value: lets the VMM (and the operator) know how far boot got.
pub const PORT_STATUS: u16 = 0x503;

/// Timeout value for [`PORT_WAIT`] meaning "until the next device event".
pub const WAIT_FOREVER: u32 = u32::MAX;

/// Magic value of [`BootInfo::magic`]: "FTVMBOOT" in little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBOOT");
/// Version of [`BootInfo`]; bumped whenever its layout changes.
pub const BOOT_INFO_VERSION: u32 = 1;

/// Milestones the guest reports through [`PORT_STATUS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestStatus {
    /// The guest's Rust code is running (stack and heap set up).
    Started = 1,
    /// The disk log has been replayed.
    LogReplayed = 2,
    /// The network is up and the server is accepting connections.
    Serving = 3,
}

impl GuestStatus {
    /// Decodes a value written to [`PORT_STATUS`].
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Started),
            2 => Some(Self::LogReplayed),
            3 => Some(Self::Serving),
            _ => None,
        }
    }
}

/// Argument block for [`PORT_CONSOLE_WRITE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsoleWrite {
    /// Guest physical address of the bytes.
    pub addr: u64,
    /// Number of bytes (the VMM caps it at 4 KiB).
    pub len: u64,
}

/// Everything the guest learns from the VMM at boot. Lives at [`BOOT_INFO_GPA`].
///
/// All fields are plain integers so both sides can read it without unsafe casts of enums or bools.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of vCPUs (the reference guest uses one).
    pub vcpus: u32,
    /// Bytes of guest RAM starting at address 0.
    pub mem_size: u64,
    /// First byte the guest may use for its heap (after its image, 2 MiB aligned).
    pub heap_start: u64,
    /// One past the last heap byte (the stack starts here).
    pub heap_end: u64,
    /// Initial stack pointer (top of RAM).
    pub stack_top: u64,
    /// TSC frequency in kHz, for turning `rdtsc` into time.
    pub tsc_khz: u64,
    /// Base of the virtio-mmio network device, 0 if there is none.
    pub virtio_net_base: u64,
    /// Base of the virtio-mmio block device, 0 if there is none.
    pub virtio_blk_base: u64,
    /// The guest's MAC address (also in the virtio-net config space).
    pub mac: [u8; 6],
    /// Prefix length of `ipv4`.
    pub ipv4_prefix_len: u8,
    /// Reserved, zero.
    pub _reserved0: u8,
    /// The guest's IPv4 address.
    pub ipv4: [u8; 4],
    /// Default gateway, all zero if none.
    pub ipv4_gateway: [u8; 4],
    /// TCP port of the key-value server.
    pub kv_port: u16,
    /// Reserved, zero.
    pub _reserved1: u16,
    /// Benchmark load: pages to dirty per millisecond while idle (0 = off).
    pub dirty_pages_per_ms: u32,
    /// Benchmark load: size of the region the dirtying load cycles through, in 4 KiB pages.
    pub dirty_region_pages: u32,
    /// Reserved, zero.
    pub _reserved2: u32,
}

impl BootInfo {
    /// A boot info with the magic and version set and everything else zero.
    pub const fn empty() -> Self {
        Self {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            vcpus: 0,
            mem_size: 0,
            heap_start: 0,
            heap_end: 0,
            stack_top: 0,
            tsc_khz: 0,
            virtio_net_base: 0,
            virtio_blk_base: 0,
            mac: [0; 6],
            ipv4_prefix_len: 0,
            _reserved0: 0,
            ipv4: [0; 4],
            ipv4_gateway: [0; 4],
            kv_port: 0,
            _reserved1: 0,
            dirty_pages_per_ms: 0,
            dirty_region_pages: 0,
            _reserved2: 0,
        }
    }

    /// True when the magic and version are the ones this crate describes.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC && self.version == BOOT_INFO_VERSION
    }

    /// The raw bytes of this struct, as the VMM copies them into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BootInfo is repr(C), Copy, made only of integers and byte arrays, and its
        // fields are laid out without implicit padding (checked by the test below), so every
        // byte is initialised.
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                core::mem::size_of::<Self>(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_has_no_padding_and_fits_a_page() {
        // Sum of field sizes equals the struct size: no implicit padding bytes.
        let fields = 8 + 4 + 4 + 7 * 8 + 6 + 1 + 1 + 4 + 4 + 2 + 2 + 4 + 4 + 4;
        assert_eq!(core::mem::size_of::<BootInfo>(), fields);
        assert!(core::mem::size_of::<BootInfo>() <= 4096);
    }

    #[test]
    fn layout_constants_do_not_overlap() {
        // Page tables: PML4 + PDPT + 4 PDs = 6 pages.
        const { assert!(PAGE_TABLES_GPA + 6 * 0x1000 <= BOOT_INFO_GPA) };
        const { assert!(BOOT_INFO_GPA + 0x1000 <= GUEST_LOAD_GPA) };
        assert_eq!(GUEST_LOAD_GPA % (2 << 20), 0);
    }

    #[test]
    fn status_round_trips() {
        for s in [GuestStatus::Started, GuestStatus::LogReplayed, GuestStatus::Serving] {
            assert_eq!(GuestStatus::from_u32(s as u32), Some(s));
        }
        assert_eq!(GuestStatus::from_u32(0), None);
    }
}
