//! The TCP A-Link transport: the baseline every faster transport is measured against.
//!
//! The primary's thread writes frames with vectored writes: header, page slices straight from guest
//! memory, tag; each batch of slices is hashed into the frame's tag just before it is written, so the
//! pages are read once by the CPU (for the tag) while they are in cache, and copied once by the
//! kernel. A second thread owns the read half of the socket and receives the acknowledgements, so
//! the primary can send epoch N+1 while N's acknowledgement is on its way.
//!
//! How the batches reach the socket is [`TcpOptions::io`]: `writev` (the default), or io_uring,
//! optionally with zero-copy sends of the pages (`writer.rs`, `uring.rs`). The bytes on the wire
//! are the same.
//!
//! With [`TcpOptions::rdma`] the page payloads of incremental epochs go as RDMA WRITEs into the
//! backup's staging ring instead (`rdma/`), and this link carries their placement descriptors and
//! everything else: the frame path stays this one.
//!
//! Timeouts: connecting and the handshake have their own; every write has the write timeout; acks
//! have the caller's deadline. The acknowledgement thread blocks without a timeout and is ended by
//! shutting the socket down (on drop, or when a write fails).

use std::collections::VecDeque;
use std::io::{self, BufReader};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_proto::frame::{FrameKind, FrameOpener, FrameSealer};
use ftvm_proto::handshake;
use ftvm_proto::pages::PageRangeSet;
use ftvm_proto::EpochId;

use super::rdma::primary::RdmaPrimary;
use super::rdma::{RdmaOptions, RdmaStats};
use super::sent_pages::SentPages;
use super::writer::{write_frame, LinkWriter};
use super::{
    AckEvent, AckListener, AckToken, BeginEpochError, CheckpointTransport, CommitError, ConnectError, HandOverError, IngressLink, LinkError,
    PageSource, SendDiskImageError, SendDiskWritesError, SendOutputError, SendPagesError, SendStateError, WaitAckError,
};
use crate::disk::DiskWrite;
use ftvm_proto::cpu::{check_restorable, GuestCpuNeeds, HostCpuCaps};
use ftvm_proto::epoch::{self, DiskMarks, EpochAck, EpochBegin, EpochCommit, EpochDigest, LeaseTerm, StandbyInfo};
use ftvm_proto::late_input::LateInputId;
use ftvm_proto::limits::{MAX_CHUNK_BYTES, MAX_DISK_WRITE_BYTES, MAX_PAGES_PER_FRAME};
use crate::{ErrorChain, PAGE_SIZE, SECTOR_SIZE};
use crate::lock;

pub use super::writer::LinkIo;

/// Longest wait, after a goodbye, for the backup to close its side.
const GOODBYE_LINGER: Duration = Duration::from_millis(200);

/// Settings of a [`TcpTransport`].
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Longest wait for the TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for each read of the handshake and of the standby information.
    pub handshake_timeout: Duration,
    /// Longest time one write may block (the socket buffer full because the backup does not read).
    pub write_timeout: Duration,
    /// Socket send and receive buffer sizes to request; `None` leaves the kernel's autotuning. A set
    /// size turns autotuning off and is capped by `net.core.wmem_max` / `rmem_max`.
    pub socket_buffer: Option<usize>,
    /// Most epochs committed and not yet acknowledged; `begin_epoch` fails beyond it.
    pub max_in_flight: usize,
    /// The guest's memory size, checked against the backup's standby memory.
    pub memory_bytes: Option<u64>,
    /// The guest's disk size, checked against the backup's standby disk.
    pub disk_bytes: Option<u64>,
    /// The lease term this primary's copy is current for, told to the backup (protocol 1.2 and
    /// later; none: 0, no quorum): the backup names it when it claims the lease to take over.
    pub lease_term: Option<u64>,
    /// The id this daemon's lease watchdog tags the guest input it forwards after the daemon's
    /// death with, told to the backup beside the term (protocol 1.8 and later; an older backup
    /// does not learn it and takes no such input). See `ftvm_proto::late_input`.
    pub late_input: Option<LateInputId>,
    /// What the guest's CPU state needs from the host that restores it, checked against the
    /// backup's capabilities (protocol 1.3 and later; an older backup is not checked, with a
    /// warning). `None`: not checked.
    pub cpu_needs: Option<GuestCpuNeeds>,
    /// How frames are written to the socket: `writev` (the default) or io_uring, optionally with
    /// zero-copy sends of guest pages. The wire is the same either way, so any choice pairs with
    /// any backup. An io_uring choice the kernel cannot serve fails the connect
    /// ([`ConnectError::UringUnsupported`]); there is no silent fallback.
    pub io: LinkIo,
    /// Page payloads by RDMA (cargo feature `rdma`; `None`: by this TCP link). The backup must
    /// have been started with RDMA too; a build without the feature, a missing device or a backup
    /// that refuses fails the connect ([`ConnectError::Rdma`]): no silent fallback.
    pub rdma: Option<RdmaOptions>,
    /// Pages an epoch carries again go as their difference from the copy the backup holds
    /// (protocol 1.9 and later; `ftvm_proto::page_delta`), keeping at most this many pages' copies
    /// (`0`: every page goes whole). Not with RDMA, whose pages go whole into the backup's ring.
    pub page_delta_pages: usize,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(1),
            socket_buffer: Some(4 << 20),
            max_in_flight: 64,
            memory_bytes: None,
            disk_bytes: None,
            lease_term: None,
            late_input: None,
            cpu_needs: None,
            io: LinkIo::Socket,
            rdma: None,
            page_delta_pages: super::sent_pages::DEFAULT_KEPT_PAGES,
        }
    }
}

/// Tells every transport apart, so a token cannot be redeemed on a later link.
static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Default)]
struct AckState {
    acked: Option<EpochId>,
    /// Committed epochs waiting for their acknowledgement, oldest first, with their commit time.
    in_flight: VecDeque<(EpochId, Instant)>,
    /// Why the link is down, once it is.
    down: Option<String>,
    /// Set by the first failure, before the listener hears of it; `down` is published after, so
    /// that whoever sees the link down finds the listener already told (the same promise as acks).
    down_claimed: bool,
}

