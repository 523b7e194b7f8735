//! Guest input that reaches a primary after its daemon died, forwarded to the backup.
//!
//! Between the primary daemon's death and the backup's takeover (about 15 ms here), clients keep
//! sending to the primary's host: the LAN still sends the guest's MAC there. The daemon's TAP
//! closed with it, so those frames were dropped, and each client waited for its retransmission
//! timeout (at least 200 ms on Linux) before the backup saw its request. The primary's lease
//! watchdog, which outlives the daemon, holds a duplicate of the daemon's TAP: the TAP stays, its
//! queue keeps what arrives, and after the death [`forward_late_input`] reads it for a short window
//! and sends each frame to the backup's A-Link address in a datagram
//! ([`ftvm_proto::late_input`]).
//!
//! The backup's [`LateInputListener`] hands the datagrams to a [`LateInbox`]. The inbox opens them
//! with the key of the primary daemon the receiver's session last served (its id came in the
//! session's `LeaseTerm` frame, [`LateInbox::bind`]), so nothing of another daemon's life, nor
//! anything forged, gets in. It keeps them until the takeover ([`LateInbox::take_over`]), which
//! gives them to the restored VM after the input the dead primary had forwarded itself, then
//! delivers what still comes for a short window, each frame once.
//!
//! Input only, and best effort: none of this releases output, and a frame lost here costs its
//! client only the retransmission it would have needed anyway.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_proto::late_input::{
    late_input_key, open_late_frame, seal_death_notice, seal_late_frame, LateInputId, LateKind, MAX_LATE_INPUT_DATAGRAM,
};
use ftvm_proto::limits::MAX_GUEST_FRAME;

use crate::lock;

/// How long a dead primary's watchdog forwards what reaches its TAP: past the backup's takeover
/// and its gratuitous ARP, after which the LAN sends the guest's frames to the backup's host.
pub const FORWARD_WINDOW: Duration = Duration::from_millis(500);
/// Most frames one watchdog forwards.
pub const FORWARD_MAX_FRAMES: usize = 4096;
/// How long after its takeover the backup still takes late input in.
pub const DELIVER_WINDOW: Duration = Duration::from_secs(1);
/// Most frames the backup keeps before its takeover, and their bytes.
const HELD_MAX_FRAMES: usize = 1024;
const HELD_MAX_BYTES: usize = 2 << 20;
/// Most frames taken from one primary daemon, kept or delivered (bounds the duplicate set too).
const ACCEPT_MAX_FRAMES: usize = FORWARD_MAX_FRAMES;
/// How often the listener looks whether it should stop.
const LISTEN_LOOK_EVERY: Duration = Duration::from_millis(100);

/// Where and how a watchdog forwards.
#[derive(Clone)]
pub struct LateForward {
    /// The backup's A-Link address (its receiver's, UDP on the same port).
    pub to: SocketAddr,
    /// [`late_input_key`] of the A-Link secret and the daemon's id.
    pub key: [u8; 32],
    /// The dead primary's lease term.
    pub term: u64,
    /// How long to read the TAP.
    pub window: Duration,
}

impl LateForward {
    /// Forwarding to `to` for the daemon with `id`, over the default window.
    pub fn new(to: SocketAddr, secret: &[u8], id: &LateInputId, term: u64) -> Self {
        Self { to, key: late_input_key(secret, id), term, window: FORWARD_WINDOW }
    }
}

impl std::fmt::Debug for LateForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LateForward").field("to", &self.to).field("term", &self.term).field("window", &self.window).finish()
    }
}

/// What [`forward_late_input`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardReport {
    /// Frames sent.
    pub frames: u64,
    /// Frames that could not be sent (the backup's host unreachable, or not listening).
    pub send_errors: u64,
}

impl ForwardReport {
    /// Frames read from the TAP: each one's sequence number is the count before it.
    fn read(&self) -> u64 {
        self.frames + self.send_errors
    }
}

