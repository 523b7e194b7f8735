//! The virtio-blk device on a raw disk file.
//!
//! Requests are parsed and handed to io_uring on the vCPU thread, inside the guest's
//! QueueNotify exit (one `io_uring_enter` per notification). Completions are reaped on the
//! device I/O thread, which writes the status byte, fills the used ring and wakes the guest.
//! Requests that need no I/O (GET_ID, bad requests) are answered at once.
//!
//! An optional [`DiskWriteObserver`] sees every write (and flush) as it is submitted, with the
//! data as the guest wrote it: the replication layer journals them per epoch on the backup.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::engine::{Completion, InflightTable, IoEngine, SubmitError};
use super::handler::{
    parse_request, write_segments, Parsed, Request, RequestType, ID_LEN, SECTOR_SIZE, STATUS_IOERR,
    STATUS_OK,
};
use crate::devices::virtio::{
    pop_chain, ring_err, ActivateError, Desc, QueueContext, QueueError, VirtioDevice, WarnOnce,
    F_RING_EVENT_IDX, F_VERSION_1, QUEUE_MAX_SIZE,
};
use crate::memory::GuestMemory;

/// The request queue.
pub const REQUEST_QUEUE: u16 = 0;

/// Features offered: virtio 1.x, EVENT_IDX, FLUSH, and the `blk_size` and `seg_max` config
/// fields.
pub const BLOCK_FEATURES: u64 = F_VERSION_1
    | F_RING_EVENT_IDX
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_SEG_MAX;

/// Config space up to the topology fields: capacity u64, size_max u32, seg_max u32, geometry
/// (4 bytes), blk_size u32, topology (8 bytes).
const CONFIG_LEN: usize = 32;

