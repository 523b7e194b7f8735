//! The standby the backup keeps: a memory image the size of the guest's, the machine state blob,
//! the disk, and the epoch they hold.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use ftvm_proto::EpochId;

/// The standby memory image: a shared mapping of a memfd, so that a restore maps the same pages
/// into the new VM instead of copying them ([`ftvm_vmm::machine::MemoryImage::Adopt`]). The memfd
/// is sealed against resizing: no one can cut pages from under the guest that adopts it.
#[derive(Debug)]
pub struct StandbyMemory {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: StandbyMemory owns its mapping; the pointer is only dereferenced through `&self` (shared
// reads) or `&mut self` (exclusive writes), so moving it to another thread is as safe as moving a
// Vec<u8>.
unsafe impl Send for StandbyMemory {}
// SAFETY: `&StandbyMemory` only gives out `&[u8]`; writes need `&mut StandbyMemory`.
unsafe impl Sync for StandbyMemory {}

impl StandbyMemory {
    /// A zero-filled image of `len` bytes (a positive multiple of the page size).
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty standby memory"));
        }
        let fd = ftvm_vmm::memory::sized_memfd(c"ftvm-standby", libc::MFD_ALLOW_SEALING, len)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an int argument and touches no memory; the fd is open.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole file, at an address the kernel picks, so it
        // aliases no Rust object; it stays valid until munmap in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        // The file's pages are allocated through this mapping: in huge pages where the host lets
        // shared memory have them, so that the VM this image becomes at a takeover dies fast (see
        // `advise_huge_pages`).
        ftvm_vmm::memory::advise_huge_pages(ptr.as_ptr(), len);
        Ok(Self { ptr, len, fd })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an image is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The image.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr and len describe a live, readable mapping owned by self; nothing in this
        // process writes it while the shared borrow lasts (writes need &mut self).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The image, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and the exclusive borrow of self makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The memfd behind the image, for a restore that maps it into the new VM. Whoever maps it must
    /// not write through that mapping while this object is still read ([`crate::backup::activate::promote`]
    /// consumes the whole standby first).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for StandbyMemory {
    fn drop(&mut self) {
        // One munmap of a large populated mapping holds the process's mmap lock for the whole
        // page-table teardown (about 18 ms for 256 MiB here): any thread that maps memory meanwhile
        // (a thread start, a large allocation) waits, and so does what queues behind it (KVM's
        // faults on guest memory take the same lock). After a failover those are the restored
        // VM's. Dropping the page-table entries first, a step at a time under the shared lock,
        // bounds each wait (to about 2 ms here); the data stays in the memfd.
        const STEP: usize = 2 << 20;
        let mut off = 0;
        while off < self.len {
            let n = STEP.min(self.len - off);
            // SAFETY: `off..off + n` lies inside the mapping made in new(), which no borrow can
            // still reach (drop has `&mut self`). MADV_DONTNEED on a shared mapping only drops this
            // mapping's page-table entries; the pages stay in the file.
            unsafe {
                libc::madvise(self.ptr.as_ptr().add(off).cast(), n, libc::MADV_DONTNEED);
            }
            off += n;
        }
        // SAFETY: the mapping was created in new() with this address and length, and no borrow of it
        // can outlive self.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// What a host that handed its VM over keeps of it: the memory, the machine state and the number
/// of the final epoch, which the other host resumed from. Its receiver starts from it instead of
/// a blank standby (see [`crate::backup::BackupReceiver::bind_keeping`]), so that the new primary
/// sends it only what changed since (its disk is the one the VM wrote, at that epoch).
#[derive(Debug)]
pub struct KeptStandby {
    /// The final epoch.
    pub epoch: EpochId,
    /// Its machine state blob, as sent.
    pub state: Vec<u8>,
    /// Guest memory at that epoch.
    pub memory: StandbyMemory,
}

/// The standby, taken out of a stopped [`crate::backup::BackupReceiver`] for the failover path.
#[derive(Debug)]
pub struct Standby {
    pub(crate) committed: Option<EpochId>,
    pub(crate) memory: StandbyMemory,
    pub(crate) state: Vec<u8>,
    pub(crate) disk: File,
    pub(crate) disk_path: PathBuf,
    /// The guest frames of the last committed epochs (virtio-net header first), oldest first: the
    /// primary may have died before releasing them, and the restored guest believes them sent.
    pub(crate) unreleased_output: Vec<Vec<u8>>,
    /// The guest input the primary sent ahead and never committed (virtio-net header first),
    /// oldest first: the restored VM never saw it, and gets it before anything from the network.
    pub(crate) replay_ingress: Vec<Vec<u8>>,
}

impl Standby {
    /// The epoch the standby holds, when it can be resumed (a committed epoch with a machine state);
    /// `None` when there is nothing to resume from.
    pub fn committed(&self) -> Option<EpochId> {
        self.committed.filter(|_| !self.state.is_empty())
    }

    /// The memory image.
    pub fn memory(&self) -> &StandbyMemory {
        &self.memory
    }

    /// The held output of the last committed epochs, to replay at a takeover (duplicates of frames
    /// the primary did release are harmless: TCP drops them).
    pub fn unreleased_output(&self) -> &[Vec<u8>] {
        &self.unreleased_output
    }

    /// The guest input to deliver to the restored VM (see the field).
    pub fn replay_ingress(&self) -> &[Vec<u8>] {
        &self.replay_ingress
    }

    /// The machine state blob of the committed epoch.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// The standby disk, open for reading and writing.
    pub fn disk(&self) -> &File {
        &self.disk
    }

    /// Where the standby disk is.
    pub fn disk_path(&self) -> &Path {
        &self.disk_path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_zeroed_writable_and_backed_by_its_memfd() {
        let mut m = StandbyMemory::new(3 * 4096).unwrap();
        assert_eq!(m.len(), 3 * 4096);
        assert!(m.as_slice().iter().all(|&b| b == 0));
        m.as_mut_slice()[4096] = 7;
        // The memfd sees the write: a restore mapping it gets the same bytes.
        let f = File::from(m.fd().try_clone_to_owned().unwrap());
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 4096).unwrap();
        assert_eq!(b, [7]);
        // Sealed: its size is fixed.
        assert!(f.set_len(4096).is_err());
        assert!(f.set_len(4 * 4096).is_err());
        assert_eq!(f.metadata().unwrap().len(), 3 * 4096);
        assert!(StandbyMemory::new(0).is_err());
    }
}