/// Copies of the death notice sent: UDP may lose one.
const DEATH_NOTICE_COPIES: usize = 2;

/// Tells the backup that the daemon died and its lease is released (see
/// [`ftvm_proto::late_input`]), so that it takes over without waiting for the daemon's A-Link
/// connection to close or fall silent.
pub fn send_death_notice(cfg: &LateForward) -> io::Result<()> {
    let socket = connected_socket(cfg.to)?;
    let notice = seal_death_notice(&cfg.key, cfg.term);
    for _ in 0..DEATH_NOTICE_COPIES {
        socket.send(&notice)?;
    }
    Ok(())
}

/// A UDP socket that sends to `to` only (and takes nothing from anyone else).
fn connected_socket(to: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(local)?;
    socket.connect(to)?;
    Ok(socket)
}

/// Sends `taken` (what the dead daemon's VM had taken in and not sent ahead, see
/// [`crate::taken_ring`]), then reads what arrives on `tap` (a non-blocking TAP with the
/// virtio-net header, the dead daemon's: each read is one frame) for `cfg.window` and sends each
/// frame to the backup. Bounded by the window and by [`FORWARD_MAX_FRAMES`].
pub fn forward_late_input(mut tap: &File, taken: &[Vec<u8>], cfg: &LateForward) -> io::Result<ForwardReport> {
    let socket = connected_socket(cfg.to)?;
    let deadline = Instant::now() + cfg.window;
    let mut report = ForwardReport::default();
    // Each frame is numbered by how many were read before it, sent or not.
    let send = |report: &mut ForwardReport, frame: &[u8]| {
        match socket.send(&seal_late_frame(&cfg.key, cfg.term, report.read(), frame)) {
            Ok(_) => report.frames += 1,
            Err(_) => report.send_errors += 1,
        }
    };
    for frame in taken.iter().take(FORWARD_MAX_FRAMES) {
        send(&mut report, frame);
    }
    let mut buf = vec![0u8; MAX_GUEST_FRAME];
    while report.read() < FORWARD_MAX_FRAMES as u64 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut pfd = libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd for the call; the fd is borrowed for this function.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // Everything queued, then wait again.
        while report.read() < FORWARD_MAX_FRAMES as u64 {
            let n = match tap.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            send(&mut report, &buf[..n]);
        }
    }
    Ok(report)
}

/// What the backup's inbox did with late input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LateInputStats {
    /// Datagrams that opened, each taken once.
    pub accepted: u64,
    /// Frames given to the restored VM's network device.
    pub delivered: u64,
    /// Datagrams that did not open (another key, changed bytes, a wrong size), or of another term.
    pub refused: u64,
    /// Datagrams taken before (the same sequence number).
    pub duplicates: u64,
    /// Datagrams past the limits, or after the delivery window.
    pub over_limit: u64,
    /// Death notices of the bound daemon (absent in files of older versions).
    #[serde(default)]
    pub death_notices: u64,
}

/// Gives frames to the restored VM (its network device's `replay_rx`); returns how many it took.
pub type LateSink = Box<dyn FnMut(Vec<Vec<u8>>) -> usize + Send>;

struct Binding {
    key: [u8; 32],
    term: u64,
}

#[derive(Default)]
struct InboxState {
    binding: Option<Binding>,
    seen: HashSet<u64>,
    held: Vec<Vec<u8>>,
    held_bytes: usize,
    sink: Option<LateSink>,
    deliver_until: Option<Instant>,
    stats: LateInputStats,
    /// The bound daemon's watchdog said it died.
    death_noticed: bool,
}

/// The backup's late input, between the listener and the takeover. See the module documentation.
pub struct LateInbox {
    secret: Vec<u8>,
    state: Mutex<InboxState>,
}

