//! The io_uring engine of a block device: one ring per disk, an eventfd the kernel signals on
//! each completion, and the table of requests in flight.
//!
//! Reads and writes go straight between the disk file and guest memory (`readv`/`writev` on
//! iovecs that point into the guest mapping): no bounce buffer. The kernel's writes into guest
//! memory bypass vm-memory, so the pages of a read are marked in the VMM dirty bitmap when its
//! completion is reaped, after the data landed (marking them at submission would let a
//! checkpoint taken in between miss the data).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::handler::{Request, RequestType, STATUS_IOERR, STATUS_OK};
use crate::memory::{mark_dirty, GuestMemory};

/// `struct iovec` with integer fields, so the in-flight table stays `Send` without an unsafe
/// impl; the kernel only sees its bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RawIovec {
    base: usize,
    len: usize,
}

const _: () = assert!(
    std::mem::size_of::<RawIovec>() == std::mem::size_of::<libc::iovec>()
        && std::mem::align_of::<RawIovec>() == std::mem::align_of::<libc::iovec>()
);

/// Largest iovec array one request may use (Linux's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;

/// One request handed to io_uring and not completed yet.
#[derive(Debug)]
struct Slot {
    request: Request,
    /// Submission order, so a checkpoint can replay requests in the order the guest gave them.
    seq: u64,
    /// Host addresses of `request.data`. Rust never reads it again; it is kept so the array the
    /// kernel was given stays allocated until the completion.
    #[allow(dead_code)]
    iovecs: Vec<RawIovec>,
}

/// Requests in flight, indexed by head descriptor index (unique among a queue's in-flight
/// chains). Plain data: a checkpoint lists them with [`InflightTable::iter`] (head, type,
/// sector, data segments, status address) to replay them on the backup.
#[derive(Debug, Default)]
pub struct InflightTable {
    slots: Vec<Option<Slot>>,
    count: usize,
    next_seq: u64,
}

impl InflightTable {
    /// Number of requests in flight.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// True when the chain with head `head` is in flight.
    pub fn contains(&self, head: u16) -> bool {
        self.slots.get(usize::from(head)).is_some_and(Option::is_some)
    }

    /// The requests in flight, in head order.
    pub fn iter(&self) -> impl Iterator<Item = &Request> {
        self.slots.iter().flatten().map(|s| &s.request)
    }

    /// The requests in flight, in the order they were submitted (how a restore submits them
    /// again: a FLUSH then still follows the writes it followed).
    pub fn in_submission_order(&self) -> Vec<&Request> {
        let mut v: Vec<&Slot> = self.slots.iter().flatten().collect();
        v.sort_unstable_by_key(|s| s.seq);
        v.into_iter().map(|s| &s.request).collect()
    }

    fn insert(&mut self, mut slot: Slot) {
        slot.seq = self.next_seq;
        self.next_seq += 1;
        let i = usize::from(slot.request.head);
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        debug_assert!(self.slots[i].is_none(), "callers check contains() first");
        if self.slots[i].is_none() {
            self.count += 1;
        }
        self.slots[i] = Some(slot);
    }

    fn remove(&mut self, head: u16) -> Option<Slot> {
        let slot = self.slots.get_mut(usize::from(head))?.take()?;
        self.count -= 1;
        Some(slot)
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The request.
    pub request: Request,
    /// Status byte to report.
    pub status: u8,
    /// The raw io_uring result (bytes, or a negative errno), for logging.
    pub result: i32,
}

/// Why a request could not be handed to io_uring; it goes back to the caller to be answered
/// with IOERR.
#[derive(Debug)]
pub struct SubmitError {
    /// The request.
    pub request: Request,
    /// What went wrong.
    pub reason: &'static str,
}

/// io_uring ring, completion eventfd and in-flight table of one disk.
pub struct IoEngine {
    ring: IoUring,
    completions: EventFd,
    inflight: InflightTable,
    reaped: Vec<(u64, i32)>,
}

impl fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEngine").field("inflight", &self.inflight).finish_non_exhaustive()
    }
}

