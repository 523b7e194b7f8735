//! userfaultfd write-protection of guest memory, for the two things built on it:
//! * the **userfaultfd dirty tracker** ([`crate::dirty`]): asynchronous write-protect
//!   ([`WpMode::Async`]): the kernel lifts the protection of a page at its first write by itself
//!   and remembers it as written; `PAGEMAP_SCAN` ([`Pagemap::take_written`]) reports the written
//!   pages and protects them again in one call. It sees writes made by the guest through KVM and
//!   by the VMM alike;
//! * **copy-on-write checkpoints** (the replication engine): synchronous write-protect
//!   ([`WpMode::Sync`]): a write to a protected page stops the writing thread (a vCPU inside
//!   `KVM_RUN`, a device thread, the kernel on behalf of io_uring) and queues a fault message until
//!   the handler lifts the protection ([`Userfault::unprotect`]).
//!
//! A range can be registered with one userfaultfd only, so a VM has one or the other.
//!
//! Addresses here are host virtual addresses of the guest memory mappings ([`HostRange`]).

pub mod sys;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::memory::{GuestMemory, PAGE_SIZE};

/// How write-protect faults are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WpMode {
    /// By the kernel, at once; the page is then "written" for `PAGEMAP_SCAN`.
    Async,
    /// By us: the writer waits for [`Userfault::unprotect`].
    Sync,
}

