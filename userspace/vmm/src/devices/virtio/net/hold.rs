//! The output-commit hold for virtio-net transmit (DESIGN "Network data path").
//!
//! In [`super::TxMode::Held`] the transmit handler appends each guest frame, with its 12-byte
//! virtio-net header, to an [`OutputHold`] and completes the descriptor at once. The checkpoint
//! engine [`OutputHold::seal`]s the frames appended so far as epoch N when it pauses the VM for
//! checkpoint N; the thread that receives the backup's acknowledgement of epoch N calls
//! [`OutputHold::release_through`]`(N)`, which writes every frame of the sealed epochs ≤ N to the
//! TAP in append order. Frames appended after the last seal belong to an epoch that is not
//! sealed yet and are never released. On failover, [`OutputHold::discard_unreleased`] drops
//! the old primary's frames that no acknowledgement covers.
//!
//! # Storage and locking
//! Frames live in one preallocated byte ring; each frame is stored contiguously (when it does
//! not fit before the end, the end is skipped and it goes to the start). The frame index
//! (offsets, sequence numbers, epoch boundaries) is under one mutex, held by an append for a
//! bounds check and a `memcpy` (about a microsecond for a full-size frame). A release holds that
//! mutex twice, briefly: to pick the frames, and to free them once written. The writes to the
//! TAP (one `write` per frame) run without it, reading the frames straight from the ring: an
//! append only ever writes bytes outside every indexed frame, and a frame's bytes are freed only
//! by the releaser after it wrote them, so the two never touch the same bytes. A second mutex
//! serialises releases (and discards) with each other, which keeps the output in order.
//!
//! When the ring has no room for a frame, [`OutputHold::append`] refuses it; the device then
//! leaves the descriptor in the guest's avail ring (backpressure, nothing is dropped) and the
//! next release that frees space writes the waker eventfd so the device retries.
//!
//! A bounded debug ring records when each epoch was sealed, when each release was asked for,
//! and when each frame was written out, for tests that check "no frame left before its epoch
//! was acknowledged".
//!
//! # Output trace
//! For a whole-system test that compares the hold with a packet capture, an
//! [`OutputTraceSink`] set with [`OutputHold::set_trace`] receives one [`TraceRecord`] per
//! append, seal, release and written frame, stamped with the real-time clock (`CLOCK_REALTIME`,
//! the clock of tcpdump's timestamps). [`FileTrace`] writes them as text lines (see
//! [`TraceRecord`]'s `Display`) from its own thread. Without a sink nothing is recorded; the
//! only cost is one `Option` check per append, seal and release.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmm_sys_util::eventfd::EventFd;

use super::handler::{FrameSink, MAX_FRAME_LEN, VNET_HDR_LEN};

/// Default ring size: 16 MiB, about 11 000 full-MTU frames, or 128 ms of a saturated 1 Gb/s
/// link, far more than one epoch sends.
pub const DEFAULT_HOLD_CAPACITY: usize = 16 << 20;
/// Default number of entries kept in the debug ring.
pub const DEFAULT_DEBUG_EVENTS: usize = 1 << 16;
/// The epoch [`OutputHold::release_all`] releases through: no acknowledgement names it, so a
/// release through it is the engine giving up on holding (simplex, or stopping), not an ack.
pub const RELEASE_ALL: u64 = u64::MAX;

/// Why an [`OutputHold`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum HoldConfigError {
    /// The ring could not hold one frame of the largest size.
    #[error("an output hold of {capacity} bytes cannot hold a {MAX_FRAME_LEN}-byte frame")]
    TooSmall {
        /// The refused capacity.
        capacity: usize,
    },
}

/// Why [`OutputHold::append`] did not take a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// No room until a release frees some; the waker is written when it does.
    #[error("the output hold is full")]
    Full,
    /// Not a frame: shorter than the virtio-net header or longer than any frame.
    #[error("a {len}-byte frame cannot be held")]
    BadLength {
        /// The frame's length.
        len: usize,
    },
}

/// Why [`OutputHold::seal`] refused an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Epochs must increase.
    #[error("epoch {epoch} sealed after epoch {last}")]
    NotIncreasing {
        /// The refused epoch.
        epoch: u64,
        /// The last epoch sealed.
        last: u64,
    },
}

/// Why [`OutputHold::release_through`] released nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// No TAP (or other output) is attached yet; the frames stay held.
    #[error("the output hold has no output attached")]
    NoOutput,
}

/// What one [`OutputHold::release_through`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Frames written out.
    pub frames: u64,
    /// Their bytes, headers included.
    pub bytes: u64,
    /// Frames the output refused (dropped, as a full TAP queue would).
    pub errors: u64,
}

/// Counters since the hold was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// Frames appended.
    pub appended: u64,
    /// Frames released (written to the output, or refused by it).
    pub released: u64,
    /// Released frames the output refused.
    pub release_errors: u64,
    /// Frames dropped by [`OutputHold::discard_unreleased`].
    pub discarded: u64,
    /// Appends refused because the ring was full.
    pub full: u64,
}

/// One entry of the debug ring. `at` is monotonic (compare within the process), `wall` is the
/// real-time clock (compare with packet captures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldEvent {
    /// `seal(epoch)` closed a batch of `frames` frames.
    Sealed {
        /// The epoch.
        epoch: u64,
        /// Frames in its batch.
        frames: u64,
        /// When.
        at: Instant,
        /// When, real time.
        wall: SystemTime,
    },
    /// `release_through(through)` was called.
    ReleaseRequested {
        /// The acknowledged epoch.
        through: u64,
        /// When.
        at: Instant,
        /// When, real time.
        wall: SystemTime,
    },
    /// A frame was written to the output.
    Released {
        /// The epoch it was sealed in.
        epoch: u64,
        /// Its append sequence number (0 for the first frame ever appended).
        seq: u64,
        /// Its length, header included.
        len: usize,
        /// Whether the output took it.
        ok: bool,
        /// When the write returned.
        at: Instant,
        /// When, real time.
        wall: SystemTime,
    },
    /// `discard_unreleased` dropped `frames` frames.
    Discarded {
        /// How many.
        frames: u64,
        /// When.
        at: Instant,
        /// When, real time.
        wall: SystemTime,
    },
}

