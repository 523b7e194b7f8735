//! The log as a whole: opening it at boot, the header, the active region's writer, and the
//! background rewrite into the free region, which the main loop advances a bounded step at a
//! time ([`Aof::step`]) while it serves. The format, the rewrite's steps and why every one of
//! them is crash-safe are in [`crate::aof`]'s module docs.

use alloc::vec;
use alloc::vec::Vec;

use crate::aof::{
    record_len, DiskOp, Header, LogFull, LogWriter, Replay, ReplayStop, FIRST_RECORD, SECTOR,
    VERSION,
};
use crate::store::{Store, ENTRY_OVERHEAD};

/// Smallest region of the two-region layout: a smaller disk keeps one log over all of it, and
/// never rewrites it.
pub const MIN_REGION: u64 = 16 * SECTOR as u64;
/// Bytes of copied records one [`Aof::step`] appends at most.
pub const STEP_BYTES: usize = 64 * 1024;
/// [`Aof::step`] copies nothing while this many bytes wait to be written to the new region.
pub const MAX_BACKLOG: u64 = 1 << 20;
/// Bytes read per request while replaying.
pub const REPLAY_CHUNK: usize = 256 * 1024;

const SECTOR_BYTES: u64 = SECTOR as u64;

/// A byte range of the disk that holds one log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Region {
    /// End (exclusive).
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    fn of(h: &Header) -> Self {
        Self {
            start: h.start,
            len: h.len,
        }
    }
}

/// The two halves of a disk of `disk_bytes` bytes after its header sector (the second gets the
/// odd sector); `None` if they would be smaller than [`MIN_REGION`].
pub fn standard_regions(disk_bytes: u64) -> Option<(Region, Region)> {
    let data = disk_bytes.checked_sub(FIRST_RECORD)? / SECTOR_BYTES * SECTOR_BYTES;
    let half = data / 2 / SECTOR_BYTES * SECTOR_BYTES;
    if half < MIN_REGION {
        return None;
    }
    Some((
        Region {
            start: FIRST_RECORD,
            len: half,
        },
        Region {
            start: FIRST_RECORD + half,
            len: data - half,
        },
    ))
}

/// Where a rewrite of the log in `active`, appended up to `end`, goes: the active region's
/// length from now on (shorter only for a version-1 log over the whole disk) and the target,
/// which does not overlap it. `None` if the disk has no room for one.
pub fn plan(disk_bytes: u64, active: Region, end: u64) -> Option<(u64, Region)> {
    let (a, b) = standard_regions(disk_bytes)?;
    if active.end() <= b.start {
        return Some((active.len, b));
    }
    if active.start >= b.start {
        return Some((active.len, a));
    }
    // A version-1 log over the whole disk: it keeps the first half if it fits there with room to
    // grow during the copy, else the rewrite goes to the last half of the space behind it.
    if active.start == a.start && end <= a.start + a.len / 4 * 3 {
        return Some((a.len, b));
    }
    let disk_end = disk_bytes / SECTOR_BYTES * SECTOR_BYTES;
    let mid = (end + disk_end.saturating_sub(end) / 2) / SECTOR_BYTES * SECTOR_BYTES;
    if mid < end || mid < active.start || disk_end < mid + MIN_REGION {
        return None;
    }
    Some((
        mid - active.start,
        Region {
            start: mid,
            len: disk_end - mid,
        },
    ))
}

/// Bytes the live keys take as `SET` records: what a rewrite writes.
pub fn live_bytes(store: &Store) -> u64 {
    let per_key = record_len(&[b"SET", b"", b""]);
    (store.used_bytes() - store.len() * ENTRY_OVERHEAD + store.len() * per_key) as u64
}

/// What [`open`] found, and where appending resumes.
#[derive(Debug)]
pub struct Opened {
    /// The header on the disk (`None`: a blank disk, or not one of ours).
    pub found: Option<Header>,
    /// The header to write (and flush) before serving: the one found, with the generation bumped,
    /// as version 2.
    pub header: Header,
    /// Size of the disk.
    pub disk_bytes: u64,
    /// Disk offset just after the last good record.
    pub end: u64,
    /// The bytes from the start of `end`'s sector up to `end`.
    pub tail: Vec<u8>,
    /// Records replayed.
    pub records: u64,
    /// Why replay stopped.
    pub stop: Option<ReplayStop>,
}

impl Opened {
    /// A blank disk: the first of the two standard regions (or, on a tiny disk, all of it) with
    /// generation 1.
    pub fn blank(disk_bytes: u64) -> Self {
        let region = standard_regions(disk_bytes).map_or(
            Region {
                start: FIRST_RECORD,
                len: disk_bytes.saturating_sub(FIRST_RECORD) / SECTOR_BYTES * SECTOR_BYTES,
            },
            |(a, _)| a,
        );
        Self {
            found: None,
            header: Header {
                version: VERSION,
                generation: 1,
                base_generation: 1,
                start: region.start,
                len: region.len,
            },
            disk_bytes,
            end: region.start,
            tail: Vec::new(),
            records: 0,
            stop: None,
        }
    }

    /// Bytes of good records replayed.
    pub fn bytes(&self) -> u64 {
        self.end - self.header.start
    }
}

/// Reads whole sectors from the disk: (first sector, buffer).
pub type ReadSectors<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), &'static str> + 'a;

