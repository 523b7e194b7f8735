//! The append-only log on the block device: its format, replay, and the group-committing writer
//! of one log region. [`crate::rewrite`] puts them together: the header, the active region and
//! the background rewrite described below.
//!
//! # On-disk format, version 2 (all integers little-endian)
//!
//! Sector 0 (512 bytes) is the header:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `FTVMAOF\0` |
//! | 8..12 | format version, [`VERSION`] |
//! | 12..16 | generation: no record on the disk carries a higher one (see below) |
//! | 16..20 | base generation: no record of the active region carries a lower one |
//! | 20..28 | active region: first byte (a multiple of 512, at least 512) |
//! | 28..36 | active region: length in bytes (a multiple of 512; the region ends inside the disk) |
//! | 36..40 | CRC-32 of bytes 0..36 |
//! | 40..512 | zero |
//!
//! The header names the **active region**: the one log that replay reads. The rest of the disk
//! is free space for the next rewrite. A fresh disk is laid out as two halves after the header
//! ([`crate::rewrite::standard_regions`]), the first one active; each completed rewrite makes the
//! other one active.
//!
//! Records follow one another from the region's first byte (not sector aligned):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | `len`: payload length in bytes |
//! | 4..8 | CRC-32 of the 4 `len` bytes followed by the payload |
//! | 8..8+len | payload: `generation u32`, `argc u32`, then `argc` times `arg_len u32` + `arg` bytes |
//!
//! A payload is the write's effect as a command: `SET key value`, `DEL key...`, `MSET k v...` or
//! `FLUSHALL` (an `INCR` is logged as the `SET` of its result), so replay is deterministic.
//!
//! ## Version 1
//! A version-1 header is bytes 0..16 as above (version 1) with the CRC-32 of bytes 0..16 at
//! 16..20, and its log is the whole disk after sector 0. Such a disk is still read: it replays as
//! one region `[512, end of disk)` with base generation 0, and the header written at boot is
//! already a version-2 one naming that same region, so nothing moves. Its first rewrite moves the
//! data to the two-region layout: if the old log ends in the first three quarters of the first
//! half, that half becomes its region (the header that starts the rewrite shrinks it) and the
//! rewrite goes to the second half; otherwise the rewrite goes to the free space behind the old
//! log (the last half of it; the old log may grow into the first half meanwhile), and the rewrite
//! after that goes to the first half.
//!
//! # Replay
//! Records are applied from the active region's first byte until the first one that is short
//! (runs past the region's end or past what was written), has a bad CRC, an impossible length or
//! payload, or a generation that is lower than its predecessor's (or than the base generation)
//! or higher than the header's. Appending then resumes at the end of the last good record,
//! overwriting the torn tail. The generation check is what makes that overwrite safe: a new
//! record may be shorter than the garbage it replaces, and whole records of an older writer that
//! survive behind it are rejected because their generation is lower.
//!
//! # Generations
//! A generation is made durable in the header before any record carries it: every boot writes the
//! header with the generation bumped before it appends anything, and so does every rewrite
//! before it writes its first record. So each writer of a region (a boot appending to it, or a
//! rewrite filling it) uses a generation no earlier writer of that region used, higher than all
//! of theirs; and the header that makes a region active sets the base generation to the
//! rewrite's, so nothing left in the region from an older use (stale records behind the new
//! log's end, or at its very start if the first write were torn) can be taken for part of it.
//!
//! # Group commit
//! [`LogWriter`] collects the records appended while a write is in flight and sends them in the
//! next single write request, starting at the sector that holds the end of the log: the partial
//! last sector is kept in memory and rewritten with the new records after it (so the design relies
//! on single-sector writes being atomic, as databases commonly do). A flush follows each write
//! when the device supports it; only then is the write's sequence number durable. Every write
//! command is one record with the next sequence number; a client's reply is released once its
//! sequence number is durable (see [`crate::conn`]).
//!
//! # Rewrite ([`crate::rewrite::Aof`])
//! Like Redis's `BGREWRITEAOF`, but without fork: the guest is single-threaded and polls, so the
//! rewrite is a state machine that the main loop advances a bounded amount per turn while it
//! serves. It starts when the active log fills half of its region and the live data (estimated
//! from the store's size) is at most half the log (or the log fills three quarters and the
//! rewrite frees an eighth of the region), or on `BGREWRITEAOF`.
//!
//! 1. **Start.** The header is written with the generation bumped (the rewrite's generation G)
//!    and, for a version-1 layout, the active region shrunk; then flushed. Nothing else changes:
//!    a crash now replays the old log as before.
//! 2. **Copy.** A second writer appends to the other region, with generation G. A key cursor
//!    walks the store (a B-tree: each turn resumes at the first key after the last one visited)
//!    and appends `SET key value` for each key, up to [`crate::rewrite::STEP_BYTES`] per turn and
//!    while less than [`crate::rewrite::MAX_BACKLOG`] bytes wait for the disk. Every write meanwhile
//!    goes to the old log as before (and is acknowledged when durable there), and also to the new
//!    one, in the same order relative to the copied records. Because records are state effects,
//!    the new log replays to the current state once the cursor has visited every key: a key
//!    written before its visit is copied with the value that includes the write; a key written
//!    after its visit gets the write's record after its copy; a deleted or flushed key is not
//!    visited, or is removed by the `DEL`/`FLUSHALL` record that follows its copy.
//! 3. **Drain.** Once every key is copied, writes go to the new log only, and are acknowledged
//!    only when the switch below is durable (replay may still pick the old log until then). The
//!    old log finishes what it had (acknowledging the writes before this point).
//! 4. **Switch.** When the new log is durable up to the end it had when the copy finished, the
//!    header naming the new region (generation and base generation G) is written, then flushed:
//!    that single-sector write is the atomic switch. Then the writes held in step 3 are
//!    acknowledged as the new log makes them durable, the old writer is dropped once its last
//!    request has come back, and the old region is free for the next rewrite.
//!
//! Crash safety, at every point: before the switch's header write reaches the disk, replay reads
//! the old log, which holds every acknowledged write (nothing is acknowledged from the new log
//! before the switch is durable, and the old log got every write up to the drain). After it,
//! replay reads the new log, which was durable up to the drain before the header was written, and
//! whose later records are acknowledged only when durable. While the header write is in flight,
//! either may be picked, and both hold every acknowledged write.
//!
//! A rewrite does not start when the live data would take more than seven eighths of the new
//! region. If the new region fills up before the copy is done (writes during the copy filled the
//! rest), the rewrite is abandoned (`aof_last_bgrewrite_status:err`) and the old log carries on;
//! the next automatic attempt waits until the log has grown by another sixteenth of its region.
//! If the active region fills, writes get `ERR disk log full` as before; the threshold above
//! leaves the other half of the region for writes while the copy runs. A steady write load thus
//! runs for as long as the live data fits in half the disk.

