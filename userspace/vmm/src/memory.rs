//! Guest memory: mappings wrapped by vm-memory, with a VMM-side dirty bitmap.
//!
//! Every write the VMM makes into guest memory through the vm-memory API (used rings, received
//! frames, data read from disk) sets a bit in the region's [`AtomicBitmap`]. KVM's dirty log does not
//! see those writes, so checkpointing ORs this bitmap with KVM's. Code that writes guest memory
//! through a raw pointer must mark the pages itself with [`mark_dirty`].
//!
//! A new VM's RAM is a private anonymous mapping ([`crate::vm::create_guest_memory`]). A restored
//! VM can instead adopt a memfd that already holds the guest's memory ([`adopt_guest_memory`]):
//! the backup's standby image becomes the guest's RAM without a copy.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use crate::vm::{check_mem_size, MemSizeError};

/// Guest memory as every part of the VMM sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The guest page size used by the dirty bitmaps (the wire's, as a `u64` for address arithmetic).
pub const PAGE_SIZE: u64 = ftvm_proto::limits::PAGE_SIZE as u64;

/// Records that the VMM wrote `len` bytes at `addr` by a path that bypasses vm-memory's accessors.
pub fn mark_dirty(mem: &GuestMemory, addr: GuestAddress, len: usize) {
    use vm_memory::GuestMemoryBackend as _;
    if let Some(region) = mem.find_region(addr) {
        let offset = addr.0 - region.start_addr().0;
        region.bitmap().mark_dirty(offset as usize, len);
    }
}

/// Asks for transparent huge pages on guest RAM at `addr` (`len` bytes), best effort. Why: when
/// the VMM dies (SIGKILL, a crash), the kernel tears its memory down before it closes its
/// sockets, and the backup learns of the death from the A-Link closing. Here 256 MiB of 4 KiB
/// pages took 11.8 ms to tear down, in 2 MiB pages 1.2 ms: the backup's takeover starts 10 ms
/// sooner, which decides whether a client's first retransmission finds it serving. Dirty
/// tracking still works in 4 KiB pages (KVM maps a logged slot in 4 KiB pages; write-protecting a
/// 4 KiB page splits its huge page). Shared memory (a standby adopted at a takeover) gets them
/// only where `/sys/kernel/mm/transparent_hugepage/shmem_enabled` allows (`advise`: 1.3 ms instead of
/// 31 ms for 256 MiB here; `scripts/install.sh` sets it).
pub fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: MADV_HUGEPAGE only changes how the kernel backs the range, never its contents; the
    // range is the mapping the caller just made (or adopted) and keeps.
    if unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no transparent huge pages for guest memory");
    }
}