impl std::fmt::Debug for LateInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LateInbox").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl LateInbox {
    /// An inbox for the A-Link `secret`, bound to no daemon yet.
    pub fn new(secret: &[u8]) -> Arc<Self> {
        Arc::new(Self { secret: secret.to_vec(), state: Mutex::default() })
    }

    /// A primary's session began: from now on only its daemon's late input opens (none, if it
    /// forwards none: `id` is `None`). What an earlier daemon sent is dropped.
    pub fn bind(&self, term: u64, id: Option<LateInputId>) {
        let mut s = lock(&self.state);
        if s.sink.is_some() {
            // Taken over already: this host is the primary now, nothing to bind.
            return;
        }
        s.binding = id.map(|id| Binding { key: late_input_key(&self.secret, &id), term });
        s.death_noticed = false;
        s.seen.clear();
        s.held.clear();
        s.held_bytes = 0;
    }

    /// Takes one datagram in.
    pub fn accept(&self, datagram: &[u8]) {
        let mut s = lock(&self.state);
        let s = &mut *s;
        let Some(binding) = &s.binding else {
            s.stats.refused += 1;
            return;
        };
        let frame = match open_late_frame(&binding.key, datagram) {
            Ok(f) if f.term == binding.term => f,
            Ok(_) | Err(_) => {
                s.stats.refused += 1;
                return;
            }
        };
        if frame.kind == LateKind::DeathNotice {
            s.stats.death_notices += 1;
            s.death_noticed = true;
            return;
        }
        if s.deliver_until.is_some_and(|t| Instant::now() > t) || s.seen.len() >= ACCEPT_MAX_FRAMES {
            s.stats.over_limit += 1;
            return;
        }
        if !s.seen.insert(frame.seq) {
            s.stats.duplicates += 1;
            return;
        }
        match &mut s.sink {
            Some(sink) => {
                s.stats.accepted += 1;
                s.stats.delivered += sink(vec![frame.frame.to_vec()]) as u64;
            }
            None if s.held.len() < HELD_MAX_FRAMES && s.held_bytes + frame.frame.len() <= HELD_MAX_BYTES => {
                s.stats.accepted += 1;
                s.held_bytes += frame.frame.len();
                s.held.push(frame.frame.to_vec());
            }
            None => {
                s.seen.remove(&frame.seq);
                s.stats.over_limit += 1;
            }
        }
    }

    /// This host took over: what was kept goes to `sink` now (after the input the dead primary
    /// forwarded itself, which the promotion queued first), and what comes within
    /// [`DELIVER_WINDOW`] goes there as it comes. Returns how many frames were delivered now.
    pub fn take_over(&self, mut sink: LateSink) -> usize {
        let mut s = lock(&self.state);
        let held = std::mem::take(&mut s.held);
        s.held_bytes = 0;
        let delivered = if held.is_empty() { 0 } else { sink(held) };
        s.stats.delivered += delivered as u64;
        s.sink = Some(sink);
        s.deliver_until = Some(Instant::now() + DELIVER_WINDOW);
        delivered
    }

    /// The watchdog of the daemon this inbox is bound to said that daemon died (and released its
    /// lease): the backup may take over at once.
    pub fn death_noticed(&self) -> bool {
        lock(&self.state).death_noticed
    }

    /// The delivery window after a takeover has passed: nothing more is taken in.
    pub fn finished(&self) -> bool {
        lock(&self.state).deliver_until.is_some_and(|t| Instant::now() > t)
    }

    /// The counters.
    pub fn stats(&self) -> LateInputStats {
        lock(&self.state).stats
    }
}

