//! Saved state of the virtio-blk device: the disk size, and the requests in flight.
//!
//! A request is in flight from its submission to io_uring (in the guest's QueueNotify exit)
//! until the I/O thread reaps its completion and puts it in the used ring. The guest cannot see
//! whether the I/O happened, so restore simply submits each one again, in the original
//! submission order, against the restored memory and disk: a write is idempotent (the data is in
//! the saved guest memory, which the guest may not touch until the completion) and a read reads
//! again. Each then completes once, into the restored used ring, through the normal completion
//! path. A request whose completion the kernel had already posted but the I/O thread had not
//! reaped at the save is still in flight for this purpose.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use super::device::{Block, BlockOpenError, DiskWriteObserver, WriteIntentHook};
use super::handler::{Request, RequestType, Segment, SECTOR_SIZE};
use crate::devices::persist::Persist;
use crate::devices::virtio::QUEUE_MAX_SIZE;
use crate::memory::GuestMemory;

/// One data buffer of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentState {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A request handed to io_uring and not completed to the guest yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightRequestState {
    /// Head descriptor index (what the used ring gets).
    pub head: u16,
    /// IN, OUT or FLUSH.
    pub request_type: RequestType,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data buffers in guest memory.
    pub segments: Vec<SegmentState>,
    /// Guest physical address of the status byte.
    pub status_addr: u64,
}

/// The virtio-blk device model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Disk size in 512-byte sectors (the restored disk must have the same).
    pub capacity: u64,
    /// Requests in flight, in submission order.
    pub inflight: Vec<InflightRequestState>,
}

impl From<&Request> for InflightRequestState {
    fn from(r: &Request) -> Self {
        Self {
            head: r.head,
            request_type: r.request_type,
            sector: r.sector,
            segments: r.data.iter().map(|s| SegmentState { addr: s.addr.0, len: s.len }).collect(),
            status_addr: r.status_addr.0,
        }
    }
}

impl InflightRequestState {
    /// The request, checked as `parse_request` checks a chain: against the disk size and the
    /// restored guest memory.
    fn to_request(&self, capacity: u64, mem: &GuestMemory) -> Result<Request, &'static str> {
        if self.head >= QUEUE_MAX_SIZE {
            return Err("head index past the largest queue");
        }
        if !mem.check_range(GuestAddress(self.status_addr), 1) {
            return Err("status byte outside guest memory");
        }
        let data: Vec<Segment> = self
            .segments
            .iter()
            .map(|s| Segment { addr: GuestAddress(s.addr), len: s.len })
            .collect();
        for s in &data {
            if s.len == 0 || s.addr.checked_add(u64::from(s.len)).is_none() {
                return Err("empty or wrapping data buffer");
            }
            if !mem.check_range(s.addr, s.len as usize) {
                return Err("data buffer outside guest memory");
            }
        }
        let request = Request {
            head: self.head,
            request_type: self.request_type,
            sector: self.sector,
            data,
            status_addr: GuestAddress(self.status_addr),
        };
        let len = request.data_len();
        match self.request_type {
            RequestType::In | RequestType::Out => {
                if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
                    return Err("data is not whole sectors");
                }
                let fits =
                    self.sector.checked_add(len / SECTOR_SIZE).is_some_and(|e| e <= capacity);
                if !fits {
                    return Err("sectors past the end of the disk");
                }
            }
            RequestType::Flush if len == 0 => {}
            RequestType::Flush => return Err("a flush with data"),
            RequestType::GetId => return Err("GET_ID is never in flight"),
        }
        Ok(request)
    }
}

/// What a block device needs besides its state.
pub struct BlockArgs {
    /// The disk (the backup's replica).
    pub path: PathBuf,
    /// Guest memory (the backup's copy), which re-submitted requests read and write.
    pub mem: GuestMemory,
    /// Who sees writes, re-submitted ones included.
    pub observer: Option<Arc<dyn DiskWriteObserver>>,
    /// Who is told of writes before they are issued, re-submitted ones included.
    pub intent: Option<WriteIntentHook>,
}

