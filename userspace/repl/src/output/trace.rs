//! The output trace: one record per append, seal, release and written frame of an
//! [`super::hold::OutputHold`], stamped with the real-time clock (`CLOCK_REALTIME`, the clock of
//! tcpdump's timestamps), for a whole-system test that compares the hold with a packet capture.
//! [`FileTrace`] writes them as text lines (see [`TraceRecord`]'s `Display`) from its own thread.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::lock;

/// The real-time clock as nanoseconds since the Unix epoch (0 before 1970).
pub(crate) fn wall_ns(t: SystemTime) -> u64 {
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
    /// [`OutputHold::release_through`](super::hold::OutputHold::release_through) an acknowledged epoch.
    Ack,
    /// [`OutputHold::release_all`](super::hold::OutputHold::release_all): the engine stopped holding without an acknowledgement.
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
        /// The acknowledged epoch ([`RELEASE_ALL`](super::hold::RELEASE_ALL) for an unhold).
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
    /// [`OutputHold::discard_unreleased`](super::hold::OutputHold::discard_unreleased) dropped `frames` frames.
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

/// Where an [`OutputHold`](super::hold::OutputHold) reports its [`TraceRecord`]s ([`OutputHold::set_trace`](super::hold::OutputHold::set_trace)).
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
    use crate::output::hold::RELEASE_ALL;
    use std::time::Instant;

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