use alloc::vec::Vec;

use crate::crc32::{crc32, Crc32};

/// Sector size of the block device, in bytes.
pub const SECTOR: usize = 512;
/// Magic at the start of the header sector.
pub const MAGIC: [u8; 8] = *b"FTVMAOF\0";
/// Format version this code writes.
pub const VERSION: u32 = 2;
/// The first format version (one log over the whole disk), still read.
pub const VERSION_1: u32 = 1;
/// Byte offset of the first record of a version-1 disk, and of the first region.
pub const FIRST_RECORD: u64 = SECTOR as u64;
/// Bytes before a record's payload (`len` and CRC).
pub const RECORD_HEADER: usize = 8;
/// Largest payload replay accepts (a command carries at most 16 MiB of arguments).
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// The header sector's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version it was read as ([`VERSION`] or [`VERSION_1`]); always written as
    /// [`VERSION`].
    pub version: u32,
    /// No record on the disk carries a higher generation.
    pub generation: u32,
    /// No record of the active region carries a lower generation.
    pub base_generation: u32,
    /// First byte of the active region.
    pub start: u64,
    /// Length of the active region in bytes.
    pub len: u64,
}

impl Header {
    /// End of the active region (exclusive).
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The header sector's bytes (always version 2).
    pub fn encode(&self) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        s[0..8].copy_from_slice(&MAGIC);
        s[8..12].copy_from_slice(&VERSION.to_le_bytes());
        s[12..16].copy_from_slice(&self.generation.to_le_bytes());
        s[16..20].copy_from_slice(&self.base_generation.to_le_bytes());
        s[20..28].copy_from_slice(&self.start.to_le_bytes());
        s[28..36].copy_from_slice(&self.len.to_le_bytes());
        let crc = crc32(&s[0..36]);
        s[36..40].copy_from_slice(&crc.to_le_bytes());
        s
    }

    /// Decodes a header sector of a disk `disk_bytes` long; `None` if it is not one of ours (a
    /// fresh disk, or garbage). A version-1 header's region is the whole disk after sector 0. The
    /// region of a version-2 header is not checked against the disk here (see
    /// [`Header::fits`]).
    pub fn decode(sector: &[u8], disk_bytes: u64) -> Option<Self> {
        if sector.len() < 40 || sector[0..8] != MAGIC {
            return None;
        }
        let version = read_u32(sector, 8)?;
        let generation = read_u32(sector, 12)?;
        match version {
            VERSION_1 if read_u32(sector, 16)? == crc32(&sector[0..16]) => Some(Self {
                version,
                generation,
                base_generation: 0,
                start: FIRST_RECORD,
                len: disk_bytes.saturating_sub(FIRST_RECORD) / SECTOR as u64 * SECTOR as u64,
            }),
            VERSION if read_u32(sector, 36)? == crc32(&sector[0..36]) => Some(Self {
                version,
                generation,
                base_generation: read_u32(sector, 16)?,
                start: read_u64(sector, 20)?,
                len: read_u64(sector, 28)?,
            }),
            _ => None,
        }
    }

    /// True when the active region is sector aligned, after the header and inside a disk of
    /// `disk_bytes` bytes.
    pub fn fits(&self, disk_bytes: u64) -> bool {
        let s = SECTOR as u64;
        self.start >= FIRST_RECORD
            && self.start.is_multiple_of(s)
            && self.len.is_multiple_of(s)
            && self
                .start
                .checked_add(self.len)
                .is_some_and(|end| end <= disk_bytes)
    }
}

