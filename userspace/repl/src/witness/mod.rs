//! The witness: the built-in quorum service of a two-host site (`ftvm witness`).
//!
//! It keeps one [`LeaseBook`] for every VM of the hosts that know its secret, and answers their
//! requests (see `ftvm_proto::witness`) over authenticated sessions: the A-Link's handshake with the
//! witness's own secret, then sealed, numbered frames, so a request recorded earlier cannot be
//! replayed into another session. A change of term or a release is written to the state directory
//! (and synced) before the reply leaves, so a witness that restarts never forgets a term it
//! granted; after a restart every lease counts as renewed at that moment ([`LeaseBook::restored`]).
//!
//! Threads: one accepting, one per connection (at most [`MAX_CONNECTIONS`]); a connection idle for
//! [`IDLE_TIMEOUT`] is closed, and a handshake must finish within [`HANDSHAKE_DEADLINE`].

pub mod store;

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_proto::frame::{FrameError, FrameKind};
use ftvm_proto::handshake;
use ftvm_proto::witness::{
    WitnessClaim, WitnessOp, WitnessPrevious, WitnessReleaseReason, WitnessReply, WitnessRequest, MAX_REQUEST_LEN,
};

use crate::ha::heartbeat::monotonic_us;
use crate::ha::quorum::rules::{Change, LeaseBook};
use crate::ha::quorum::{ClaimOutcome, Previous, Refusal, ReleaseReason};
use crate::transport::deadline::DeadlineStream;
use crate::ErrorChain;
use store::{StateStore, StoreError};
use crate::lock;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole handshake must finish within this.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);
/// The default lease length.
pub const DEFAULT_TTL: Duration = Duration::from_millis(1000);

/// Settings of a [`Witness`].
#[derive(Clone)]
pub struct WitnessConfig {
    /// Where to listen (never an unspecified address).
    pub listen: SocketAddr,
    /// The shared secret of the site's hosts and the witness.
    pub secret: Vec<u8>,
    /// Where the leases are kept across restarts.
    pub state_dir: PathBuf,
    /// The length of the leases it grants.
    pub ttl: Duration,
}

impl std::fmt::Debug for WitnessConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessConfig")
            .field("listen", &self.listen)
            .field("state_dir", &self.state_dir)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Why a witness could not start.