/// What the sending thread and the acknowledgement thread share.
struct AckShared {
    state: Mutex<AckState>,
    cv: Condvar,
    listener: Mutex<Option<AckListener>>,
}

impl std::fmt::Debug for AckShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckShared").field("state", &self.state).finish_non_exhaustive()
    }
}

impl AckShared {
    fn notify(&self, event: AckEvent) {
        if let Some(l) = lock(&self.listener).as_mut() {
            l(event);
        }
    }

    /// Records the first failure; later ones are consequences of it. `closed` marks an orderly
    /// close by this side, which is not worth a warning.
    fn mark_down(&self, reason: String) {
        self.mark_down_as(reason, false);
    }

    fn mark_down_as(&self, reason: String, closed: bool) {
        {
            let mut s = lock(&self.state);
            if s.down_claimed {
                return;
            }
            s.down_claimed = true;
        }
        if closed {
            tracing::info!(%reason, "A-Link closed");
        } else {
            tracing::warn!(%reason, "A-Link down");
        }
        self.notify(AckEvent::LinkDown { reason: reason.clone() });
        lock(&self.state).down = Some(reason);
        self.cv.notify_all();
    }

    fn down(&self) -> Option<String> {
        lock(&self.state).down.clone()
    }

    /// An acknowledgement arrived: it must be for the oldest epoch in flight. The listener hears of
    /// it before any `wait_ack` returns, so whoever waits finds the release already done.
    fn on_ack(&self, epoch: EpochId) -> Result<(), String> {
        let round_trip = {
            let mut s = lock(&self.state);
            match s.in_flight.front() {
                Some(&(e, sent)) if e == epoch => {
                    s.in_flight.pop_front();
                    sent.elapsed()
                }
                Some(&(e, _)) => return Err(format!("backup acknowledged epoch {epoch}, expected {e}")),
                None => return Err(format!("backup acknowledged epoch {epoch}, none is in flight")),
            }
        };
        tracing::debug!(epoch = epoch.0, ack_us = round_trip.as_micros() as u64, "epoch acknowledged");
        self.notify(AckEvent::Acked { epoch, round_trip });
        lock(&self.state).acked = Some(epoch);
        self.cv.notify_all();
        Ok(())
    }
}

/// The epoch being sent.
#[derive(Debug)]
struct OpenEpoch {
    begin: EpochBegin,
    digest: EpochDigest,
    pages: u64,
    state: u64,
    writes: u64,
    image: u64,
    bytes: u64,
    /// The epoch's pages go by RDMA.
    rdma: bool,
    span: tracing::Span,
}

/// The primary's end of a TCP A-Link.
#[derive(Debug)]
pub struct TcpTransport {
    /// The socket, for shutting it down (the writer and the acknowledgement thread hold duplicates).
    stream: TcpStream,
    /// Where frames are written, and their sealer: shared with the ingress forwarder
    /// ([`CheckpointTransport::ingress_link`]), whose frames go between the engine's.
    channel: Arc<Mutex<Channel>>,
    shared: Arc<AckShared>,
    reader: Option<JoinHandle<()>>,
    peer: StandbyInfo,
    peer_marks: Option<DiskMarks>,
    peer_digest: Option<[u8; 32]>,
    peer_addr: SocketAddr,
    link: u64,
    max_in_flight: usize,
    open: Option<OpenEpoch>,
    last_begun: Option<EpochId>,
    /// Scratch for the head of list payloads (page ranges, disk write table).
    head: Vec<u8>,
    /// The protocol minor both sides speak.
    minor: u8,
    /// Page payloads by RDMA, when asked for.
    rdma: Option<RdmaPrimary>,
    /// How long RDMA writes may take to complete at a commit.
    write_timeout: Duration,
    /// The pages this session sent, when their deltas go (see [`TcpOptions::page_delta_pages`]).
    sent_pages: Option<SentPages>,
}

/// The writing half of the link: every frame the primary sends goes through it, one whole frame
/// at a time, so the engine's frames and the ingress forwarder's interleave whole and in sequence.
#[derive(Debug)]
struct Channel {
    writer: LinkWriter,
    sealer: FrameSealer,
    /// `TCP_CORK` is set (an epoch is being written).
    corked: bool,
}

/// [`write_frame`] on the shared channel.
fn write_on(
    channel: &Mutex<Channel>,
    kind: FrameKind,
    epoch: u64,
    head: &[u8],
    pieces: &[&[u8]],
    stable_pieces: bool,
) -> Result<[u8; ftvm_proto::frame::TAG_LEN], LinkError> {
    let mut c = lock(channel);
    let c = &mut *c;
    write_frame(&mut c.writer, &mut c.sealer, kind, epoch, head, pieces, stable_pieces)
}

/// The ingress forwarder's handle on a TCP link (minor 7 and later).
#[derive(Debug)]
struct TcpIngress {
    channel: Arc<Mutex<Channel>>,
    shared: Arc<AckShared>,
    stream: TcpStream,
}

/// Input frames up to this size may be sent by [`IngressLink::try_send_ingress`]: a socket that
/// polls writable has at least this much room.
const DIRECT_INGRESS_BYTES: usize = 16 << 10;

impl IngressLink for TcpIngress {
    fn send_ingress(&self, epoch: u64, payload: &[u8]) -> Result<(), LinkError> {
        if let Some(reason) = self.shared.down() {
            return Err(LinkError::Down { reason });
        }
        self.send_locked(&mut lock(&self.channel), epoch, payload)
    }

