//! Finding a backup again: while a host's VM runs alone, a thread keeps trying to reach the peer
//! host's A-Link listener (its service, restarted after a repair, listens as a standby) and hands
//! the link to the engine, which synchronises that backup and protects the VM again.
//!
//! Each attempt names the lease term this copy is current for, so that the backup, once it holds
//! the copy, claims the lease for that term if it must take over. A peer that answers and refuses
//! (a wrong secret, another protocol version, a size mismatch, a CPU that cannot restore this
//! guest) is said once, and asked again less often: an operator may fix it while the VM runs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::epoch::engine::{BackupAttacher, EngineState, EngineStatus, StatusSnapshot};
use crate::ha::lease::Lease;
use crate::transport::tcp::{TcpOptions, TcpTransport};
use crate::ErrorChain;

/// How often an unreachable peer is tried again by default.
pub const DEFAULT_RETRY: Duration = Duration::from_millis(500);
/// How often a peer that refused this host is asked again.
const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// Where the backup is to be found, and how to talk to it.
#[derive(Clone)]
pub struct RejoinConfig {
    /// The peer host's A-Link address.
    pub peer: SocketAddr,
    /// The A-Link's shared secret.
    pub secret: Vec<u8>,
    /// The link's settings (the lease term is filled in at each attempt).
    pub options: TcpOptions,
    /// How often an unreachable peer is tried again.
    pub retry: Duration,
}

impl std::fmt::Debug for RejoinConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejoinConfig").field("peer", &self.peer).field("retry", &self.retry).finish_non_exhaustive()
    }
}

impl RejoinConfig {
    /// Reaches `peer` with `secret` and `options`, tried every [`DEFAULT_RETRY`].
    pub fn new(peer: SocketAddr, secret: Vec<u8>, options: TcpOptions) -> Self {
        Self { peer, secret, options, retry: DEFAULT_RETRY }
    }
}

/// The thread that looks for a backup while the VM runs alone; it stops when dropped.
#[derive(Debug)]
pub struct Rejoiner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Rejoiner {
    /// Starts looking: whenever `status` says the VM runs alone (and is not paused for want of a
    /// lease), the peer is tried; a link that comes up goes to `attacher`.
    pub fn spawn(cfg: RejoinConfig, lease: Lease, status: Arc<EngineStatus>, attacher: BackupAttacher) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ftvm-rejoin".into())
            .spawn(move || look_for_backup(&cfg, &lease, &status, &attacher, &flag))?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Rejoiner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether an engine whose status is `s` waits for a backup: it runs alone, and is not paused
/// for want of a lease (no backup until the quorum is back).
fn wants_backup(s: &StatusSnapshot) -> bool {
    matches!(s.state, EngineState::Simplex { .. }) && !s.paused_for_lease
}

fn look_for_backup(cfg: &RejoinConfig, lease: &Lease, status: &EngineStatus, attacher: &BackupAttacher, stop: &AtomicBool) {
    let mut next_try = Instant::now();
    let mut last_said: Option<String> = None;
    // Bounded by `stop`; one attempt at most every `retry`.
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() < next_try || attacher.pending() || !wants_backup(&status.snapshot()) {
            continue;
        }
        let options = TcpOptions { lease_term: lease.has_quorum().then(|| lease.term()), ..cfg.options.clone() };
        match TcpTransport::connect(cfg.peer, &cfg.secret, &options) {
            Ok(link) => {
                tracing::info!(peer = %cfg.peer, term = options.lease_term, "a backup answered: protecting the VM again");
                attacher.attach(Box::new(link));
                status.update(|s| s.backup_refused = None);
                last_said = None;
                next_try = Instant::now() + cfg.retry;
            }
            Err(e) => {
                let said = ErrorChain(&e).to_string();
                let transient = e.is_transient();
                // Status says why a peer that answers is not the backup (nobody answering needs
                // no explanation: the VM runs alone).
                status.update(|s| s.backup_refused = (!transient).then(|| said.clone()));
                if last_said.as_deref() != Some(said.as_str()) {
                    if transient {
                        tracing::info!(peer = %cfg.peer, error = %said, "no backup yet; the VM runs unprotected");
                    } else {
                        tracing::warn!(peer = %cfg.peer, error = %said, "the peer refused to be this VM's backup; asking again every {REFUSED_RETRY:?}");
                    }
                    last_said = Some(said);
                }
                next_try = Instant::now() + if transient { cfg.retry } else { REFUSED_RETRY };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_vm_running_alone_with_its_lease_looks_for_a_backup() {
        let status = EngineStatus::new();
        let with = |state: EngineState, paused: bool| {
            status.update(|s| {
                s.state = state;
                s.paused_for_lease = paused;
            });
            wants_backup(&status.snapshot())
        };
        assert!(with(EngineState::Simplex { reason: "the backup is gone".into() }, false));
        assert!(!with(EngineState::Simplex { reason: "the backup is gone".into() }, true));
        assert!(!with(EngineState::Protected, false));
        assert!(!with(EngineState::Stopped, false));
        assert!(!with(EngineState::Fenced { reason: "x".into() }, false));
    }
}