#[derive(Debug, thiserror::Error)]
pub enum WitnessStartError {
    /// `0.0.0.0` or `::`: the witness listens on one chosen address.
    #[error("Refusing to listen on the unspecified address {0}: name the management address")]
    Unspecified(SocketAddr),
    /// The secret is too short.
    #[error("The witness secret is shorter than {} bytes", handshake::MIN_SECRET_LEN)]
    WeakSecret,
    /// The lease length is out of range.
    #[error("Lease TTL {0:?} is out of range (100 ms to 60 s)")]
    Ttl(Duration),
    /// The state directory.
    #[error("Cannot load the witness state")]
    State(#[from] StoreError),
    /// Binding the listener.
    #[error("Cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The accept thread.
    #[error("Cannot start the witness thread")]
    Thread(#[source] std::io::Error),
}

struct Shared {
    book: Mutex<LeaseBook>,
    store: StateStore,
    secret: Vec<u8>,
    stop: AtomicBool,
    connections: AtomicUsize,
}

/// A running witness; dropping it stops it.
pub struct Witness {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witness").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl Witness {
    /// Loads the state and starts listening.
    pub fn start(cfg: WitnessConfig) -> Result<Self, WitnessStartError> {
        if cfg.listen.ip().is_unspecified() {
            return Err(WitnessStartError::Unspecified(cfg.listen));
        }
        if cfg.secret.len() < handshake::MIN_SECRET_LEN {
            return Err(WitnessStartError::WeakSecret);
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&cfg.ttl) {
            return Err(WitnessStartError::Ttl(cfg.ttl));
        }
        let store = StateStore::open(&cfg.state_dir)?;
        let records = store.load()?;
        let book = LeaseBook::restored(cfg.ttl, records, monotonic_us());
        let listener = TcpListener::bind(cfg.listen).map_err(|source| WitnessStartError::Bind { addr: cfg.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| WitnessStartError::Bind { addr: cfg.listen, source })?;
        listener.set_nonblocking(true).map_err(|source| WitnessStartError::Bind { addr: cfg.listen, source })?;
        let shared = Arc::new(Shared {
            book: Mutex::new(book),
            store,
            secret: cfg.secret,
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ftvm-witness".into())
            .spawn(move || accept_loop(&s, &listener))
            .map_err(WitnessStartError::Thread)?;
        Ok(Self { shared, local_addr, thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The current term and holder of `vm`, if it knows it.
    pub fn lease_of(&self, vm: &str) -> Option<(u64, String)> {
        lock(&self.shared.book).record(vm).map(|r| (r.term, r.owner.clone()))
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    // Bounded by `stop`; the listener is non-blocking and polled every few milliseconds.
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if shared.connections.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "too many witness connections: closing this one");
                    continue;
                }
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let s = Arc::clone(shared);
                let spawned = std::thread::Builder::new().name("ftvm-witness-conn".into()).spawn(move || {
                    if let Err(e) = serve(&s, stream) {
                        tracing::debug!(%peer, error = %ErrorChain(&e), "witness connection ended");
                    }
                    s.connections.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    shared.connections.fetch_sub(1, Ordering::SeqCst);
                    tracing::error!(error = %e, "cannot start a witness connection thread");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                tracing::warn!(error = %e, "witness accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Why a witness connection ended.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("socket set-up failed")]
    Socket(#[source] std::io::Error),
    #[error("handshake failed")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("handshake took longer than {HANDSHAKE_DEADLINE:?}")]
    HandshakeDeadline,
    #[error("frame refused")]
    Frame(#[from] FrameError),
    #[error("unexpected frame {0:?}")]
    Unexpected(FrameKind),
}

fn serve(shared: &Shared, stream: TcpStream) -> Result<(), ServeError> {
    let peer = stream.peer_addr().ok();
    let started = Instant::now();
    stream.set_nonblocking(false).map_err(ServeError::Socket)?;
    stream.set_nodelay(true).map_err(ServeError::Socket)?;
    let session = handshake::respond(&mut DeadlineStream::new(&stream, started + HANDSHAKE_DEADLINE), &shared.secret);
    if started.elapsed() > HANDSHAKE_DEADLINE {
        return Err(ServeError::HandshakeDeadline);
    }
    let session = session?;
    stream.set_write_timeout(Some(HANDSHAKE_DEADLINE)).map_err(ServeError::Socket)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(ServeError::Socket)?);
    let mut writer = BufWriter::new(stream.try_clone().map_err(ServeError::Socket)?);
    let mut opener = session.opener.with_max_payload(MAX_REQUEST_LEN as u32);
    let mut sealer = session.sealer;
    stream.set_read_timeout(Some(IDLE_TIMEOUT)).map_err(ServeError::Socket)?;
    // Bounded by the idle timeout and `stop`: each iteration is one request.
    while !shared.stop.load(Ordering::SeqCst) {
        let frame = match opener.read(&mut reader) {
            Ok(f) => f,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if frame.header.kind != FrameKind::WitnessRequest {
            return Err(ServeError::Unexpected(frame.header.kind));
        }
        let reply = match WitnessRequest::decode(&frame.payload) {
            Ok(req) => answer(shared, &req, peer),
            Err(e) => WitnessReply::Error(format!("malformed request: {e}")),
        };
        sealer.write(&mut writer, FrameKind::WitnessReply, 0, 0, &[&reply.encode()])?;
        writer.flush().map_err(FrameError::Io)?;
    }
    Ok(())
}

fn answer(shared: &Shared, req: &WitnessRequest, peer: Option<SocketAddr>) -> WitnessReply {
    let now = monotonic_us();
    let mut book = lock(&shared.book);
    let (reply, change) = match req.op {
        WitnessOp::Acquire(claim) => {
            let (outcome, change) = book.acquire(&req.vm, &req.host, claim == WitnessClaim::Start, req.term, now);
            (outcome_reply(&outcome, book.ttl()), change)
        }
        WitnessOp::Renew => (outcome_reply(&book.renew(&req.vm, &req.host, req.term, now), book.ttl()), Change::None),
        WitnessOp::Release(reason) => {
            let reason = match reason {
                WitnessReleaseReason::Stopped => ReleaseReason::Stopped,
                WitnessReleaseReason::HolderDied => ReleaseReason::HolderDied,
            };
            (WitnessReply::Done, book.release(&req.vm, &req.host, req.term, reason, now))
        }
    };
    if change == Change::Durable {
        // Before the reply: a granted term must survive a restart of the witness.
        if let Err(e) = shared.store.save(book.records()) {
            tracing::error!(error = %ErrorChain(&e), "cannot save the witness state: the request is refused");
            // Undo is impossible to do safely here; the caller is told nothing was granted, and
            // the book keeps the change (it can only make later claims stricter).
            return WitnessReply::Error("the witness cannot save its state".into());
        }
    }
    if !matches!(req.op, WitnessOp::Renew) || !matches!(reply, WitnessReply::Granted { .. }) {
        tracing::info!(vm = %req.vm, host = %req.host, ?peer, op = ?req.op, term = req.term, ?reply, "witness");
    }
    reply
}

fn outcome_reply(outcome: &ClaimOutcome, ttl: Duration) -> WitnessReply {
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    match outcome {
        ClaimOutcome::Granted(g) => WitnessReply::Granted {
            term: g.term,
            ttl_ms: ms(g.ttl.unwrap_or(ttl)),
            previous: match g.previous {
                Previous::None => WitnessPrevious::None,
                Previous::Expired => WitnessPrevious::Expired,
                Previous::Released(ReleaseReason::Stopped) => WitnessPrevious::ReleasedStopped,
                Previous::Released(ReleaseReason::HolderDied) => WitnessPrevious::ReleasedDied,
            },
        },
        ClaimOutcome::Refused(Refusal::Held { owner, term, remaining }) => {
            WitnessReply::Held { owner: owner.clone(), term: *term, remaining_ms: ms(*remaining) }
        }
        ClaimOutcome::Refused(Refusal::Stale { known, current, owner }) => {
            WitnessReply::Stale { known: *known, current: *current, owner: owner.clone().unwrap_or_default() }
        }
        ClaimOutcome::Refused(Refusal::Released) => WitnessReply::Released,
        ClaimOutcome::Refused(Refusal::Unknown) => WitnessReply::Unknown,
    }
}