    fn try_send_ingress(&self, epoch: u64, payload: &[u8]) -> Option<Result<(), LinkError>> {
        if payload.len() > DIRECT_INGRESS_BYTES {
            return None;
        }
        if let Some(reason) = self.shared.down() {
            return Some(Err(LinkError::Down { reason }));
        }
        let mut c = self.channel.try_lock().ok()?;
        let mut writable = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, a zero timeout; poll writes only its `revents`.
        let n = unsafe { libc::poll(&mut writable, 1, 0) };
        if n != 1 || writable.revents & libc::POLLOUT == 0 {
            return None;
        }
        Some(self.send_locked(&mut c, epoch, payload))
    }
}

impl TcpIngress {
    /// Writes and pushes one Ingress frame, the channel held.
    fn send_locked(&self, c: &mut Channel, epoch: u64, payload: &[u8]) -> Result<(), LinkError> {
        match write_frame(&mut c.writer, &mut c.sealer, FrameKind::Ingress, epoch, payload, &[], false) {
            Ok(_) => {
                // Out now, even inside a corked epoch (setting TCP_NODELAY pushes what is pending):
                // input held back in this host's socket dies with it. Once sent, it reaches the
                // backup's socket even if this process dies next (the backup reads what arrived
                // before a reset). Uncorked, the write itself sent it (the socket has TCP_NODELAY).
                if c.corked {
                    if let Err(e) = set_int_option(&self.stream, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1) {
                        tracing::debug!(error = %e, "TCP_NODELAY to push guest input");
                    }
                }
                Ok(())
            }
            Err(e) => {
                // As the engine's own failed writes: the stream may hold half a frame now.
                self.shared.mark_down(format!("forwarding guest input: {}", ErrorChain(&e)));
                let _ = self.stream.shutdown(Shutdown::Both);
                c.writer.forsake();
                Err(e)
            }
        }
    }
}

fn set_socket_buffer(stream: &TcpStream, option: libc::c_int, bytes: usize) -> io::Result<()> {
    set_int_option(stream, libc::SOL_SOCKET, option, libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX))
}

/// Corks the socket (`TCP_CORK`) while an epoch is written, uncorks it at the commit: the frames
/// of a small epoch (begin, pages, state, output, commit) then leave as one segment instead of
/// five, which wakes the backup's receiver once instead of five times (the socket has
/// `TCP_NODELAY`, so without the cork every write goes out at once). A full segment still leaves
/// as soon as it is full; uncorking sends what is left at once.
/// [`set_cork`], recorded in the channel (the ingress writer pushes only inside a corked epoch).
fn cork(channel: &Mutex<Channel>, stream: &TcpStream, on: bool) {
    let mut c = lock(channel);
    set_cork(stream, on);
    c.corked = on;
}

fn set_cork(stream: &TcpStream, on: bool) {
    if let Err(e) = set_int_option(stream, libc::IPPROTO_TCP, libc::TCP_CORK, libc::c_int::from(on)) {
        tracing::debug!(error = %e, on, "TCP_CORK");
    }
}