/// Total bytes a record of these arguments takes on disk.
pub fn record_len(args: &[&[u8]]) -> usize {
    RECORD_HEADER + 8 + args.iter().map(|a| 4 + a.len()).sum::<usize>()
}

/// Appends one record to `out`.
pub fn encode_record(generation: u32, args: &[&[u8]], out: &mut Vec<u8>) {
    let start = out.len();
    let payload_len = (record_len(args) - RECORD_HEADER) as u32;
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&(args.len() as u32).to_le_bytes());
    for a in args {
        out.extend_from_slice(&(a.len() as u32).to_le_bytes());
        out.extend_from_slice(a);
    }
    let mut c = Crc32::new();
    c.update(&out[start..start + 4]);
    c.update(&out[start + RECORD_HEADER..]);
    let crc = c.finish();
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes a payload into its generation and arguments; `None` if it is inconsistent.
pub fn decode_payload(payload: &[u8]) -> Option<(u32, Vec<&[u8]>)> {
    let generation = read_u32(payload, 0)?;
    let argc = read_u32(payload, 4)? as usize;
    if argc == 0 || argc > payload.len() / 4 {
        return None;
    }
    let mut args = Vec::with_capacity(argc);
    let mut at = 8;
    for _ in 0..argc {
        let len = read_u32(payload, at)? as usize;
        at += 4;
        args.push(payload.get(at..at.checked_add(len)?)?);
        at += len;
    }
    if at != payload.len() {
        return None;
    }
    Some((generation, args))
}

/// Why replay stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayStop {
    /// A zero record header: the log ends cleanly there.
    End,
    /// A record runs past the end of the disk (or of the input).
    Torn,
    /// A record with a bad CRC, length, payload or generation.
    Corrupt,
}

/// Streaming replay of one region: feed its bytes from its first byte on, in order, in any chunks.
#[derive(Debug)]
pub struct Replay {
    buf: Vec<u8>,
    /// First byte of the region.
    start: u64,
    /// Log offset of `buf[0]`.
    offset: u64,
    /// End of the region, in bytes.
    limit: u64,
    max_generation: u32,
    last_generation: u32,
    records: u64,
    stop: Option<ReplayStop>,
}

impl Replay {
    /// Replay of the region `[start, limit)` whose records carry generations from
    /// `min_generation` to `max_generation` (the header's base generation and generation).
    pub fn new(start: u64, limit: u64, min_generation: u32, max_generation: u32) -> Self {
        Self {
            buf: Vec::new(),
            start,
            offset: start,
            limit,
            max_generation,
            last_generation: min_generation,
            records: 0,
            stop: None,
        }
    }

    /// Log offset just after the last good record: where appending resumes.
    pub fn end(&self) -> u64 {
        self.offset
    }

    /// Records applied so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes of good records (headers included).
    pub fn bytes(&self) -> u64 {
        self.offset - self.start
    }

    /// Why replay stopped, once it has.
    pub fn stopped(&self) -> Option<ReplayStop> {
        self.stop
    }

    /// Log offset of the next byte [`Replay::feed`] expects.
    pub fn next_input_offset(&self) -> u64 {
        self.offset + self.buf.len() as u64
    }

    /// Feeds the next bytes of the log and applies every complete good record through `apply`.
    /// Returns false once replay has stopped (more input is not needed).
    pub fn feed(&mut self, data: &[u8], apply: &mut dyn FnMut(&[&[u8]])) -> bool {
        if self.stop.is_some() {
            return false;
        }
        self.buf.extend_from_slice(data);
        let mut at = 0usize;
        loop {
            let rest = &self.buf[at..];
            if rest.len() < RECORD_HEADER {
                break;
            }
            let len = read_u32(rest, 0).unwrap_or(0);
            let crc = read_u32(rest, 4).unwrap_or(0);
            if len == 0 && crc == 0 {
                self.stop = Some(ReplayStop::End);
                break;
            }
            if !(8..=MAX_PAYLOAD).contains(&len) {
                self.stop = Some(ReplayStop::Corrupt);
                break;
            }
            let total = RECORD_HEADER as u64 + len as u64;
            if self.offset + at as u64 + total > self.limit {
                self.stop = Some(ReplayStop::Torn);
                break;
            }
            if (rest.len() as u64) < total {
                break;
            }
            let payload = &rest[RECORD_HEADER..total as usize];
            let mut c = Crc32::new();
            c.update(&rest[0..4]);
            c.update(payload);
            if c.finish() != crc {
                self.stop = Some(ReplayStop::Corrupt);
                break;
            }
            match decode_payload(payload) {
                Some((generation, args))
                    if generation >= self.last_generation && generation <= self.max_generation =>
                {
                    self.last_generation = generation;
                    apply(&args);
                }
                _ => {
                    self.stop = Some(ReplayStop::Corrupt);
                    break;
                }
            }
            self.records += 1;
            at += total as usize;
        }
        self.buf.drain(..at);
        self.offset += at as u64;
        if self.stop.is_some() {
            self.buf = Vec::new();
        }
        self.stop.is_none()
    }