impl IoEngine {
    /// A ring with room for `entries` requests in flight (the queue size is enough: the driver
    /// cannot have more chains outstanding) and a non-blocking completion eventfd.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        let completions = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(completions.as_raw_fd())?;
        Ok(Self { ring, completions, inflight: InflightTable::default(), reaped: Vec::new() })
    }

    /// The eventfd signalled on every completion.
    pub fn completion_fd(&self) -> RawFd {
        self.completions.as_raw_fd()
    }

    /// Clears the completion eventfd (the I/O thread does this before reaping).
    pub fn clear_completion_event(&self) {
        // WouldBlock: nothing was pending, which is fine.
        let _ = self.completions.read();
    }

    /// Makes the completion eventfd readable, so the I/O thread reaps whatever the kernel
    /// posted meanwhile (after a pause).
    pub fn signal_completion_event(&self) {
        // Only fails on counter overflow, and then it is readable anyway.
        let _ = self.completions.write(1);
    }

    /// The requests in flight.
    pub fn inflight(&self) -> &InflightTable {
        &self.inflight
    }

    /// Queues `request` (IN, OUT or FLUSH) on the ring. Call [`Self::flush`] after a batch.
    pub fn submit(
        &mut self,
        fd: RawFd,
        request: Request,
        mem: &GuestMemory,
    ) -> Result<(), SubmitError> {
        if self.inflight.contains(request.head) {
            return Err(SubmitError { request, reason: "head already in flight" });
        }
        let iovecs = match request.request_type {
            RequestType::In | RequestType::Out => match host_iovecs(mem, &request) {
                Some(v) => v,
                None => {
                    return Err(SubmitError {
                        request,
                        reason: "data buffers outside guest memory",
                    })
                }
            },
            RequestType::Flush => Vec::new(),
            RequestType::GetId => {
                return Err(SubmitError { request, reason: "GET_ID needs no I/O" })
            }
        };
        let user_data = u64::from(request.head);
        let iov_ptr = iovecs.as_ptr().cast::<libc::iovec>();
        // At most MAX_IOVECS entries (checked in host_iovecs).
        let iov_len = iovecs.len() as u32;
        let fd = types::Fd(fd);
        let entry = match request.request_type {
            RequestType::In => {
                opcode::Readv::new(fd, iov_ptr, iov_len).offset(request.offset()).build()
            }
            RequestType::Out => {
                opcode::Writev::new(fd, iov_ptr, iov_len).offset(request.offset()).build()
            }
            // IO_DRAIN: the flush starts only after every earlier request completed, so it
            // covers writes the guest submitted before it (io_uring does not order otherwise).
            _ => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(user_data);
        for attempt in 0..2 {
            // SAFETY: the kernel reads the entry at the next io_uring_enter, after the slot
            // below owns the iovec array (moving a Vec does not move its heap buffer). The
            // array stays in the in-flight table until this request's completion is reaped or
            // the engine is drained; the guest memory it points into stays mapped as long as
            // the device holds its GuestMemory, which outlives the engine; the fd belongs to
            // the device's disk file, which also outlives the engine.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.inflight.insert(Slot { request, seq: 0, iovecs });
                return Ok(());
            }
            if attempt == 0 {
                // Submission queue full (should not happen with entries >= queue size): hand
                // what is queued to the kernel and try again.
                let _ = self.flush();
            }
        }
        Err(SubmitError { request, reason: "io_uring submission queue full" })
    }

    /// Hands queued requests to the kernel (one `io_uring_enter`).
    pub fn flush(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes every completion the kernel posted and calls `f` for each. Data of finished reads
    /// is marked dirty before `f` runs.
    pub fn reap(&mut self, mem: &GuestMemory, mut f: impl FnMut(Completion)) -> usize {
        self.reaped.clear();
        self.reaped.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        let mut n = 0;
        for i in 0..self.reaped.len() {
            let (user_data, result) = self.reaped[i];
            let Some(slot) = u16::try_from(user_data).ok().and_then(|h| self.inflight.remove(h))
            else {
                continue;
            };
            let request = slot.request;
            if request.request_type == RequestType::In {
                // Even a failed read may have written part of the buffers.
                for s in &request.data {
                    mark_dirty(mem, s.addr, s.len as usize);
                }
            }
            let expected = match request.request_type {
                RequestType::In | RequestType::Out => {
                    i64::try_from(request.data_len()).unwrap_or(-1)
                }
                _ => 0,
            };
            // A short transfer on a regular file means the file shrank or the disk is full.
            let status =
                if result < 0 || i64::from(result) != expected { STATUS_IOERR } else { STATUS_OK };
            f(Completion { request, status, result });
            n += 1;
        }
        n
    }

    /// Waits for every request in flight and calls `f` for each completion.
    pub fn wait_all(&mut self, mem: &GuestMemory, mut f: impl FnMut(Completion)) -> io::Result<()> {
        loop {
            self.reap(mem, &mut f);
            if self.inflight.is_empty() {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for IoEngine {
    /// Waits for the requests in flight: the kernel must not keep writing guest memory, or
    /// reading the iovec arrays, for a device that no longer exists (a device dropped before
    /// its completions were reaped: a failed restore, a test). Their pages are not marked dirty:
    /// nobody is left to complete them to the guest.
    fn drop(&mut self) {
        while !self.inflight.is_empty() {
            for cqe in self.ring.completion() {
                if let Ok(head) = u16::try_from(cqe.user_data()) {
                    self.inflight.remove(head);
                }
            }
            if self.inflight.is_empty() {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("virtio-blk: cannot wait for requests in flight at drop: {e}");
                    break;
                }
            }
        }
    }
}

/// Host iovecs for the request's data, or `None` if part of it is not guest RAM.
fn host_iovecs(mem: &GuestMemory, request: &Request) -> Option<Vec<RawIovec>> {
    let mut out = Vec::with_capacity(request.data.len());
    for s in &request.data {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = slice.ok()?;
            out.push(RawIovec { base: slice_addr(&slice), len: slice.len() });
        }
    }
    (out.len() <= MAX_IOVECS).then_some(out)
}

/// Host address of a slice of the guest mapping. The guard only matters for Xen-style
/// mappings that are established per access; ours are mmap regions that stay mapped.
fn slice_addr<B: BitmapSlice>(slice: &vm_memory::VolatileSlice<'_, B>) -> usize {
    slice.ptr_guard_mut().as_ptr() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn inflight_table_tracks_heads() {
        let mut t = InflightTable::default();
        let req = |head| Request {
            head,
            request_type: RequestType::Flush,
            sector: 0,
            data: Vec::new(),
            status_addr: GuestAddress(0x1000),
        };
        t.insert(Slot { request: req(5), seq: 0, iovecs: Vec::new() });
        t.insert(Slot { request: req(2), seq: 0, iovecs: Vec::new() });
        assert_eq!(t.len(), 2);
        assert!(t.contains(5) && t.contains(2) && !t.contains(3) && !t.contains(1000));
        assert_eq!(t.iter().map(|r| r.head).collect::<Vec<_>>(), [2, 5]);
        assert_eq!(t.in_submission_order().iter().map(|r| r.head).collect::<Vec<_>>(), [5, 2]);
        assert_eq!(t.remove(5).unwrap().request.head, 5);
        assert!(t.remove(5).is_none());
        assert_eq!(t.len(), 1);
    }
}
