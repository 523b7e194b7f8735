//! [`Prober`]: probes a peer's heartbeat responder over UDP.
//!
//! The prober's own kernel delivers the replies to its socket: replies are not probes, so the
//! responder attached to our own A-Link end passes them up (XDP_PASS).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use ftvm_ebpf_common::heartbeat::{DaemonState, ProbeFrame, KIND_REPLY, PORT};

use crate::clock::monotonic_ns;

/// Why probing failed (a missing reply is not an error: it is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("Cannot open the probe socket on {local}")]
    Bind {
        local: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("Cannot send a probe to {peer}")]
    Send {
        peer: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("Cannot receive probe replies")]
    Receive(#[source] io::Error),
}

/// A reply from the peer's responder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeReply {
    pub seq: u64,
    /// Round trip, from sending the probe to receiving this reply.
    pub rtt: Duration,
    /// The peer's generation (term).
    pub generation: u64,
    pub committed_epoch: u64,
    /// The peer's clock: when its daemon last made progress.
    pub daemon_progress_ns: u64,
    pub daemon_state: DaemonState,
    /// The peer's clock: when the responder answered.
    pub replied_ns: u64,
}

impl ProbeReply {
    /// How long before the reply the peer's daemon last made progress (both times on the peer's
    /// clock); `None` if it never published any.
    pub fn progress_age(&self) -> Option<Duration> {
        (self.daemon_progress_ns != 0).then(|| Duration::from_nanos(self.replied_ns.saturating_sub(self.daemon_progress_ns)))
    }
}

/// A UDP socket that probes one peer's responder.
#[derive(Debug)]
pub struct Prober {
    socket: UdpSocket,
    peer: SocketAddrV4,
    next_seq: u64,
    /// The last probe sent: (seq, monotonic ns). Replies to earlier probes are dropped.
    outstanding: Option<(u64, u64)>,
}

impl Prober {
    /// A prober bound to `local` (the A-Link address; port 0 picks one) that probes `peer`'s
    /// responder on [`PORT`].
    pub fn bind(local: SocketAddrV4, peer: Ipv4Addr) -> Result<Prober, ProbeError> {
        let socket = UdpSocket::bind(local).map_err(|source| ProbeError::Bind { local, source })?;
        // Sequence numbers start from the clock, so a restarted prober does not take a late
        // reply to its predecessor's probe for its own.
        Ok(Prober { socket, peer: SocketAddrV4::new(peer, PORT), next_seq: monotonic_ns(), outstanding: None })
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends a probe; returns its sequence number. A reply to an earlier probe is ignored from
    /// now on.
    pub fn send(&mut self) -> Result<u64, ProbeError> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let sent_ns = monotonic_ns();
        let frame = ProbeFrame::probe(seq, sent_ns).to_bytes();
        self.socket.send_to(&frame, self.peer).map_err(|source| ProbeError::Send { peer: self.peer, source })?;
        self.outstanding = Some((seq, sent_ns));
        Ok(seq)
    }

    /// Waits until `deadline` for the reply to the last probe sent. Anything else arriving
    /// (late replies, foreign datagrams) is read and dropped.
    pub fn poll(&mut self, deadline: Instant) -> Result<Option<ProbeReply>, ProbeError> {
        let Some((seq, sent_ns)) = self.outstanding else { return Ok(None) };
        let mut buf = [0u8; 2 * ProbeFrame::LEN];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // A zero timeout means "block for ever" to the socket: `left` is never zero here.
            self.socket.set_read_timeout(Some(left)).map_err(ProbeError::Receive)?;
            let (n, from) = match self.socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => continue,
                // An ICMP error for an earlier probe (port unreachable: no responder there).
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(ProbeError::Receive(e)),
            };
            let received_ns = monotonic_ns();
            if from != SocketAddr::V4(self.peer) {
                continue;
            }
            let Some(frame) = buf.get(..n).and_then(ProbeFrame::from_bytes) else { continue };
            if frame.kind != KIND_REPLY || frame.seq != seq {
                continue;
            }
            self.outstanding = None;
            return Ok(Some(ProbeReply {
                seq,
                rtt: Duration::from_nanos(received_ns.saturating_sub(sent_ns)),
                generation: frame.generation,
                committed_epoch: frame.committed_epoch,
                daemon_progress_ns: frame.daemon_progress_ns,
                daemon_state: DaemonState::from_u32(frame.daemon_state),
                replied_ns: frame.replied_ns,
            }));
        }
    }

    /// Sends a probe and waits up to `timeout` for its reply.
    pub fn probe(&mut self, timeout: Duration) -> Result<Option<ProbeReply>, ProbeError> {
        let deadline = Instant::now() + timeout;
        self.send()?;
        self.poll(deadline)
    }
}