/// The byte ring. Which bytes may be read or written when is decided by [`Index`] (see the
/// module documentation); this type only owns the allocation.
struct Storage {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Storage` owns a plain heap allocation of bytes; it has no thread affinity.
unsafe impl Send for Storage {}
// SAFETY: shared access only goes through `write_at`/`read_at`, whose callers guarantee (through
// the `Index` protocol in the module documentation) that no byte is written while another thread
// reads or writes it.
unsafe impl Sync for Storage {}

impl Storage {
    fn new(len: usize) -> Self {
        // vec! of zeros gets zeroed pages from the allocator lazily: the ring costs memory only
        // as far as it is used.
        let boxed: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let ptr = NonNull::new(Box::into_raw(boxed).cast::<u8>()).unwrap_or(NonNull::dangling());
        Self { ptr, len }
    }

    /// Copies `data` to `[off, off + data.len())`.
    ///
    /// # Safety
    /// The range lies within the ring and no other thread reads or writes it during the call.
    unsafe fn write_at(&self, off: usize, data: &[u8]) {
        debug_assert!(off + data.len() <= self.len);
        // SAFETY: in bounds and exclusive, per this function's contract; `data` is a separate
        // allocation (a caller's buffer), so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        }
    }

    /// The bytes `[off, off + len)`.
    ///
    /// # Safety
    /// The range lies within the ring and nobody writes it while the slice lives.
    unsafe fn read_at(&self, off: usize, len: usize) -> &[u8] {
        debug_assert!(off + len <= self.len);
        // SAFETY: in bounds and not written while the slice lives, per this function's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
        // SAFETY: `ptr`/`len` came from `Box::into_raw` of a `Box<[u8]>` of that length in
        // `new`, and nothing uses the storage after drop. (A zero length never happens: the
        // capacity is at least MAX_FRAME_LEN.)
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// One held frame.
#[derive(Clone, Copy, Debug)]
struct Frame {
    seq: u64,
    off: usize,
    len: usize,
}

/// A sealed epoch whose frames are not all released: frames with `seq < end_seq` (and after the
/// previous batch's end) belong to it.
#[derive(Clone, Copy, Debug)]
struct Batch {
    epoch: u64,
    end_seq: u64,
}

/// The frame index, under [`OutputHold::index`].
struct Index {
    /// Held frames in append order. Their byte ranges are the only ones in use.
    frames: VecDeque<Frame>,
    /// Sealed epochs with frames still held, in order.
    batches: VecDeque<Batch>,
    /// Offset of the first held frame's bytes (0 when empty).
    head: usize,
    /// Offset just past the last held frame's bytes (0 when empty).
    tail: usize,
    next_seq: u64,
    /// `next_seq` at the last seal: frames from here on are unsealed.
    sealed_seq: u64,
    last_sealed: Option<u64>,
    /// An append was refused: write the waker when space frees.
    space_wanted: bool,
    waker: Option<Arc<EventFd>>,
    stats: HoldStats,
    events: VecDeque<HoldEvent>,
    events_cap: usize,
    trace: Option<Arc<dyn OutputTraceSink>>,
}

impl Index {
    fn held_bytes(&self, cap: usize) -> usize {
        match (self.frames.front(), self.frames.back()) {
            (Some(_), Some(_)) if self.tail > self.head => self.tail - self.head,
            (Some(_), Some(_)) => cap - self.head + self.tail,
            _ => 0,
        }
    }

    /// Where a `len`-byte frame would go, or `None` when there is no room. Held bytes are
    /// `[head, tail)`, or `[head, cap) + [0, tail)` once wrapped; `tail == head` never happens
    /// with frames held, so the two cases stay distinguishable.
    fn place(&self, len: usize, cap: usize) -> Option<usize> {
        if self.frames.is_empty() {
            return (len <= cap).then_some(0);
        }
        if self.tail > self.head {
            if cap - self.tail >= len {
                Some(self.tail)
            } else if self.head > len {
                Some(0)
            } else {
                None
            }
        } else if self.head - self.tail > len {
            Some(self.tail)
        } else {
            None
        }
    }

    fn record(&mut self, event: HoldEvent) {
        if self.events_cap == 0 {
            return;
        }
        if self.events.len() == self.events_cap {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Drops the first `n` frames and the batches they finish; wakes a refused appender.
    fn free_front(&mut self, n: usize) {
        self.frames.drain(..n.min(self.frames.len()));
        match self.frames.front() {
            Some(f) => self.head = f.off,
            None => {
                self.head = 0;
                self.tail = 0;
            }
        }
        let first_held = self.frames.front().map_or(self.next_seq, |f| f.seq);
        while self.batches.front().is_some_and(|b| b.end_seq <= first_held) {
            self.batches.pop_front();
        }
        if n > 0 && self.space_wanted {
            self.space_wanted = false;
            if let Some(w) = &self.waker {
                // Only fails on counter overflow, and then the device is woken anyway.
                let _ = w.write(1);
            }
        }
    }
}

/// The releaser's side, under [`OutputHold::release`].
struct Releaser {
    output: Option<Box<dyn FrameSink + Send>>,
    /// Frames picked for the current release: (frame, epoch).
    todo: Vec<(Frame, u64)>,
    /// Write results, parallel to `todo`.
    done: Vec<(bool, Instant, SystemTime)>,
}

/// Guest transmit frames held until their epoch is acknowledged. Shared (`Arc`) between the
/// device (appends), the checkpoint engine (seals) and the acknowledgement receiver (releases).
pub struct OutputHold {
    storage: Storage,
    index: Mutex<Index>,
    release: Mutex<Releaser>,
    /// Signalled on an append while someone waits in [`OutputHold::wait_appended`] (the flag,
    /// read under the index lock, spares appends a system call when nobody waits).
    appended: Condvar,
    appended_waiting: AtomicBool,
}

impl fmt::Debug for OutputHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let index = self.lock_index();
        f.debug_struct("OutputHold")
            .field("capacity", &self.storage.len)
            .field("frames", &index.frames.len())
            .field("last_sealed", &index.last_sealed)
            .field("stats", &index.stats)
            .finish_non_exhaustive()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the index consistent before anything that could panic.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl OutputHold {
    /// A hold of `capacity` bytes with the default debug ring.
    pub fn new(capacity: usize) -> Result<Self, HoldConfigError> {
        Self::with_debug_events(capacity, DEFAULT_DEBUG_EVENTS)
    }

    /// A hold of `capacity` bytes whose debug ring keeps the last `debug_events` entries (0:
    /// none).
    pub fn with_debug_events(
        capacity: usize,
        debug_events: usize,
    ) -> Result<Self, HoldConfigError> {
        if capacity < MAX_FRAME_LEN {
            return Err(HoldConfigError::TooSmall { capacity });
        }
        Ok(Self {
            storage: Storage::new(capacity),
            index: Mutex::new(Index {
                frames: VecDeque::with_capacity(4096),
                batches: VecDeque::with_capacity(64),
                head: 0,
                tail: 0,
                next_seq: 0,
                sealed_seq: 0,
                last_sealed: None,
                space_wanted: false,
                waker: None,
                stats: HoldStats::default(),
                events: VecDeque::with_capacity(debug_events.min(4096)),
                events_cap: debug_events,
                trace: None,
            }),
            release: Mutex::new(Releaser { output: None, todo: Vec::new(), done: Vec::new() }),
            appended: Condvar::new(),
            appended_waiting: AtomicBool::new(false),
        })
    }

    /// Waits until more than `beyond` frames were ever appended, or `timeout` passes; returns
    /// whether they were. For one waiter (the checkpoint engine, waiting for output to commit).
    pub fn wait_appended(&self, beyond: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut index = self.lock_index();
        while index.stats.appended <= beyond {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Set under the index lock, which `append` holds when it reads it: no lost wake-up.
            self.appended_waiting.store(true, Ordering::Relaxed);
            index = self.appended.wait_timeout(index, left).map_or_else(|e| e.into_inner().0, |(g, _)| g);
            self.appended_waiting.store(false, Ordering::Relaxed);
        }
        true
    }

    fn lock_index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Ring size in bytes.
    pub fn capacity(&self) -> usize {
        self.storage.len
    }

    /// Where released frames go (the device attaches a duplicate of its TAP fd). Replaces any
    /// previous output; waits for a release in progress.
    pub fn attach_output(&self, output: Box<dyn FrameSink + Send>) {
        lock(&self.release).output = Some(output);
    }

    /// The eventfd written when a release frees space after an append was refused (the
    /// device's transmit retry).
    pub fn set_space_waker(&self, waker: Option<Arc<EventFd>>) {
        self.lock_index().waker = waker;
    }

    /// Sends a [`TraceRecord`] of every append, seal, release and written frame to `sink` from
    /// now on (`None`: stop). The sink is called with the hold's locks held, on the transmit and
    /// release paths: it must only buffer (as [`FileTrace`] does).
    pub fn set_trace(&self, sink: Option<Arc<dyn OutputTraceSink>>) {
        self.lock_index().trace = sink;
    }

    /// Appends one frame (header included) to the current, unsealed epoch.
    pub fn append(&self, frame: &[u8]) -> Result<(), AppendError> {
        let len = frame.len();
        if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
            return Err(AppendError::BadLength { len });
        }
        let mut index = self.lock_index();
        let Some(off) = index.place(len, self.storage.len) else {
            index.space_wanted = true;
            index.stats.full += 1;
            return Err(AppendError::Full);
        };
        // SAFETY: `place` returned a range inside the ring that overlaps no held frame; the
        // releaser reads only held frames, and other appenders wait for the index lock we hold.
        unsafe { self.storage.write_at(off, frame) };
        let seq = index.next_seq;
        index.frames.push_back(Frame { seq, off, len });
        index.next_seq += 1;
        if index.frames.len() == 1 {
            index.head = off;
        }
        index.tail = off + len;
        index.stats.appended += 1;
        if self.appended_waiting.load(Ordering::Relaxed) {
            self.appended.notify_one();
        }
        if let Some(trace) = &index.trace {
            trace.record(TraceRecord {
                wall_ns: wall_ns(SystemTime::now()),
                event: TraceEvent::Append { seq, len: len - VNET_HDR_LEN },
            });
        }
        Ok(())
    }

    /// Closes the batch of frames appended since the last seal as `epoch`; later appends
    /// belong to the next epoch. Returns the number of frames in the batch. Call it while the
    /// vCPUs and devices are paused for checkpoint `epoch`, so the batch is exactly the output
    /// of the state that checkpoint captures.
    pub fn seal(&self, epoch: u64) -> Result<u64, SealError> {
        self.seal_inner(epoch, None)
    }

    /// Like [`OutputHold::seal`], and appends a copy of the batch's frames (headers included) to
    /// `out`, one range of it per frame in `frames`: what the backup replays if it takes over
    /// before this side released them.
    pub fn seal_copying(
        &self,
        epoch: u64,
        out: &mut Vec<u8>,
        frames: &mut Vec<std::ops::Range<usize>>,
    ) -> Result<u64, SealError> {
        self.seal_inner(epoch, Some((out, frames)))
    }

    fn seal_inner(
        &self,
        epoch: u64,
        copy: Option<(&mut Vec<u8>, &mut Vec<std::ops::Range<usize>>)>,
    ) -> Result<u64, SealError> {
        let mut index = self.lock_index();
        if let Some(last) = index.last_sealed.filter(|&last| epoch <= last) {
            return Err(SealError::NotIncreasing { epoch, last });
        }
        if let Some((out, ranges)) = copy {
            let first = index.sealed_seq;
            let unsealed = index.frames.iter().rev().take_while(|f| f.seq >= first).count();
            let start = index.frames.len() - unsealed;
            for f in index.frames.range(start..) {
                // SAFETY: an unsealed frame is held: no release can free it before it is sealed
                // (which needs this lock), and appends never write into held frames.
                let bytes = unsafe { self.storage.read_at(f.off, f.len) };
                let at = out.len();
                out.extend_from_slice(bytes);
                ranges.push(at..out.len());
            }
        }
        let end_seq = index.next_seq;
        let frames = end_seq - index.sealed_seq;
        if frames > 0 {
            index.batches.push_back(Batch { epoch, end_seq });
        }
        index.sealed_seq = end_seq;
        index.last_sealed = Some(epoch);
        let wall = SystemTime::now();
        index.record(HoldEvent::Sealed { epoch, frames, at: Instant::now(), wall });
        if let Some(trace) = &index.trace {
            trace.record(TraceRecord {
                wall_ns: wall_ns(wall),
                event: TraceEvent::Seal { epoch, end_seq, frames },
            });
        }
        Ok(frames)
    }

    /// Writes every held frame of the sealed epochs ≤ `epoch` to the output, in append order,
    /// and frees their space. Frames of later or unsealed epochs stay held. Concurrent calls
    /// run one after the other. [`RELEASE_ALL`] is not an epoch: see
    /// [`OutputHold::release_all`].
    pub fn release_through(&self, epoch: u64) -> Result<ReleaseReport, ReleaseError> {
        let mut rel = lock(&self.release);
        let rel = &mut *rel;
        let Some(output) = rel.output.as_mut() else {
            return Err(ReleaseError::NoOutput);
        };
        rel.todo.clear();
        rel.done.clear();
        let trace;
        {
            let mut index = self.lock_index();
            let wall = SystemTime::now();
            index.record(HoldEvent::ReleaseRequested { through: epoch, at: Instant::now(), wall });
            trace = index.trace.clone();
            if let Some(trace) = &trace {
                let cause =
                    if epoch == RELEASE_ALL { ReleaseCause::Unhold } else { ReleaseCause::Ack };
                trace.record(TraceRecord {
                    wall_ns: wall_ns(wall),
                    event: TraceEvent::Release { through: epoch, cause },
                });
            }
            let mut batches = index.batches.iter().take_while(|b| b.epoch <= epoch).peekable();
            for f in &index.frames {
                // Skip the batches this frame is past (batches cover frames in order).
                while batches.peek().is_some_and(|b| f.seq >= b.end_seq) {
                    batches.next();
                }
                match batches.peek() {
                    Some(b) => rel.todo.push((*f, b.epoch)),
                    None => break,
                }
            }
        }
        let mut report = ReleaseReport::default();
        for (f, e) in &rel.todo {
            // SAFETY: the frame is held (in the index) and stays held until the index update
            // below, which only this releaser makes (releases and discards hold `self.release`);
            // appends never write into held frames.
            let bytes = unsafe { self.storage.read_at(f.off, f.len) };
            let ok = output.send_frame(bytes).is_ok();
            let wall = SystemTime::now();
            rel.done.push((ok, Instant::now(), wall));
            if let Some(trace) = &trace {
                // Outside the index lock: hashing a frame must not hold up the appender.
                let eth = bytes.get(VNET_HDR_LEN..).unwrap_or_default();
                trace.record(TraceRecord {
                    wall_ns: wall_ns(wall),
                    event: TraceEvent::Sent {
                        seq: f.seq,
                        epoch: *e,
                        len: eth.len(),
                        hash: frame_hash(eth),
                        ok,
                    },
                });
            }
            report.frames += 1;
            report.bytes += f.len as u64;
            report.errors += u64::from(!ok);
        }
        if !rel.todo.is_empty() {
            let mut index = self.lock_index();
            for ((f, e), (ok, at, wall)) in rel.todo.iter().zip(&rel.done) {
                index.record(HoldEvent::Released {
                    epoch: *e,
                    seq: f.seq,
                    len: f.len,
                    ok: *ok,
                    at: *at,
                    wall: *wall,
                });
            }
            index.stats.released += report.frames;
            index.stats.release_errors += report.errors;
            index.free_front(rel.todo.len());
        }
        if report.errors > 0 {
            tracing::trace!(errors = report.errors, "output hold: frames refused by the TAP");
        }
        Ok(report)
    }

    /// Writes out the frames of every sealed epoch, acknowledged or not (seal the open epoch
    /// first to include it). This is the engine giving up on holding (the backup is lost, or the
    /// engine stops); the output trace says so (`unhold`, where a release through an
    /// acknowledged epoch says `ack`).
    pub fn release_all(&self) -> Result<ReleaseReport, ReleaseError> {
        self.release_through(RELEASE_ALL)
    }

    /// Drops every frame not released yet, sealed or not (failover: the old primary's output
    /// that no acknowledgement covers must never leave). Returns how many were dropped.
    pub fn discard_unreleased(&self) -> u64 {
        let _rel = lock(&self.release);
        let mut index = self.lock_index();
        let n = index.frames.len();
        index.stats.discarded += n as u64;
        index.free_front(n);
        index.batches.clear();
        index.sealed_seq = index.next_seq;
        let wall = SystemTime::now();
        index.record(HoldEvent::Discarded { frames: n as u64, at: Instant::now(), wall });
        if let Some(trace) = &index.trace {
            trace.record(TraceRecord {
                wall_ns: wall_ns(wall),
                event: TraceEvent::Discard { frames: n as u64 },
            });
        }
        n as u64
    }

    /// Frames held (sealed or not).
    pub fn held_frames(&self) -> usize {
        self.lock_index().frames.len()
    }

    /// Bytes of the ring in use (frames, and any skipped end of the ring).
    pub fn held_bytes(&self) -> usize {
        self.lock_index().held_bytes(self.storage.len)
    }

    /// The last epoch sealed.
    pub fn last_sealed(&self) -> Option<u64> {
        self.lock_index().last_sealed
    }

    /// Counters.
    pub fn stats(&self) -> HoldStats {
        self.lock_index().stats
    }

    /// A copy of the debug ring, oldest first.
    pub fn debug_events(&self) -> Vec<HoldEvent> {
        self.lock_index().events.iter().copied().collect()
    }
}

/// Writes released frames to a [`FrameSink`] shared with someone else (tests, a TAP).
impl<T: FrameSink + Send + ?Sized> FrameSink for Arc<Mutex<T>> {
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        lock(self).send_frame(frame)
    }
}

/// The real-time clock as nanoseconds since the Unix epoch (0 before 1970).
fn wall_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The hash of a frame in the output trace: 64-bit FNV-1a over the Ethernet frame (the bytes after
/// the virtio-net header, i.e. what a capture on the wire shows). Not cryptographic: it only has
/// to tell the frames of one test run apart.
pub fn frame_hash(eth: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    eth.iter().fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// Why a release happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseCause {
    /// [`OutputHold::release_through`] an acknowledged epoch.
    Ack,
    /// [`OutputHold::release_all`]: the engine stopped holding without an acknowledgement.
    Unhold,
}

/// One event of the output trace (lengths are Ethernet frame bytes, without the virtio-net
/// header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// A frame entered the hold; its epoch is decided by the next seal.
    Append {
        /// Append sequence number (0 for the first frame ever appended).
        seq: u64,
        /// Frame length.
        len: usize,
    },
    /// The frames appended before (sequence numbers below `end_seq`, and not in an earlier
    /// batch) form `epoch`'s batch of `frames` frames.
    Seal {
        /// The epoch.
        epoch: u64,
        /// Sequence number of the first frame of the next epoch.
        end_seq: u64,
        /// Frames in the batch.
        frames: u64,
    },
    /// A release of the sealed epochs ≤ `through` started.
    Release {
        /// The acknowledged epoch ([`RELEASE_ALL`] for an unhold).
        through: u64,
        /// Why.
        cause: ReleaseCause,
    },
    /// A frame was written to the output (the TAP); the time is when the write returned.
    Sent {
        /// Its sequence number.
        seq: u64,
        /// The epoch it was sealed in.
        epoch: u64,
        /// Frame length.
        len: usize,
        /// [`frame_hash`] of the frame.
        hash: u64,
        /// Whether the output took it.
        ok: bool,
    },
    /// [`OutputHold::discard_unreleased`] dropped `frames` frames.
    Discard {
        /// How many.
        frames: u64,
    },
    /// The trace writer fell behind and lost `records` records (the trace is incomplete).
    Dropped {
        /// How many.
        records: u64,
    },
}

/// One line of the output trace: an event and its real-time clock reading in nanoseconds since
/// the Unix epoch. As text (`Display`, parsed back by `FromStr`), one line per record:
///
/// ```text
/// append  <t_ns> <seq> <len>
/// seal    <t_ns> <epoch> <end_seq> <frames>
/// release <t_ns> <through> ack|unhold
/// sent    <t_ns> <seq> <epoch> <len> <hash, 16 hex digits> ok|err
/// discard <t_ns> <frames>
/// dropped <t_ns> <records>
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    /// `CLOCK_REALTIME` in nanoseconds.
    pub wall_ns: u64,
    /// What happened.
    pub event: TraceEvent,
}