fn set_int_option(stream: &TcpStream, level: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the descriptor is the open socket `stream` borrows for the whole call; the option value
    // points to a c_int that lives across the call, and its exact size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The backup's next frame while the link is set up: the payload of a `want` frame; a goodbye is
/// its refusal, and any other kind is out of place.
fn read_answer(opener: &mut FrameOpener, io: &mut impl io::Read, want: FrameKind) -> Result<Vec<u8>, ConnectError> {
    let frame = opener.read(io).map_err(ConnectError::Info)?;
    match frame.header.kind {
        kind if kind == want => Ok(frame.payload),
        FrameKind::Goodbye => Err(ConnectError::Refused(String::from_utf8_lossy(&frame.payload).into_owned())),
        other => Err(ConnectError::Unexpected(other)),
    }
}

/// The RDMA exchange, right after the backup's last set-up frame: this side's queue pair out, the
/// backup's queue pair and staging ring back, then the queue pair connected.
#[cfg(feature = "rdma")]
fn connect_rdma<S: io::Read + io::Write>(
    options: &RdmaOptions,
    sealer: &mut FrameSealer,
    opener: &mut FrameOpener,
    io: &mut S,
    write_timeout: Duration,
) -> Result<RdmaPrimary, ConnectError> {
    use super::rdma::verbs::PrimarySetup;
    let (setup, local) = PrimarySetup::open(options).map_err(ConnectError::Rdma)?;
    sealer.write(io, FrameKind::RdmaEndpoint, 0, 0, &[&local.encode()]).map_err(ConnectError::Info)?;
    let answer = read_answer(opener, io, FrameKind::RdmaEndpoint)?;
    let peer = ftvm_proto::rdma::RdmaEndpoint::decode(&answer).map_err(ConnectError::MalformedRdma)?;
    let ring = peer.ring.map_or(0, |r| r.bytes);
    let writer = setup.connect(&peer, write_timeout).map_err(ConnectError::Rdma)?;
    Ok(RdmaPrimary::new(Box::new(writer), ring))
}

/// Without the `rdma` feature, asking for RDMA fails the connect, before anything is sent.
#[cfg(not(feature = "rdma"))]
fn connect_rdma<S: io::Read + io::Write>(
    _options: &RdmaOptions,
    _sealer: &mut FrameSealer,
    _opener: &mut FrameOpener,
    _io: &mut S,
    _write_timeout: Duration,
) -> Result<RdmaPrimary, ConnectError> {
    Err(ConnectError::Rdma(super::rdma::RdmaSetupError::NotBuilt))
}

fn ack_reader(stream: TcpStream, mut opener: FrameOpener, shared: Arc<AckShared>) {
    let mut input = BufReader::with_capacity(4096, stream);
    let mut payload = Vec::new();
    // Ends when the socket fails or is shut down (drop, or a failed write): every exit marks the link
    // down, which is a no-op when it already was.
    loop {
        let header = match opener.read_into(&mut input, &mut payload) {
            Ok(h) => h,
            Err(e) => return shared.mark_down(format!("receiving acknowledgements: {}", ErrorChain(&e))),
        };
        match header.kind {
            FrameKind::EpochAck => {
                let ack = match EpochAck::decode(&payload) {
                    Ok(a) if a.epoch.0 == header.epoch => a,
                    Ok(a) => return shared.mark_down(format!("acknowledgement of epoch {} in a frame of epoch {}", a.epoch, header.epoch)),
                    Err(e) => return shared.mark_down(format!("malformed acknowledgement: {e}")),
                };
                if let Err(reason) = shared.on_ack(ack.epoch) {
                    return shared.mark_down(reason);
                }
            }
            FrameKind::HeartbeatReply => {}
            FrameKind::TakingOver => {
                let reason = String::from_utf8_lossy(&payload).into_owned();
                tracing::error!(%reason, "the backup is taking over this VM");
                shared.notify(AckEvent::Superseded { reason: reason.clone() });
                return shared.mark_down(format!("the backup took over: {reason}"));
            }
            FrameKind::Goodbye => {
                return shared.mark_down(format!("backup closed the link: {}", String::from_utf8_lossy(&payload)))
            }
            other => return shared.mark_down(format!("backup sent an unexpected {other:?} frame")),
        }
    }
}

impl TcpTransport {
    /// Connects to the backup's A-Link address, runs the handshake as initiator with the shared
    /// secret, reads what the backup's standby holds, and starts the acknowledgement thread.
    pub fn connect(addr: SocketAddr, secret: &[u8], options: &TcpOptions) -> Result<Self, ConnectError> {
        let stream =
            TcpStream::connect_timeout(&addr, options.connect_timeout).map_err(|source| ConnectError::Connect { addr, source })?;
        stream.set_nodelay(true).map_err(ConnectError::Socket)?;
        if let Some(bytes) = options.socket_buffer {
            set_socket_buffer(&stream, libc::SO_SNDBUF, bytes).map_err(ConnectError::Socket)?;
            set_socket_buffer(&stream, libc::SO_RCVBUF, bytes).map_err(ConnectError::Socket)?;
        }
        stream.set_write_timeout(Some(options.write_timeout.max(Duration::from_millis(1)))).map_err(ConnectError::Socket)?;
        stream.set_read_timeout(Some(options.handshake_timeout.max(Duration::from_millis(1)))).map_err(ConnectError::Socket)?;

        // One deadline for the handshake and the standby information together.
        let deadline = Instant::now() + options.handshake_timeout.max(Duration::from_millis(1));
        let mut io = super::deadline::DeadlineStream::new(&stream, deadline);
        let session = handshake::initiate(&mut io, secret)?;
        let (mut sealer, mut opener) = (session.sealer, session.opener);
        // From 1.2 this side speaks first: its lease term (0: no quorum) is the first frame under
        // the session key, which is what makes the backup count the session, and the standby
        // information (or a refusal) answers it. A 1.1 backup sends its information at once.
        if session.minor >= 2 {
            let term = LeaseTerm {
                term: options.lease_term.unwrap_or(0),
                late_input: options.late_input.filter(|_| session.minor >= 8),
            };
            sealer.write(&mut io, FrameKind::LeaseTerm, 0, 0, &[&term.encode()]).map_err(ConnectError::Info)?;
        }
        let info = read_answer(&mut opener, &mut io, FrameKind::StandbyInfo)?;
        let peer = StandbyInfo::decode(&info).map_err(ConnectError::MalformedInfo)?;
        if let Some(guest) = options.memory_bytes.filter(|&g| g != peer.memory_bytes) {
            return Err(ConnectError::MemoryMismatch { backup: peer.memory_bytes, guest });
        }
        if let Some(guest) = options.disk_bytes.filter(|&g| g != peer.disk_bytes) {
            return Err(ConnectError::DiskMismatch { backup: peer.disk_bytes, guest });
        }
        // From 1.3 the backup's CPU capabilities follow: a backup whose KVM could not restore this
        // guest is no place it can resume, so it is refused here rather than reported protected.
        if session.minor >= 3 {
            let caps = read_answer(&mut opener, &mut io, FrameKind::HostCpu)?;
            let caps = HostCpuCaps::decode(&caps).map_err(ConnectError::MalformedCpu)?;
            if let Some(needs) = &options.cpu_needs {
                check_restorable(needs, &caps).map_err(ConnectError::CpuIncompatible)?;
            }
        } else if options.cpu_needs.is_some() {
            tracing::warn!(%addr, minor = session.minor, "the backup speaks protocol 1.{} and sends no CPU capabilities: whether it can resume this guest's CPU state could not be checked", session.minor);
        }
        // From 1.5 the backup's write-intent marks follow: a rejoin then copies only the disk's
        // regions that may differ. An older backup gets the whole disk.
        // And the digest of the state its standby holds: a primary that resumed from exactly
        // that state sends it only the pages written since.
        let (peer_marks, peer_digest) = if session.minor >= 5 {
            let marks = read_answer(&mut opener, &mut io, FrameKind::DiskMarks)?;
            let marks = DiskMarks::decode(&marks, peer.disk_bytes).map_err(ConnectError::MalformedMarks)?;
            let digest = read_answer(&mut opener, &mut io, FrameKind::StandbyDigest)?;
            let digest: [u8; 32] = digest[..].try_into().map_err(|_| ConnectError::MalformedDigest(digest.len()))?;
            (Some(marks), Some(digest).filter(|d| d.iter().any(|&b| b != 0) && peer.restorable))
        } else {
            (None, None)
        };

        // RDMA, when asked for: queue pairs are connected now, when the pair forms, never later.
        let rdma = match &options.rdma {
            Some(r) => Some(connect_rdma(r, &mut sealer, &mut opener, &mut io, options.write_timeout.max(Duration::from_millis(1)))?),
            None => None,
        };

        // From here on the acknowledgement thread reads without a timeout (acks only come when an
        // epoch is in flight); wait_ack's deadline bounds every wait, and shutdown ends the thread.
        stream.set_read_timeout(None).map_err(ConnectError::Socket)?;
        stream.set_write_timeout(Some(options.write_timeout.max(Duration::from_millis(1)))).map_err(ConnectError::Socket)?;
        let read_half = stream.try_clone().map_err(ConnectError::Socket)?;
        let write_half = stream.try_clone().map_err(ConnectError::Socket)?;
        let writer = LinkWriter::new(write_half, options.io, options.write_timeout)?;
        let shared = Arc::new(AckShared { state: Mutex::default(), cv: Condvar::new(), listener: Mutex::new(None) });
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("ftvm-alink-ack".into())
                .spawn(move || ack_reader(read_half, opener, shared))
                .map_err(ConnectError::Thread)?
        };
        let io_name = io_name(writer.name(), rdma.is_some());
        tracing::info!(%addr, committed = ?peer.committed, restorable = peer.restorable, io = io_name, "A-Link up");
        Ok(Self {
            stream,
            channel: Arc::new(Mutex::new(Channel { writer, sealer, corked: false })),
            shared,
            reader: Some(reader),
            peer,
            peer_marks,
            peer_digest,
            peer_addr: addr,
            link: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
            max_in_flight: options.max_in_flight.max(1),
            open: None,
            last_begun: None,
            head: Vec::new(),
            minor: session.minor,
            sent_pages: (session.minor >= 9 && rdma.is_none() && options.page_delta_pages > 0)
                .then(|| SentPages::new(options.page_delta_pages)),
            rdma,
            write_timeout: options.write_timeout.max(Duration::from_millis(1)),
        })
    }

    /// The backup's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The RDMA link's device and counters, when page payloads go by RDMA.
    pub fn rdma_stats(&self) -> Option<(&str, RdmaStats)> {
        self.rdma.as_ref().map(|r| (r.device(), r.stats()))
    }

    /// Sends an orderly goodbye (when no epoch is open) and closes the link.
    pub fn close(mut self, reason: &str) {
        self.say_goodbye(reason);
    }

    /// A goodbye when the framing allows it (no epoch half sent, the link not failed), then the
    /// link marked down as closed by this side.
    fn say_goodbye(&mut self, reason: &str) {
        let said = self.open.is_none()
            && self.shared.down().is_none()
            && write_on(&self.channel, FrameKind::Goodbye, 0, reason.as_bytes(), &[], false).is_ok();
        self.shared.mark_down_as(format!("closed by the primary: {reason}"), true);
        if said {
            // The goodbye must arrive: closing a socket that has unread bytes (a late heartbeat
            // reply) resets the connection and drops what is not sent yet. So: end our side after
            // the goodbye, and let the acknowledgement thread read until the backup closes its own.
            let _ = self.stream.shutdown(Shutdown::Write);
            let deadline = Instant::now() + GOODBYE_LINGER;
            while self.reader.as_ref().is_some_and(|r| !r.is_finished()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn check_up(&self) -> Result<(), LinkError> {
        match self.shared.down() {
            Some(reason) => Err(LinkError::Down { reason }),
            None => Ok(()),
        }
    }

    /// A write failed: the stream is now unusable (a frame may be half written), and nothing
    /// sent zero-copy is waited for any more.
    fn fail(&mut self, e: LinkError) -> LinkError {
        self.shared.mark_down(ErrorChain(&e).to_string());
        let _ = self.stream.shutdown(Shutdown::Both);
        lock(&self.channel).writer.forsake();
        if let Some(r) = self.rdma.as_mut() {
            r.forsake();
        }
        e
    }

    /// `send_pages` of an epoch whose pages go by RDMA: the writes are posted, and their
    /// descriptors follow on this link (checked by the caller: the epoch is open and announced
    /// these pages, and every page is in `source`).
    fn send_pages_rdma(&mut self, pages: &PageRangeSet, source: &dyn PageSource) -> Result<u64, SendPagesError> {
        let written = match self.rdma.as_mut().map(|r| r.write_pages(pages, source)) {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(SendPagesError::Link(self.fail(LinkError::Rdma(e)))),
            None => return Err(SendPagesError::Link(self.fail(LinkError::Rdma(super::rdma::RdmaIoError::Reservation)))),
        };
        let Some(open) = self.open.as_mut() else { return Err(SendPagesError::NoEpoch) };
        let _entered = open.span.clone().entered();
        let mut sent = 0u64;
        let mut failure = None;
        for d in &written {
            d.encode_into(&mut self.head);
            match write_on(&self.channel, FrameKind::RdmaPages, open.begin.epoch.0, &self.head, &[], false) {
                Ok(tag) => {
                    open.digest.add_frame(&tag);
                    open.pages += d.page_count();
                    // The page bytes cross the link too, by RDMA.
                    let bytes = (self.head.len() + 64) as u64 + d.byte_len();
                    open.bytes += bytes;
                    sent += bytes;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        match failure {
            Some(e) => Err(SendPagesError::Link(self.fail(e))),
            None => Ok(sent),
        }
    }

    fn memory_pages(&self) -> u64 {
        self.peer.memory_bytes / PAGE_SIZE as u64
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // Zero-copy sends of an epoch never committed: on a working link the kernel is done with
        // them soon (bounded by the write timeout); on a failed one they are not waited for.
        if self.shared.down().is_none() {
            let _ = lock(&self.channel).writer.settle();
        }
        lock(&self.channel).writer.forsake();
        self.shared.mark_down_as("transport closed".into(), true);
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// The name status and the bench show: the writer's, prefixed with "rdma+" when page payloads
/// go by RDMA.
fn io_name(writer: &'static str, rdma: bool) -> &'static str {
    match (rdma, writer) {
        (false, w) => w,
        (true, "socket") => "rdma+socket",
        (true, "io_uring") => "rdma+io_uring",
        (true, "io_uring+zc") => "rdma+io_uring+zc",
        (true, _) => "rdma",
    }
}

impl CheckpointTransport for TcpTransport {
    fn peer_standby(&self) -> StandbyInfo {
        self.peer
    }

    fn peer_disk_marks(&self) -> Option<DiskMarks> {
        self.peer_marks.clone()
    }

    fn peer_standby_digest(&self) -> Option<[u8; 32]> {
        self.peer_digest
    }

    fn page_deltas(&self) -> super::PageDeltaStats {
        self.sent_pages
            .as_ref()
            .map_or_else(Default::default, |s| super::PageDeltaStats { pages: s.pages_as_deltas, bytes_saved: s.bytes_saved })
    }

    fn peer_takes_state_deltas(&self) -> bool {
        self.minor >= 6
    }

    fn ingress_link(&self) -> Option<Arc<dyn IngressLink>> {
        if self.minor < 7 {
            return None;
        }
        let stream = self.stream.try_clone().ok()?;
        Some(Arc::new(TcpIngress { channel: Arc::clone(&self.channel), shared: Arc::clone(&self.shared), stream }))
    }

    fn io_name(&self) -> &'static str {
        io_name(lock(&self.channel).writer.name(), self.rdma.is_some())
    }

    fn heartbeat(&mut self) -> Result<(), LinkError> {
        self.check_up()?;
        if self.open.is_some() {
            // Inside an epoch its own frames are the sign of life (and the digest covers them).
            return Ok(());
        }
        let r = write_on(&self.channel, FrameKind::Heartbeat, 0, &[], &[], false);
        r.map(|_| ()).map_err(|e| self.fail(e))
    }

    fn abandon(&mut self, reason: &str) {
        self.say_goodbye(reason);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn drain_after_failure(&mut self, within: Duration) {
        if self.shared.down().is_none() {
            return;
        }
        let Some(reader) = &self.reader else { return };
        // The reader ends at the end of the stream, after whatever came before it.
        let until = Instant::now() + within;
        while !reader.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn hand_over(&mut self, epoch: EpochId) -> Result<(), HandOverError> {
        if self.minor < 4 {
            return Err(HandOverError::Unsupported(self.minor));
        }
        if let Some(open) = &self.open {
            return Err(HandOverError::EpochOpen(open.begin.epoch));
        }
        self.check_up()?;
        let r = write_on(&self.channel, FrameKind::Handover, epoch.0, &[], &[], false);
        r.map(|_| ()).map_err(|e| HandOverError::Link(self.fail(e)))
    }

    fn set_ack_listener(&mut self, listener: AckListener) {
        *lock(&self.shared.listener) = Some(listener);
    }

    fn begin_epoch(&mut self, begin: &EpochBegin) -> Result<(), BeginEpochError> {
        if let Some(open) = &self.open {
            return Err(BeginEpochError::EpochOpen(open.begin.epoch));
        }
        self.check_up().map_err(BeginEpochError::Link)?;
        let in_flight = lock(&self.shared.state).in_flight.len();
        if in_flight >= self.max_in_flight {
            return Err(BeginEpochError::TooManyInFlight(in_flight));
        }
        if begin.initial_sync {
            if let Some(last) = self.last_begun.filter(|&l| begin.epoch <= l) {
                return Err(BeginEpochError::OutOfOrder { epoch: begin.epoch, last });
            }
        } else {
            match self.last_begun.or(self.peer.committed) {
                None => return Err(BeginEpochError::NeedsInitialSync),
                Some(last) if last.0.checked_add(1) != Some(begin.epoch.0) => {
                    return Err(BeginEpochError::OutOfOrder { epoch: begin.epoch, last })
                }
                Some(_) => {}
            }
            if begin.disk_image_bytes != 0 {
                return Err(BeginEpochError::Invalid("disk image bytes outside an initial synchronisation"));
            }
            if begin.state_len == 0 {
                return Err(BeginEpochError::Invalid("an incremental epoch carries the machine state"));
            }
        }
        let span = tracing::debug_span!(
            "epoch",
            epoch = begin.epoch.0,
            pages = begin.page_count,
            bytes = tracing::field::Empty,
            initial_sync = begin.initial_sync
        );
        let payload = begin.encode();
        cork(&self.channel, &self.stream, true);
        let r = write_on(&self.channel, FrameKind::EpochBegin, begin.epoch.0, &payload, &[], false);
        let tag = r.map_err(|e| BeginEpochError::Link(self.fail(e)))?;
        // Whether the pages go by RDMA: the ring space of acknowledged epochs is free again.
        let acked = lock(&self.shared.state).acked;
        let rdma = self.rdma.as_mut().is_some_and(|r| r.begin(begin, acked));
        let mut digest = EpochDigest::new(begin.epoch);
        digest.add_frame(&tag);
        self.last_begun = Some(begin.epoch);
        let bytes = (payload.len() + 64) as u64;
        self.open = Some(OpenEpoch { begin: *begin, digest, pages: 0, state: 0, writes: 0, image: 0, bytes, rdma, span });
        Ok(())
    }

    fn send_pages(&mut self, pages: &PageRangeSet, source: &dyn PageSource) -> Result<u64, SendPagesError> {
        let memory_pages = self.memory_pages();
        let open = self.open.as_mut().ok_or(SendPagesError::NoEpoch)?;
        let n = pages.page_count();
        if open.pages + n > open.begin.page_count {
            return Err(SendPagesError::OverAnnounced { announced: open.begin.page_count, would_send: n });
        }
        // Check everything before the first byte goes out, so a bad call leaves the epoch as it was.
        if let Some(r) = pages.ranges().iter().find(|r| r.start.checked_add(r.len).is_none_or(|end| end > memory_pages)) {
            return Err(SendPagesError::OutsideMemory(r.start.max(memory_pages)));
        }
        for r in pages.ranges() {
            if source.run(r.start, r.len).is_some_and(|s| s.len() == r.len as usize * PAGE_SIZE) {
                continue;
            }
            if let Some(pfn) = (r.start..r.start + r.len).find(|&p| source.page(p).is_none_or(|s| s.len() != PAGE_SIZE)) {
                return Err(SendPagesError::MissingPage(pfn));
            }
        }
        if let Some(reason) = self.shared.down() {
            return Err(SendPagesError::Link(LinkError::Down { reason }));
        }
        if open.rdma {
            return self.send_pages_rdma(pages, source);
        }
        let _entered = open.span.clone().entered();
        // Pages the session sent before go as deltas from that copy, which the backup holds; a
        // synchronisation's pages are a running guest's and are never kept.
        let split = match self.sent_pages.as_mut() {
            Some(kept) if !open.begin.initial_sync => Some(kept.split(pages, source, open.begin.epoch.0)),
            _ => None,
        };
        let whole = split.as_ref().map_or(pages, |s| &s.whole);
        let mut sent = 0u64;
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(MAX_PAGES_PER_FRAME as usize + 1);
        let mut failure = None;
        for payload in split.as_ref().map_or(&[][..], |s| &s.deltas[..]) {
            match write_on(&self.channel, FrameKind::PageDeltas, open.begin.epoch.0, payload, &[], false) {
                Ok(tag) => {
                    open.digest.add_frame(&tag);
                    open.pages += u64::from(ftvm_proto::page_delta::count(payload));
                    let bytes = payload.len() as u64 + 64;
                    open.bytes += bytes;
                    sent += bytes;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        for ranges in epoch::page_frames(whole, MAX_PAGES_PER_FRAME).take_while(|_| failure.is_none()) {
            let count = epoch::encode_pages_head(&ranges, &mut self.head);
            pieces.clear();
            let packed = source.packed(&ranges).filter(|p| p.len() == count as usize * PAGE_SIZE);
            for r in ranges.iter().filter(|_| packed.is_none()) {
                match source.run(r.start, r.len).filter(|s| s.len() == r.len as usize * PAGE_SIZE) {
                    Some(run) => pieces.push(run),
                    // Checked above: every page is there and 4 KiB long.
                    None => pieces.extend((r.start..r.start + r.len).filter_map(|p| source.page(p))),
                }
            }
            pieces.extend(packed);
            match write_on(&self.channel, FrameKind::Pages, open.begin.epoch.0, &self.head, &pieces, true) {
                Ok(tag) => {
                    open.digest.add_frame(&tag);
                    open.pages += count;
                    let bytes = epoch::pages_payload_len(&ranges) as u64 + 64;
                    open.bytes += bytes;
                    sent += bytes;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(pieces);
        let initial_sync = open.begin.initial_sync;
        if let Some(e) = failure {
            return Err(SendPagesError::Link(self.fail(e)));
        }
        // An initial synchronisation streams memory through one buffer reused call after call
        // while the guest runs (see PageSource): the kernel must be done with it before we return.
        if initial_sync {
            let settled = lock(&self.channel).writer.settle();
            settled.map_err(|e| SendPagesError::Link(self.fail(e)))?;
        }
        Ok(sent)
    }

    fn send_state(&mut self, state: &[u8]) -> Result<(), SendStateError> {
        let open = self.open.as_mut().ok_or(SendStateError::NoEpoch)?;
        let len = state.len() as u64;
        if open.state + len > open.begin.state_len {
            return Err(SendStateError::OverAnnounced { announced: open.begin.state_len, would_send: len });
        }
        if let Some(reason) = self.shared.down() {
            return Err(SendStateError::Link(LinkError::Down { reason }));
        }
        for chunk in state.chunks(MAX_CHUNK_BYTES) {
            match write_on(&self.channel, FrameKind::MachineState, open.begin.epoch.0, chunk, &[], false) {
                Ok(tag) => {
                    open.digest.add_frame(&tag);
                    open.state += chunk.len() as u64;
                    open.bytes += chunk.len() as u64 + 64;
                }
                Err(e) => return Err(SendStateError::Link(self.fail(e))),
            }
        }
        Ok(())
    }

    fn send_output(&mut self, frames: &[&[u8]]) -> Result<u64, SendOutputError> {
        let open = self.open.as_mut().ok_or(SendOutputError::NoEpoch)?;
        if let Some(f) = frames.iter().find(|f| f.is_empty() || f.len() > ftvm_proto::limits::MAX_GUEST_FRAME) {
            return Err(SendOutputError::BadFrame(f.len()));
        }
        if let Some(reason) = self.shared.down() {
            return Err(SendOutputError::Link(LinkError::Down { reason }));
        }
        let epoch = open.begin.epoch.0;
        let mut sent = 0u64;
        let mut payload = std::mem::take(&mut self.head);
        let mut rest = frames;
        while !rest.is_empty() {
            payload.clear();
            // Whole frames per A-Link frame, up to the chunk size (one frame always fits).
            let mut n = 0;
            while n < rest.len() && (n == 0 || payload.len() + 4 + rest[n].len() <= MAX_CHUNK_BYTES) {
                epoch::encode_output_frame(rest[n], &mut payload);
                n += 1;
            }
            rest = &rest[n..];
            match write_on(&self.channel, FrameKind::HeldOutput, epoch, &payload, &[], false) {
                Ok(tag) => {
                    if let Some(open) = self.open.as_mut() {
                        open.digest.add_frame(&tag);
                        open.bytes += payload.len() as u64 + 64;
                    }
                    sent += payload.len() as u64 + 64;
                }
                Err(e) => {
                    self.head = payload;
                    return Err(SendOutputError::Link(self.fail(e)));
                }
            }
        }
        self.head = payload;
        Ok(sent)
    }

    fn send_disk_writes(&mut self, writes: &[DiskWrite]) -> Result<(), SendDiskWritesError> {
        let disk = self.peer.disk_bytes;
        let open = self.open.as_mut().ok_or(SendDiskWritesError::NoEpoch)?;
        let n = writes.len() as u64;
        if open.writes + n > open.begin.disk_write_count {
            return Err(SendDiskWritesError::OverAnnounced { announced: open.begin.disk_write_count, would_send: n });
        }
        for w in writes {
            let len = w.data.len();
            let inside = w.sector.checked_mul(SECTOR_SIZE).and_then(|o| o.checked_add(len as u64)).is_some_and(|e| e <= disk);
            if len == 0 || !(len as u64).is_multiple_of(SECTOR_SIZE) || len > MAX_DISK_WRITE_BYTES || !inside {
                return Err(SendDiskWritesError::BadWrite { sector: w.sector, len });
            }
        }
        if let Some(reason) = self.shared.down() {
            return Err(SendDiskWritesError::Link(LinkError::Down { reason }));
        }
        let mut pieces: Vec<&[u8]> = Vec::new();
        let mut failure = None;
        for group in epoch::disk_write_frames(writes, MAX_CHUNK_BYTES) {
            epoch::encode_disk_writes_head(group, &mut self.head);
            pieces.clear();
            pieces.extend(group.iter().map(|w| &w.data[..]));
            match write_on(&self.channel, FrameKind::DiskWrites, open.begin.epoch.0, &self.head, &pieces, false) {
                Ok(tag) => {
                    open.digest.add_frame(&tag);
                    open.writes += group.len() as u64;
                    open.bytes += epoch::disk_writes_payload_len(group) as u64 + 64;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(pieces);
        match failure {
            Some(e) => Err(SendDiskWritesError::Link(self.fail(e))),
            None => Ok(()),
        }
    }

    fn send_disk_image(&mut self, offset: u64, data: &[u8]) -> Result<(), SendDiskImageError> {
        let disk = self.peer.disk_bytes;
        let open = self.open.as_mut().ok_or(SendDiskImageError::NoEpoch)?;
        if !open.begin.initial_sync {
            return Err(SendDiskImageError::NotInitialSync);
        }
        let len = data.len() as u64;
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) || !offset.is_multiple_of(SECTOR_SIZE) || offset.checked_add(len).is_none_or(|e| e > disk) {
            return Err(SendDiskImageError::BadChunk { offset, len: data.len() });
        }
        if open.image + len > open.begin.disk_image_bytes {
            return Err(SendDiskImageError::OverAnnounced { announced: open.begin.disk_image_bytes, would_send: len });
        }
        if let Some(reason) = self.shared.down() {
            return Err(SendDiskImageError::Link(LinkError::Down { reason }));
        }
        // MAX_CHUNK_BYTES is a whole number of sectors, so every chunk stays aligned.
        for (i, chunk) in data.chunks(MAX_CHUNK_BYTES).enumerate() {
            let head = epoch::encode_disk_image_head(offset + (i * MAX_CHUNK_BYTES) as u64);
            match write_on(&self.channel, FrameKind::DiskImage, open.begin.epoch.0, &head, &[chunk], false) {
                Ok(tag) => {
                    open.digest.add_frame(&tag);
                    open.image += chunk.len() as u64;
                    open.bytes += chunk.len() as u64 + 72;
                }
                Err(e) => return Err(SendDiskImageError::Link(self.fail(e))),
            }
        }
        Ok(())
    }

    fn commit(&mut self, epoch: EpochId) -> Result<AckToken, CommitError> {
        let open = match &self.open {
            Some(o) if o.begin.epoch == epoch => o,
            _ => return Err(CommitError::NotOpen(epoch)),
        };
        let b = &open.begin;
        for (what, sent, announced) in [
            ("pages", open.pages, b.page_count),
            ("state bytes", open.state, b.state_len),
            ("disk writes", open.writes, b.disk_write_count),
            ("disk image bytes", open.image, b.disk_image_bytes),
        ] {
            if sent != announced {
                return Err(CommitError::Incomplete { epoch, what, sent, announced });
            }
        }
        self.check_up().map_err(CommitError::Link)?;
        // RDMA: every write of the epoch has completed before the commit frame leaves, and the
        // backup reads its ring only after that frame.
        if open.rdma {
            if let Some(Err(e)) = self.rdma.as_mut().map(|r| r.commit(self.write_timeout)) {
                return Err(CommitError::Link(self.fail(LinkError::Rdma(e))));
            }
        }
        let commit = EpochCommit {
            epoch,
            pages: open.pages,
            state_bytes: open.state,
            disk_writes: open.writes,
            disk_image_bytes: open.image,
            digest: open.digest.finish(),
        };
        open.span.record("bytes", open.bytes + EpochCommit::LEN as u64 + 64);
        // In flight before the commit frame leaves: the acknowledgement can come back at once.
        lock(&self.shared.state).in_flight.push_back((epoch, Instant::now()));
        let r = write_on(&self.channel, FrameKind::EpochCommit, epoch.0, &commit.encode(), &[], false);
        cork(&self.channel, &self.stream, false);
        self.open = None;
        r.map_err(|e| CommitError::Link(self.fail(e)))?;
        // The zero-copy invariant ends here: the kernel must be done reading the epoch's pages.
        let settled = lock(&self.channel).writer.settle();
        settled.map_err(|e| CommitError::Link(self.fail(e)))?;
        Ok(AckToken { epoch, link: self.link })
    }

    fn wait_ack(&self, token: AckToken, deadline: Instant) -> Result<EpochId, WaitAckError> {
        if token.link != self.link {
            return Err(WaitAckError::ForeignToken(token.epoch));
        }
        let start = Instant::now();
        let mut s = lock(&self.shared.state);
        // Bounded by the deadline: every round either returns or waits until it.
        loop {
            if let Some(acked) = s.acked.filter(|&a| a >= token.epoch) {
                return Ok(acked);
            }
            if let Some(reason) = &s.down {
                return Err(WaitAckError::Link { epoch: token.epoch, source: LinkError::Down { reason: reason.clone() } });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitAckError::TimedOut { epoch: token.epoch, waited: now - start });
            }
            s = self.shared.cv.wait_timeout(s, deadline - now).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn acked(&self) -> Option<EpochId> {
        lock(&self.shared.state).acked
    }
}
