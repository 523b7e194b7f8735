//! What the fuzz targets share: a reader over the fuzzer's bytes, descriptions of A-Link frames
//! that a target seals itself (with a key it knows, so that inputs get past the tag check and
//! reach the decoders behind it), an in-memory stream, and an allocation counter.
//!
//! The seed generator (`examples/seeds.rs`) writes inputs in the same formats, with the encoders
//! here, so a format changes in one place.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use ftvm_proto::frame::{FrameKind, FrameSealer};

/// The session key the frame targets seal with.
pub const KEY: [u8; 32] = [0x5a; 32];
/// The shared secret of the handshake target (long enough for `MIN_SECRET_LEN`).
pub const SECRET: &[u8] = b"ftvm fuzzing shared secret";

/// Every frame kind, so that one input byte picks one (index modulo the length).
pub const KINDS: [FrameKind; 26] = [
    FrameKind::Hello,
    FrameKind::Refused,
    FrameKind::EpochBegin,
    FrameKind::Pages,
    FrameKind::VcpuState,
    FrameKind::DeviceState,
    FrameKind::DiskWrites,
    FrameKind::EpochCommit,
    FrameKind::EpochAck,
    FrameKind::MachineState,
    FrameKind::DiskImage,
    FrameKind::StandbyInfo,
    FrameKind::HeldOutput,
    FrameKind::LeaseTerm,
    FrameKind::HostCpu,
    FrameKind::DiskMarks,
    FrameKind::StandbyDigest,
    FrameKind::Heartbeat,
    FrameKind::HeartbeatReply,
    FrameKind::Goodbye,
    FrameKind::TakingOver,
    FrameKind::Handover,
    FrameKind::WitnessRequest,
    FrameKind::WitnessReply,
    // Appended, so that the indices of the kinds before them (and the seeds that use them) stay.
    FrameKind::RdmaEndpoint,
    FrameKind::RdmaPages,
];

/// Reads the fuzzer's bytes front to back; past the end every number is 0 and every slice short,
/// so a target never has to reject an input for being too short.
#[derive(Debug)]
pub struct Input<'a> {
    b: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    /// True when every byte was read.
    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.b.split_at(n.min(self.b.len()));
        self.b = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.b.len())
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        let mut a = [0u8; 2];
        let b = self.bytes(2);
        a[..b.len()].copy_from_slice(b);
        u16::from_le_bytes(a)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        let b = self.bytes(8);
        a[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(a)
    }
}

/// A frame to seal: `kind u8 (index into KINDS) | flags u16 | epoch u8 | len u16 | payload`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    /// Its kind.
    pub kind: FrameKind,
    /// Its flags.
    pub flags: u16,
    /// Its epoch.
    pub epoch: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl FrameSpec {
    /// The next description, `None` at the end of the input.
    pub fn read(input: &mut Input<'_>) -> Option<Self> {
        if input.is_empty() {
            return None;
        }
        let kind = KINDS[usize::from(input.u8()) % KINDS.len()];
        let flags = input.u16();
        let epoch = u64::from(input.u8());
        let len = usize::from(input.u16());
        Some(Self { kind, flags, epoch, payload: input.bytes(len).to_vec() })
    }

    /// Appends the description (the inverse of [`FrameSpec::read`], for seeds).
    pub fn write(&self, out: &mut Vec<u8>) {
        let kind = KINDS.iter().position(|&k| k == self.kind).expect("every kind is listed");
        out.push(kind as u8);
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.push(u8::try_from(self.epoch).expect("seed epochs fit in a byte"));
        out.extend_from_slice(&u16::try_from(self.payload.len()).expect("seed payloads fit").to_le_bytes());
        out.extend_from_slice(&self.payload);
    }
}

/// Seals `specs` with `key` into one stream, sequence numbers 1, 2, …; returns the stream and the
/// byte range of each frame in it.
pub fn seal(key: [u8; 32], specs: &[FrameSpec]) -> (Vec<u8>, Vec<Range<usize>>) {
    let mut sealer = FrameSealer::new(key);
    let mut out = Vec::new();
    let mut ranges = Vec::with_capacity(specs.len());
    for s in specs {
        let start = out.len();
        sealer.write(&mut out, s.kind, s.flags, s.epoch, &[&s.payload]).expect("u16 payloads are under the limit");
        ranges.push(start..out.len());
    }
    (out, ranges)
}

/// An in-memory stream: reads come from `input`, at most `chunk` bytes per call (so the
/// readers' loops over short reads run too), writes go to `output`.
#[derive(Debug)]
pub struct Pipe<'a> {
    /// What the peer sent.
    pub input: &'a [u8],
    /// What this side wrote.
    pub output: Vec<u8>,
    /// Most bytes one read returns (at least 1).
    pub chunk: usize,
}

impl Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.input.len()).min(self.chunk.max(1));
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes and their peak, for targets that check how much a
/// decoder allocates before it has checked its input. A target opts in with
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.
#[derive(Debug)]
pub struct CountingAlloc;

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old block stays live until the copy is done: count both at the peak.
            grew(new_size);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes it had allocated at once (beyond what was
/// live when it started). Meaningful only in a target that installed [`CountingAlloc`].
pub fn peak_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}