impl fmt::Display for TraceRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.wall_ns;
        match self.event {
            TraceEvent::Append { seq, len } => write!(f, "append {t} {seq} {len}"),
            TraceEvent::Seal { epoch, end_seq, frames } => {
                write!(f, "seal {t} {epoch} {end_seq} {frames}")
            }
            TraceEvent::Release { through, cause } => {
                let cause = match cause {
                    ReleaseCause::Ack => "ack",
                    ReleaseCause::Unhold => "unhold",
                };
                write!(f, "release {t} {through} {cause}")
            }
            TraceEvent::Sent { seq, epoch, len, hash, ok } => {
                let ok = if ok { "ok" } else { "err" };
                write!(f, "sent {t} {seq} {epoch} {len} {hash:016x} {ok}")
            }
            TraceEvent::Discard { frames } => write!(f, "discard {t} {frames}"),
            TraceEvent::Dropped { records } => write!(f, "dropped {t} {records}"),
        }
    }
}

/// A line that is not a [`TraceRecord`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not an output trace line: {line:?}")]
pub struct TraceParseError {
    /// The line.
    pub line: String,
}

impl FromStr for TraceRecord {
    type Err = TraceParseError;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let bad = || TraceParseError { line: line.to_string() };
        let mut words = line.split_ascii_whitespace();
        let kind = words.next().ok_or_else(bad)?;
        let mut num = || -> Result<u64, TraceParseError> {
            words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)
        };
        let wall_ns = num()?;
        let event = match kind {
            "append" => {
                TraceEvent::Append { seq: num()?, len: usize::try_from(num()?).map_err(|_| bad())? }
            }
            "seal" => TraceEvent::Seal { epoch: num()?, end_seq: num()?, frames: num()? },
            "discard" => TraceEvent::Discard { frames: num()? },
            "dropped" => TraceEvent::Dropped { records: num()? },
            "release" => {
                let through = num()?;
                let cause = match words.next() {
                    Some("ack") => ReleaseCause::Ack,
                    Some("unhold") => ReleaseCause::Unhold,
                    _ => return Err(bad()),
                };
                TraceEvent::Release { through, cause }
            }
            "sent" => {
                let (seq, epoch) = (num()?, num()?);
                let len = usize::try_from(num()?).map_err(|_| bad())?;
                let hash = words
                    .next()
                    .filter(|w| w.len() == 16)
                    .and_then(|w| u64::from_str_radix(w, 16).ok())
                    .ok_or_else(bad)?;
                let ok = match words.next() {
                    Some("ok") => true,
                    Some("err") => false,
                    _ => return Err(bad()),
                };
                TraceEvent::Sent { seq, epoch, len, hash, ok }
            }
            _ => return Err(bad()),
        };
        if words.next().is_some() {
            return Err(bad());
        }
        Ok(Self { wall_ns, event })
    }
}