    /// No more input (the end of the device): a partial record left over is torn.
    pub fn finish(&mut self) {
        if self.stop.is_none() {
            self.stop = Some(if self.buf.iter().all(|&b| b == 0) {
                ReplayStop::End
            } else {
                ReplayStop::Torn
            });
        }
        self.buf = Vec::new();
    }
}

/// A request for the block device.
#[derive(Debug, PartialEq, Eq)]
pub enum DiskOp {
    /// Write `data` (a whole number of sectors) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// The bytes; hand the vector back through [`LogWriter::write_done`].
        data: Vec<u8>,
    },
    /// Make completed writes durable.
    Flush,
}

/// The log is out of space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogFull;

/// A point in one log: the last sequence number at or before it, and the log offset.
#[derive(Clone, Copy, Debug, Default)]
struct Mark {
    seq: u64,
    end: u64,
}

/// Appends records to one log region and turns them into group-committed disk requests; tracks
/// which sequence numbers (and log offsets) are durable.
#[derive(Debug)]
pub struct LogWriter {
    enabled: bool,
    generation: u32,
    capacity: u64,
    /// Sector-aligned log offset of `tail[0]`.
    tail_start: u64,
    /// Log bytes from `tail_start` to the end of everything appended.
    tail: Vec<u8>,
    last_seq: u64,
    /// Log offset up to which data has been handed to the device.
    submitted_end: u64,
    /// What completed writes cover.
    written: Mark,
    /// What completed flushes cover (completed writes, without flush support).
    durable: Mark,
    flush_supported: bool,
    write: Option<Mark>,
    flush: Option<Mark>,
    spare: Vec<u8>,
    write_failures: u64,
}

impl LogWriter {
    /// A writer with no device: every record is durable at once and nothing is written.
    pub fn disabled() -> Self {
        let mut w = Self::new(0, u64::MAX, FIRST_RECORD, Vec::new(), false);
        w.enabled = false;
        w
    }

    /// A writer that appends at log offset `end` of a region that ends at `capacity` (a device
    /// offset). `tail` holds the bytes from the start of `end`'s sector up to `end` (as read back
    /// during replay); `generation` goes into every record.
    pub fn new(
        generation: u32,
        capacity: u64,
        end: u64,
        tail: Vec<u8>,
        flush_supported: bool,
    ) -> Self {
        let tail_start = end / SECTOR as u64 * SECTOR as u64;
        let mut tail = tail;
        tail.resize((end - tail_start) as usize, 0);
        let at = Mark { seq: 0, end };
        Self {
            enabled: true,
            generation,
            capacity,
            tail_start,
            tail,
            last_seq: 0,
            submitted_end: end,
            written: at,
            durable: at,
            flush_supported,
            write: None,
            flush: None,
            spare: Vec::new(),
            write_failures: 0,
        }
    }

    /// The same writer, numbering its next record `seq + 1` (a rewrite's new log continues the
    /// sequence of the old one).
    pub fn at_seq(mut self, seq: u64) -> Self {
        self.last_seq = seq;
        self.written.seq = seq;
        self.durable.seq = seq;
        self
    }

    /// True when records go to a device.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Log offset just after the last appended record.
    pub fn end(&self) -> u64 {
        self.tail_start + self.tail.len() as u64
    }

    /// Bytes left in the region.
    pub fn room(&self) -> u64 {
        self.capacity.saturating_sub(self.end())
    }

    /// Moves the region's end (never below what is appended).
    pub fn set_capacity(&mut self, capacity: u64) {
        self.capacity = capacity.max(self.end());
    }