/// A new memfd named `name` (`MFD_CLOEXEC` and `flags`), `len` bytes long (zeroes): memory that
/// another mapping or another process can share (the backup's standby, a ring the lease watchdog
/// reads after a death).
pub fn sized_memfd(name: &std::ffi::CStr, flags: libc::c_uint, len: usize) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let file_len = libc::off_t::try_from(len).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: the name is a NUL-terminated string that outlives the call; the flags are valid.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: the descriptor is open for the call; ftruncate only sizes the file.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), file_len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Why [`adopt_guest_memory`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AdoptMemoryError {
    /// The size does not fit the guest memory layout.
    #[error(transparent)]
    MemSize(#[from] MemSizeError),
    /// The file is not sealed against shrinking and cannot be: a shrunk file would make the
    /// guest's accesses past its new end kill the VMM (SIGBUS).
    #[error(
        "the memory file cannot be sealed against shrinking \
         (it must be a memfd created with MFD_ALLOW_SEALING)"
    )]
    NotSealable(#[source] std::io::Error),
    /// `fstat` failed.
    #[error("cannot read the size of the memory file")]
    Stat(#[source] std::io::Error),
    /// The file is not the size of guest memory.
    #[error("the memory file has {file:#x} bytes, guest memory {mem:#x}")]
    Size {
        /// Bytes in the file.
        file: u64,
        /// Bytes of guest memory.
        mem: u64,
    },
    /// The shared mapping could not be made.
    #[error("cannot map the memory file")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// Builds guest RAM `[0, mem_size)` from `memfd`, which holds the guest's memory (address 0 at
/// offset 0), as a new `MAP_SHARED` mapping of it: nothing is copied, and no page is allocated
/// that the file does not already have. The guest's writes go to the file, so any other mapping
/// of it sees them. The VMM-side dirty bitmap starts clean; KVM dirty logging works on the region
/// as on anonymous memory.
///
/// The file is sealed against shrinking (if it is not already), so that no one can cut pages from
/// under the running guest; it must be exactly `mem_size` bytes. Whoever hands it over must not
/// write it any more: from now on it is the guest's RAM.
pub fn adopt_guest_memory(memfd: OwnedFd, mem_size: u64) -> Result<GuestMemory, AdoptMemoryError> {
    check_mem_size(mem_size)?;
    let size = usize::try_from(mem_size).map_err(|_| MemSizeError::TooLarge(mem_size >> 20))?;
    seal_against_shrinking(&memfd).map_err(AdoptMemoryError::NotSealable)?;
    let file = File::from(memfd);
    // After the seal: the size cannot go down any more between this check and the guest's use.
    let file_size = file.metadata().map_err(AdoptMemoryError::Stat)?.len();
    if file_size != mem_size {
        return Err(AdoptMemoryError::Size {
            file: file_size,
            mem: mem_size,
        });
    }
    let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        // No MAP_POPULATE: it would allocate the file's holes (RAM the guest never used); the
        // guest faults in what it touches, from the page cache.
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .build()
        .map_err(AdoptMemoryError::Map)?;
    advise_huge_pages(region.as_ptr(), size);
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .expect("a region at address 0 below MAX_MEM_SIZE cannot overflow");
    Ok(GuestMemory::from_regions(vec![region]).expect("a single region cannot overlap"))
}

/// Adds `F_SEAL_SHRINK` to a memfd unless it is there already.
fn seal_against_shrinking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory; the fd is open (borrowed).
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if seals & libc::F_SEAL_SHRINK != 0 {
        return Ok(());
    }
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory; the fd is open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn memfd(flags: libc::c_uint, len: u64) -> File {
        File::from(sized_memfd(c"ftvm-test", flags, len as usize).unwrap())
    }

    #[test]
    fn adopted_memory_is_the_file() {
        const MEM: u64 = 16 << 20;
        let f = memfd(libc::MFD_ALLOW_SEALING, MEM);
        f.write_all_at(b"hello", 0x1000).unwrap();
        let mem = adopt_guest_memory(f.try_clone().unwrap().into(), MEM).unwrap();
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), MEM);
        let mut b = [0u8; 5];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        // Writes through guest memory reach the file (shared, not copy-on-write), and the file
        // can no longer shrink.
        mem.write_obj(0xdead_beef_u32, GuestAddress(MEM - 4))
            .unwrap();
        let mut w = [0u8; 4];
        f.read_exact_at(&mut w, MEM - 4).unwrap();
        assert_eq!(u32::from_le_bytes(w), 0xdead_beef);
        assert!(f.set_len(MEM - 4096).is_err());
        // Nothing of it is dirty for the VMM yet.
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(!region.bitmap().dirty_at(0x1000));
    }

    #[test]
    fn adoption_refuses_what_it_cannot_keep_safe() {
        const MEM: u64 = 16 << 20;
        assert!(matches!(
            adopt_guest_memory(memfd(libc::MFD_ALLOW_SEALING, MEM / 2).into(), MEM),
            Err(AdoptMemoryError::Size { file, mem }) if file == MEM / 2 && mem == MEM
        ));
        // Without MFD_ALLOW_SEALING, the file could be shrunk under the guest.
        let e = adopt_guest_memory(memfd(0, MEM).into(), MEM).unwrap_err();
        assert!(matches!(e, AdoptMemoryError::NotSealable(_)), "{e}");
        assert!(matches!(
            adopt_guest_memory(memfd(libc::MFD_ALLOW_SEALING, MEM).into(), MEM + 4096),
            Err(AdoptMemoryError::MemSize(MemSizeError::Unaligned(_)))
        ));
    }
}