/// Reads the header through `read` and replays the active region's records through `apply`.
pub fn open(
    disk_bytes: u64,
    read: &mut ReadSectors<'_>,
    apply: &mut dyn FnMut(&[&[u8]]),
) -> Result<Opened, &'static str> {
    if disk_bytes < 2 * SECTOR_BYTES {
        return Err("block device too small for the log");
    }
    let mut sector = vec![0u8; SECTOR];
    read(0, &mut sector)?;
    let Some(found) = Header::decode(&sector, disk_bytes) else {
        return Ok(Opened::blank(disk_bytes));
    };
    if !found.fits(disk_bytes) {
        return Err("the log header names a region outside the disk");
    }
    let generation = found
        .generation
        .checked_add(1)
        .ok_or("the log's generation counter is exhausted")?;
    let mut replay = Replay::new(
        found.start,
        found.end(),
        found.base_generation,
        found.generation,
    );
    let mut chunk = vec![0u8; REPLAY_CHUNK.min(found.len as usize)];
    let mut off = found.start;
    while off < found.end() {
        let n = (chunk.len() as u64).min(found.end() - off) as usize;
        read(off / SECTOR_BYTES, &mut chunk[..n])?;
        off += n as u64;
        if !replay.feed(&chunk[..n], apply) {
            break;
        }
    }
    replay.finish();
    let end = replay.end();
    let mut tail = Vec::new();
    if !end.is_multiple_of(SECTOR_BYTES) {
        read(end / SECTOR_BYTES, &mut sector)?;
        tail.extend_from_slice(&sector[..(end % SECTOR_BYTES) as usize]);
    }
    Ok(Opened {
        found: Some(found),
        header: Header {
            version: VERSION,
            generation,
            ..found
        },
        disk_bytes,
        end,
        tail,
        records: replay.records(),
        stop: replay.stopped(),
    })
}

/// Names the writer (or the header) a disk request came from, so that its completion goes back
/// to it ([`Aof::op_done`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpTag(u32);

const HEADER_TAG: OpTag = OpTag(0);

/// A writer of one region.
#[derive(Debug)]
struct Lane {
    id: u32,
    w: LogWriter,
    region: Region,
}

/// Where the rewrite is (see [`crate::aof`]'s module docs).
#[derive(Debug)]
enum Phase {
    Idle,
    /// The header with the rewrite's generation is being made durable.
    Starting {
        target: Region,
    },
    /// Copying the keys after `cursor`; writes go to both logs.
    Copying {
        target: Lane,
        cursor: Option<Vec<u8>>,
    },
    /// Every key is copied; writes go to the new log only; waiting for it to be durable up to
    /// `mark`.
    Draining {
        target: Lane,
        mark: u64,
    },
    /// The header naming the new region is being made durable.
    Switching {
        target: Lane,
    },
}

/// The header sector's write and flush.
#[derive(Debug)]
enum HeaderIo {
    Idle,
    Pending(Vec<u8>),
    Writing,
    FlushPending,
    Flushing,
    Done,
}

/// Something for the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A rewrite started.
    Started {
        /// The active log's region (as the start header left it) and size.
        from: Region,
        /// Bytes in the active log.
        log_bytes: u64,
        /// Where the new log goes.
        to: Region,
        /// Estimated bytes of the copy.
        live_bytes: u64,
    },
    /// The new log is active.
    Finished {
        /// Its region.
        region: Region,
        /// Its size at the switch.
        bytes: u64,
    },
    /// The rewrite gave up (the old log carries on).
    Abandoned(&'static str),
}

/// Rewrite figures for `INFO`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RewriteStats {
    /// Rewrites completed since boot.
    pub rewrites: u64,
    /// Rewrites abandoned since boot.
    pub abandoned: u64,
    /// Size of the new log when the last rewrite switched to it.
    pub last_bytes: u64,
    /// Size of the log after the last rewrite (at boot: after replay).
    pub base_size: u64,
    /// The last rewrite was abandoned.
    pub last_failed: bool,
}

/// How a rewrite request was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewriteStart {
    /// It started.
    Started,
    /// It starts once the last rewrite's old writer has finished its requests.
    Scheduled,
}

/// `-ERR` text of a rewrite request while one runs (Redis's).
pub const ERR_REWRITE_RUNNING: &str =
    "ERR Background append only file rewriting already in progress";
/// `-ERR` text of a rewrite request without a log.
pub const ERR_NO_LOG: &str = "ERR no disk log to rewrite (no block device, or a read-only one)";
/// `-ERR` text when the disk has no free region for the live data.
pub const ERR_NO_ROOM: &str = "ERR the disk has no free region that holds the live data";

/// The append-only log: the active region's writer, the header, and the background rewrite.
#[derive(Debug)]
pub struct Aof {
    enabled: bool,
    flush_supported: bool,
    disk_bytes: u64,
    /// The header as last written (or being written).
    header: Header,
    active: Lane,
    phase: Phase,
    /// Writers that are done with but still have requests in flight.
    retiring: Vec<Lane>,
    header_io: HeaderIo,
    next_id: u32,
    scheduled: bool,
    /// After an abandoned rewrite: the active log size below which none starts by itself.
    retry_at: u64,
    failures: u64,
    step_bytes: usize,
    stats: RewriteStats,
    events: Vec<Event>,
}

impl Aof {
    /// No device: every write is durable at once and nothing is written or rewritten.
    pub fn disabled() -> Self {
        let mut aof = Self::new(&Opened::blank(0), false);
        aof.enabled = false;
        aof.active.w = LogWriter::disabled();
        aof
    }

    /// The log on a disk that has just been opened (and whose `opened.header` is on the disk).
    pub fn new(opened: &Opened, flush_supported: bool) -> Self {
        let h = opened.header;
        let active = Lane {
            id: 1,
            w: LogWriter::new(
                h.generation,
                h.end(),
                opened.end,
                opened.tail.clone(),
                flush_supported,
            ),
            region: Region::of(&h),
        };
        Self {
            enabled: true,
            flush_supported,
            disk_bytes: opened.disk_bytes,
            header: h,
            active,
            phase: Phase::Idle,
            retiring: Vec::new(),
            header_io: HeaderIo::Idle,
            next_id: 2,
            scheduled: false,
            retry_at: 0,
            failures: 0,
            step_bytes: STEP_BYTES,
            stats: RewriteStats {
                base_size: opened.bytes(),
                ..RewriteStats::default()
            },
            events: Vec::new(),
        }
    }