/// Where an [`OutputHold`] reports its [`TraceRecord`]s ([`OutputHold::set_trace`]).
pub trait OutputTraceSink: Send + Sync + fmt::Debug {
    /// Takes one record. Called on the transmit and release paths with the hold's locks held:
    /// buffer it, never wait for I/O.
    fn record(&self, record: TraceRecord);
}

/// Text buffered by a [`FileTrace`] and not written yet.
#[derive(Debug, Default)]
struct TraceBuffer {
    text: Vec<u8>,
    /// Records refused because `text` was full (the writer fell behind).
    dropped: u64,
}

#[derive(Debug)]
struct FileTraceShared {
    buffer: Mutex<TraceBuffer>,
    file: Mutex<File>,
    stop: AtomicBool,
    /// The first write error, reported once.
    failed: AtomicBool,
}

impl FileTraceShared {
    /// Writes out what is buffered: the buffer is swapped for an empty one under its lock, and
    /// the file is written without it, so recording never waits for the file.
    fn flush(&self) -> io::Result<()> {
        let (text, dropped) = {
            let mut b = lock(&self.buffer);
            (std::mem::take(&mut b.text), std::mem::take(&mut b.dropped))
        };
        let mut file = lock(&self.file);
        file.write_all(&text)?;
        if dropped > 0 {
            let rec = TraceRecord {
                wall_ns: wall_ns(SystemTime::now()),
                event: TraceEvent::Dropped { records: dropped },
            };
            writeln!(file, "{rec}")?;
        }
        Ok(())
    }