#[cfg(test)]
mod tests {
    //! The prober against a userspace stand-in for the responder, on loopback (no root needed).
    //! The XDP responder itself is tested in tests/ebpf_gate.rs.

    use ftvm_ebpf_common::heartbeat::{KIND_PROBE, KIND_REPLY};

    use super::*;

    /// A loopback address of its own, so that port 7709 is free.
    const PEER: Ipv4Addr = Ipv4Addr::new(127, 77, 9, 1);

    #[test]
    fn probe_frames_round_trip_and_foreign_payloads_are_refused() {
        let mut f = ProbeFrame::probe(7, 123_456);
        f.kind = KIND_REPLY;
        f.generation = 3;
        f.committed_epoch = 99;
        f.daemon_progress_ns = 42;
        f.daemon_state = DaemonState::Dead as u32;
        f.replied_ns = 77;
        let b = f.to_bytes();
        assert_eq!(ProbeFrame::from_bytes(&b), Some(f));
        assert_eq!(ProbeFrame::from_bytes(&b[..63]), None);
        let mut longer = b.to_vec();
        longer.push(0);
        assert_eq!(ProbeFrame::from_bytes(&longer), None);
        for byte in [0, 4] {
            let mut wrong = b;
            wrong[byte] ^= 0x40;
            assert_eq!(ProbeFrame::from_bytes(&wrong), None, "byte {byte} changed");
        }
        assert_eq!(DaemonState::from_u32(77), DaemonState::Unknown);
    }

    #[test]
    fn replies_are_matched_by_sequence_and_everything_else_is_ignored() {
        let responder = UdpSocket::bind(SocketAddrV4::new(PEER, PORT)).expect("bind the stand-in responder");
        responder.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut prober = Prober::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), PEER).expect("bind the prober");

        // Nobody answers: None, after the timeout and not much later.
        let start = Instant::now();
        assert_eq!(prober.probe(Duration::from_millis(30)).expect("probe"), None);
        assert!(start.elapsed() >= Duration::from_millis(30) && start.elapsed() < Duration::from_secs(2));
        let mut buf = [0u8; 128];
        let (_, _) = responder.recv_from(&mut buf).expect("the unanswered probe");

        let stand_in = std::thread::spawn(move || {
            let mut buf = [0u8; 128];
            let (n, from) = responder.recv_from(&mut buf).expect("probe");
            let probe = ProbeFrame::from_bytes(&buf[..n]).expect("a probe frame");
            assert_eq!(probe.kind, KIND_PROBE);
            let reply = |seq: u64, kind: u16| {
                let mut r = probe;
                r.seq = seq;
                r.kind = kind;
                r.generation = 5;
                r.committed_epoch = 6;
                r.daemon_progress_ns = 1_000;
                r.daemon_state = DaemonState::Running as u32;
                r.replied_ns = 4_000;
                r.to_bytes()
            };
            // Noise first: a late reply to an older probe, an echo of the probe itself, garbage.
            responder.send_to(&reply(probe.seq - 1, KIND_REPLY), from).expect("send");
            responder.send_to(&reply(probe.seq, KIND_PROBE), from).expect("send");
            responder.send_to(b"not a frame", from).expect("send");
            responder.send_to(&reply(probe.seq, KIND_REPLY), from).expect("send");
        });
        let reply = prober.probe(Duration::from_secs(5)).expect("probe").expect("the reply");
        stand_in.join().expect("stand-in responder");
        assert_eq!((reply.generation, reply.committed_epoch, reply.daemon_state), (5, 6, DaemonState::Running));
        assert_eq!(reply.progress_age(), Some(Duration::from_nanos(3_000)));
        assert!(reply.rtt < Duration::from_secs(5));
        // The reply was consumed: polling again finds nothing outstanding.
        assert_eq!(prober.poll(Instant::now() + Duration::from_millis(10)).expect("poll"), None);
    }
}
