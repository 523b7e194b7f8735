//! Liveness of the A-Link, as cheaply as possible.
//!
//! * The backup: every read of the receiver that returns bytes (epoch data or heartbeat) stamps a
//!   [`LinkActivity`], one relaxed atomic store of monotonic microseconds. The failure detector
//!   polls it. Its own slowness must not look like the primary's death, so the detector also asks
//!   the live socket for bytes not read yet ([`LinkActivity::unread_bytes`]), and it learns how a
//!   session ended ([`SessionEnd`]): a goodbye or a refusal forbids a takeover, a link closed by
//!   the primary's kernel allows one at once.
//! * The primary: while epochs flow, they are the heartbeat. When it sends nothing for a while
//!   (the backup is behind and the epochs in flight are at their limit), [`IdleHeartbeat`] sends a
//!   heartbeat frame so that the backup's detector keeps hearing from it.

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::transport::{CheckpointTransport, LinkError};

/// Microseconds of `CLOCK_MONOTONIC`, plus one so that 0 can mean "never". Shared by the
/// receiver's stamps and the detector's clock: both must read the same clock.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        // Cannot happen on Linux; 1 ("the beginning") keeps callers' arithmetic well defined.
        return 1;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000).saturating_add(1)
}

/// How the primary's last session ended, as far as takeover is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SessionEnd {
    /// No session ended since the last one started (or none ever ran).
    Open = 0,
    /// The primary said goodbye: it left on purpose, and its silence is not a death.
    Goodbye = 1,
    /// This side ended the session (a frame failed a check) and told the primary, which goes on
    /// alone: taking over would run a second copy of the VM.
    Refused = 2,
    /// The primary's end of the link closed or reset without a goodbye: its process is gone (the
    /// kernel closed its socket), so there is no point in waiting for the silence timeout.
    Vanished = 3,
    /// The primary handed the VM over (a planned switchover): it stopped its VM at this side's
    /// committed epoch and gave the lease up; this side takes over at once.
    HandedOver = 4,
}

/// The time of the last bytes received from the primary, in [`monotonic_us`] (0: none yet), how
/// its last session ended, and the live session's socket (to see bytes the receiver has not read
/// yet). Cloning shares the same state.
#[derive(Clone, Debug, Default)]
pub struct LinkActivity(Arc<Activity>);

#[derive(Debug, Default)]
struct Activity {
    last_us: AtomicU64,
    end: AtomicU8,
    socket: Mutex<Option<TcpStream>>,
    /// The last session's peer address (kept after it ended: the host to probe).
    peer: Mutex<Option<std::net::IpAddr>>,
}

impl LinkActivity {
    /// A stamp that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records bytes received now.
    pub fn touch(&self) {
        self.touch_at(monotonic_us());
    }

    /// Records bytes received at `now_us`. The stamp never goes backwards.
    pub fn touch_at(&self, now_us: u64) {
        self.0.last_us.fetch_max(now_us, Ordering::Relaxed);
    }

    /// A primary authenticated on `socket` (a clone of the session's stream): a sign of life, and
    /// any earlier ending is void.
    pub fn session_started(&self, socket: Option<TcpStream>) {
        if let Some(peer) = socket.as_ref().and_then(|s| s.peer_addr().ok()) {
            *self.0.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer.ip());
        }
        *self.0.socket.lock().unwrap_or_else(|e| e.into_inner()) = socket;
        self.0.end.store(SessionEnd::Open as u8, Ordering::SeqCst);
        self.touch();
    }

    /// The address of the last session's peer (the primary's A-Link address), if any session ran.
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        *self.0.peer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session ended as `end` (the first ending recorded after a start counts).
    pub fn session_ended(&self, end: SessionEnd) {
        self.0.socket.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.0.end.compare_exchange(SessionEnd::Open as u8, end as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The primary said goodbye: it leaves on purpose, and its silence is not a death.
    pub fn goodbye(&self) {
        self.session_ended(SessionEnd::Goodbye);
    }

    /// How the last session ended.
    pub fn session_end(&self) -> SessionEnd {
        match self.0.end.load(Ordering::SeqCst) {
            1 => SessionEnd::Goodbye,
            2 => SessionEnd::Refused,
            3 => SessionEnd::Vanished,
            4 => SessionEnd::HandedOver,
            _ => SessionEnd::Open,
        }
    }

    /// Whether the last session ended with a goodbye (and no session started since).
    pub fn said_goodbye(&self) -> bool {
        self.session_end() == SessionEnd::Goodbye
    }

    /// Bytes that arrived on the live session's socket and are not read yet, if a session is live.
    /// A receiver busy applying an epoch (or starved of CPU) reads nothing for a while: bytes
    /// waiting here mean the primary is alive, whatever the stamp says.
    pub fn unread_bytes(&self) -> Option<usize> {
        let guard = self.0.socket.lock().unwrap_or_else(|e| e.into_inner());
        let socket = guard.as_ref()?;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for the call; the
        // descriptor is open while the guard holds the stream.
        let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
        (r == 0).then(|| usize::try_from(n).unwrap_or(0))
    }

    /// When the last bytes arrived, if any did.
    pub fn last_us(&self) -> Option<u64> {
        Some(self.0.last_us.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// How long ago the last bytes arrived, if any did.
    pub fn age(&self, now_us: u64) -> Option<Duration> {
        self.last_us().map(|t| Duration::from_micros(now_us.saturating_sub(t)))
    }
}

/// A reader that stamps a [`LinkActivity`] whenever it reads bytes, so that a large frame being
/// received counts as life all along, not only once it is complete.
#[derive(Debug)]
pub struct StampingReader<R> {
    inner: R,
    activity: LinkActivity,
}

impl<R> StampingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, activity: LinkActivity) -> Self {
        Self { inner, activity }
    }

    /// The wrapped reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

impl<R: Read> Read for StampingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.activity.touch();
        }
        Ok(n)
    }
}