    fn flush_or_report(&self) {
        if let Err(e) = self.flush() {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot write the output trace; it is incomplete");
            }
        }
    }
}

/// An [`OutputTraceSink`] that appends the records as text lines to a file. Recording formats a
/// line into a memory buffer; a thread of its own writes the buffer out every
/// [`FileTrace::FLUSH_INTERVAL`] (and when the `FileTrace` is dropped). If the writer falls
/// [`FileTrace::MAX_BUFFERED`] bytes behind, records are dropped and counted (a `dropped` line).
/// A process killed with SIGKILL loses the last interval's records.
#[derive(Debug)]
pub struct FileTrace {
    shared: Arc<FileTraceShared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl FileTrace {
    /// How often the writer thread writes the buffer out.
    pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
    /// Most bytes buffered before records are dropped.
    pub const MAX_BUFFERED: usize = 64 << 20;

    /// Creates (truncates) `path` and starts the writer thread.
    pub fn create(path: &Path) -> io::Result<Arc<Self>> {
        let file = File::create(path)?;
        let shared = Arc::new(FileTraceShared {
            buffer: Mutex::new(TraceBuffer { text: Vec::with_capacity(1 << 20), dropped: 0 }),
            file: Mutex::new(file),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new().name("output-trace".into()).spawn(move || {
                while !shared.stop.load(Ordering::Acquire) {
                    std::thread::park_timeout(Self::FLUSH_INTERVAL);
                    shared.flush_or_report();
                }
            })?
        };
        Ok(Arc::new(Self { shared, writer: Mutex::new(Some(writer)) }))
    }

    /// Writes out everything recorded so far.
    pub fn flush(&self) -> io::Result<()> {
        self.shared.flush()
    }
}

impl OutputTraceSink for FileTrace {
    fn record(&self, record: TraceRecord) {
        let mut b = lock(&self.shared.buffer);
        if b.text.len() >= Self::MAX_BUFFERED {
            b.dropped += 1;
            return;
        }
        // Writing to a Vec cannot fail.
        let _ = writeln!(b.text, "{record}");
    }
}

impl Drop for FileTrace {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(writer) = lock(&self.writer).take() {
            writer.thread().unpark();
            let _ = writer.join();
        }
        // The writer's last flush may have run before the final records.
        self.shared.flush_or_report();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use crate::devices::virtio::test_utils::wait_readable;

    /// An output that records frames, or refuses them.
    #[derive(Default)]
    struct Recorder {
        frames: Vec<Vec<u8>>,
        refuse: bool,
    }

    impl FrameSink for Recorder {
        fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
            if self.refuse {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.frames.push(frame.to_vec());
            Ok(())
        }
    }

    /// A frame of `len` bytes whose payload starts with `tag`.
    fn frame(tag: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(VNET_HDR_LEN + 4)];
        f[VNET_HDR_LEN..VNET_HDR_LEN + 4].copy_from_slice(&tag.to_le_bytes());
        for (i, b) in f[VNET_HDR_LEN + 4..].iter_mut().enumerate() {
            *b = (tag as usize + i) as u8;
        }
        f
    }

    fn tag(f: &[u8]) -> u32 {
        u32::from_le_bytes(f[VNET_HDR_LEN..VNET_HDR_LEN + 4].try_into().unwrap())
    }

    fn hold(capacity: usize) -> (OutputHold, Arc<Mutex<Recorder>>) {
        let h = OutputHold::new(capacity).unwrap();
        let out = Arc::new(Mutex::new(Recorder::default()));
        h.attach_output(Box::new(out.clone()));
        (h, out)
    }

    fn tags(out: &Arc<Mutex<Recorder>>) -> Vec<u32> {
        out.lock().unwrap().frames.iter().map(|f| tag(f)).collect()
    }

    #[test]
    fn wait_appended_wakes_on_an_append_and_times_out_without_one() {
        let hold = Arc::new(OutputHold::new(1 << 20).unwrap());
        assert!(!hold.wait_appended(0, Duration::from_millis(5)), "nothing appended");
        let appender = {
            let hold = hold.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                hold.append(&[1u8; 64]).unwrap();
            })
        };
        let t = Instant::now();
        assert!(hold.wait_appended(0, Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(5), "woken by the append, not the timeout");
        appender.join().unwrap();
        assert!(hold.wait_appended(0, Duration::ZERO), "already appended: no wait");
    }