/// Why a userfaultfd could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// `userfaultfd(2)` failed (for an unprivileged process, `vm.unprivileged_userfaultfd`).
    #[error("cannot create a userfaultfd")]
    Create(#[source] std::io::Error),
    /// `UFFDIO_API` failed.
    #[error("the kernel refuses the userfaultfd API handshake")]
    Api(#[source] std::io::Error),
    /// The kernel lacks a feature this mode needs.
    #[error("the kernel's userfaultfd lacks features {missing:#x} (offers {offered:#x})")]
    Features {
        /// Bits asked for and not offered.
        missing: u64,
        /// Bits offered.
        offered: u64,
    },
    /// `UFFDIO_REGISTER` failed.
    #[error("cannot register guest memory at {host:#x} (+{len:#x}) for write-protect")]
    Register {
        /// Host address.
        host: u64,
        /// Bytes.
        len: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `UFFDIO_WRITEPROTECT` failed.
    #[error("cannot change the write protection of {host:#x} (+{len:#x})")]
    WriteProtect {
        /// Host address.
        host: u64,
        /// Bytes.
        len: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading the fault messages failed.
    #[error("cannot read userfaultfd messages")]
    Read(#[source] std::io::Error),
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap")]
    OpenPagemap(#[source] std::io::Error),
    /// `PAGEMAP_SCAN` failed (a kernel older than 6.7, or memory not registered async).
    #[error("PAGEMAP_SCAN failed on {host:#x} (+{len:#x})")]
    Scan {
        /// Host address.
        host: u64,
        /// Bytes.
        len: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One guest memory region as the host maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRange {
    /// Guest physical address of its first byte.
    pub guest: u64,
    /// Host virtual address of its first byte.
    pub host: u64,
    /// Bytes.
    pub len: u64,
}

impl HostRange {
    /// Every region of `mem`.
    pub fn of(mem: &GuestMemory) -> Vec<Self> {
        mem.iter()
            .map(|r| Self {
                guest: r.start_addr().0,
                host: r.as_ptr() as u64,
                len: r.len(),
            })
            .collect()
    }

    /// The host address of guest page `pfn`, if this range holds it.
    pub fn host_of(&self, pfn: u64) -> Option<u64> {
        let gpa = pfn.checked_mul(PAGE_SIZE)?;
        (gpa >= self.guest && gpa < self.guest + self.len).then(|| self.host + (gpa - self.guest))
    }

    /// The guest page at host address `host`, if this range maps it.
    pub fn pfn_of(&self, host: u64) -> Option<u64> {
        (host >= self.host && host < self.host + self.len).then(|| (self.guest + (host - self.host)) / PAGE_SIZE)
    }
}

/// A userfaultfd with guest memory registered for write-protect.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    mode: WpMode,
}

impl Userfault {
    /// A userfaultfd in `mode` (non-blocking, close-on-exec), for memory private or shared, with
    /// pages never touched protected too.
    pub fn new(mode: WpMode) -> Result<Self, UffdError> {
        // SAFETY: userfaultfd(2) takes a flags int and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(UffdError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: the syscall just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        let mut wanted = sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM | sys::UFFD_FEATURE_WP_UNPOPULATED;
        if mode == WpMode::Async {
            wanted |= sys::UFFD_FEATURE_WP_ASYNC;
        }
        let mut api = sys::UffdioApi { api: sys::UFFD_API, features: wanted, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is (size checked
        // in `sys`); it lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut api) } < 0 {
            let e = std::io::Error::last_os_error();
            // An older kernel refuses unknown feature bits with EINVAL: say which are missing.
            return Err(match probe_features() {
                Some(offered) if offered & wanted != wanted => UffdError::Features { missing: wanted & !offered, offered },
                _ => UffdError::Api(e),
            });
        }
        Ok(Self { fd, mode })
    }

    /// The mode it was made with.
    pub fn mode(&self) -> WpMode {
        self.mode
    }

    /// Registers every region of `mem` for write-protect (nothing is protected yet).
    pub fn register(&self, mem: &GuestMemory) -> Result<(), UffdError> {
        for r in HostRange::of(mem) {
            let mut reg = sys::UffdioRegister {
                range: sys::UffdioRange { start: r.host, len: r.len },
                mode: sys::UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which `reg`
            // is; the range is a live mapping of guest memory, which `mem` keeps mapped.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &mut reg) } < 0 {
                return Err(UffdError::Register {
                    host: r.host,
                    len: r.len,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    fn writeprotect(&self, host: u64, len: u64, mode: u64) -> Result<(), UffdError> {
        let mut wp = sys::UffdioWriteprotect { range: sys::UffdioRange { start: host, len }, mode };
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`, which `wp` is; it
            // changes page protections of registered memory only, never memory Rust owns.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WRITEPROTECT as _, &mut wp) } == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            // EAGAIN: the address space changed under the walk (mremap, fork): try again.
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(UffdError::WriteProtect { host, len, source: e });
            }
        }
    }

    /// Write-protects `[host, host + len)`: the next write to each page faults.
    pub fn protect(&self, host: u64, len: u64) -> Result<(), UffdError> {
        self.writeprotect(host, len, sys::UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Lifts the protection of `[host, host + len)` and wakes the threads waiting on it.
    pub fn unprotect(&self, host: u64, len: u64) -> Result<(), UffdError> {
        self.writeprotect(host, len, 0)
    }

    /// Lifts the protection of `[host, host + len)` without waking anyone (the caller wakes them
    /// with a later [`Self::unprotect`] over their pages).
    pub fn unprotect_quietly(&self, host: u64, len: u64) -> Result<(), UffdError> {
        self.writeprotect(host, len, sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    }

    /// Appends to `out` the page-aligned host address of every write-protect fault queued now;
    /// returns how many (0: none waiting). Never blocks.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<usize, UffdError> {
        let mut msgs = [sys::UffdMsg::default(); 32];
        let mut n = 0;
        loop {
            // SAFETY: reads at most the size of `msgs` bytes into it; a `UffdMsg` is plain data,
            // valid for any bytes.
            let got = unsafe {
                libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs))
            };
            if got < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(n),
                    Some(libc::EINTR) => continue,
                    _ => Err(UffdError::Read(e)),
                };
            }
            let count = got as usize / std::mem::size_of::<sys::UffdMsg>();
            for m in &msgs[..count] {
                if m.event == sys::UFFD_EVENT_PAGEFAULT {
                    out.push(m.address & !(PAGE_SIZE - 1));
                    n += 1;
                }
            }
            if count < msgs.len() {
                return Ok(n);
            }
        }
    }

    /// Waits up to `timeout` for a fault message; true when one is there.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        r > 0 && pfd.revents & libc::POLLIN != 0
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The features this kernel's userfaultfd offers (a throw-away descriptor asked with no feature).
fn probe_features() -> Option<u64> {
    // SAFETY: as in `Userfault::new`.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if raw < 0 {
        return None;
    }
    // SAFETY: just returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    let mut api = sys::UffdioApi { api: sys::UFFD_API, features: 0, ioctls: 0 };
    // SAFETY: as in `Userfault::new`.
    (unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut api) } == 0).then_some(api.features)
}

/// This process's `/proc/self/pagemap`, for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct Pagemap(File);

impl Pagemap {
    /// Opens it.
    pub fn open() -> Result<Self, UffdError> {
        File::open("/proc/self/pagemap").map(Self).map_err(UffdError::OpenPagemap)
    }

    /// Reports every page of `[host, host + len)` written since it was last protected, as
    /// `[start, end)` host address ranges appended to `out`, and write-protects them again, in one
    /// walk (the memory must be registered with [`WpMode::Async`]). `buf` is scratch space for the
    /// kernel's answer; a larger one means fewer calls.
    pub fn take_written(
        &self,
        host: u64,
        len: u64,
        buf: &mut Vec<sys::PageRegion>,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), UffdError> {
        if buf.is_empty() {
            buf.resize(512, sys::PageRegion::default());
        }
        let end = host + len;
        let mut start = host;
        while start < end {
            let mut arg = sys::PmScanArg {
                size: std::mem::size_of::<sys::PmScanArg>() as u64,
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                category_mask: sys::PAGE_IS_WRITTEN,
                return_mask: sys::PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` `struct page_region`s
            // into `buf` (whose length that is) and `walk_end` into `arg`; both live across the call.
            let n = unsafe { libc::ioctl(self.0.as_raw_fd(), sys::PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                return Err(UffdError::Scan { host, len, source: std::io::Error::last_os_error() });
            }
            out.extend(buf[..n as usize].iter().map(|r| (r.start, r.end)));
            // The walk stops early when `buf` is full; it says where.
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    fn memory(len: u64) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), len as usize)]).unwrap()
    }

    #[test]
    fn host_ranges_map_pages_both_ways() {
        let r = HostRange { guest: 0x10_0000, host: 0x7f00_0000_0000, len: 0x2000 };
        assert_eq!(r.host_of(0x100), Some(0x7f00_0000_0000));
        assert_eq!(r.host_of(0x101), Some(0x7f00_0000_1000));
        assert_eq!(r.host_of(0x102), None);
        assert_eq!(r.host_of(0xff), None);
        assert_eq!(r.host_of(u64::MAX), None);
        assert_eq!(r.pfn_of(0x7f00_0000_1fff), Some(0x101));
        assert_eq!(r.pfn_of(0x7f00_0000_2000), None);
    }

    /// Async: written pages are reported once, protected again by the same scan, and writes made
    /// through the mapping by this process count.
    #[test]
    fn async_scan_reports_each_written_page_once() {
        let mem = memory(8 << 20);
        let uffd = Userfault::new(WpMode::Async).unwrap();
        uffd.register(&mem).unwrap();
        let r = HostRange::of(&mem)[0];
        uffd.protect(r.host, r.len).unwrap();
        let pm = Pagemap::open().unwrap();
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        pm.take_written(r.host, r.len, &mut buf, &mut out).unwrap();
        assert!(out.is_empty(), "{out:x?}");
        for pfn in [3u64, 4, 100, 2047] {
            mem.write_obj(pfn, GuestAddress(pfn * PAGE_SIZE + 8)).unwrap();
        }
        pm.take_written(r.host, r.len, &mut buf, &mut out).unwrap();
        let pages: Vec<u64> = out.iter().flat_map(|&(s, e)| (s..e).step_by(PAGE_SIZE as usize)).filter_map(|h| r.pfn_of(h)).collect();
        assert_eq!(pages, [3, 4, 100, 2047]);
        out.clear();
        pm.take_written(r.host, r.len, &mut buf, &mut out).unwrap();
        assert!(out.is_empty(), "scanned twice: {out:x?}");
        // A tiny answer buffer: the scan goes on where the kernel stopped.
        let mut small = vec![sys::PageRegion::default(); 1];
        for pfn in [7u64, 9, 11] {
            mem.write_obj(pfn, GuestAddress(pfn * PAGE_SIZE)).unwrap();
        }
        pm.take_written(r.host, r.len, &mut small, &mut out).unwrap();
        assert_eq!(out.len(), 3, "{out:x?}");
    }

    /// Sync: a write to a protected page waits until it is lifted; the fault names the page.
    #[test]
    fn sync_write_waits_for_the_handler() {
        let mem = memory(4 << 20);
        let uffd = Userfault::new(WpMode::Sync).unwrap();
        uffd.register(&mem).unwrap();
        let r = HostRange::of(&mem)[0];
        mem.write_obj(1u64, GuestAddress(5 * PAGE_SIZE)).unwrap();
        uffd.protect(r.host + 5 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mem, done) = (mem.clone(), done.clone());
            std::thread::spawn(move || {
                mem.write_obj(2u64, GuestAddress(5 * PAGE_SIZE)).unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        assert!(uffd.wait(Duration::from_secs(5)), "no fault message");
        let mut faults = Vec::new();
        assert_eq!(uffd.read_faults(&mut faults).unwrap(), 1);
        assert_eq!(faults, [r.host + 5 * PAGE_SIZE]);
        // Still waiting, and the page still holds the value of the protection.
        std::thread::sleep(Duration::from_millis(20));
        assert!(!done.load(Ordering::SeqCst));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(5 * PAGE_SIZE)).unwrap(), 1);
        uffd.unprotect(r.host + 5 * PAGE_SIZE, PAGE_SIZE).unwrap();
        writer.join().unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(5 * PAGE_SIZE)).unwrap(), 2);
        // Other pages were never protected.
        mem.write_obj(3u64, GuestAddress(6 * PAGE_SIZE)).unwrap();
        assert!(!uffd.wait(Duration::ZERO));
    }

    /// What arming costs (printed, not asserted): 1 000 scattered pages in 256 MiB, one ioctl each.
    #[test]
    fn protect_costs() {
        let mem = memory(256 << 20);
        let uffd = Userfault::new(WpMode::Sync).unwrap();
        uffd.register(&mem).unwrap();
        let r = HostRange::of(&mem)[0];
        let pages: Vec<u64> = (0..1000u64).map(|i| (i * 61) % 65536).collect();
        for &p in &pages {
            mem.write_obj(p, GuestAddress(p * PAGE_SIZE)).unwrap();
        }
        let mut times = Vec::new();
        for _ in 0..10 {
            let t = std::time::Instant::now();
            for &p in &pages {
                uffd.protect(r.host + p * PAGE_SIZE, PAGE_SIZE).unwrap();
            }
            let armed = t.elapsed();
            let t = std::time::Instant::now();
            for &p in &pages {
                uffd.unprotect_quietly(r.host + p * PAGE_SIZE, PAGE_SIZE).unwrap();
            }
            times.push((armed, t.elapsed()));
        }
        let t = std::time::Instant::now();
        uffd.protect(r.host, r.len).unwrap();
        let whole = t.elapsed();
        let t = std::time::Instant::now();
        uffd.unprotect_quietly(r.host, r.len).unwrap();
        eprintln!(
            "protect/unprotect 1000 scattered pages, one ioctl each: {times:?}; all 256 MiB at once: {whole:?}/{:?}",
            t.elapsed()
        );
    }
}
