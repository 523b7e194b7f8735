//! Shared pieces of the loopback tests: a model primary (memory, disk, state), a backup receiver on
//! 127.0.0.1 with a temporary disk, a raw primary that writes hand-made frames, and comparisons.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ftvm_proto::frame::{FrameKind, FrameOpener, FrameSealer};
use ftvm_proto::handshake;
use ftvm_proto::pages::PageRangeSet;
use ftvm_proto::EpochId;
use ftvm_repl::backup::{BackupReceiver, ReceiverConfig, ReceiverStats};
use ftvm_repl::disk::{DiskReplicator, DiskWrite, MemoryDiskReplicator};
use ftvm_proto::epoch::{self as wire, EpochBegin, EpochCommit, EpochDigest, StandbyInfo};
use ftvm_repl::transport::tcp::{LinkIo, TcpOptions, TcpTransport};
use ftvm_repl::transport::{AckToken, CheckpointTransport, FlatMemory};
use ftvm_repl::PAGE_SIZE;

pub const SECRET: &[u8] = b"a-link test secret, long enough";
pub const ACK_DEADLINE: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .try_init();
}

/// xorshift64*: deterministic randomness without a dependency.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

/// A temporary standby disk path, removed on drop.
#[derive(Debug)]
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("ftvm-repl-{tag}-{}-{n}.img", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the primary's machine holds: memory, disk, machine state, and what changed since the last
/// epoch the backup acknowledged.
#[derive(Clone, Debug)]
pub struct Model {
    pub mem: Vec<u8>,
    pub disk: Vec<u8>,
    pub state: Vec<u8>,
    pub dirty: PageRangeSet,
}

impl Model {
    pub fn new(rng: &mut Rng, mem_bytes: usize, disk_bytes: usize) -> Self {
        Self { mem: rng.bytes(mem_bytes), disk: rng.bytes(disk_bytes), state: rng.bytes(300), dirty: PageRangeSet::new() }
    }

    pub fn pages(&self) -> u64 {
        (self.mem.len() / PAGE_SIZE) as u64
    }

    /// The guest runs: `pages` scattered pages (and a short run) change, the machine state
    /// changes, and `writes` disk writes go to the disk and to the replicator.
    pub fn run(&mut self, rng: &mut Rng, pages: u64, writes: u64, replicator: &mut MemoryDiskReplicator) {
        let mut left = pages;
        if pages > 4 {
            // A short run of neighbours, so ranges longer than one page occur too.
            let start = rng.below(self.pages() - 4);
            for p in start..start + 4 {
                self.dirty_page(rng, p);
            }
            left -= 4;
        }
        for _ in 0..left {
            let pfn = rng.below(self.pages());
            self.dirty_page(rng, pfn);
        }
        let state_len = 1 + rng.below(64 << 10) as usize;
        self.state = rng.bytes(state_len);
        let sectors = (self.disk.len() / 512) as u64;
        for _ in 0..writes {
            let n = 1 + rng.below(32);
            let sector = rng.below(sectors - n);
            let data = rng.bytes(n as usize * 512);
            self.disk[sector as usize * 512..][..data.len()].copy_from_slice(&data);
            replicator.record(sector, &data).unwrap();
        }
    }

    /// The guest writes a little of page `pfn`: a few bytes at random places.
    pub fn touch_page(&mut self, rng: &mut Rng, pfn: u64) {
        for _ in 0..1 + rng.below(8) {
            let at = pfn as usize * PAGE_SIZE + rng.below(PAGE_SIZE as u64) as usize;
            self.mem[at] = self.mem[at].wrapping_add(1 + rng.below(255) as u8);
        }
        self.dirty.insert(pfn, 1);
    }

    pub fn dirty_page(&mut self, rng: &mut Rng, pfn: u64) {
        let at = pfn as usize * PAGE_SIZE;
        rng.fill(&mut self.mem[at..at + PAGE_SIZE]);
        self.dirty.insert(pfn, 1);
    }
}

/// A backup that completes the handshake and says it holds nothing, then only reads (or, with
/// `read` false, reads nothing at all) until told to vanish.
pub struct FakeBackup {
    pub addr: SocketAddr,
    vanish: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeBackup {
    pub fn start(model: &Model, read: bool) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (vanish, told) = std::sync::mpsc::channel::<()>();
        let info = StandbyInfo { committed: None, restorable: false, memory_bytes: model.mem.len() as u64, disk_bytes: model.disk.len() as u64 };
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut io = &stream;
            let mut s = handshake::respond(&mut io, SECRET).unwrap();
            s.sealer.write(&mut io, FrameKind::StandbyInfo, 0, 0, &[&info.encode()]).unwrap();
            if s.minor >= 3 {
                let caps = ftvm_proto::cpu::HostCpuCaps::default().encode();
                s.sealer.write(&mut io, FrameKind::HostCpu, 0, 0, &[&caps]).unwrap();
            }
            if s.minor >= 5 {
                let marks = ftvm_proto::epoch::DiskMarks::unknown(1 << 20).encode();
                s.sealer.write(&mut io, FrameKind::DiskMarks, 0, 0, &[&marks]).unwrap();
                s.sealer.write(&mut io, FrameKind::StandbyDigest, 0, 0, &[&[0u8; 32]]).unwrap();
            }
            let drain = read.then(|| {
                let mut rd = stream.try_clone().unwrap();
                std::thread::spawn(move || {
                    let mut sink = vec![0u8; 1 << 20];
                    while matches!(std::io::Read::read(&mut rd, &mut sink), Ok(n) if n > 0) {}
                })
            });
            let _ = told.recv();
            let _ = stream.shutdown(std::net::Shutdown::Both);
            if let Some(d) = drain {
                d.join().unwrap();
            }
        });
        Self { addr, vanish, thread: Some(thread) }
    }

    /// The backup host dies: its socket closes.
    pub fn vanish(mut self) {
        let _ = self.vanish.send(());
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for FakeBackup {
    fn drop(&mut self) {
        let _ = self.vanish.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn options(model: &Model) -> TcpOptions {
    options_io(model, LinkIo::Socket)
}

/// The options of [`options`], writing to the socket with `io`.
pub fn options_io(model: &Model, io: LinkIo) -> TcpOptions {
    TcpOptions { memory_bytes: Some(model.mem.len() as u64), disk_bytes: Some(model.disk.len() as u64), io, ..TcpOptions::default() }
}

pub fn receiver_config(model: &Model, disk: &TempPath) -> ReceiverConfig {
    let mut cfg = ReceiverConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        SECRET,
        model.mem.len() as u64,
        disk.0.clone(),
        model.disk.len() as u64,
    );
    cfg.link_timeout = Duration::from_secs(3);
    cfg
}

pub fn start_backup(model: &Model, tag: &str) -> (BackupReceiver, TempPath) {
    start_backup_reading(model, tag, false)
}

/// [`start_backup`], reading the A-Link through io_uring when `uring`.
pub fn start_backup_reading(model: &Model, tag: &str, uring: bool) -> (BackupReceiver, TempPath) {
    let disk = TempPath::new(tag);
    let r = BackupReceiver::bind(ReceiverConfig { uring, ..receiver_config(model, &disk) }).unwrap();
    assert_eq!(r.stats().receive_io, if uring { "io_uring" } else { "socket" });
    (r, disk)
}

pub fn connect(addr: SocketAddr, model: &Model) -> TcpTransport {
    connect_io(addr, model, LinkIo::Socket)
}

/// [`connect`], writing to the socket with `io`.
pub fn connect_io(addr: SocketAddr, model: &Model, io: LinkIo) -> TcpTransport {
    let t = TcpTransport::connect(addr, SECRET, &options_io(model, io)).unwrap();
    assert_eq!(t.io_name(), io.name());
    t
}

/// Initial synchronisation with the machine paused throughout: every page, the whole disk and the
/// state, in one epoch; the standby is restorable at once. Clears the dirty set.
pub fn full_sync(t: &mut TcpTransport, model: &mut Model, epoch: EpochId) -> AckToken {
    let begin = EpochBegin {
        epoch,
        page_count: model.pages(),
        state_len: model.state.len() as u64,
        disk_write_count: 0,
        disk_image_bytes: model.disk.len() as u64,
        initial_sync: true,
    };
    t.begin_epoch(&begin).unwrap();
    let mut all = PageRangeSet::new();
    all.insert(0, model.pages());
    t.send_pages(&all, &FlatMemory(&model.mem)).unwrap();
    t.send_disk_image(0, &model.disk).unwrap();
    t.send_state(&model.state).unwrap();
    model.dirty.clear();
    t.commit(epoch).unwrap()
}

/// One incremental epoch: the dirty pages, the state, the sealed disk writes.
pub fn send_epoch(t: &mut TcpTransport, model: &mut Model, replicator: &mut MemoryDiskReplicator, epoch: EpochId) -> AckToken {
    let writes = replicator.seal(epoch).unwrap();
    let begin = EpochBegin {
        epoch,
        page_count: model.dirty.page_count(),
        state_len: model.state.len() as u64,
        disk_write_count: writes.len() as u64,
        disk_image_bytes: 0,
        initial_sync: false,
    };
    t.begin_epoch(&begin).unwrap();
    t.send_pages(&model.dirty, &FlatMemory(&model.mem)).unwrap();
    t.send_state(&model.state).unwrap();
    t.send_disk_writes(&writes).unwrap();
    let token = t.commit(epoch).unwrap();
    model.dirty.clear();
    token
}

pub fn wait(t: &TcpTransport, token: AckToken) -> EpochId {
    t.wait_ack(token, Instant::now() + ACK_DEADLINE).unwrap()
}

/// A model primary synchronised with a fresh backup: the set-up most loopback tests begin with.
pub struct SyncedPair {
    pub rng: Rng,
    pub model: Model,
    /// The primary's record of disk writes, for the epochs the test sends.
    pub disks: MemoryDiskReplicator,
    pub backup: BackupReceiver,
    pub t: TcpTransport,
    /// The backup's disk, removed with it.
    pub disk: TempPath,
}

/// Tracing, a model of `mem_bytes` of memory and `disk_bytes` of disk drawn from `seed`, a backup
/// whose disk is named after `tag`, a transport writing with `io`, and a full synchronisation as
/// epoch 0, acknowledged.
pub fn synced_pair(seed: u64, mem_bytes: usize, disk_bytes: usize, tag: &str, io: LinkIo) -> SyncedPair {
    init_tracing();
    let mut rng = Rng(seed);
    let mut model = Model::new(&mut rng, mem_bytes, disk_bytes);
    let disks = MemoryDiskReplicator::new(model.disk.len() as u64, 64 << 20);
    // The backup reads through io_uring when the primary writes through it.
    let (backup, disk) = start_backup_reading(&model, tag, io != LinkIo::Socket);
    let mut t = connect_io(backup.local_addr(), &model, io);
    let token = full_sync(&mut t, &mut model, EpochId(0));
    wait(&t, token);
    SyncedPair { rng, model, disks, backup, t, disk }
}

fn first_difference(a: &[u8], b: &[u8], unit: usize) -> Option<usize> {
    a.chunks(unit).zip(b.chunks(unit)).position(|(x, y)| x != y)
}

/// The backup's committed standby is exactly `model` at `epoch`: memory, state and disk. Compared
/// byte for byte; a mismatch reports the BLAKE3 hashes and the first differing page or sector.
pub fn assert_standby(r: &BackupReceiver, model: &Model, epoch: EpochId) {
    let view = r.committed().expect("a restorable standby");
    assert_eq!(view.epoch(), epoch, "committed epoch");
    let mem = view.memory();
    assert!(
        mem == &model.mem[..],
        "standby memory {} differs from the primary's {} (first page {:?})",
        blake3::hash(mem),
        blake3::hash(&model.mem),
        first_difference(mem, &model.mem, PAGE_SIZE)
    );
    assert!(view.state() == &model.state[..], "standby state differs ({} vs {} bytes)", view.state().len(), model.state.len());
    let mut disk = vec![0u8; model.disk.len()];
    view.disk().read_exact_at(&mut disk, 0).unwrap();
    assert!(
        disk == model.disk,
        "standby disk {} differs from the primary's {} (first sector {:?})",
        blake3::hash(&disk),
        blake3::hash(&model.disk),
        first_difference(&disk, &model.disk, 512)
    );
}

/// Polls the receiver's counters until `pred` holds (bounded).
pub fn wait_stats(r: &BackupReceiver, what: &str, pred: impl Fn(&ReceiverStats) -> bool) -> ReceiverStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = r.stats();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A primary that speaks the protocol by hand, so that tests can corrupt, cut, replay and forge.
pub struct RawPrimary {
    pub stream: TcpStream,
    pub sealer: FrameSealer,
    pub opener: FrameOpener,
    pub info: StandbyInfo,
    /// When set, [`Self::epoch_frames`] sends the pages as `PageDeltas` made from this memory
    /// (which must hold what the backup holds, for an honest epoch).
    pub deltas_from: Option<Vec<u8>>,
}

impl RawPrimary {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut io = &stream;
        let s = handshake::initiate(&mut io, SECRET).unwrap();
        let minor = s.minor;
        let (mut sealer, mut opener) = (s.sealer, s.opener);
        // Protocol 1.2: the primary's lease term first, answered by the standby information.
        sealer.write(&mut io, FrameKind::LeaseTerm, 0, 0, &[&0u64.to_le_bytes()]).unwrap();
        let f = opener.read(&mut io).unwrap();
        assert_eq!(f.header.kind, FrameKind::StandbyInfo);
        let info = StandbyInfo::decode(&f.payload).unwrap();
        // Protocol 1.3: the backup's CPU capabilities follow.
        if minor >= 3 {
            let f = opener.read(&mut io).unwrap();
            assert_eq!(f.header.kind, FrameKind::HostCpu);
            ftvm_proto::cpu::HostCpuCaps::decode(&f.payload).unwrap();
        }
        // Protocol 1.5: the backup's write-intent marks follow.
        if minor >= 5 {
            let f = opener.read(&mut io).unwrap();
            assert_eq!(f.header.kind, FrameKind::DiskMarks);
            ftvm_proto::epoch::DiskMarks::decode(&f.payload, info.disk_bytes).unwrap();
            let f = opener.read(&mut io).unwrap();
            assert_eq!((f.header.kind, f.payload.len()), (FrameKind::StandbyDigest, 32));
        }
        Self { stream, sealer, opener, info, deltas_from: None }
    }

    /// Seals one frame into bytes; returns them and the frame's tag.
    pub fn seal(&mut self, kind: FrameKind, epoch: u64, payload: &[&[u8]]) -> (Vec<u8>, [u8; 32]) {
        let mut out = Vec::new();
        self.sealer.write(&mut out, kind, 0, epoch, payload).unwrap();
        (out, self.sealer.last_tag().unwrap())
    }

    /// The frames of one well-formed incremental epoch, Pages frames of at most `pages_per_frame`
    /// pages; `tamper` may change the commit before it is sealed.
    pub fn epoch_frames(
        &mut self,
        epoch: EpochId,
        model: &Model,
        writes: &[DiskWrite],
        pages_per_frame: u64,
        tamper: impl FnOnce(&mut EpochCommit),
    ) -> Vec<(FrameKind, Vec<u8>)> {
        let e = epoch.0;
        let mut frames = Vec::new();
        let mut digest = EpochDigest::new(epoch);
        let begin = EpochBegin {
            epoch,
            page_count: model.dirty.page_count(),
            state_len: model.state.len() as u64,
            disk_write_count: writes.len() as u64,
            disk_image_bytes: 0,
            initial_sync: false,
        };
        let (f, tag) = self.seal(FrameKind::EpochBegin, e, &[&begin.encode()]);
        digest.add_frame(&tag);
        frames.push((FrameKind::EpochBegin, f));
        if let Some(base) = self.deltas_from.take() {
            let mut payload = Vec::new();
            ftvm_proto::page_delta::start(&mut payload);
            for pfn in model.dirty.pages() {
                let at = pfn as usize * PAGE_SIZE;
                let mut runs = Vec::new();
                ftvm_proto::xor_runs::encode(&base[at..at + PAGE_SIZE], &model.mem[at..at + PAGE_SIZE], &mut runs);
                ftvm_proto::page_delta::push(&mut payload, pfn, &model.mem[at..at + PAGE_SIZE], &runs);
            }
            let (f, tag) = self.seal(FrameKind::PageDeltas, e, &[&payload]);
            digest.add_frame(&tag);
            frames.push((FrameKind::PageDeltas, f));
            self.deltas_from = Some(base);
        }
        let whole = self.deltas_from.is_none();
        for ranges in wire::page_frames(&model.dirty, pages_per_frame).filter(|_| whole) {
            let mut head = Vec::new();
            wire::encode_pages_head(&ranges, &mut head);
            let mut pieces: Vec<&[u8]> = vec![&head];
            for r in &ranges {
                pieces.push(&model.mem[r.start as usize * PAGE_SIZE..(r.start + r.len) as usize * PAGE_SIZE]);
            }
            let (f, tag) = self.seal(FrameKind::Pages, e, &pieces);
            digest.add_frame(&tag);
            frames.push((FrameKind::Pages, f));
        }
        let (f, tag) = self.seal(FrameKind::MachineState, e, &[&model.state]);
        digest.add_frame(&tag);
        frames.push((FrameKind::MachineState, f));
        if !writes.is_empty() {
            let mut head = Vec::new();
            wire::encode_disk_writes_head(writes, &mut head);
            let mut pieces: Vec<&[u8]> = vec![&head];
            pieces.extend(writes.iter().map(|w| &w.data[..]));
            let (f, tag) = self.seal(FrameKind::DiskWrites, e, &pieces);
            digest.add_frame(&tag);
            frames.push((FrameKind::DiskWrites, f));
        }
        let mut commit = EpochCommit {
            epoch,
            pages: begin.page_count,
            state_bytes: begin.state_len,
            disk_writes: begin.disk_write_count,
            disk_image_bytes: 0,
            digest: digest.finish(),
        };
        tamper(&mut commit);
        let (f, _) = self.seal(FrameKind::EpochCommit, e, &[&commit.encode()]);
        frames.push((FrameKind::EpochCommit, f));
        frames
    }

    pub fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        // The receiver may already have dropped the link: a failed write is part of some tests.
        let _ = (&self.stream).write_all(bytes);
    }

    /// Reads the next frame (an ack), if the link is still up.
    pub fn read(&mut self) -> Result<ftvm_proto::frame::Frame, ftvm_proto::frame::FrameError> {
        let mut io = &self.stream;
        self.opener.read(&mut io)
    }
}
