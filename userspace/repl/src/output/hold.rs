//! The output-commit hold for virtio-net transmit (DESIGN "Network data path").
//!
//! In `TxMode::Held` the virtio-net transmit handler appends each guest frame, with its 12-byte
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
//! An [`OutputTraceSink`] set with [`OutputHold::set_trace`] receives one record per append,
//! seal, release and written frame (see [`super::trace`]). Without a sink nothing is recorded;
//! the only cost is one `Option` check per append, seal and release.

use std::collections::VecDeque;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use ftvm_vmm::devices::virtio::net::handler::{FrameSink, MAX_FRAME_LEN, VNET_HDR_LEN};
pub use ftvm_vmm::devices::virtio::net::held::AppendError;
use ftvm_vmm::devices::virtio::net::held::FrameHold;
use vmm_sys_util::eventfd::EventFd;

use super::trace::{frame_hash, wall_ns, OutputTraceSink, ReleaseCause, TraceEvent, TraceRecord};
use crate::lock;

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
    /// release paths: it must only buffer (as [`FileTrace`](super::trace::FileTrace) does).
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

/// The device's view of the hold: it appends, and gives the output and the space waker.
impl FrameHold for OutputHold {
    fn append(&self, frame: &[u8]) -> Result<(), AppendError> {
        OutputHold::append(self, frame)
    }

    fn attach_output(&self, output: Box<dyn FrameSink + Send>) {
        OutputHold::attach_output(self, output);
    }

    fn set_space_waker(&self, waker: Option<Arc<EventFd>>) {
        OutputHold::set_space_waker(self, waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// Whether the (non-blocking) waker was written since it was last read; reads it.
    fn woken(waker: &EventFd) -> bool {
        waker.read().is_ok()
    }

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
        assert!(!woken(&waker));
        h.seal(1).unwrap();
        // Releasing nothing wakes nobody.
        h.release_through(0).unwrap();
        assert!(!woken(&waker));
        h.release_through(1).unwrap();
        assert!(woken(&waker), "space freed: the device retries");
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
}