    #[test]
    fn seal_copying_copies_exactly_the_sealed_batch() {
        let hold = OutputHold::new(1 << 20).unwrap();
        hold.append(&[1u8; 64]).unwrap();
        hold.seal(1).unwrap();
        hold.append(&[2u8; 70]).unwrap();
        hold.append(&[3u8; 80]).unwrap();
        let (mut out, mut ranges) = (Vec::new(), Vec::new());
        assert_eq!(hold.seal_copying(2, &mut out, &mut ranges).unwrap(), 2);
        assert_eq!(ranges, vec![0..70, 70..150]);
        assert!(out[..70].iter().all(|&b| b == 2) && out[70..].iter().all(|&b| b == 3));
        // An empty batch copies nothing; a refused seal copies nothing either.
        assert_eq!(hold.seal_copying(3, &mut out, &mut ranges).unwrap(), 0);
        assert!(hold.seal_copying(3, &mut out, &mut ranges).is_err());
        assert_eq!((out.len(), ranges.len()), (150, 2));
        assert_eq!(hold.held_frames(), 3);
    }

    #[test]
    fn a_hold_smaller_than_a_frame_is_refused() {
        assert!(OutputHold::new(1000).is_err());
        assert!(OutputHold::new(MAX_FRAME_LEN).is_ok());
    }

    #[test]
    fn epochs_are_released_in_order_and_only_when_sealed_and_acknowledged() {
        let (h, out) = hold(DEFAULT_HOLD_CAPACITY);
        h.append(&frame(1, 60)).unwrap();
        h.append(&frame(2, 1500)).unwrap();
        assert_eq!(h.seal(10).unwrap(), 2);
        h.append(&frame(3, 100)).unwrap();
        assert_eq!(h.seal(11).unwrap(), 1);
        assert_eq!(h.seal(12).unwrap(), 0, "an epoch without output");
        h.append(&frame(4, 100)).unwrap();
        h.append(&frame(5, 100)).unwrap();
        assert_eq!(h.seal(13).unwrap(), 2);
        h.append(&frame(6, 100)).unwrap(); // open epoch

        // Nothing before any acknowledgement; an acknowledgement older than every batch
        // releases nothing.
        assert_eq!(tags(&out), [] as [u32; 0]);
        assert_eq!(h.release_through(9).unwrap().frames, 0);
        let r = h.release_through(10).unwrap();
        assert_eq!((r.frames, r.bytes, r.errors), (2, 1560, 0));
        assert_eq!(tags(&out), [1, 2]);
        // An acknowledgement covering several epochs releases them all, in order.
        assert_eq!(h.release_through(13).unwrap().frames, 3);
        assert_eq!(tags(&out), [1, 2, 3, 4, 5]);
        // The open epoch stays, even for an acknowledgement far ahead.
        assert_eq!(h.release_through(1000).unwrap().frames, 0);
        assert_eq!(h.held_frames(), 1);
        h.seal(14).unwrap();
        h.release_through(14).unwrap();
        assert_eq!(tags(&out), [1, 2, 3, 4, 5, 6]);
        assert_eq!(h.held_frames(), 0);
        assert_eq!(h.held_bytes(), 0);
        // The bytes came out as they went in, headers included.
        assert_eq!(out.lock().unwrap().frames[1], frame(2, 1500));

        // Epochs must increase.
        assert_eq!(h.seal(14), Err(SealError::NotIncreasing { epoch: 14, last: 14 }));
        let s = h.stats();
        assert_eq!((s.appended, s.released, s.discarded), (6, 6, 0));
    }

    #[test]
    fn release_of_an_unsealed_epoch_releases_nothing_of_it() {
        let (h, out) = hold(DEFAULT_HOLD_CAPACITY);
        h.append(&frame(1, 60)).unwrap();
        h.seal(1).unwrap();
        h.append(&frame(2, 60)).unwrap();
        // Epoch 2 is still being filled: its ack cannot have come, but a confused caller must
        // not leak it.
        assert_eq!(h.release_through(2).unwrap().frames, 1);
        assert_eq!(tags(&out), [1]);
        h.append(&frame(3, 60)).unwrap();
        h.seal(2).unwrap();
        assert_eq!(h.release_through(2).unwrap().frames, 2);
        assert_eq!(tags(&out), [1, 2, 3]);
    }

    #[test]
    fn discard_drops_everything_unreleased() {
        let (h, out) = hold(DEFAULT_HOLD_CAPACITY);
        h.append(&frame(1, 60)).unwrap();
        h.seal(1).unwrap();
        h.release_through(1).unwrap();
        h.append(&frame(2, 60)).unwrap();
        h.seal(2).unwrap();
        h.append(&frame(3, 60)).unwrap();
        assert_eq!(h.discard_unreleased(), 2);
        assert_eq!(h.held_frames(), 0);
        // A later acknowledgement of epoch 2 (the old primary's) releases nothing.
        assert_eq!(h.release_through(2).unwrap().frames, 0);
        h.append(&frame(4, 60)).unwrap();
        h.seal(3).unwrap();
        h.release_through(3).unwrap();
        assert_eq!(tags(&out), [1, 4]);
        assert_eq!(h.stats().discarded, 2);
    }