/// The backup's UDP socket for late input, on its A-Link address, and the thread that reads it.
/// Stops when dropped, or by itself once the inbox's delivery window has passed.
#[derive(Debug)]
pub struct LateInputListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LateInputListener {
    /// Binds `addr` (UDP) and starts reading into `inbox`.
    pub fn start(addr: SocketAddr, inbox: Arc<LateInbox>) -> io::Result<Self> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(LISTEN_LOOK_EVERY))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new().name("ftvm-late-input".into()).spawn(move || {
                // One more than the largest datagram: a longer one arrives cut, and is refused.
                let mut buf = vec![0u8; MAX_LATE_INPUT_DATAGRAM + 1];
                // Bounded by `stop` and by the end of the delivery window.
                while !stop.load(Ordering::Relaxed) && !inbox.finished() {
                    match socket.recv(&mut buf) {
                        Ok(n) => inbox.accept(&buf[..n]),
                        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "the late input socket failed; no more late input");
                            return;
                        }
                    }
                }
            })?
        };
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for LateInputListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn id(b: u8) -> LateInputId {
        LateInputId([b; 16])
    }

    fn datagram(term: u64, seq: u64, frame: &[u8]) -> Vec<u8> {
        seal_late_frame(&late_input_key(SECRET, &id(1)), term, seq, frame)
    }

    /// A sink that records what it is given.
    fn recording() -> (LateSink, Arc<Mutex<Vec<Vec<u8>>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        (Box::new(move |frames: Vec<Vec<u8>>| {
            let n = frames.len();
            lock(&g).extend(frames);
            n
        }), got)
    }

    #[test]
    fn the_inbox_keeps_its_daemons_frames_once_and_delivers_them_at_the_takeover_then_as_they_come() {
        let inbox = LateInbox::new(SECRET);
        // Bound to nothing: nothing opens.
        inbox.accept(&datagram(5, 0, b"early"));
        inbox.bind(5, Some(id(1)));
        inbox.accept(&datagram(5, 0, b"first"));
        inbox.accept(&datagram(5, 0, b"first"));
        inbox.accept(&datagram(5, 1, b"second"));
        // Another daemon's key, another term, a changed byte.
        inbox.accept(&seal_late_frame(&late_input_key(SECRET, &id(2)), 5, 2, b"other daemon"));
        inbox.accept(&datagram(4, 3, b"old term"));
        let mut bad = datagram(5, 4, b"changed");
        bad[30] ^= 1;
        inbox.accept(&bad);
        let (sink, got) = recording();
        assert_eq!(inbox.take_over(sink), 2);
        assert_eq!(*lock(&got), vec![b"first".to_vec(), b"second".to_vec()]);
        inbox.accept(&datagram(5, 5, b"after"));
        inbox.accept(&datagram(5, 1, b"second"));
        assert_eq!(lock(&got).len(), 3);
        assert_eq!(lock(&got)[2], b"after");
        // A session after the takeover (this host is the primary now) changes nothing.
        inbox.bind(9, Some(id(3)));
        inbox.accept(&datagram(5, 6, b"still"));
        assert_eq!(lock(&got).len(), 4);
        assert_eq!(
            inbox.stats(),
            LateInputStats { accepted: 4, delivered: 4, refused: 4, duplicates: 2, over_limit: 0, death_notices: 0 }
        );
        assert!(!inbox.finished());
    }

    #[test]
    fn only_the_bound_daemons_death_notice_counts_and_a_new_session_forgets_it() {
        let inbox = LateInbox::new(SECRET);
        let notice = |id: LateInputId, term| seal_death_notice(&late_input_key(SECRET, &id), term);
        inbox.accept(&notice(id(1), 5));
        assert!(!inbox.death_noticed(), "bound to no daemon yet");
        inbox.bind(5, Some(id(1)));
        inbox.accept(&notice(id(2), 5));
        inbox.accept(&notice(id(1), 4));
        let mut bad = notice(id(1), 5);
        bad[20] ^= 1;
        inbox.accept(&bad);
        assert!(!inbox.death_noticed(), "another daemon's, another term's, a changed one");
        inbox.accept(&notice(id(1), 5));
        assert!(inbox.death_noticed());
        assert_eq!(inbox.stats().death_notices, 1);
        assert_eq!(inbox.stats().refused, 4);
        // A notice is no frame: nothing to deliver.
        let (sink, got) = recording();
        assert_eq!(inbox.take_over(sink), 0);
        assert!(lock(&got).is_empty());
        let inbox = LateInbox::new(SECRET);
        inbox.bind(5, Some(id(1)));
        inbox.accept(&notice(id(1), 5));
        inbox.bind(6, Some(id(2)));
        assert!(!inbox.death_noticed(), "the next daemon lives");
    }

    #[test]
    fn a_new_session_drops_what_an_earlier_daemon_sent() {
        let inbox = LateInbox::new(SECRET);
        inbox.bind(5, Some(id(1)));
        inbox.accept(&datagram(5, 0, b"from the first life"));
        inbox.bind(5, Some(id(2)));
        // The first daemon's datagrams no longer open, even replayed.
        inbox.accept(&datagram(5, 1, b"replayed"));
        inbox.bind(6, None);
        inbox.accept(&datagram(5, 2, b"no id"));
        let (sink, got) = recording();
        assert_eq!(inbox.take_over(sink), 0);
        assert!(lock(&got).is_empty());
        assert_eq!(inbox.stats().refused, 2);
    }

    #[test]
    fn the_inbox_keeps_at_most_its_limit_before_the_takeover() {
        let inbox = LateInbox::new(SECRET);
        inbox.bind(5, Some(id(1)));
        for seq in 0..(HELD_MAX_FRAMES as u64 + 10) {
            inbox.accept(&datagram(5, seq, &[0u8; 64]));
        }
        assert_eq!(inbox.stats().accepted, HELD_MAX_FRAMES as u64);
        assert_eq!(inbox.stats().over_limit, 10);
        let (sink, got) = recording();
        assert_eq!(inbox.take_over(sink), HELD_MAX_FRAMES);
        // A frame turned away for room is taken when it comes again after the takeover.
        inbox.accept(&datagram(5, HELD_MAX_FRAMES as u64, &[1u8; 64]));
        assert_eq!(lock(&got).len(), HELD_MAX_FRAMES + 1);
    }

    /// The forwarder reads frames as a TAP gives them (one per read: a datagram socket pair
    /// stands in for the TAP) and the listener takes them, over real UDP on loopback.
    #[test]
    fn what_reaches_the_dead_primarys_tap_reaches_the_backups_inbox() {
        let inbox = LateInbox::new(SECRET);
        inbox.bind(7, Some(id(1)));
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let listener = LateInputListener::start(addr, Arc::clone(&inbox)).unwrap();
        let (tap_far, tap_near) = UnixDatagram::pair().unwrap();
        tap_near.set_nonblocking(true).unwrap();
        // Frames queued before the forwarder starts (arrived while the daemon was dying), and one
        // during its window.
        tap_far.send(b"queued at the death").unwrap();
        tap_far.send(&vec![9u8; 1500]).unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tap_far.send(b"arrived later").unwrap();
            tap_far
        });
        let mut cfg = LateForward::new(addr, SECRET, &id(1), 7);
        cfg.window = Duration::from_millis(300);
        let tap = File::from(OwnedFd::from(tap_near));
        // And one the daemon's VM had taken in without sending it ahead: it goes first.
        let taken = vec![b"taken, not sent ahead".to_vec()];
        let report = forward_late_input(&tap, &taken, &cfg).unwrap();
        let _tap_far = sender.join().unwrap();
        assert_eq!(report, ForwardReport { frames: 4, send_errors: 0 });
        let deadline = Instant::now() + Duration::from_secs(5);
        while inbox.stats().accepted < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (sink, got) = recording();
        assert_eq!(inbox.take_over(sink), 4);
        let got = lock(&got).clone();
        let want = [&b"taken, not sent ahead"[..], b"queued at the death", &[9u8; 1500], b"arrived later"];
        assert_eq!(got, want.map(<[u8]>::to_vec));
        // The death notice goes the same way.
        assert!(!inbox.death_noticed());
        send_death_notice(&cfg).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !inbox.death_noticed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(inbox.death_noticed(), "the notice did not arrive");
        drop(listener);
    }
}