/// What GET_ID answers (the same on every host, so a failover does not change the disk's ID).
const DISK_ID: &[u8] = b"ftvm-disk0";

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockOpenError {
    /// open(2) failed.
    #[error("cannot open disk {}", path.display())]
    Open {
        /// The disk file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The size could not be read.
    #[error("cannot read the size of disk {}", path.display())]
    Size {
        /// The disk file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// io_uring could not be set up.
    #[error("cannot set up io_uring for disk {}", path.display())]
    IoUring {
        /// The disk file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Sees the guest's disk writes as they are submitted (the replication layer's hook).
///
/// Called on the vCPU thread inside the guest's QueueNotify exit (and on the restoring thread
/// for requests a restore submits again), in submission order, once per request: keep it
/// short (copy the data into a journal buffer, do not wait on the network).
pub trait DiskWriteObserver: Send + Sync {
    /// A write of `data` (whole sectors, as the guest wrote it) at `sector` was submitted.
    fn record(&self, sector: u64, data: &[u8]);
    /// A FLUSH was submitted: writes recorded before it must be durable when it completes.
    fn flush(&self);
}

/// Told of every guest write before it is handed to the kernel (the replication layer's
/// write-intent record: a region must be recorded as possibly different from the other copy of
/// the disk before any write to it can land). Called on the same threads as
/// [`DiskWriteObserver::record`]; it may block briefly (a durable update of a small file).
pub trait DiskWriteIntent: Send + Sync {
    /// A write of `len` bytes at byte `offset` is about to be issued. An error fails the write
    /// (the guest sees IOERR) without issuing it.
    fn before_write(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// A [`DiskWriteIntent`] in a device's configuration: two are equal when they are the same object.
#[derive(Clone)]
pub struct WriteIntentHook(pub Arc<dyn DiskWriteIntent>);

impl PartialEq for WriteIntentHook {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl Eq for WriteIntentHook {}

impl fmt::Debug for WriteIntentHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DiskWriteIntent")
    }
}

/// The observer, with a `Debug` the trait object does not have.
#[derive(Clone)]
struct Observer(Arc<dyn DiskWriteObserver>);

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DiskWriteObserver")
    }
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    file: File,
    path: PathBuf,
    capacity: u64,
    config: [u8; CONFIG_LEN],
    id: [u8; ID_LEN],
    engine: IoEngine,
    descs: Vec<Desc>,
    observer: Option<Observer>,
    intent: Option<WriteIntentHook>,
    /// Scratch for gathering a write's data for the observer.
    observed: Vec<u8>,
    warned: WarnOnce,
}

impl Block {
    /// Opens `path` read-write (a regular file or a block device). The capacity is its size
    /// in whole 512-byte sectors.
    pub fn open(path: &Path) -> Result<Self, BlockOpenError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| BlockOpenError::Open { path: path.into(), source })?;
        // Seeking to the end works for block devices too, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockOpenError::Size { path: path.into(), source })?;
        let capacity = size / SECTOR_SIZE;
        let engine = IoEngine::new(u32::from(QUEUE_MAX_SIZE))
            .map_err(|source| BlockOpenError::IoUring { path: path.into(), source })?;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // A chain holds the header and the status besides the data.
        config[12..16].copy_from_slice(&(u32::from(QUEUE_MAX_SIZE) - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let mut id = [0u8; ID_LEN];
        id[..DISK_ID.len()].copy_from_slice(DISK_ID);
        Ok(Self {
            file,
            path: path.into(),
            capacity,
            config,
            id,
            engine,
            descs: Vec::with_capacity(usize::from(QUEUE_MAX_SIZE)),
            observer: None,
            intent: None,
            observed: Vec::new(),
            warned: WarnOnce::default(),
        })
    }

    /// Sets (or removes) the observer of guest writes. A new observer is first shown the writes
    /// already handed to io_uring and not completed, in submission order: their data may reach the
    /// file after whoever installs the observer has read that part of it (a backup synchronised
    /// while the guest runs), so it must see them as if they were submitted now.
    pub fn set_write_observer(&mut self, observer: Option<Arc<dyn DiskWriteObserver>>, mem: &GuestMemory) {
        self.observer = observer.map(Observer);
        let Some(obs) = self.observer.clone() else { return };
        let writes: Vec<Request> =
            self.engine.inflight().in_submission_order().into_iter().filter(|r| r.request_type == RequestType::Out).cloned().collect();
        for req in &writes {
            // The buffers were inside guest memory at submission, and guest memory does not shrink.
            if gather(mem, req, &mut self.observed) {
                obs.0.record(req.sector, &self.observed);
            }
        }
    }

    /// Sets (or removes) who is told of writes before they are issued.
    pub fn set_write_intent(&mut self, intent: Option<WriteIntentHook>) {
        self.intent = intent;
    }

    /// Hands `req` (IN, OUT or FLUSH) to io_uring and, once it is queued, shows writes and
    /// flushes to the observer. Call [`Self::flush_submissions`] after a batch.
    pub(crate) fn submit(&mut self, req: Request, mem: &GuestMemory) -> Result<(), SubmitError> {
        let observe = match (&self.observer, req.request_type) {
            (Some(_), RequestType::Out) => {
                if !gather(mem, &req, &mut self.observed) {
                    return Err(SubmitError {
                        request: req,
                        reason: "data buffers outside guest memory",
                    });
                }
                Some((req.request_type, req.sector))
            }
            (Some(_), RequestType::Flush) => Some((req.request_type, req.sector)),
            _ => None,
        };
        if let (Some(intent), RequestType::Out) = (&self.intent, req.request_type) {
            if let Err(e) = intent.0.before_write(req.offset(), req.data_len()) {
                if self.warned.first("intent") {
                    tracing::error!(disk = %self.path.display(), error = %e, "a guest write failed: its region could not be recorded in the write-intent record first");
                }
                return Err(SubmitError { request: req, reason: "the write-intent record could not be updated" });
            }
        }
        self.engine.submit(self.file.as_raw_fd(), req, mem)?;
        if let (Some(obs), Some((kind, sector))) = (&self.observer, observe) {
            match kind {
                RequestType::Out => obs.0.record(sector, &self.observed),
                _ => obs.0.flush(),
            }
        }
        Ok(())
    }

    /// One `io_uring_enter` for the requests queued by [`Self::submit`].
    pub(crate) fn flush_submissions(&mut self) -> io::Result<()> {
        self.engine.flush()
    }

    /// The disk file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The eventfd io_uring signals on completions (for the I/O thread's epoll).
    pub fn completion_fd(&self) -> RawFd {
        self.engine.completion_fd()
    }

    /// Resets the completion eventfd without reaping (the I/O thread, while the device is not
    /// running).
    pub fn clear_completion_event(&self) {
        self.engine.clear_completion_event();
    }

    /// Makes the I/O thread look at the completion queue (completions it skipped while the
    /// device was paused stay there).
    pub fn signal_completion_event(&self) {
        self.engine.signal_completion_event();
    }

    /// Requests handed to io_uring and not completed yet.
    pub fn inflight(&self) -> &InflightTable {
        self.engine.inflight()
    }

    /// Makes the disk file's data durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// I/O thread: completes every request io_uring finished.
    pub fn process_completions(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), QueueError> {
        self.engine.clear_completion_event();
        let mem = ctx.mem;
        let queue = &mut ctx.queues[usize::from(REQUEST_QUEUE)];
        let mut first_error = None;
        let mut completed = 0;
        let warned = &mut self.warned;
        let path = &self.path;
        self.engine.reap(mem, |c| {
            log_failure(warned, path, &c);
            completed += 1;
            if let Err(e) = finish(queue, mem, &c) {
                first_error.get_or_insert(e);
            }
        });
        if let Some(e) = first_error {
            return Err(e);
        }
        if completed > 0
            && queue.ready()
            && queue.needs_notification(mem).map_err(ring_err(REQUEST_QUEUE))?
        {
            // The guest may be idle in PORT_WAIT, waiting for exactly this completion.
            ctx.signal_used(true);
        }
        Ok(())
    }

    /// Waits for every request in flight and completes each into the used ring (shutdown).
    pub fn complete_all(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), QueueError> {
        let mem = ctx.mem;
        let queue = &mut ctx.queues[usize::from(REQUEST_QUEUE)];
        let mut first_error = None;
        let mut completed = 0;
        let warned = &mut self.warned;
        let path = &self.path;
        let waited = self.engine.wait_all(mem, |c| {
            log_failure(warned, path, &c);
            completed += 1;
            if let Err(e) = finish(queue, mem, &c) {
                first_error.get_or_insert(e);
            }
        });
        if let Err(e) = waited {
            tracing::warn!(disk = %self.path.display(), "virtio-blk: cannot wait for in-flight requests: {e}");
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if completed > 0
            && queue.ready()
            && queue.needs_notification(mem).map_err(ring_err(REQUEST_QUEUE))?
        {
            ctx.signal_used(true);
        }
        Ok(())
    }

    /// Waits for every request in flight and forgets them (device reset, or a device that is
    /// not running). Data already read into guest memory is still marked dirty.
    pub fn drain(&mut self, mem: &GuestMemory) {
        let path = &self.path;
        if let Err(e) = self.engine.wait_all(mem, |_| {}) {
            tracing::warn!(disk = %path.display(), "virtio-blk: cannot wait for in-flight requests: {e}");
        }
    }

    fn process_requests(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), QueueError> {
        let mem = ctx.mem;
        let queue = &mut ctx.queues[usize::from(REQUEST_QUEUE)];
        if !queue.ready() {
            return Ok(());
        }
        let mut answered = 0;
        let mut submitted = 0;
        loop {
            queue.disable_notification(mem).map_err(ring_err(REQUEST_QUEUE))?;
            while let Some(chain) = pop_chain(queue, mem).map_err(ring_err(REQUEST_QUEUE))? {
                let head = chain.head_index();
                if self.engine.inflight().contains(head) {
                    return Err(QueueError::HeadInUse { queue: REQUEST_QUEUE, head });
                }
                match parse_request(chain, REQUEST_QUEUE, mem, self.capacity, &mut self.descs)? {
                    Parsed::Reject { head, status_addr, status } => {
                        complete(queue, mem, head, status_addr, status, 1)?;
                        answered += 1;
                    }
                    Parsed::Ready(req) if req.request_type == RequestType::GetId => {
                        let written = write_segments(mem, &req.data, &self.id);
                        complete(
                            queue,
                            mem,
                            req.head,
                            req.status_addr,
                            STATUS_OK,
                            written as u32 + 1,
                        )?;
                        answered += 1;
                    }
                    Parsed::Ready(req) => match self.submit(req, mem) {
                        Ok(()) => submitted += 1,
                        Err(e) => {
                            if self.warned.first("submit") {
                                tracing::warn!(disk = %self.path.display(), "virtio-blk: cannot submit a request: {}", e.reason);
                            }
                            let r = e.request;
                            complete(queue, mem, r.head, r.status_addr, STATUS_IOERR, 1)?;
                            answered += 1;
                        }
                    },
                }
            }
            if !queue.enable_notification(mem).map_err(ring_err(REQUEST_QUEUE))? {
                break;
            }
        }
        if submitted > 0 {
            if let Err(e) = self.flush_submissions() {
                // The entries stay queued and go with the next successful io_uring_enter.
                if self.warned.first("uring-enter") {
                    tracing::warn!(disk = %self.path.display(), "virtio-blk: io_uring_enter failed: {e}");
                }
            }
        }
        if answered > 0 && queue.needs_notification(mem).map_err(ring_err(REQUEST_QUEUE))? {
            // Answered inside the guest's own notify exit: no wake-up needed.
            ctx.signal_used(false);
        }
        Ok(())
    }
}

/// Copies a request's data into `out`. False if part of it is not guest memory.
fn gather(mem: &GuestMemory, req: &Request, out: &mut Vec<u8>) -> bool {
    out.clear();
    let Ok(len) = usize::try_from(req.data_len()) else { return false };
    out.resize(len, 0);
    let mut at = 0;
    for s in &req.data {
        let n = s.len as usize;
        if mem.read_slice(&mut out[at..at + n], s.addr).is_err() {
            return false;
        }
        at += n;
    }
    true
}

/// Logs the first failed I/O of a disk.
fn log_failure(warned: &mut WarnOnce, path: &Path, c: &Completion) {
    if c.status != STATUS_OK && warned.first("io-error") {
        let what = if c.result < 0 {
            io::Error::from_raw_os_error(-c.result).to_string()
        } else {
            format!("short transfer of {} bytes", c.result)
        };
        tracing::warn!(disk = %path.display(), sector = c.request.sector, "virtio-blk: {:?} failed: {what}", c.request.request_type);
    }
}

/// Reports a finished request: status byte, then the used ring. A queue the driver disabled
/// meanwhile (teardown) gets no used entry.
fn finish(queue: &mut Queue, mem: &GuestMemory, c: &Completion) -> Result<(), QueueError> {
    let r = &c.request;
    let used_len = match r.request_type {
        // Data bytes written into the guest's buffers, plus the status byte.
        RequestType::In if c.status == STATUS_OK => {
            u32::try_from(r.data_len() + 1).unwrap_or(u32::MAX)
        }
        _ => 1,
    };
    if !queue.ready() {
        let _ = mem.write_obj(c.status, r.status_addr);
        return Ok(());
    }
    complete(queue, mem, r.head, r.status_addr, c.status, used_len)
}

/// Writes the status byte (through vm-memory: dirty-tracked) and adds the used entry.
fn complete(
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    status_addr: GuestAddress,
    status: u8,
    used_len: u32,
) -> Result<(), QueueError> {
    mem.write_obj(status, status_addr).map_err(|_| QueueError::MalformedChain {
        queue: REQUEST_QUEUE,
        head,
        reason: "the status byte lies outside guest memory",
    })?;
    queue.add_used(mem, head, used_len).map_err(ring_err(REQUEST_QUEUE))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE]
    }

    fn device_features(&self) -> u64 {
        BLOCK_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only: VIRTIO_BLK_F_CONFIG_WCE is not offered.
    }

    fn activate(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), ActivateError> {
        if !ctx.queues[usize::from(REQUEST_QUEUE)].ready() {
            return Err(ActivateError::QueueNotReady(usize::from(REQUEST_QUEUE)));
        }
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16, ctx: &mut QueueContext<'_>) -> Result<(), QueueError> {
        match queue {
            REQUEST_QUEUE => self.process_requests(ctx),
            _ => Err(ring_err(queue)(virtio_queue::Error::InvalidDescriptorIndex)),
        }
    }

    fn reset(&mut self, mem: &GuestMemory) {
        // The kernel may still be writing guest memory for reads in flight: wait for them.
        self.drain(mem);
    }
}

#[cfg(test)]
mod tests {
    use super::super::handler::STATUS_UNSUPP;
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::MmioTransport;
    use crate::wake::GuestWake;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_mmio::*;

    /// A temporary disk file, removed on drop.
    struct TempDisk(PathBuf);

    impl TempDisk {
        fn new(tag: &str, sectors: u64) -> Self {
            let path =
                std::env::temp_dir().join(format!("ftvm-blk-{}-{tag}.img", std::process::id()));
            let mut f = File::create(&path).unwrap();
            // Sector n is filled with byte n.
            for n in 0..sectors {
                f.write_all(&[n as u8; 512]).unwrap();
            }
            Self(path)
        }

        fn read_sector(&self, n: u64) -> Vec<u8> {
            let mut f = File::open(&self.0).unwrap();
            f.seek(SeekFrom::Start(n * 512)).unwrap();
            let mut b = vec![0u8; 512];
            f.read_exact(&mut b).unwrap();
            b
        }
    }

    impl Drop for TempDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    struct Rig<'m> {
        t: MmioTransport<Block>,
        q: TestQueue<'m>,
        wake: Arc<GuestWake>,
        _disk: TempDisk,
    }

    const HDR: u64 = 0x8_0000;
    const STATUS: u64 = 0x8_1000;

    fn rig<'m>(mem: &'m GuestMemory, tag: &str, event_idx: bool) -> (Rig<'m>, PathBuf) {
        let disk = TempDisk::new(tag, 16);
        let path = disk.0.clone();
        let wake = Arc::new(GuestWake::new().unwrap());
        let mut t = MmioTransport::new(Block::open(&disk.0).unwrap(), mem.clone(), wake.clone());
        let accept = if event_idx { u64::MAX } else { !F_RING_EVENT_IDX };
        negotiate(&mut t, accept);
        let q = TestQueue::new(mem, 0x1_0000, 16);
        q.program(&mut t, 0);
        driver_ok(&mut t);
        assert!(t.is_running());
        (Rig { t, q, wake, _disk: disk }, path)
    }

    impl Rig<'_> {
        fn submit(&mut self, mem: &GuestMemory, t: u32, sector: u64, chain: &[(u64, u32, bool)]) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&t.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            self.q.add_chain(chain);
            w32(&mut self.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        }

        /// Waits for io_uring completions and processes them as the I/O thread would, until the
        /// used ring moves.
        fn complete(&mut self) -> (u32, u32) {
            for _ in 0..500 {
                if let Some(u) = self.q.next_used() {
                    return u;
                }
                wait_readable(self.t.device().completion_fd(), 10);
                self.t.process(|b, ctx| b.process_completions(ctx)).unwrap();
            }
            panic!("no completion");
        }

        fn status(&self, mem: &GuestMemory) -> u8 {
            mem.read_obj(GuestAddress(STATUS)).unwrap()
        }
    }

    #[test]
    fn config_space_matches_virtio_drivers() {
        let disk = TempDisk::new("config", 16);
        let mem = test_memory();
        let wake = Arc::new(GuestWake::new().unwrap());
        let mut t = MmioTransport::new(Block::open(&disk.0).unwrap(), mem, wake);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        // virtio-drivers reads capacity as two u32.
        assert_eq!(r32(&mut t, 0x100), 16);
        assert_eq!(r32(&mut t, 0x104), 0);
        assert_eq!(r32(&mut t, 0x10c), 254, "seg_max");
        assert_eq!(r32(&mut t, 0x114), 512, "blk_size");
        // virtio-drivers' blk SUPPORTED_FEATURES: RO, FLUSH, RING_INDIRECT_DESC, RING_EVENT_IDX,
        // VERSION_1. A queue of 16 (its QUEUE_SIZE) must be allowed.
        let got = negotiate(&mut t, 1 << 5 | 1 << 9 | 1 << 28 | 1 << 29 | 1 << 32);
        assert_eq!(got, F_VERSION_1 | F_RING_EVENT_IDX | 1 << VIRTIO_BLK_F_FLUSH);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert!(r32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX) >= 16);
    }

    #[test]
    fn missing_disk_gives_an_operator_message() {
        let err = Block::open(Path::new("/nonexistent/ftvm/disk.img")).unwrap_err();
        assert_eq!(
            crate::devices::virtio::mmio::error_chain(&err),
            "cannot open disk /nonexistent/ftvm/disk.img: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn read_through_io_uring_lands_in_guest_memory_and_marks_it_dirty() {
        for event_idx in [false, true] {
            let mem = test_memory();
            let (mut r, _) = rig(&mem, &format!("read{event_idx}"), event_idx);
            clear_dirty(&mem);
            r.submit(
                &mem,
                VIRTIO_BLK_T_IN,
                3,
                &[(HDR, 16, false), (0x9_0000, 1024, true), (STATUS, 1, true)],
            );
            assert_eq!(r.t.device().inflight().len(), 1);
            assert_eq!(r.t.device().inflight().iter().next().unwrap().sector, 3);
            let (id, len) = r.complete();
            assert_eq!((id, len), (0, 1025));
            assert_eq!(r.status(&mem), STATUS_OK);
            assert!(r.t.device().inflight().is_empty());
            let mut got = vec![0u8; 1024];
            mem.read_slice(&mut got, GuestAddress(0x9_0000)).unwrap();
            assert_eq!(&got[..512], &[3u8; 512][..]);
            assert_eq!(&got[512..], &[4u8; 512][..]);
            assert!(is_dirty(&mem, 0x9_0000), "read data (written by the kernel)");
            assert!(is_dirty(&mem, STATUS), "status byte");
            assert!(is_dirty(&mem, r.q.used), "used ring");
            assert!(!is_dirty(&mem, 0xc_0000), "an untouched page");
            // The completion woke the guest.
            assert!(wait_readable(std::os::fd::AsRawFd::as_raw_fd(&*r.wake), 0));
        }
    }

    #[test]
    fn write_then_flush_reach_the_file() {
        let mem = test_memory();
        let (mut r, path) = rig(&mem, "write", true);
        mem.write_slice(&[0xaa; 512], GuestAddress(0x9_0000)).unwrap();
        mem.write_slice(&[0xbb; 512], GuestAddress(0xa_0000)).unwrap();
        // Two data descriptors.
        r.submit(
            &mem,
            VIRTIO_BLK_T_OUT,
            7,
            &[(HDR, 16, false), (0x9_0000, 512, false), (0xa_0000, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(r.complete(), (0, 1));
        assert_eq!(r.status(&mem), STATUS_OK);
        r.submit(&mem, VIRTIO_BLK_T_FLUSH, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(r.complete(), (4, 1));
        assert_eq!(r.status(&mem), STATUS_OK);
        let disk = TempDisk(path);
        assert_eq!(disk.read_sector(7), [0xaa; 512]);
        assert_eq!(disk.read_sector(8), [0xbb; 512]);
        assert_eq!(disk.read_sector(9), [9; 512]);
        std::mem::forget(disk); // the rig's TempDisk removes it
    }

    #[test]
    fn out_of_range_unknown_and_get_id_are_answered_at_once() {
        let mem = test_memory();
        let (mut r, _) = rig(&mem, "immediate", false);
        r.submit(
            &mem,
            VIRTIO_BLK_T_IN,
            16,
            &[(HDR, 16, false), (0x9_0000, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(r.q.next_used(), Some((0, 1)), "answered inside the notify");
        assert_eq!(r.status(&mem), STATUS_IOERR);
        r.submit(
            &mem,
            VIRTIO_BLK_T_OUT,
            15,
            &[(HDR, 16, false), (0x9_0000, 1024, false), (STATUS, 1, true)],
        );
        assert_eq!(r.q.next_used(), Some((3, 1)));
        assert_eq!(r.status(&mem), STATUS_IOERR);
        r.submit(&mem, 0x1234, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(r.q.next_used(), Some((6, 1)));
        assert_eq!(r.status(&mem), STATUS_UNSUPP);
        r.submit(
            &mem,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16, false), (0x9_0000, 20, true), (STATUS, 1, true)],
        );
        assert_eq!(r.q.next_used(), Some((8, 21)));
        assert_eq!(r.status(&mem), STATUS_OK);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x9_0000)).unwrap();
        assert_eq!(&id[..DISK_ID.len()], DISK_ID);
        // The device is still healthy.
        assert!(r.t.is_running());
        assert_eq!(r.t.device().inflight().len(), 0);
    }

    #[test]
    fn malformed_chains_never_panic() {
        let mem = test_memory();
        let (mut r, _) = rig(&mem, "malformed", true);
        // Data outside guest memory: IOERR, device keeps running.
        r.submit(
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, false), (0x7fff_0000, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(r.q.next_used(), Some((0, 1)));
        assert_eq!(r.status(&mem), STATUS_IOERR);
        // Zero-length data: IOERR.
        r.submit(
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, false), (0x9_0000, 0, true), (STATUS, 1, true)],
        );
        assert_eq!(r.q.next_used(), Some((3, 1)));
        assert_eq!(r.status(&mem), STATUS_IOERR);
        assert!(r.t.is_running());
        // A status descriptor that is not writable: the device cannot answer, needs a reset.
        r.submit(
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, false), (0x9_0000, 512, true), (STATUS, 1, false)],
        );
        assert!(!r.t.is_running());
        assert_ne!(r32(&mut r.t, VIRTIO_MMIO_STATUS) & 64, 0, "DEVICE_NEEDS_RESET");
        // The driver resets and starts again; the device works.
        let q = TestQueue::new(&mem, 0x4_0000, 16);
        negotiate(&mut r.t, u64::MAX);
        q.program(&mut r.t, 0);
        driver_ok(&mut r.t);
        assert!(r.t.is_running());
        r.q = q;
        r.submit(
            &mem,
            VIRTIO_BLK_T_IN,
            1,
            &[(HDR, 16, false), (0x9_0000, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(r.complete(), (0, 513));
        assert_eq!(r.status(&mem), STATUS_OK);
        // A loop.
        r.q.set_desc(10, HDR, 16, virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16, 11);
        r.q.set_desc(
            11,
            STATUS,
            1,
            (virtio_bindings::virtio_ring::VRING_DESC_F_NEXT
                | virtio_bindings::virtio_ring::VRING_DESC_F_WRITE) as u16,
            10,
        );
        r.q.publish(10);
        w32(&mut r.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(!r.t.is_running());
    }

    #[test]
    fn reset_waits_for_reads_in_flight() {
        let mem = test_memory();
        let (mut r, _) = rig(&mem, "reset", false);
        clear_dirty(&mem);
        r.submit(
            &mem,
            VIRTIO_BLK_T_IN,
            5,
            &[(HDR, 16, false), (0x9_0000, 4096, true), (STATUS, 1, true)],
        );
        w32(&mut r.t, VIRTIO_MMIO_STATUS, 0);
        assert!(r.t.device().inflight().is_empty());
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x9_0000)).unwrap();
        assert_eq!(got, [5u8; 512]);
        assert!(is_dirty(&mem, 0x9_0000));
    }

    /// Says yes (recording what it was told) until told to refuse.
    #[derive(Default)]
    struct Intent {
        told: std::sync::Mutex<Vec<(u64, u64)>>,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl DiskWriteIntent for Intent {
        fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::other("record full"));
            }
            self.told.lock().unwrap().push((offset, len));
            Ok(())
        }
    }

    #[test]
    fn the_intent_is_told_of_each_write_first_and_a_refusal_fails_the_write_unissued() {
        let mem = test_memory();
        let (mut r, _) = rig(&mem, "intent", true);
        let intent = Arc::new(Intent::default());
        r.t.device_mut().set_write_intent(Some(WriteIntentHook(intent.clone())));
        mem.write_slice(&[7u8; 1024], GuestAddress(0x9_0000)).unwrap();
        r.submit(&mem, VIRTIO_BLK_T_OUT, 3, &[(HDR, 16, false), (0x9_0000, 1024, false), (STATUS, 1, true)]);
        r.complete();
        assert_eq!(r.status(&mem), STATUS_OK);
        // Reads are not writes.
        r.submit(&mem, VIRTIO_BLK_T_IN, 0, &[(HDR, 16, false), (0xb_0000, 512, true), (STATUS, 1, true)]);
        r.complete();
        assert_eq!(*intent.told.lock().unwrap(), [(3 * 512, 1024)]);
        // Refused: the guest gets IOERR and the bytes never reach the disk.
        intent.refuse.store(true, std::sync::atomic::Ordering::Relaxed);
        mem.write_slice(&[9u8; 512], GuestAddress(0xa_0000)).unwrap();
        r.submit(&mem, VIRTIO_BLK_T_OUT, 8, &[(HDR, 16, false), (0xa_0000, 512, false), (STATUS, 1, true)]);
        r.complete();
        assert_eq!(r.status(&mem), STATUS_IOERR);
        let mut disk = vec![0u8; 16 * 512];
        File::open(r._disk.0.clone()).unwrap().read_exact(&mut disk).unwrap();
        assert_eq!(&disk[3 * 512..5 * 512], &[7u8; 1024][..]);
        assert_ne!(&disk[8 * 512..9 * 512], &[9u8; 512][..], "a refused write reached the disk");
    }

    /// Records what it observes.
    #[derive(Default)]
    struct Journal(std::sync::Mutex<Vec<(u64, Vec<u8>)>>);

    impl DiskWriteObserver for Journal {
        fn record(&self, sector: u64, data: &[u8]) {
            self.0.lock().unwrap().push((sector, data.to_vec()));
        }
        fn flush(&self) {
            self.0.lock().unwrap().push((u64::MAX, Vec::new()));
        }
    }

    #[test]
    fn every_write_is_observed_once_in_submission_order_with_its_bytes() {
        let mem = test_memory();
        let (mut r, _) = rig(&mem, "observer", true);
        let journal = Arc::new(Journal::default());
        r.t.device_mut().set_write_observer(Some(journal.clone()), &mem);
        let first: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        mem.write_slice(&first[..512], GuestAddress(0x9_0000)).unwrap();
        mem.write_slice(&first[512..], GuestAddress(0xa_0000)).unwrap();
        // A write split over two descriptors.
        r.submit(
            &mem,
            VIRTIO_BLK_T_OUT,
            2,
            &[(HDR, 16, false), (0x9_0000, 512, false), (0xa_0000, 512, false), (STATUS, 1, true)],
        );
        r.submit(&mem, VIRTIO_BLK_T_FLUSH, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
        // Not writes: a read, and a write past the end of the disk (refused, never submitted).
        r.submit(
            &mem,
            VIRTIO_BLK_T_IN,
            1,
            &[(HDR, 16, false), (0xb_0000, 512, true), (STATUS, 1, true)],
        );
        r.submit(
            &mem,
            VIRTIO_BLK_T_OUT,
            16,
            &[(HDR, 16, false), (0xc_0000, 512, false), (STATUS, 1, true)],
        );
        // Several chains in one notification: observed in the order of the avail ring.
        mem.write_slice(&[0x31; 512], GuestAddress(0xd_0000)).unwrap();
        mem.write_slice(&[0x32; 512], GuestAddress(0xe_0000)).unwrap();
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&9u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0xf_0000)).unwrap();
        h[8..].copy_from_slice(&4u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0xf_0100)).unwrap();
        r.q.add_chain(&[(0xf_0000, 16, false), (0xd_0000, 512, false), (0xf_1000, 1, true)]);
        r.q.add_chain(&[(0xf_0100, 16, false), (0xe_0000, 512, false), (0xf_1001, 1, true)]);
        w32(&mut r.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let mut done = 0;
        while done < 6 {
            r.complete();
            done += 1;
            while r.q.next_used().is_some() {
                done += 1;
            }
        }
        let j = journal.0.lock().unwrap();
        assert_eq!(
            *j,
            [(2, first), (u64::MAX, Vec::new()), (9, vec![0x31; 512]), (4, vec![0x32; 512])]
        );
        // The observer saw what reached the disk.
        let mut f = File::open(r._disk.0.clone()).unwrap();
        let mut disk = vec![0u8; 16 * 512];
        f.read_exact(&mut disk).unwrap();
        assert_eq!(&disk[9 * 512..10 * 512], &[0x31; 512][..]);
        assert_eq!(&disk[4 * 512..5 * 512], &[0x32; 512][..]);
    }

    #[test]
    fn an_observer_installed_late_is_shown_the_writes_still_in_flight() {
        let mem = test_memory();
        let (mut r, _) = rig(&mem, "late-observer", true);
        mem.write_slice(&[0x41; 512], GuestAddress(0x9_0000)).unwrap();
        // Submitted unobserved, not completed yet: its data may reach the file after a reader of
        // the disk (a backup's synchronisation) passed its sector.
        r.submit(&mem, VIRTIO_BLK_T_OUT, 5, &[(HDR, 16, false), (0x9_0000, 512, false), (STATUS, 1, true)]);
        r.submit(&mem, VIRTIO_BLK_T_IN, 1, &[(HDR, 16, false), (0xb_0000, 512, true), (STATUS, 1, true)]);
        let journal = Arc::new(Journal::default());
        r.t.device_mut().set_write_observer(Some(journal.clone()), &mem);
        assert_eq!(*journal.0.lock().unwrap(), [(5, vec![0x41; 512])], "the write in flight, and not the read");
        // Once completed, a write is in the file: a later observer is not shown it again.
        let mut used = 0;
        while used < 2 {
            r.complete();
            used += 1;
            while r.q.next_used().is_some() {
                used += 1;
            }
        }
        assert!(r.t.device().inflight().is_empty());
        let later = Arc::new(Journal::default());
        r.t.device_mut().set_write_observer(Some(later.clone()), &mem);
        assert!(later.0.lock().unwrap().is_empty());
    }

    #[test]
    fn complete_all_finishes_everything_in_flight() {
        let mem = test_memory();
        let (mut r, _) = rig(&mem, "complete-all", true);
        for i in 0..4u64 {
            r.q.add_chain(&[
                (HDR, 16, false),
                (0x9_0000 + i * 0x1000, 512, true),
                (0xd_0000 + i, 1, true),
            ]);
        }
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&2u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        w32(&mut r.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        r.t.process(|b, ctx| b.complete_all(ctx)).unwrap();
        assert!(r.t.device().inflight().is_empty());
        for _ in 0..4 {
            assert!(r.q.next_used().is_some());
        }
        r.t.device().sync().unwrap();
    }
}