    #[test]
    fn a_full_ring_refuses_appends_and_wakes_the_device_when_space_frees() {
        let cap = MAX_FRAME_LEN + 10_000;
        let (h, out) = hold(cap);
        let waker = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        h.set_space_waker(Some(waker.clone()));
        let big = MAX_FRAME_LEN / 2;
        h.append(&frame(1, big)).unwrap();
        h.append(&frame(2, big)).unwrap();
        assert_eq!(h.append(&frame(3, big)), Err(AppendError::Full));
        assert_eq!(h.append(&frame(3, 20_000)), Err(AppendError::Full));
        assert_eq!(h.stats().full, 2);
        assert!(!wait_readable(waker.as_raw_fd(), 0));
        h.seal(1).unwrap();
        // Releasing nothing wakes nobody.
        h.release_through(0).unwrap();
        assert!(!wait_readable(waker.as_raw_fd(), 0));
        h.release_through(1).unwrap();
        assert!(wait_readable(waker.as_raw_fd(), 0), "space freed: the device retries");
        assert_eq!(waker.read().unwrap(), 1);
        h.append(&frame(3, big)).unwrap();
        assert_eq!(tags(&out), [1, 2]);
        // The largest frame always fits in an empty ring.
        h.seal(2).unwrap();
        h.release_through(2).unwrap();
        h.append(&frame(4, MAX_FRAME_LEN)).unwrap();
        assert_eq!(h.append(&frame(5, 10_001)), Err(AppendError::Full));
        h.append(&frame(5, 10_000)).unwrap();
        assert_eq!(
            h.append(&[0u8; 4]),
            Err(AppendError::BadLength { len: 4 }),
            "shorter than a header"
        );
    }

    #[test]
    fn frames_wrap_around_the_ring_intact() {
        let cap = MAX_FRAME_LEN + 7_777;
        let (h, out) = hold(cap);
        let mut expected = Vec::new();
        let mut epoch = 0;
        let mut n = 0u32;
        // Many times around the ring, with sizes that do not divide it.
        for round in 0..200u32 {
            for _ in 0..3 {
                let f = frame(n, 60 + (round as usize * 997 + n as usize * 331) % 9000);
                if h.append(&f).is_err() {
                    break;
                }
                expected.push(f);
                n += 1;
            }
            epoch += 1;
            h.seal(epoch).unwrap();
            if round % 2 == 1 {
                h.release_through(epoch).unwrap();
            }
        }
        h.release_through(epoch).unwrap();
        assert_eq!(out.lock().unwrap().frames, expected);
        assert!(expected.len() > 300);
    }

    #[test]
    fn a_refused_frame_is_counted_and_the_rest_still_go() {
        let (h, out) = hold(DEFAULT_HOLD_CAPACITY);
        h.append(&frame(1, 60)).unwrap();
        h.seal(1).unwrap();
        out.lock().unwrap().refuse = true;
        assert_eq!(h.release_through(1).unwrap().errors, 1);
        out.lock().unwrap().refuse = false;
        assert_eq!(h.held_frames(), 0, "a refused frame is dropped, as a full TAP would");
        assert_eq!(h.stats().release_errors, 1);
        // Without an output nothing is lost.
        let bare = OutputHold::new(MAX_FRAME_LEN).unwrap();
        bare.append(&frame(1, 60)).unwrap();
        bare.seal(1).unwrap();
        assert!(matches!(bare.release_through(1), Err(ReleaseError::NoOutput)));
        assert_eq!(bare.held_frames(), 1);
    }

    #[test]
    fn the_debug_ring_shows_no_frame_released_before_its_acknowledgement() {
        let (h, _out) = hold(DEFAULT_HOLD_CAPACITY);
        for e in 1..=5u64 {
            h.append(&frame(e as u32, 60)).unwrap();
            h.seal(e).unwrap();
            if e % 2 == 0 {
                h.release_through(e - 1).unwrap();
            }
        }
        h.release_through(5).unwrap();
        let events = h.debug_events();
        // Replay the ring: every released frame's epoch is ≤ the latest acknowledgement so far,
        // was sealed before, and frames come out in sequence.
        let mut acked = None;
        let mut sealed = Vec::new();
        let mut next_seq = 0;
        let mut last_at = None;
        for ev in &events {
            match *ev {
                HoldEvent::Sealed { epoch, at, .. } => {
                    sealed.push(epoch);
                    last_at = Some(at);
                }
                HoldEvent::ReleaseRequested { through, at, .. } => {
                    acked = Some(through);
                    assert!(last_at.is_none_or(|l| l <= at));
                    last_at = Some(at);
                }
                HoldEvent::Released { epoch, seq, at, ok, .. } => {
                    assert!(ok);
                    assert!(acked.is_some_and(|a| epoch <= a), "{ev:?} before its ack");
                    assert!(sealed.contains(&epoch));
                    assert_eq!(seq, next_seq);
                    assert!(last_at.is_none_or(|l| l <= at));
                    next_seq += 1;
                }
                HoldEvent::Discarded { .. } => unreachable!(),
            }
        }
        assert_eq!(next_seq, 5);
        // The ring is bounded.
        let small = OutputHold::with_debug_events(MAX_FRAME_LEN, 3).unwrap();
        for e in 1..=10 {
            small.seal(e).unwrap();
        }
        let ev = small.debug_events();
        assert_eq!(ev.len(), 3);
        assert!(matches!(ev[2], HoldEvent::Sealed { epoch: 10, .. }));
    }