/// The primary's idle heartbeat: a frame after `interval` without any other frame sent.
/// The epoch engine calls [`IdleHeartbeat::note_sent`] whenever it sends something, and
/// [`IdleHeartbeat::send_if_due`] from its loop.
#[derive(Clone, Debug)]
pub struct IdleHeartbeat {
    interval_us: u64,
    last_sent_us: u64,
}

impl IdleHeartbeat {
    /// Heartbeats after `interval` of silence. The backup's "peer silent" timeout should be a
    /// few intervals (the default detector suspects after 30 ms: an interval of 5–10 ms).
    pub fn new(interval: Duration) -> Self {
        let interval_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX).max(1);
        Self { interval_us, last_sent_us: 0 }
    }

    /// Something (epoch data, a heartbeat) went to the backup at `now_us`.
    pub fn note_sent(&mut self, now_us: u64) {
        self.last_sent_us = self.last_sent_us.max(now_us);
    }

    /// Whether a heartbeat is due at `now_us`.
    pub fn due(&self, now_us: u64) -> bool {
        now_us.saturating_sub(self.last_sent_us) >= self.interval_us
    }

    /// How long until a heartbeat is due at `now_us` (zero when one is).
    pub fn until_due(&self, now_us: u64) -> Duration {
        Duration::from_micros(self.interval_us.saturating_sub(now_us.saturating_sub(self.last_sent_us)))
    }

    /// Sends a heartbeat on `transport` if one is due; returns whether it sent one.
    pub fn send_if_due(&mut self, now_us: u64, transport: &mut dyn CheckpointTransport) -> Result<bool, LinkError> {
        if !self.due(now_us) {
            return Ok(false);
        }
        transport.heartbeat()?;
        self.note_sent(now_us);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_moves_forward_and_is_never_zero() {
        let a = monotonic_us();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_us();
        assert!(a > 0 && b >= a + 2_000, "{a} -> {b}");
    }

    #[test]
    fn activity_stamp_never_goes_backwards() {
        let a = LinkActivity::new();
        assert_eq!(a.last_us(), None);
        assert_eq!(a.age(100), None);
        a.touch_at(50);
        a.clone().touch_at(40);
        assert_eq!(a.last_us(), Some(50));
        assert_eq!(a.age(80), Some(Duration::from_micros(30)));
        assert!(!a.said_goodbye());
        a.goodbye();
        assert!(a.said_goodbye());
        a.session_started(None);
        assert!(!a.said_goodbye() && a.last_us().is_some_and(|t| t > 50));
        assert_eq!(a.session_end(), SessionEnd::Open);
        // The first ending after a start counts: a refusal followed by the link closing stays a
        // refusal.
        a.session_ended(SessionEnd::Refused);
        a.session_ended(SessionEnd::Vanished);
        assert_eq!(a.session_end(), SessionEnd::Refused);
        assert_eq!(a.unread_bytes(), None);
    }

    #[test]
    fn unread_bytes_and_stamping_reads() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        let a = LinkActivity::new();
        a.session_started(Some(rx.try_clone().unwrap()));
        assert_eq!(a.unread_bytes(), Some(0));
        std::io::Write::write_all(&mut tx, &[7u8; 100]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while a.unread_bytes() != Some(100) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(a.unread_bytes(), Some(100));
        let before = a.last_us().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let mut r = StampingReader::new(&rx, a.clone());
        let mut buf = [0u8; 40];
        r.read_exact(&mut buf).unwrap();
        assert!(a.last_us().unwrap() > before, "a read stamps the activity");
        assert_eq!(a.unread_bytes(), Some(60));
        a.session_ended(SessionEnd::Vanished);
        assert_eq!(a.unread_bytes(), None, "no session, no socket");
        assert_eq!(a.session_end(), SessionEnd::Vanished);
    }

    #[test]
    fn idle_heartbeat_is_due_only_after_an_interval_of_silence() {
        let mut h = IdleHeartbeat::new(Duration::from_millis(5));
        h.note_sent(1_000);
        assert!(!h.due(5_999));
        assert!(h.due(6_000));
        h.note_sent(6_000);
        assert!(!h.due(10_000));
        assert_eq!(h.until_due(10_000), Duration::from_millis(1));
        assert_eq!(h.until_due(20_000), Duration::ZERO);
    }
}