impl fmt::Debug for BlockArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockArgs")
            .field("path", &self.path)
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a block state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockRestoreError {
    /// The disk could not be opened.
    #[error(transparent)]
    Open(#[from] BlockOpenError),
    /// The disk is not the size the state was saved with.
    #[error("the disk has {disk} sectors, the saved device had {saved}")]
    Capacity {
        /// Sectors in the state.
        saved: u64,
        /// Sectors of the disk opened.
        disk: u64,
    },
    /// An in-flight request in the state is malformed.
    #[error("saved in-flight request {head} is invalid: {reason}")]
    Request {
        /// Its head index.
        head: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// An in-flight request could not be submitted again.
    #[error("cannot submit saved in-flight request {head} again: {reason}")]
    Submit {
        /// Its head index.
        head: u16,
        /// What went wrong.
        reason: &'static str,
    },
    /// io_uring_enter failed for the re-submitted requests.
    #[error("cannot hand the re-submitted requests to the kernel")]
    Enter(#[source] io::Error),
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockRestoreError;

    fn save(&self) -> BlockState {
        BlockState {
            capacity: self.capacity(),
            inflight: self
                .inflight()
                .in_submission_order()
                .into_iter()
                .map(InflightRequestState::from)
                .collect(),
        }
    }

    /// Opens the disk and submits the saved in-flight requests again (all are checked
    /// before any is submitted). Their data moves between the disk and `args.mem` only; the
    /// completions wait in io_uring until the device I/O thread reaps them.
    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, BlockRestoreError> {
        let mut block = Block::open(&args.path)?;
        if block.capacity() != state.capacity {
            return Err(BlockRestoreError::Capacity {
                saved: state.capacity,
                disk: block.capacity(),
            });
        }
        block.set_write_intent(args.intent);
        block.set_write_observer(args.observer, &args.mem);
        let requests = state
            .inflight
            .iter()
            .map(|r| {
                r.to_request(state.capacity, &args.mem)
                    .map_err(|reason| BlockRestoreError::Request { head: r.head, reason })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for req in requests {
            let head = req.head;
            block
                .submit(req, &args.mem)
                .map_err(|e| BlockRestoreError::Submit { head, reason: e.reason })?;
        }
        if !state.inflight.is_empty() {
            block.flush_submissions().map_err(BlockRestoreError::Enter)?;
        }
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::super::handler::STATUS_OK;
    use super::*;
    use crate::devices::persist::VirtioDeviceState;
    use crate::devices::virtio::persist::MmioTransportArgs;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::MmioTransport;
    use crate::wake::GuestWake;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::Bytes;

    /// A disk file filled with byte n in sector n, removed on drop.
    pub(crate) struct TempDisk(pub PathBuf);

    impl TempDisk {
        pub(crate) fn new(sectors: u64) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("ftvm-blkp-{}-{n}.img", std::process::id()));
            let data: Vec<u8> = (0..sectors).flat_map(|s| [s as u8; 512]).collect();
            std::fs::write(&path, data).unwrap();
            Self(path)
        }

        pub(crate) fn sector(&self, n: u64) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()[(n * 512) as usize..][..512].to_vec()
        }
    }

    impl Drop for TempDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const HDR: u64 = 0x8_0000;
    const STATUS: u64 = 0x8_1000;

    struct BlockRig {
        t: MmioTransport<Block>,
        mem: &'static GuestMemory,
        q: TestQueue<'static>,
        disk: Arc<TempDisk>,
        /// Requests queued so far (each gets its own header, data and status slots).
        queued: u64,
    }

    impl BlockRig {
        /// Queues a request and notifies. Data slots are 4 KiB apart from 0x9_0000.
        fn request(&mut self, t: u32, sector: u64, data_len: u32) -> u16 {
            let n = self.queued;
            self.queued += 1;
            let (hdr, data, status) =
                (HDR + 16 * (n % 64), 0x9_0000 + 0x1000 * (n % 16), STATUS + n % 64);
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&t.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            let writable = t == VIRTIO_BLK_T_IN;
            let head = if data_len == 0 {
                self.q.add_chain(&[(hdr, 16, false), (status, 1, true)])
            } else {
                self.q.add_chain(&[(hdr, 16, false), (data, data_len, writable), (status, 1, true)])
            };
            w32(&mut self.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
            head
        }

        fn restore_into(
            &self,
            mem: &'static GuestMemory,
            disk: Arc<TempDisk>,
            observer: Option<Arc<dyn DiskWriteObserver>>,
            state: &VirtioDeviceState<BlockState>,
        ) -> BlockRig {
            let args = BlockArgs { path: disk.0.clone(), mem: mem.clone(), observer, intent: None };
            let block = Block::restore(args, &state.device).unwrap();
            let targs = MmioTransportArgs {
                device: block,
                mem: mem.clone(),
                wake: Arc::new(GuestWake::new().unwrap()),
            };
            let t = MmioTransport::restore(targs, &state.transport).unwrap();
            BlockRig { t, mem, q: self.q.on(mem), disk, queued: self.queued }
        }

        /// Reaps completions as the I/O thread would, until `n` more used entries appeared.
        fn complete(&mut self, n: usize) -> Vec<(u32, u32)> {
            let mut got = Vec::new();
            for _ in 0..500 {
                while let Some(u) = self.q.next_used() {
                    got.push(u);
                }
                if got.len() >= n {
                    return got;
                }
                wait_readable(self.t.device().completion_fd(), 10);
                self.t.process(|b, ctx| b.process_completions(ctx)).unwrap();
            }
            panic!("only {} of {n} completions", got.len());
        }
    }

    impl SuspendableRig for BlockRig {
        type State = VirtioDeviceState<BlockState>;

        fn new_running() -> Self {
            let mem = leaked_memory();
            let disk = Arc::new(TempDisk::new(64));
            let wake = Arc::new(GuestWake::new().unwrap());
            let mut t = MmioTransport::new(Block::open(&disk.0).unwrap(), mem.clone(), wake);
            negotiate(&mut t, u64::MAX);
            let q = TestQueue::new(mem, 0x1_0000, 16);
            q.program(&mut t, 0);
            driver_ok(&mut t);
            assert!(t.is_running());
            Self { t, mem, q, disk, queued: 0 }
        }
        fn pause(&mut self) {
            self.t.pause();
        }
        fn resume(&mut self) {
            self.t.resume();
        }
        fn save(&self) -> Self::State {
            VirtioDeviceState { transport: self.t.save(), device: self.t.device().save() }
        }
        fn restore_from(&self, state: &Self::State) -> Self {
            self.restore_into(self.mem, self.disk.clone(), None, state)
        }
        fn mutate(&mut self) {
            // A read that stays in flight until someone reaps it.
            self.request(VIRTIO_BLK_T_IN, 3, 512);
        }
    }

    suspendable_tests!(block_suspendable, BlockRig);

    /// Records what it observes.
    #[derive(Default)]
    struct Journal(Mutex<Vec<(u64, Vec<u8>)>>);

    impl DiskWriteObserver for Journal {
        fn record(&self, sector: u64, data: &[u8]) {
            self.0.lock().unwrap().push((sector, data.to_vec()));
        }
        fn flush(&self) {
            self.0.lock().unwrap().push((u64::MAX, Vec::new()));
        }
    }

    #[test]
    fn a_write_in_flight_completes_once_into_the_restored_memory_and_disk() {
        let mut rig = BlockRig::new_running();
        // The backup's replica of the disk, as it was before the write.
        let replica = Arc::new(TempDisk::new(64));
        std::fs::copy(&rig.disk.0, &replica.0).unwrap();

        rig.mem.write_slice(&[0x77; 1024], GuestAddress(0x9_0000)).unwrap();
        rig.request(VIRTIO_BLK_T_OUT, 5, 1024);
        rig.request(VIRTIO_BLK_T_FLUSH, 0, 0);
        // A read, also in flight.
        rig.request(VIRTIO_BLK_T_IN, 9, 512);
        assert_eq!(rig.t.device().inflight().len(), 3);
        rig.pause();
        let state = rig.save();
        assert_eq!(
            state.device.inflight.iter().map(|r| r.request_type).collect::<Vec<_>>(),
            [RequestType::Out, RequestType::Flush, RequestType::In],
            "in submission order"
        );

        let copy = copy_memory(rig.mem);
        // Scribble over the read's buffer in the copy: the re-read must overwrite it.
        copy.write_slice(&[0xee; 512], GuestAddress(0x9_2000)).unwrap();
        clear_dirty(copy);
        let journal = Arc::new(Journal::default());
        let mut b = rig.restore_into(copy, replica.clone(), Some(journal.clone()), &state);
        assert_eq!(b.t.device().inflight().len(), 3, "re-submitted");
        let mut used = b.complete(3);
        used.sort_unstable();
        assert_eq!(used, [(0, 1), (3, 1), (5, 513)], "each request completes once");
        for n in 0..3 {
            assert_eq!(copy.read_obj::<u8>(GuestAddress(STATUS + n)).unwrap(), STATUS_OK);
        }
        let mut got = vec![0u8; 512];
        copy.read_slice(&mut got, GuestAddress(0x9_2000)).unwrap();
        assert_eq!(got, [9u8; 512], "the read was read again from the replica");
        assert!(is_dirty(copy, 0x9_2000));
        assert_eq!(replica.sector(5), [0x77; 512], "the write reached the replica");
        assert_eq!(replica.sector(6), [0x77; 512]);
        assert_eq!(replica.sector(7), [7; 512]);
        // Nothing more arrives.
        std::thread::sleep(std::time::Duration::from_millis(20));
        b.t.process(|d, ctx| d.process_completions(ctx)).unwrap();
        assert_eq!(b.q.next_used(), None);
        assert!(b.t.device().inflight().is_empty());
        // Re-submitted writes and flushes are observed (a duplicate in the journal is
        // harmless, a missing one is not).
        let j = journal.0.lock().unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j[0], (5, vec![0x77; 1024]));
        assert_eq!(j[1].0, u64::MAX);
        // The primary's memory saw nothing of the backup's completions.
        assert_eq!(rig.q.used_idx(), 0);
    }

    #[test]
    fn restore_refuses_a_wrong_disk_or_bad_requests() {
        let rig = BlockRig::new_running();
        let mut state = rig.save().device;
        let args =
            |path: &PathBuf| BlockArgs { path: path.clone(), mem: rig.mem.clone(), observer: None, intent: None };
        state.capacity = 65;
        let err = Block::restore(args(&rig.disk.0), &state).unwrap_err();
        assert_eq!(err.to_string(), "the disk has 64 sectors, the saved device had 65");
        state.capacity = 64;
        let good = InflightRequestState {
            head: 1,
            request_type: RequestType::In,
            sector: 63,
            segments: vec![SegmentState { addr: 0x9_0000, len: 512 }],
            status_addr: STATUS,
        };
        let bad = [
            InflightRequestState { sector: 64, ..good.clone() },
            InflightRequestState { head: 300, ..good.clone() },
            InflightRequestState { status_addr: 0x1000_0000, ..good.clone() },
            InflightRequestState {
                segments: vec![SegmentState { addr: 0xf_ff00, len: 512 }],
                ..good.clone()
            },
            InflightRequestState {
                segments: vec![SegmentState { addr: 0x9_0000, len: 100 }],
                ..good.clone()
            },
            InflightRequestState { request_type: RequestType::GetId, ..good.clone() },
            InflightRequestState { request_type: RequestType::Flush, ..good.clone() },
        ];
        for r in bad {
            state.inflight = vec![good.clone(), r.clone()];
            let err = Block::restore(args(&rig.disk.0), &state).unwrap_err();
            assert!(matches!(err, BlockRestoreError::Request { .. }), "{r:?}: {err}");
        }
        // The same head twice cannot be in flight.
        state.inflight = vec![good.clone(), good];
        let err = Block::restore(args(&rig.disk.0), &state).unwrap_err();
        assert!(err.to_string().contains("again"), "{err}");
    }
}