    /// Sequence number of the last appended record (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Every record up to this sequence number is durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable.seq
    }

    /// Every byte of the log before this offset is durable.
    pub fn durable_end(&self) -> u64 {
        self.durable.end
    }

    /// Bytes appended and not written yet.
    pub fn backlog(&self) -> u64 {
        self.end() - self.written.end
    }

    /// Failed writes so far (each was retried).
    pub fn write_failures(&self) -> u64 {
        self.write_failures
    }

    /// True when a record of these arguments fits.
    pub fn fits(&self, args: &[&[u8]]) -> bool {
        !self.enabled || (record_len(args) as u64) <= self.room()
    }

    /// Appends a record; returns its sequence number.
    pub fn append(&mut self, args: &[&[u8]]) -> Result<u64, LogFull> {
        if !self.fits(args) {
            return Err(LogFull);
        }
        self.last_seq += 1;
        if self.enabled {
            encode_record(self.generation, args, &mut self.tail);
        } else {
            self.durable.seq = self.last_seq;
        }
        Ok(self.last_seq)
    }

    /// Appends a record that is not a write of its own (a rewrite's copy of a key): it takes no
    /// sequence number.
    pub fn append_copy(&mut self, args: &[&[u8]]) -> Result<(), LogFull> {
        if !self.fits(args) {
            return Err(LogFull);
        }
        if self.enabled {
            encode_record(self.generation, args, &mut self.tail);
        }
        Ok(())
    }

    /// True when nothing is waiting to be written or made durable.
    pub fn idle(&self) -> bool {
        self.durable.end == self.end() && self.durable.seq == self.last_seq && !self.busy()
    }

    /// True while a request is in flight.
    pub fn busy(&self) -> bool {
        self.write.is_some() || self.flush.is_some()
    }

    /// The next request to send to the device, if any. Call until it returns `None`: at most one
    /// write and one flush are in flight at a time.
    pub fn next_op(&mut self) -> Option<DiskOp> {
        if !self.enabled {
            return None;
        }
        if self.flush_supported && self.flush.is_none() && self.written.end > self.durable.end {
            self.flush = Some(self.written);
            return Some(DiskOp::Flush);
        }
        if self.write.is_none() && self.end() > self.submitted_end {
            let mut data = core::mem::take(&mut self.spare);
            data.clear();
            data.extend_from_slice(&self.tail);
            let padded = data.len().div_ceil(SECTOR) * SECTOR;
            data.resize(padded, 0);
            self.submitted_end = self.end();
            self.write = Some(Mark {
                seq: self.last_seq,
                end: self.submitted_end,
            });
            return Some(DiskOp::Write {
                sector: self.tail_start / SECTOR as u64,
                data,
            });
        }
        None
    }

    /// The write from [`LogWriter::next_op`] completed; `data` is its buffer back (kept for reuse).
    pub fn write_done(&mut self, data: Vec<u8>) {
        self.spare = data;
        let Some(w) = self.write.take() else { return };
        let new_start = w.end / SECTOR as u64 * SECTOR as u64;
        let drop = (new_start - self.tail_start) as usize;
        self.tail.drain(..drop);
        self.tail_start = new_start;
        self.written = w;
        if !self.flush_supported {
            self.durable = w;
        }
    }

    /// The write failed: it will be sent again (with whatever was appended since).
    pub fn write_failed(&mut self, data: Vec<u8>) {
        self.spare = data;
        self.write_failures += 1;
        if self.write.take().is_some() {
            self.submitted_end = self.written.end;
        }
    }

    /// The flush from [`LogWriter::next_op`] completed (`ok == false`: it failed and will be
    /// sent again).
    pub fn flush_done(&mut self, ok: bool) {
        if let Some(target) = self.flush.take() {
            if ok {
                if target.end > self.durable.end {
                    self.durable = target;
                }
            } else {
                self.write_failures += 1;
            }
        }
    }

    /// Hands a completed (`ok`) or failed request from [`LogWriter::next_op`] back.
    pub fn done(&mut self, op: DiskOp, ok: bool) {
        match (op, ok) {
            (DiskOp::Write { data, .. }, true) => self.write_done(data),
            (DiskOp::Write { data, .. }, false) => self.write_failed(data),
            (DiskOp::Flush, ok) => self.flush_done(ok),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;
    use std::format;

    /// A simulated disk that completes every request at once.
    struct Disk {
        bytes: Vec<u8>,
    }

    impl Disk {
        fn new(sectors: usize) -> Self {
            Self {
                bytes: vec![0; sectors * SECTOR],
            }
        }

        fn run(&mut self, w: &mut LogWriter) {
            while let Some(op) = w.next_op() {
                match op {
                    DiskOp::Write { sector, data } => {
                        assert_eq!(data.len() % SECTOR, 0);
                        let at = sector as usize * SECTOR;
                        self.bytes[at..at + data.len()].copy_from_slice(&data);
                        w.write_done(data);
                    }
                    DiskOp::Flush => w.flush_done(true),
                }
            }
        }

        fn replay(&self, generation: u32) -> (Vec<Vec<Vec<u8>>>, Replay) {
            let mut r = Replay::new(FIRST_RECORD, self.bytes.len() as u64, 0, generation);
            let mut got = Vec::new();
            for chunk in self.bytes[FIRST_RECORD as usize..].chunks(777) {
                if !r.feed(chunk, &mut |args| {
                    got.push(args.iter().map(|a| a.to_vec()).collect())
                }) {
                    break;
                }
            }
            r.finish();
            (got, r)
        }

        /// What a restarted guest does: a writer that continues at the replay's end.
        fn resume(&self, r: &Replay, generation: u32) -> LogWriter {
            let end = r.end();
            let start = (end / SECTOR as u64 * SECTOR as u64) as usize;
            LogWriter::new(
                generation,
                self.bytes.len() as u64,
                end,
                self.bytes[start..end as usize].to_vec(),
                true,
            )
        }
    }

    fn args<'a>(v: &'a [&'a str]) -> Vec<&'a [u8]> {
        v.iter().map(|s| s.as_bytes()).collect()
    }

    fn owned(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn header_round_trip_and_rejection() {
        let h = Header {
            version: VERSION,
            generation: 7,
            base_generation: 5,
            start: 1 << 20,
            len: 3 << 20,
        };
        let s = h.encode();
        assert_eq!(Header::decode(&s, 8 << 20), Some(h));
        assert!(h.fits(4 << 20));
        assert!(!h.fits((4 << 20) - 512));
        assert_eq!(Header::decode(&[0u8; SECTOR], 8 << 20), None);
        for byte in [9, 13, 17, 21, 30, 37] {
            let mut bad = s;
            bad[byte] ^= 1;
            assert_eq!(Header::decode(&bad, 8 << 20), None, "byte {byte}");
        }
        let unaligned = Header { start: 1000, ..h };
        assert!(!unaligned.fits(8 << 20));
        let over_the_header = Header { start: 0, ..h };
        assert!(!over_the_header.fits(8 << 20));
    }

    /// The version-1 header, as the first format wrote it.
    pub(crate) fn v1_header(generation: u32) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        s[0..8].copy_from_slice(&MAGIC);
        s[8..12].copy_from_slice(&VERSION_1.to_le_bytes());
        s[12..16].copy_from_slice(&generation.to_le_bytes());
        let crc = crc32(&s[0..16]);
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        s
    }

    #[test]
    fn a_version_1_header_names_the_whole_disk() {
        let h = Header::decode(&v1_header(9), 64 << 10).unwrap();
        assert_eq!(
            h,
            Header {
                version: VERSION_1,
                generation: 9,
                base_generation: 0,
                start: FIRST_RECORD,
                len: (64 << 10) - 512,
            }
        );
        assert!(h.fits(64 << 10));
        let mut bad = v1_header(9);
        bad[12] ^= 1;
        assert_eq!(Header::decode(&bad, 64 << 10), None);
    }

    #[test]
    fn copies_take_no_sequence_number_and_a_rewrite_log_continues_the_sequence() {
        let mut disk = Disk::new(64);
        let mut w =
            LogWriter::new(3, disk.bytes.len() as u64, FIRST_RECORD, Vec::new(), true).at_seq(41);
        w.append_copy(&args(&["SET", "a", "1"])).unwrap();
        assert_eq!(w.last_seq(), 41);
        assert!(!w.idle(), "the copy is not on the disk yet");
        assert_eq!(w.backlog(), record_len(&args(&["SET", "a", "1"])) as u64);
        disk.run(&mut w);
        assert!(w.idle());
        assert_eq!((w.durable_seq(), w.durable_end()), (41, w.end()));
        assert_eq!(w.append(&args(&["SET", "b", "2"])), Ok(42));
        disk.run(&mut w);
        let (got, r) = disk.replay(3);
        assert_eq!((w.durable_seq(), r.records()), (42, 2));
        assert_eq!(got[0], owned(&["SET", "a", "1"]), "the copy comes first");
        w.set_capacity(0);
        assert_eq!(w.room(), 0, "never below what is appended");
        assert_eq!(w.append_copy(&args(&["DEL", "a"])), Err(LogFull));
    }

    #[test]
    fn replay_of_a_region_checks_the_base_generation() {
        let mut bytes = Vec::new();
        encode_record(4, &args(&["SET", "old", "1"]), &mut bytes);
        let mut r = Replay::new(4096, 1 << 20, 5, 9);
        r.feed(&bytes, &mut |_| {
            panic!("a record older than the region's base")
        });
        assert_eq!(r.stopped(), Some(ReplayStop::Corrupt));
        assert_eq!((r.end(), r.bytes()), (4096, 0));
        let mut r = Replay::new(4096, 1 << 20, 4, 9);
        let mut n = 0;
        r.feed(&bytes, &mut |_| n += 1);
        assert_eq!((n, r.bytes()), (1, bytes.len() as u64));
    }

    #[test]
    fn record_round_trip() {
        let mut out = Vec::new();
        let a = args(&["SET", "key", ""]);
        encode_record(3, &a, &mut out);
        assert_eq!(out.len(), record_len(&a));
        let len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
        assert_eq!(len + RECORD_HEADER, out.len());
        let (g, decoded) = decode_payload(&out[RECORD_HEADER..]).unwrap();
        assert_eq!(g, 3);
        assert_eq!(decoded, a);
        assert_eq!(decode_payload(&out[RECORD_HEADER..out.len() - 1]), None);
    }

    #[test]
    fn group_commit_writes_then_replays_everything() {
        let mut disk = Disk::new(64);
        let mut w = LogWriter::new(1, disk.bytes.len() as u64, FIRST_RECORD, Vec::new(), true);
        let mut expect = Vec::new();
        for i in 0..200 {
            let k = format!("key:{i}");
            let v = "v".repeat(i % 37);
            let seq = w.append(&args(&["SET", &k, &v])).unwrap();
            assert_eq!(seq, i as u64 + 1);
            expect.push(owned(&["SET", &k, &v]));
            // Commit every few records: each commit rewrites the partial last sector.
            if i % 7 == 0 {
                disk.run(&mut w);
                assert_eq!(w.durable_seq(), seq);
            }
        }
        disk.run(&mut w);
        assert!(w.idle());
        let (got, r) = disk.replay(1);
        assert_eq!(got, expect);
        assert_eq!(r.stopped(), Some(ReplayStop::End));
        assert_eq!(r.end(), w.end());
        assert_eq!(r.records(), 200);
    }

    #[test]
    fn replies_wait_for_write_and_flush() {
        let mut w = LogWriter::new(1, 1 << 20, FIRST_RECORD, Vec::new(), true);
        w.append(&args(&["SET", "a", "1"])).unwrap();
        let op = w.next_op().unwrap();
        let DiskOp::Write { sector, data } = op else {
            panic!()
        };
        assert_eq!(sector, 1);
        // Appended while the write is in flight: goes in the next write, not this one.
        w.append(&args(&["SET", "b", "2"])).unwrap();
        assert_eq!(w.next_op(), None);
        w.write_done(data);
        assert_eq!(w.durable_seq(), 0, "not durable before the flush");
        assert_eq!(w.next_op(), Some(DiskOp::Flush));
        // The second write may go while the flush is in flight.
        let Some(DiskOp::Write { sector, data }) = w.next_op() else {
            panic!()
        };
        assert_eq!(sector, 1, "the partial sector is rewritten");
        w.flush_done(true);
        assert_eq!(w.durable_seq(), 1);
        w.write_done(data);
        assert_eq!(w.next_op(), Some(DiskOp::Flush));
        w.flush_done(true);
        assert_eq!(w.durable_seq(), 2);
        assert!(w.idle());
    }

    #[test]
    fn without_flush_a_completed_write_is_durable() {
        let mut w = LogWriter::new(1, 1 << 20, FIRST_RECORD, Vec::new(), false);
        w.append(&args(&["FLUSHALL"])).unwrap();
        let Some(DiskOp::Write { data, .. }) = w.next_op() else {
            panic!()
        };
        w.write_done(data);
        assert_eq!(w.durable_seq(), 1);
        assert_eq!(w.next_op(), None);
    }

    #[test]
    fn failed_write_is_retried_with_everything_since() {
        let mut disk = Disk::new(16);
        let mut w = LogWriter::new(1, disk.bytes.len() as u64, FIRST_RECORD, Vec::new(), true);
        w.append(&args(&["SET", "a", "1"])).unwrap();
        let Some(DiskOp::Write { data, .. }) = w.next_op() else {
            panic!()
        };
        w.append(&args(&["SET", "b", "2"])).unwrap();
        w.write_failed(data);
        assert_eq!(w.write_failures(), 1);
        disk.run(&mut w);
        assert_eq!(w.durable_seq(), 2);
        let (got, _) = disk.replay(1);
        assert_eq!(
            got,
            vec![owned(&["SET", "a", "1"]), owned(&["SET", "b", "2"])]
        );
    }

    #[test]
    fn full_log_refuses_records() {
        let mut w = LogWriter::new(1, 2 * SECTOR as u64, FIRST_RECORD, Vec::new(), true);
        let big = "x".repeat(400);
        assert!(w.append(&args(&["SET", "k", &big])).is_ok());
        assert_eq!(w.append(&args(&["SET", "k", &big])), Err(LogFull));
        assert!(w.fits(&args(&["DEL", "k"])));
        assert_eq!(w.last_seq(), 1);
    }

    #[test]
    fn disabled_log_is_durable_at_once() {
        let mut w = LogWriter::disabled();
        assert_eq!(w.append(&args(&["SET", "a", "b"])), Ok(1));
        assert_eq!(w.durable_seq(), 1);
        assert_eq!(w.next_op(), None);
    }

    fn write_records(
        disk: &mut Disk,
        generation: u32,
        n: usize,
        w: Option<LogWriter>,
    ) -> LogWriter {
        let mut w = w.unwrap_or_else(|| {
            LogWriter::new(
                generation,
                disk.bytes.len() as u64,
                FIRST_RECORD,
                Vec::new(),
                true,
            )
        });
        for i in 0..n {
            w.append(&args(&["SET", &format!("g{generation}:{i}"), "some value"]))
                .unwrap();
        }
        disk.run(&mut w);
        w
    }

    #[test]
    fn torn_tail_stops_replay_and_appending_resumes_there() {
        let mut disk = Disk::new(64);
        let w = write_records(&mut disk, 1, 10, None);
        let end = w.end() as usize;
        // Zero the last 8 bytes, as a power cut in the middle of the last record would.
        disk.bytes[end - 8..end].fill(0);
        let (got, r) = disk.replay(1);
        assert_eq!(got.len(), 9);
        assert_eq!(r.stopped(), Some(ReplayStop::Corrupt));
        // Next boot (generation 2) appends over the torn record: a shorter record leaves some of
        // the old bytes behind it, which must not be replayed.
        let mut w2 = disk.resume(&r, 2);
        w2.append(&args(&["DEL", "x"])).unwrap();
        disk.run(&mut w2);
        let (got, r) = disk.replay(2);
        assert_eq!(got.len(), 10);
        assert_eq!(got[9], owned(&["DEL", "x"]));
        assert_ne!(r.stopped(), None);
        assert_eq!(r.end(), w2.end());
    }

    #[test]
    fn bad_crc_in_the_middle_stops_there() {
        let mut disk = Disk::new(64);
        write_records(&mut disk, 1, 10, None);
        let mut r = Replay::new(FIRST_RECORD, disk.bytes.len() as u64, 0, 1);
        let mut n = 0;
        // Find the 4th record and flip one payload bit.
        let mut off = FIRST_RECORD as usize;
        for _ in 0..3 {
            off += RECORD_HEADER
                + u32::from_le_bytes(disk.bytes[off..off + 4].try_into().unwrap()) as usize;
        }
        disk.bytes[off + RECORD_HEADER + 5] ^= 0x10;
        r.feed(&disk.bytes[FIRST_RECORD as usize..], &mut |_| n += 1);
        assert_eq!(n, 3);
        assert_eq!(r.stopped(), Some(ReplayStop::Corrupt));
        assert_eq!(r.end(), off as u64);
    }

    #[test]
    fn stale_records_behind_a_shorter_overwrite_are_not_replayed() {
        let mut disk = Disk::new(64);
        // Generation 1 writes 40 records (several sectors); record 5 is then cut.
        write_records(&mut disk, 1, 40, None);
        let mut off = FIRST_RECORD as usize;
        for _ in 0..5 {
            off += RECORD_HEADER
                + u32::from_le_bytes(disk.bytes[off..off + 4].try_into().unwrap()) as usize;
        }
        disk.bytes[off + 4] ^= 0xff;
        let (got, r) = disk.replay(1);
        assert_eq!(got.len(), 5);
        // Generation 2 appends one record there. The rest of its sector is zero-padded, but
        // whole generation-1 records survive in the sectors behind it.
        let mut w2 = disk.resume(&r, 2);
        w2.append(&args(&["SET", "g1:5", "other vals"])).unwrap();
        disk.run(&mut w2);
        let (got, r) = disk.replay(2);
        assert_eq!(got.len(), 6);
        assert_eq!(r.end(), w2.end());
    }

    #[test]
    fn a_lower_generation_after_a_higher_one_stops_replay() {
        // Records back to back: generation 1, 2, then a stale 1 with a good CRC.
        let mut bytes = Vec::new();
        encode_record(1, &args(&["SET", "a", "1"]), &mut bytes);
        encode_record(2, &args(&["SET", "b", "2"]), &mut bytes);
        let good = bytes.len() as u64;
        encode_record(1, &args(&["SET", "stale", "x"]), &mut bytes);
        encode_record(2, &args(&["SET", "c", "3"]), &mut bytes);
        let mut r = Replay::new(FIRST_RECORD, 1 << 20, 0, 2);
        let mut got = Vec::new();
        r.feed(&bytes, &mut |a| got.push(a[1].to_vec()));
        assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(r.stopped(), Some(ReplayStop::Corrupt));
        assert_eq!(r.end(), FIRST_RECORD + good);
    }

    #[test]
    fn record_running_past_the_device_is_torn() {
        let mut out = Vec::new();
        encode_record(1, &args(&["SET", "k", "v"]), &mut out);
        let mut r = Replay::new(FIRST_RECORD, FIRST_RECORD + out.len() as u64 - 1, 0, 1);
        assert!(!r.feed(&out, &mut |_| panic!("must not apply")));
        assert_eq!(r.stopped(), Some(ReplayStop::Torn));
        assert_eq!(r.end(), FIRST_RECORD);

        let mut r = Replay::new(FIRST_RECORD, 1 << 20, 0, 1);
        assert!(r.feed(&out[..out.len() - 3], &mut |_| panic!("must not apply")));
        r.finish();
        assert_eq!(r.stopped(), Some(ReplayStop::Torn));
    }

    #[test]
    fn future_generation_is_corrupt() {
        let mut out = Vec::new();
        encode_record(5, &args(&["SET", "k", "v"]), &mut out);
        let mut r = Replay::new(FIRST_RECORD, 1 << 20, 0, 4);
        r.feed(&out, &mut |_| panic!("must not apply"));
        assert_eq!(r.stopped(), Some(ReplayStop::Corrupt));
    }
}
