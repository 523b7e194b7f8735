//! The userfaultfd and `PAGEMAP_SCAN` kernel ABI (`linux/userfaultfd.h`, `linux/fs.h`), written
//! out by hand: Debian's headers here are older than the kernel and lack `WP_ASYNC` and
//! `PAGEMAP_SCAN`. x86-64 values; every struct is checked against the size the kernel expects.

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xaa;

/// `_IOWR(type, nr, size)` of `asm-generic/ioctl.h`.
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `UFFDIO_API`.
pub const UFFDIO_API: u64 = iowr(0xaa, 0x3f, std::mem::size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u64 = iowr(0xaa, 0x00, std::mem::size_of::<UffdioRegister>());
/// `UFFDIO_WRITEPROTECT`.
pub const UFFDIO_WRITEPROTECT: u64 = iowr(0xaa, 0x06, std::mem::size_of::<UffdioWriteprotect>());
/// `PAGEMAP_SCAN`, on `/proc/<pid>/pagemap`.
pub const PAGEMAP_SCAN: u64 = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());

/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect works on shared memory (a memfd).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protecting a page never touched protects it too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write-protect faults itself (no message), leaving
/// the page "written" for `PAGEMAP_SCAN`.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: lift the protection).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`: lift without waking the faulting threads.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`: the fault hit a write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `PM_SCAN_WP_MATCHING`: write-protect the pages the scan reports.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: refuse to scan memory not registered with async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffd_msg`, for a page fault (the only event registered for): `event`, three reserved
/// fields, then the `pagefault` member of the union (`flags`, `address`, `ptid`, padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub flags: u64,
    pub address: u64,
    pub ptid: u32,
    pub pad: u32,
}

/// `struct page_region`: `[start, end)` with the categories it matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

const _: () = {
    assert!(std::mem::size_of::<UffdioApi>() == 24);
    assert!(std::mem::size_of::<UffdioRegister>() == 32);
    assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
    assert!(std::mem::size_of::<UffdMsg>() == 32);
    assert!(std::mem::size_of::<PageRegion>() == 24);
    assert!(std::mem::size_of::<PmScanArg>() == 96);
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
};