    #[test]
    fn release_from_another_thread_while_appending() {
        let cap = MAX_FRAME_LEN * 2;
        let (h, out) = hold(cap);
        let h = Arc::new(h);
        const FRAMES: u32 = 20_000;
        let appender = {
            let h = h.clone();
            std::thread::spawn(move || {
                let mut epoch = 0;
                let mut full = 0u64;
                for n in 0..FRAMES {
                    let f = frame(n, 60 + (n as usize * 7919) % 3000);
                    // Backpressure: wait for the releaser, as the device waits for its waker.
                    while h.append(&f).is_err() {
                        full += 1;
                        if full.is_multiple_of(64) {
                            // The releaser only frees sealed epochs: seal what is there.
                            epoch += 1;
                            h.seal(epoch).unwrap();
                        }
                        std::thread::yield_now();
                    }
                    if n % 16 == 15 {
                        epoch += 1;
                        h.seal(epoch).unwrap();
                    }
                }
                epoch += 1;
                h.seal(epoch).unwrap();
                epoch
            })
        };
        let releaser = {
            let h = h.clone();
            std::thread::spawn(move || {
                let mut spins = 0u64;
                while h.stats().released < u64::from(FRAMES) {
                    if let Some(e) = h.last_sealed() {
                        h.release_through(e).unwrap();
                    }
                    spins += 1;
                    assert!(spins < 50_000_000, "stuck");
                    std::thread::yield_now();
                }
            })
        };
        let last = appender.join().unwrap();
        releaser.join().unwrap();
        assert_eq!(h.last_sealed(), Some(last));
        let frames = &out.lock().unwrap().frames;
        assert_eq!(frames.len(), FRAMES as usize);
        for (n, f) in frames.iter().enumerate() {
            assert_eq!(*f, frame(n as u32, 60 + (n * 7919) % 3000), "frame {n}");
        }
    }

    /// A trace sink that keeps the records.
    #[derive(Debug, Default)]
    struct TraceRecorder(Mutex<Vec<TraceRecord>>);

    impl OutputTraceSink for TraceRecorder {
        fn record(&self, record: TraceRecord) {
            self.0.lock().unwrap().push(record);
        }
    }

    #[test]
    fn the_trace_reports_appends_seals_releases_and_sent_frames_in_order() {
        let (h, out) = hold(DEFAULT_HOLD_CAPACITY);
        let sink = Arc::new(TraceRecorder::default());
        h.append(&frame(9, 80)).unwrap(); // before the trace: not reported
        h.seal(1).unwrap();
        h.release_through(1).unwrap();
        h.set_trace(Some(sink.clone()));
        let (f1, f2, f3) = (frame(1, 60), frame(2, 1500), frame(3, 100));
        h.append(&f1).unwrap();
        h.append(&f2).unwrap();
        h.seal(2).unwrap();
        h.append(&f3).unwrap();
        h.seal(3).unwrap();
        h.release_through(2).unwrap();
        // The engine giving up: everything sealed leaves, and the trace tells it from an ack.
        h.release_all().unwrap();
        assert_eq!(h.discard_unreleased(), 0);
        h.set_trace(None);
        h.append(&frame(4, 60)).unwrap();
        assert_eq!(tags(&out), [9, 1, 2, 3]);

        let recs = sink.0.lock().unwrap().clone();
        let hash = |f: &[u8]| frame_hash(&f[VNET_HDR_LEN..]);
        let events: Vec<TraceEvent> = recs.iter().map(|r| r.event).collect();
        assert_eq!(
            events,
            [
                TraceEvent::Append { seq: 1, len: 60 - VNET_HDR_LEN },
                TraceEvent::Append { seq: 2, len: 1500 - VNET_HDR_LEN },
                TraceEvent::Seal { epoch: 2, end_seq: 3, frames: 2 },
                TraceEvent::Append { seq: 3, len: 100 - VNET_HDR_LEN },
                TraceEvent::Seal { epoch: 3, end_seq: 4, frames: 1 },
                TraceEvent::Release { through: 2, cause: ReleaseCause::Ack },
                TraceEvent::Sent {
                    seq: 1,
                    epoch: 2,
                    len: 60 - VNET_HDR_LEN,
                    hash: hash(&f1),
                    ok: true
                },
                TraceEvent::Sent {
                    seq: 2,
                    epoch: 2,
                    len: 1500 - VNET_HDR_LEN,
                    hash: hash(&f2),
                    ok: true
                },
                TraceEvent::Release { through: RELEASE_ALL, cause: ReleaseCause::Unhold },
                TraceEvent::Sent {
                    seq: 3,
                    epoch: 3,
                    len: 100 - VNET_HDR_LEN,
                    hash: hash(&f3),
                    ok: true
                },
                TraceEvent::Discard { frames: 0 },
            ]
        );
        // Real time, in order, and recent.
        let now = wall_ns(SystemTime::now());
        assert!(recs.windows(2).all(|w| w[0].wall_ns <= w[1].wall_ns));
        assert!(recs.iter().all(|r| r.wall_ns <= now && now - r.wall_ns < 60_000_000_000));
        // The hash is over the Ethernet frame alone, the bytes a capture shows.
        assert_ne!(hash(&f1), frame_hash(&f1));
    }

    #[test]
    fn trace_lines_read_back_as_written() {
        let records = [
            TraceEvent::Append { seq: 0, len: 54 },
            TraceEvent::Seal { epoch: 7, end_seq: 12, frames: 3 },
            TraceEvent::Release { through: 7, cause: ReleaseCause::Ack },
            TraceEvent::Release { through: RELEASE_ALL, cause: ReleaseCause::Unhold },
            TraceEvent::Sent { seq: 11, epoch: 7, len: 1514, hash: 0xab, ok: true },
            TraceEvent::Sent { seq: 12, epoch: 8, len: 60, hash: u64::MAX, ok: false },
            TraceEvent::Discard { frames: 2 },
            TraceEvent::Dropped { records: 5 },
        ]
        .map(|event| TraceRecord { wall_ns: 1_700_000_000_123_456_789, event });
        for r in records {
            let line = r.to_string();
            assert_eq!(line.parse::<TraceRecord>(), Ok(r), "{line}");
        }
        assert_eq!(
            records[4].to_string(),
            "sent 1700000000123456789 11 7 1514 00000000000000ab ok"
        );
        assert_eq!(records[2].to_string(), "release 1700000000123456789 7 ack");
        for bad in [
            "",
            "append",
            "append 1 2",
            "append 1 2 3 4",
            "seal x 1 2 3",
            "release 1 2 maybe",
            "sent 1 2 3 4 ab ok",
            "sent 1 2 3 4 00000000000000ab yes",
            "teleport 1 2",
        ] {
            assert!(bad.parse::<TraceRecord>().is_err(), "{bad:?}");
        }
        // FNV-1a 64 reference values.
        assert_eq!(frame_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(frame_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn a_file_trace_writes_lines_on_its_own_and_everything_when_dropped() {
        let path = std::env::temp_dir().join(format!("ftvm-hold-trace-{}.txt", std::process::id()));
        let trace = FileTrace::create(&path).unwrap();
        let rec = |seq| TraceRecord { wall_ns: 1, event: TraceEvent::Append { seq, len: 60 } };
        trace.record(rec(0));
        // The writer thread writes within a few intervals, without a flush or a drop.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "nothing written by the writer thread");
            std::thread::sleep(FileTrace::FLUSH_INTERVAL / 2);
        }
        for seq in 1..1000 {
            trace.record(rec(seq));
        }
        drop(trace);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let got: Vec<TraceRecord> = text.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(got, (0..1000).map(rec).collect::<Vec<_>>());
    }
}