    /// A blank disk of `disk_bytes` bytes (its header not written: for tests of the commands).
    pub fn blank(disk_bytes: u64, flush_supported: bool) -> Self {
        Self::new(&Opened::blank(disk_bytes), flush_supported)
    }

    /// True when records go to a device.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The writer new records go to.
    fn appending(&self) -> &Lane {
        match &self.phase {
            Phase::Draining { target, .. } | Phase::Switching { target } => target,
            _ => &self.active,
        }
    }

    /// Sequence number of the last write.
    pub fn last_seq(&self) -> u64 {
        self.appending().w.last_seq()
    }

    /// Every write up to this sequence number is durable in the log that replay reads.
    pub fn durable_seq(&self) -> u64 {
        // Until the switch is durable, replay may read the old log: during the drain and the
        // switch it gets no new records, so writes after the drain wait.
        self.active.w.durable_seq()
    }

    /// Bytes in the log new records go to.
    pub fn current_size(&self) -> u64 {
        let l = self.appending();
        l.w.end() - l.region.start
    }

    /// Size of the region new records go to.
    pub fn region_size(&self) -> u64 {
        self.appending().region.len
    }

    /// The header as last written.
    pub fn header(&self) -> Header {
        self.header
    }

    /// Failed disk requests so far (each was retried).
    pub fn write_failures(&self) -> u64 {
        self.failures
    }

    /// A rewrite runs.
    pub fn rewrite_in_progress(&self) -> bool {
        !matches!(self.phase, Phase::Idle)
    }

    /// A rewrite was asked for and waits for the last one's old writer.
    pub fn rewrite_scheduled(&self) -> bool {
        self.scheduled
    }

    /// Rewrite figures.
    pub fn stats(&self) -> RewriteStats {
        self.stats
    }

    /// What happened since the last call, for the console.
    pub fn take_events(&mut self) -> Vec<Event> {
        core::mem::take(&mut self.events)
    }

    /// Sets the bytes of copied records per step (tests drive the copy in small steps).
    pub fn set_step_bytes(&mut self, bytes: usize) {
        self.step_bytes = bytes.max(1);
    }

    /// Appends a write's record; returns its sequence number.
    pub fn append(&mut self, args: &[&[u8]]) -> Result<u64, LogFull> {
        let target_full = match &mut self.phase {
            Phase::Draining { target, .. } | Phase::Switching { target } => {
                return target.w.append(args)
            }
            Phase::Copying { target, .. } => {
                if !self.active.w.fits(args) {
                    return Err(LogFull);
                }
                if target.w.fits(args) {
                    let seq = self.active.w.append(args)?;
                    target.w.append(args)?;
                    return Ok(seq);
                }
                true
            }
            _ => false,
        };
        if target_full {
            self.abandon("the new log's region is full");
        }
        self.active.w.append(args)
    }

    /// The next request for the device, if any. Call until it returns `None`; hand each back
    /// through [`Aof::op_done`].
    pub fn next_op(&mut self) -> Option<(OpTag, DiskOp)> {
        match core::mem::replace(&mut self.header_io, HeaderIo::Idle) {
            HeaderIo::Pending(data) => {
                self.header_io = HeaderIo::Writing;
                return Some((HEADER_TAG, DiskOp::Write { sector: 0, data }));
            }
            HeaderIo::FlushPending => {
                self.header_io = HeaderIo::Flushing;
                return Some((HEADER_TAG, DiskOp::Flush));
            }
            other => self.header_io = other,
        }
        if let Some(op) = self.active.w.next_op() {
            return Some((OpTag(self.active.id), op));
        }
        let target = match &mut self.phase {
            Phase::Copying { target, .. }
            | Phase::Draining { target, .. }
            | Phase::Switching { target } => target,
            _ => return None,
        };
        let op = target.w.next_op()?;
        Some((OpTag(target.id), op))
    }

    /// A request from [`Aof::next_op`] completed (`ok`) or failed (it is sent again).
    pub fn op_done(&mut self, tag: OpTag, op: DiskOp, ok: bool) {
        if !ok {
            self.failures += 1;
        }
        if tag == HEADER_TAG {
            self.header_io = match (op, ok) {
                (DiskOp::Write { .. }, true) if self.flush_supported => HeaderIo::FlushPending,
                (DiskOp::Write { .. }, true) | (DiskOp::Flush, true) => HeaderIo::Done,
                (DiskOp::Write { data, .. }, false) => HeaderIo::Pending(data),
                (DiskOp::Flush, false) => HeaderIo::FlushPending,
            };
            return;
        }
        let target = match &mut self.phase {
            Phase::Copying { target, .. }
            | Phase::Draining { target, .. }
            | Phase::Switching { target } => Some(target),
            _ => None,
        };
        let lane = core::iter::once(&mut self.active)
            .chain(target)
            .chain(self.retiring.iter_mut())
            .find(|l| OpTag(l.id) == tag);
        if let Some(lane) = lane {
            lane.w.done(op, ok);
        }
    }

    /// Asks for a rewrite (`BGREWRITEAOF`); the error is the reply's text.
    pub fn request_rewrite(&mut self, store: &Store) -> Result<RewriteStart, &'static str> {
        if !self.enabled {
            return Err(ERR_NO_LOG);
        }
        if self.rewrite_in_progress() {
            return Err(ERR_REWRITE_RUNNING);
        }
        if !self.can_start() {
            self.scheduled = true;
            return Ok(RewriteStart::Scheduled);
        }
        self.begin(store).map(|()| RewriteStart::Started)
    }

    fn can_start(&self) -> bool {
        self.enabled
            && matches!(self.phase, Phase::Idle)
            && matches!(self.header_io, HeaderIo::Idle)
            && self.retiring.is_empty()
    }

    /// True when the log is big enough, and the live data small enough, for a rewrite to pay.
    fn due(&self, store: &Store) -> bool {
        let used = self.active.w.end() - self.active.region.start;
        // A version-1 log over the whole disk counts against the region it will keep.
        let len = plan(self.disk_bytes, self.active.region, self.active.w.end())
            .map_or(self.active.region.len, |(len, _)| len);
        if used < len / 2 || used < self.retry_at {
            return false;
        }
        let live = live_bytes(store);
        live.saturating_mul(2) <= used || (used >= len / 4 * 3 && live + len / 8 <= used)
    }

    /// Starts a rewrite: writes the header with the rewrite's generation.
    fn begin(&mut self, store: &Store) -> Result<(), &'static str> {
        self.scheduled = false;
        let end = self.active.w.end();
        let live = live_bytes(store);
        let generation = self.header.generation.checked_add(1);
        let (active_len, target) =
            match (plan(self.disk_bytes, self.active.region, end), generation) {
                (Some((len, target)), Some(_)) if live + target.len / 8 <= target.len => {
                    (len, target)
                }
                _ => {
                    self.stats.last_failed = true;
                    self.retry_at = self.retry_at.max(end - self.active.region.start)
                        + self.active.region.len / 16;
                    return Err(ERR_NO_ROOM);
                }
            };
        self.active.region.len = active_len;
        self.active.w.set_capacity(self.active.region.end());
        self.header = Header {
            version: VERSION,
            generation: generation.unwrap_or(self.header.generation),
            len: active_len,
            ..self.header
        };
        self.header_io = HeaderIo::Pending(self.header.encode().to_vec());
        self.phase = Phase::Starting { target };
        self.events.push(Event::Started {
            from: self.active.region,
            log_bytes: end - self.active.region.start,
            to: target,
            live_bytes: live,
        });
        Ok(())
    }

    /// Gives up the copy: the new log's writer retires, the old log carries on.
    fn abandon(&mut self, why: &'static str) {
        if let Phase::Copying { target, .. } = core::mem::replace(&mut self.phase, Phase::Idle) {
            self.retiring.push(target);
        }
        self.stats.abandoned += 1;
        self.stats.last_failed = true;
        let used = self.active.w.end() - self.active.region.start;
        self.retry_at = used + self.active.region.len / 16;
        self.events.push(Event::Abandoned(why));
    }

    /// Advances the rewrite (starting one when it is due); call once per main-loop turn. True if
    /// it did anything.
    pub fn step(&mut self, store: &Store) -> bool {
        if !self.enabled {
            return false;
        }
        self.retiring.retain(|l| l.w.busy());
        let done = matches!(self.header_io, HeaderIo::Done);
        match core::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Idle => {
                if !self.can_start() || !(self.scheduled || self.due(store)) {
                    return false;
                }
                if let Err(why) = self.begin(store) {
                    self.events.push(Event::Abandoned(why));
                }
                true
            }
            Phase::Starting { target } if done => {
                self.header_io = HeaderIo::Idle;
                let w = LogWriter::new(
                    self.header.generation,
                    target.end(),
                    target.start,
                    Vec::new(),
                    self.flush_supported,
                )
                .at_seq(self.active.w.last_seq());
                let target = Lane {
                    id: self.next_id,
                    w,
                    region: target,
                };
                self.next_id += 1;
                self.phase = Phase::Copying {
                    target,
                    cursor: None,
                };
                true
            }
            Phase::Copying { target, cursor } => self.copy(store, target, cursor),
            Phase::Draining { target, mark } if target.w.durable_end() >= mark => {
                self.header = Header {
                    version: VERSION,
                    generation: self.header.generation,
                    base_generation: self.header.generation,
                    start: target.region.start,
                    len: target.region.len,
                };
                self.header_io = HeaderIo::Pending(self.header.encode().to_vec());
                self.phase = Phase::Switching { target };
                true
            }
            Phase::Switching { target } if done => {
                self.header_io = HeaderIo::Idle;
                let old = core::mem::replace(&mut self.active, target);
                self.retiring.push(old);
                let bytes = self.active.w.end() - self.active.region.start;
                self.stats.rewrites += 1;
                self.stats.last_bytes = bytes;
                self.stats.base_size = bytes;
                self.stats.last_failed = false;
                self.retry_at = 0;
                self.events.push(Event::Finished {
                    region: self.active.region,
                    bytes,
                });
                true
            }
            waiting => {
                self.phase = waiting;
                false
            }
        }
    }

    /// Copies the keys after `cursor`, up to the step's budget.
    fn copy(&mut self, store: &Store, mut target: Lane, cursor: Option<Vec<u8>>) -> bool {
        let mut budget = self.step_bytes;
        let mut last = None;
        let mut keys = store.iter_after(cursor.as_deref());
        let finished = loop {
            if budget == 0 || target.w.backlog() >= MAX_BACKLOG {
                break false;
            }
            let Some((k, v)) = keys.next() else {
                break true;
            };
            let record: [&[u8]; 3] = [b"SET", k, v];
            if target.w.append_copy(&record).is_err() {
                self.phase = Phase::Copying { target, cursor };
                self.abandon("the live data does not fit the new log's region");
                return true;
            }
            budget = budget.saturating_sub(record_len(&record));
            last = Some(k);
        };
        let progress = finished || last.is_some();
        let cursor = last.map(<[u8]>::to_vec).or(cursor);
        self.phase = if finished {
            let mark = target.w.end();
            Phase::Draining { target, mark }
        } else {
            Phase::Copying { target, cursor }
        };
        progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aof::tests::v1_header;
    use crate::aof::{encode_record, VERSION_1};
    use crate::engine::tests::run;
    use crate::engine::Engine;
    use alloc::collections::BTreeMap;
    use alloc::string::String;
    use std::collections::HashSet;
    use std::format;
    use std::hash::{DefaultHasher, Hash, Hasher};

    type State = BTreeMap<Vec<u8>, Vec<u8>>;

    fn state(store: &Store) -> State {
        store
            .iter_after(None)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    /// Boots from a disk image as the guest does: replays the log into a new engine, then writes
    /// the bumped header.
    fn boot(image: &mut [u8], flush: bool) -> (Engine, Opened) {
        let mut e = Engine::new(Aof::disabled());
        let img = &*image;
        let opened = open(
            img.len() as u64,
            &mut |sector, buf| {
                let at = sector as usize * SECTOR;
                buf.copy_from_slice(&img[at..at + buf.len()]);
                Ok(())
            },
            &mut |args| assert!(e.apply_record(args), "a record the engine does not write"),
        )
        .unwrap();
        image[..SECTOR].copy_from_slice(&opened.header.encode());
        e.log = Aof::new(&opened, flush);
        (e, opened)
    }

    /// A blank disk of `bytes` bytes, and the engine booted from it.
    fn blank(bytes: usize) -> (Engine, Vec<u8>) {
        let mut image = vec![0u8; bytes];
        let (e, _) = boot(&mut image, true);
        (e, image)
    }

    /// The store a restart from `image` replays.
    fn replayed(image: &[u8]) -> State {
        state(boot(&mut image.to_vec(), true).0.store())
    }

    /// Small xorshift generator: the runs are reproducible.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n.max(1) as u64) as usize
        }
    }

    /// A simulated disk: requests complete in any order; `image` is what completed writes left
    /// (what survives the VMM process being killed), `durable` what the last completed flush
    /// covers (what survives a power cut).
    struct Sim {
        image: Vec<u8>,
        durable: Vec<u8>,
        /// Submission order of the flush `durable` comes from.
        durable_stamp: u64,
        inflight: Vec<Inflight>,
        stamp: u64,
        rng: Rng,
        /// One request in this many fails (0: none).
        fail_one_in: usize,
    }

    /// A request in flight; a flush carries the image and stamp of its submission.
    type Inflight = (OpTag, DiskOp, Option<(Vec<u8>, u64)>);

    fn apply(image: &mut [u8], op: &DiskOp, sectors: Option<usize>) {
        if let DiskOp::Write { sector, data } = op {
            let at = *sector as usize * SECTOR;
            let n = sectors.map_or(data.len(), |s| s * SECTOR);
            image[at..at + n].copy_from_slice(&data[..n]);
        }
    }

    /// Everything one crash check needs to know about the run so far.
    struct Checker {
        flush: bool,
        /// The store's contents after each write (index 0: at boot).
        history: Vec<State>,
        seen: HashSet<u64>,
        checks: usize,
    }

    impl Checker {
        /// A power cut leaves `image`: replay must give the state after some write that was
        /// issued and not before the last acknowledged one; every few checks, a boot from it
        /// also takes more writes, and must keep them across another restart.
        fn check(&mut self, image: &[u8], acked: u64, issued: u64, what: &str) {
            let mut h = DefaultHasher::new();
            (image, acked, issued).hash(&mut h);
            if !self.seen.insert(h.finish()) {
                return;
            }
            self.checks += 1;
            let mut img = image.to_vec();
            let (mut e, _) = boot(&mut img, self.flush);
            let got = state(e.store());
            assert!(
                (acked..=issued).any(|k| self.history[k as usize] == got),
                "{what}: replay gives none of the states after writes {acked}..={issued}"
            );
            if self.checks.is_multiple_of(5) {
                run(&mut e, &["SET", "after-crash", "1"]);
                run(&mut e, &["INCR", "after-crash"]);
                settle(&mut e, &mut img);
                let (e2, _) = boot(&mut img, self.flush);
                let mut want = got;
                want.insert(b"after-crash".to_vec(), b"2".to_vec());
                assert_eq!(state(e2.store()), want, "{what}: writes after the restart");
            }
        }
    }

    /// Completes every request the log has to send, at once. True if there were any.
    fn complete(e: &mut Engine, image: &mut [u8]) -> bool {
        let mut any = false;
        while let Some((tag, op)) = e.log.next_op() {
            apply(image, &op, None);
            e.log.op_done(tag, op, true);
            any = true;
        }
        any
    }

    /// Runs every request to completion at once, and the rewrite to its end.
    fn settle(e: &mut Engine, image: &mut [u8]) {
        for _ in 0..100_000 {
            let stepped = e.step_log();
            if !complete(e, image) && !stepped {
                return;
            }
        }
        panic!("the log never settles");
    }

    impl Sim {
        /// One main-loop turn: the rewrite's step, the requests submitted, then some of those
        /// in flight completed (or failed), each after the crash images at that point are
        /// checked.
        fn turn(&mut self, e: &mut Engine, checker: &mut Checker) {
            e.step_log();
            while let Some((tag, op)) = e.log.next_op() {
                self.stamp += 1;
                let snap = matches!(op, DiskOp::Flush).then(|| (self.image.clone(), self.stamp));
                self.inflight.push((tag, op, snap));
            }
            for _ in 0..self.rng.below(self.inflight.len() + 1) {
                let i = self.rng.below(self.inflight.len());
                let (tag, op, snap) = self.inflight.swap_remove(i);
                self.crash_points(e, &op, checker);
                let ok = self.fail_one_in == 0 || self.rng.below(self.fail_one_in) != 0;
                if ok {
                    apply(&mut self.image, &op, None);
                    if let Some((img, stamp)) = snap {
                        if stamp > self.durable_stamp {
                            self.durable = img;
                            self.durable_stamp = stamp;
                        }
                    }
                    if !checker.flush {
                        self.durable = self.image.clone();
                    }
                }
                e.log.op_done(tag, op, ok);
            }
        }

        /// The disk as a crash just before `op` completes could leave it: without it, with it,
        /// with half its sectors, with every write in flight, and (power cut) only what the last
        /// flush covered.
        fn crash_points(&self, e: &Engine, op: &DiskOp, checker: &mut Checker) {
            let (acked, issued) = (e.durable(), e.tag());
            checker.check(&self.image, acked, issued, "completed writes only");
            if let DiskOp::Write { data, .. } = op {
                let mut img = self.image.clone();
                apply(&mut img, op, None);
                checker.check(&img, acked, issued, "with the write in flight");
                let sectors = data.len() / SECTOR;
                if sectors > 1 {
                    let mut img = self.image.clone();
                    apply(&mut img, op, Some(sectors / 2));
                    checker.check(&img, acked, issued, "with half the write in flight");
                }
            }
            let mut img = self.image.clone();
            for (_, other, _) in &self.inflight {
                apply(&mut img, other, None);
            }
            checker.check(&img, acked, issued, "with every write in flight");
            checker.check(
                &self.durable,
                acked,
                issued,
                "power cut: flushed writes only",
            );
        }
    }

    /// The next write of the load: SETs over a small key space, INCRs, DELs, MSETs and now and
    /// then a FLUSHALL, each of which logs exactly one record.
    fn next_write(i: usize, rng: &mut Rng, model: &Engine) -> Vec<String> {
        let key = format!("key:{}", rng.below(24));
        let r = rng.below(100);
        let v = |rng: &mut Rng| format!("v{i}:{}", "x".repeat(rng.below(40)));
        let cmd: Vec<String> = if r < 55 {
            vec!["SET".into(), key, v(rng)]
        } else if r < 80 {
            vec!["INCR".into(), format!("counter:{}", rng.below(4))]
        } else if r < 90 && model.store().contains(key.as_bytes()) {
            vec!["DEL".into(), key]
        } else if r < 99 || model.store().is_empty() {
            let k2 = format!("key:{}", rng.below(24));
            vec!["MSET".into(), key, v(rng), k2, v(rng)]
        } else {
            vec!["FLUSHALL".into()]
        };
        cmd
    }

    /// Drives `writes` writes against a log that boots from `image`, with a power cut checked at
    /// every disk request's completion; returns the engine, the final image and the checks run.
    fn crash_run(
        image: Vec<u8>,
        writes: usize,
        seed: u64,
        step_bytes: usize,
        flush: bool,
        fail_one_in: usize,
    ) -> (Engine, Vec<u8>, usize) {
        let mut image = image;
        let (mut e, _) = boot(&mut image, flush);
        e.log.set_step_bytes(step_bytes);
        let mut model = Engine::new(Aof::disabled());
        for (k, v) in state(e.store()) {
            model.apply_record(&[b"SET", k.as_slice(), v.as_slice()]);
        }
        let mut checker = Checker {
            flush,
            history: vec![state(e.store())],
            seen: HashSet::new(),
            checks: 0,
        };
        let mut sim = Sim {
            durable: image.clone(),
            image,
            durable_stamp: 0,
            inflight: Vec::new(),
            stamp: 0,
            rng: Rng(seed),
            fail_one_in,
        };
        let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        for i in 0..writes {
            let cmd = next_write(i, &mut rng, &model);
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let reply = run(&mut e, &args);
            assert!(!reply.starts_with('-'), "write {i} {args:?}: {reply}");
            assert_eq!(reply, run(&mut model, &args));
            checker.history.push(state(model.store()));
            assert_eq!(e.tag(), i as u64 + 1, "one record per write");
            sim.turn(&mut e, &mut checker);
        }
        // Complete everything: the last state is the one replay gives.
        while !sim.inflight.is_empty() {
            sim.rng.0 |= 1;
            sim.fail_one_in = 0;
            sim.turn(&mut e, &mut checker);
        }
        let mut image = sim.image;
        settle(&mut e, &mut image);
        assert_eq!(
            e.durable(),
            writes as u64,
            "every write acknowledged in the end"
        );
        let (after, _) = boot(&mut image.clone(), flush);
        assert_eq!(&state(after.store()), checker.history.last().unwrap());
        (e, image, checker.checks)
    }

    const DISK: usize = 48 << 10;

    #[test]
    fn a_power_cut_at_any_disk_request_keeps_every_acknowledged_write() {
        for (seed, step) in [(1, 96), (7, 700), (23, STEP_BYTES)] {
            let (e, image, checks) = crash_run(vec![0; DISK], 1200, seed, step, true, 0);
            let s = e.log.stats();
            assert!(s.rewrites >= 3, "seed {seed}: only {} rewrites", s.rewrites);
            assert_eq!(s.abandoned, 0);
            assert!(checks > 1000, "seed {seed}: {checks} checks");
            let h = Header::decode(&image[..SECTOR], DISK as u64).unwrap();
            assert_eq!(h.version, VERSION);
        }
    }

    #[test]
    fn failed_requests_are_retried_through_a_rewrite() {
        let (e, _, _) = crash_run(vec![0; DISK], 800, 99, 200, true, 13);
        assert!(e.log.stats().rewrites >= 2);
        assert!(e.log.write_failures() > 0);
    }

    #[test]
    fn a_device_without_flush_is_durable_on_write_completion() {
        let (e, _, _) = crash_run(vec![0; DISK], 800, 5, 300, false, 0);
        assert!(e.log.stats().rewrites >= 2);
    }

    /// A version-1 disk (header version 1, one log over the whole disk) of `records` writes over
    /// a few keys; returns it and the keys' values.
    fn v1_disk(records: usize) -> (Vec<u8>, State) {
        let mut image = vec![0u8; DISK];
        image[..SECTOR].copy_from_slice(&v1_header(3));
        let mut log = Vec::new();
        let mut want = State::new();
        for i in 0..records {
            let (k, v) = (format!("old:{}", i % 20), format!("value-{i}"));
            // Generations 1..=3, as three boots of the old guest wrote them.
            let generation = 1 + (3 * i / records) as u32;
            encode_record(generation, &[b"SET", k.as_bytes(), v.as_bytes()], &mut log);
            want.insert(k.into_bytes(), v.into_bytes());
        }
        image[SECTOR..SECTOR + log.len()].copy_from_slice(&log);
        (image, want)
    }

    #[test]
    fn a_version_1_disk_keeps_its_data_and_moves_to_two_regions() {
        let (a, b) = standard_regions(DISK as u64).unwrap();
        // 60 records end in the first quarter of the first half: it becomes the active region.
        // 450 end past three quarters of it: the first rewrite goes behind the old log.
        for (records, first_target) in [(60, b.start), (450, 0)] {
            let (mut image, want) = v1_disk(records);
            let (e, opened) = boot(&mut image, true);
            assert_eq!(opened.found.map(|h| h.version), Some(VERSION_1));
            assert_eq!(opened.records, records as u64);
            assert_eq!(state(e.store()), want);
            let h = Header::decode(&image[..SECTOR], DISK as u64).unwrap();
            assert_eq!(
                (h.version, h.generation, h.base_generation),
                (VERSION, 4, 0)
            );
            assert_eq!((h.start, h.len), (FIRST_RECORD, DISK as u64 - FIRST_RECORD));
            let (from, to) = plan(DISK as u64, Region::of(&h), opened.end).unwrap();
            if first_target != 0 {
                assert_eq!((from, to), (a.len, b));
            } else {
                assert!(to.start > opened.end && to.start > b.start && to.end() == DISK as u64);
            }
            // A power cut anywhere during the moves keeps the old data too.
            let (e, image, _) = crash_run(image, 700, records as u64, 150, true, 0);
            assert!(e.log.stats().rewrites >= 2);
            let h = e.log.header();
            assert!(
                Region::of(&h) == a || Region::of(&h) == b,
                "{records} records: after two rewrites the layout is the two halves: {h:?}"
            );
            for (k, v) in replayed(&image) {
                if k.starts_with(b"old:") {
                    assert_eq!(want.get(&k), Some(&v));
                }
            }
        }
    }

    #[test]
    fn a_steady_load_runs_far_past_the_disk_size() {
        let (mut e, mut image) = blank(256 << 10);
        let mut want = State::new();
        let mut logged = 0;
        let mut i = 0;
        while logged < 10 * image.len() {
            let (k, v) = (format!("k{}", i % 500), format!("{i:08}"));
            logged += record_len(&[b"SET", k.as_bytes(), v.as_bytes()]);
            assert_eq!(run(&mut e, &["SET", &k, &v]), "+OK\r\n", "write {i}");
            want.insert(k.into_bytes(), v.into_bytes());
            settle(&mut e, &mut image);
            i += 1;
        }
        let s = e.log.stats();
        assert!(s.rewrites >= 20, "{s:?}");
        assert!(e.log.current_size() < e.log.region_size());
        assert_eq!(replayed(&image), want);
    }

    #[test]
    fn live_data_larger_than_a_region_abandons_the_rewrite_and_keeps_the_log() {
        let (mut e, mut image) = blank(DISK);
        // 21 KiB of distinct keys: the other region (23.75 KiB) would hold them, but without
        // room for the writes during the copy.
        for i in 0..370 {
            run(&mut e, &["SET", &format!("big:{i:04}"), &"v".repeat(20)]);
            settle(&mut e, &mut image);
        }
        assert_eq!(
            e.log.stats().rewrites,
            0,
            "never due: the live data is most of the log"
        );
        assert_eq!(
            run(&mut e, &["BGREWRITEAOF"]),
            format!("-{ERR_NO_ROOM}\r\n"),
        );
        assert!(run(&mut e, &["INFO"]).contains("aof_last_bgrewrite_status:err"));
        assert_eq!(replayed(&image).len(), 370);
    }

    #[test]
    fn a_rewrite_whose_region_fills_is_abandoned_and_the_old_log_carries_on() {
        // A version-1 log that ends past three quarters of the first half: its first rewrite
        // goes to the last half of the space behind it (about 13 KiB), which the keys written
        // during a slow copy fill before the old log's room runs out.
        let (mut image, mut want) = v1_disk(450);
        let (mut e, _) = boot(&mut image, true);
        e.log.set_step_bytes(1);
        assert_eq!(
            run(&mut e, &["BGREWRITEAOF"]),
            "+Background append only file rewriting started\r\n"
        );
        // The start header, then the copy begins.
        for _ in 0..2 {
            e.step_log();
            complete(&mut e, &mut image);
        }
        let mut i = 0;
        while e.log.stats().abandoned == 0 {
            for _ in 0..10 {
                let (k, v) = (format!("new:{i:04}"), "n".repeat(60));
                assert_eq!(run(&mut e, &["SET", &k, &v]), "+OK\r\n", "write {i}");
                want.insert(k.into_bytes(), v.into_bytes());
                i += 1;
            }
            assert!(i < 1000, "never abandoned");
            e.step_log();
            complete(&mut e, &mut image);
        }
        assert!(!e.log.rewrite_in_progress());
        assert!(run(&mut e, &["INFO"]).contains("aof_last_bgrewrite_status:err\r\n"));
        settle(&mut e, &mut image);
        assert_eq!(replayed(&image), want);
    }

    #[test]
    fn bgrewriteaof_and_info() {
        let (mut e, mut image) = blank(DISK);
        for i in 0..100 {
            run(&mut e, &["SET", "same", &format!("{i}")]);
        }
        settle(&mut e, &mut image);
        let info = run(&mut e, &["INFO", "persistence"]);
        for field in [
            "aof_enabled:1",
            "aof_rewrite_in_progress:0",
            "aof_rewrite_scheduled:0",
            "aof_rewrites:0",
            "aof_last_bgrewrite_status:ok",
            &format!("aof_current_size:{}", e.log.current_size()),
            &format!(
                "aof_region_size:{}",
                standard_regions(DISK as u64).unwrap().0.len
            ),
        ] {
            assert!(info.contains(&format!("{field}\r\n")), "{field} in {info}");
        }
        let boot_generation = e.log.header().generation;
        assert_eq!(
            run(&mut e, &["BGREWRITEAOF"]),
            "+Background append only file rewriting started\r\n"
        );
        assert!(run(&mut e, &["INFO"]).contains("aof_rewrite_in_progress:1\r\n"));
        assert_eq!(
            run(&mut e, &["bgrewriteaof"]),
            format!("-{ERR_REWRITE_RUNNING}\r\n")
        );
        // The rewrite's generation is in the header before the new log's first record.
        let before = e.log.current_size();
        complete(&mut e, &mut image);
        let h = Header::decode(&image[..SECTOR], DISK as u64).unwrap();
        assert_eq!(
            (h.generation, h.base_generation),
            (boot_generation + 1, boot_generation)
        );
        settle(&mut e, &mut image);
        // The switch sets the base generation: nothing older in the region is replayed.
        let h = Header::decode(&image[..SECTOR], DISK as u64).unwrap();
        assert_eq!(
            (h.generation, h.base_generation),
            (boot_generation + 1, boot_generation + 1)
        );
        assert_eq!(Region::of(&h), standard_regions(DISK as u64).unwrap().1);
        let info = run(&mut e, &["INFO"]);
        let one = record_len(&[b"SET", b"same", b"99"]) as u64;
        assert!(info.contains("aof_rewrites:1\r\n"), "{info}");
        assert!(info.contains("aof_rewrite_in_progress:0\r\n"), "{info}");
        assert!(
            info.contains(&format!("aof_last_rewrite_bytes:{one}\r\n")),
            "{info}"
        );
        assert!(
            info.contains(&format!("aof_current_size:{one}\r\n")),
            "{info}"
        );
        assert!(before > 50 * one);
        assert_eq!(run(&mut e, &["DBSIZE"]), ":1\r\n");
        // The old writer's last requests are back: the next one starts at once, and the log
        // is back in the first region.
        assert_eq!(
            run(&mut e, &["BGREWRITEAOF"]),
            "+Background append only file rewriting started\r\n"
        );
        settle(&mut e, &mut image);
        assert_eq!(e.log.header().start, FIRST_RECORD);
        assert_eq!(
            replayed(&image).get(&b"same"[..]).map(Vec::as_slice),
            Some(&b"99"[..])
        );
        let mut no_disk = Engine::new(Aof::disabled());
        assert_eq!(
            run(&mut no_disk, &["BGREWRITEAOF"]),
            format!("-{ERR_NO_LOG}\r\n")
        );
    }

    #[test]
    fn a_rewrite_asked_for_while_the_old_writer_is_busy_is_scheduled() {
        let (mut e, mut image) = blank(DISK);
        run(&mut e, &["SET", "a", "1"]);
        assert_eq!(
            run(&mut e, &["BGREWRITEAOF"]),
            "+Background append only file rewriting started\r\n"
        );
        // Drive the rewrite to its switch while one write of the old log stays in flight.
        let mut held = None;
        for _ in 0..100 {
            e.step_log();
            while let Some((tag, op)) = e.log.next_op() {
                if held.is_none() && tag == OpTag(1) && matches!(op, DiskOp::Write { .. }) {
                    held = Some((tag, op));
                    continue;
                }
                apply(&mut image, &op, None);
                e.log.op_done(tag, op, true);
            }
        }
        assert_eq!(e.log.stats().rewrites, 1);
        assert_eq!(
            run(&mut e, &["BGREWRITEAOF"]),
            "+Background append only file rewriting scheduled\r\n"
        );
        assert!(run(&mut e, &["INFO"]).contains("aof_rewrite_scheduled:1\r\n"));
        let (tag, op) = held.unwrap();
        e.log.op_done(tag, op, true);
        settle(&mut e, &mut image);
        assert_eq!(e.log.stats().rewrites, 2);
        assert!(!e.log.rewrite_scheduled());
    }

    #[test]
    fn plans() {
        let disk = 64u64 << 20;
        let (a, b) = standard_regions(disk).unwrap();
        assert_eq!((a.start, a.len, b.end()), (512, (32 << 20) - 512, disk));
        assert_eq!(plan(disk, a, a.start + 10), Some((a.len, b)));
        assert_eq!(plan(disk, b, b.start + 10), Some((b.len, a)));
        let whole = Region {
            start: 512,
            len: disk - 512,
        };
        assert_eq!(plan(disk, whole, 1 << 20), Some((a.len, b)));
        let (keep, tail) = plan(disk, whole, 40 << 20).unwrap();
        assert_eq!(keep, tail.start - 512);
        assert_eq!((tail.start, tail.end()), (52 << 20, disk));
        assert_eq!(plan(disk, tail, tail.start + 5), Some((tail.len, a)));
        assert_eq!(
            plan(disk, whole, disk - 1024),
            None,
            "a full version-1 disk"
        );
        assert_eq!(standard_regions(16 << 10), None);
        let tiny = Opened::blank(4096).header;
        assert_eq!((tiny.start, tiny.len), (512, 3584));
    }
}
