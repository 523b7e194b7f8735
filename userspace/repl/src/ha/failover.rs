//! The backup daemon: receive checkpoints, watch the primary, take over when it dies.
//!
//! One thread polls the receiver's link activity stamp into the failure detector every
//! `poll_interval`. Bytes waiting unread on the live session's socket count as life: a receiver
//! slowed by its own work (applying a large epoch, syncing the disk, starved of CPU) must not take
//! its own silence for the primary's. While the primary is alive or only suspected, nothing
//! happens (status shows the suspicion). The verdict is dead when the silence timeout passes, or
//! at once when the primary's end of the link closed without a goodbye (its process is gone).
//! When the verdict is dead:
//! * with a restorable standby (an epoch committed with a machine state), the daemon stops the
//!   receiver (which discards any half-received epoch), [`promote`]s the committed standby into a
//!   fresh VM, and runs it: role `Standby` → `Promoting` → `Active`;
//! * without one (the primary died before its first full checkpoint), there is nothing to resume:
//!   the daemon logs an error and keeps waiting, receiver running, for a primary to come back;
//! * a primary that said goodbye left on purpose: its silence is not a death, no takeover; nor
//!   after this side refused the session (the primary was told and goes on alone);
//! * a primary that handed the VM over (a planned switchover, at this standby's epoch) is taken
//!   over at once, with no probe: it gives the lease up as soon as it hears this side takes over.
//!
//! After the takeover, with [`DaemonConfig::protect_again`], the restored VM runs under an epoch
//! engine built [`PrimaryEngine::alone`]: a [`Rejoiner`] looks for the other host, the engine
//! synchronises it once it answers, and the VM is protected again; the engine polices the lease
//! (this loop ends the VM when the engine is fenced or fails), and a switchover hands the VM back
//! (role [`Role::HandedOver`]). Without it the restored VM runs alone until it ends.
//!
//! With a quorum, a dead verdict is a suspicion until the quorum agrees: the daemon claims the
//! VM's lease for its standby's term (the term of the primary whose epoch made it) and takes over
//! only when granted; refused (the primary holds the lease: the A-Link broke but the primary lives,
//! or this standby is stale), it stays standby and asks again every [`QUORUM_RETRY`]. A grant that
//! replaced an *expired* lease waits [`TAKEOVER_QUIET`] after the receiver stopped, for output the
//! old primary may release on a fresh acknowledgement ([`crate::ha::lease::ACK_AUTHORITY`]). After
//! the takeover the lease is renewed; while it is not valid the restored VM is paused, and if it is
//! lost to another host the VM is stopped (role [`Role::Fenced`]).
//!
//! The primary's lease watchdog sends a death notice as soon as it has released a dead primary's
//! lease ([`LateInbox::death_noticed`]): that is a dead verdict at once, as the host's "daemon
//! dead" is.
//!
//! When the primary falls silent or its end of the link closes, and a [`HostProbe`] is configured,
//! the daemon asks the primary's host (its XDP responder) before it believes the verdict: a
//! daemon that still makes progress is not dead (a busy primary, or a broken connection: the
//! quorum decides if it goes on alone), one the host reports dead or stuck is, and a host that
//! answered before but no longer does is dead at once (see [`super::probe`]). Without a probe, or
//! before the responder ever answered, the timeouts alone decide.
//!
//! A takeover tells a primary still connected that this host takes over
//! ([`BackupReceiver::stop_taking_over`]): a live primary taken for dead then stops its copy
//! instead of serving beside the restored one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_proto::EpochId;
use ftvm_vmm::machine::{CheckpointSource, MachineExit, MachineHandle};

use super::detector::{DeadReason, DetectorConfig, FailureDetector, Suspicion, TimeoutDetector};
use super::fence::Fence;
use super::heartbeat::{monotonic_us, LinkActivity, SessionEnd};
use super::lease::{Lease, Renewer, QUORUM_CONNECTION_REFRESH, TAKEOVER_QUIET};
use super::probe::{HostProbe, ProbeOutcome};
use super::quorum::{Claim, Previous};
use super::rejoin::{RejoinConfig, Rejoiner};
use super::term::TermFile;
use crate::backup::activate::{promote, PromoteConfig, RestoreTimings};
use crate::backup::standby::KeptStandby;
use crate::backup::{BackupReceiver, BindError, ReceiverConfig};
use crate::epoch::engine::{
    AckAuthorityHook, DiskSource, EngineConfig, EngineHandle, EngineState, EngineStatus, PrimaryEngine, SwitchoverTrigger,
};
use crate::late_input::{LateInbox, LateInputListener, LateInputStats};
use crate::ErrorChain;
use crate::lock;

/// How long after a refused takeover claim the quorum is asked again (a primary that died may have
/// its lease released by its host's watchdog a moment later).
pub const QUORUM_RETRY: Duration = Duration::from_millis(10);
/// The same, when the primary's host reported its daemon dead: its watchdog writes that just before
/// it releases the lease, so the release is a witness round trip away (the 10 ms retry made a
/// killed primary's takeover wait about 12 ms for nothing, measured by `cargo xtask bench`).
pub const QUORUM_RETRY_DAEMON_DEAD: Duration = Duration::from_millis(2);
/// How often the restored VM's lease is looked at.
const LEASE_POLL: Duration = Duration::from_millis(5);
/// While the primary is suspected, its host is probed at most this often (a probe outcome is
/// reused until then: the link may be the problem, and must not be flooded).
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// How often instead while the last reply said the daemon lives but its progress is this old: a
/// killed primary's host says so until its watchdog, a few milliseconds later, marks the daemon
/// dead (and the reply after that one decides).
const PROBE_STALE_EVERY: Duration = Duration::from_millis(2);
const STALE_PROGRESS: Duration = Duration::from_millis(5);
/// Probes sent before "no reply" is believed (each waits for the [`HostProbe`]'s own timeout, a
/// few milliseconds): one lost datagram must not make a host dead.
const PROBE_TRIES: usize = 3;

/// Settings of a [`BackupDaemon`].
#[derive(Debug)]
pub struct DaemonConfig {
    /// The A-Link receiver.
    pub receiver: ReceiverConfig,
    /// The failure detector's timeouts.
    pub detector: DetectorConfig,
    /// How often the detector is polled (detection latency is at most this over the timeout).
    pub poll_interval: Duration,
    /// What the restored VM gets on this host.
    pub promote: PromoteConfig,
    /// Claimed before a takeover, renewed after it (the default, no quorum, grants every claim).
    pub lease: Lease,
    /// Where the standby's term is kept with its disk.
    pub term_file: Option<TermFile>,
    /// Asks the primary's host whether its daemon lives, when the daemon falls silent.
    pub host_probe: Option<Box<dyn HostProbe>>,
    /// After a takeover, protect the restored VM again once a backup can be reached (none: it
    /// runs alone until it ends). [`PromoteConfig::dirty_tracking`] must then track.
    pub protect_again: Option<ProtectAgain>,
    /// The VM this host handed over at a planned switchover: the standby starts as it, so that
    /// the new primary sends only what changed since (none: a blank standby).
    pub kept: Option<KeptStandby>,
}

/// How a host that took over protects its VM again: the restored VM runs under an epoch engine
/// built [`PrimaryEngine::alone`], and a [`Rejoiner`] looks for the peer host (the old primary's,
/// once repaired, listens as a standby) and hands its link to the engine.
pub struct ProtectAgain {
    /// Where the backup is to be found.
    pub rejoin: RejoinConfig,
    /// The epoch engine's settings.
    pub engine: EngineConfig,
    /// Told before output leaves on a fresh acknowledgement alone (the host's gate follows it).
    pub ack_authority_hook: Option<AckAuthorityHook>,
    /// Asks the engine, once it runs, for a planned switchover back to the other host.
    pub switchover: SwitchoverTrigger,
}

impl std::fmt::Debug for ProtectAgain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectAgain").field("rejoin", &self.rejoin).field("engine", &self.engine).finish_non_exhaustive()
    }
}

impl DaemonConfig {
    /// Default detector timeouts, polled every millisecond.
    pub fn new(receiver: ReceiverConfig, promote: PromoteConfig) -> Self {
        Self {
            receiver,
            detector: DetectorConfig::default(),
            poll_interval: Duration::from_millis(1),
            promote,
            lease: Lease::default(),
            term_file: None,
            host_probe: None,
            protect_again: None,
            kept: None,
        }
    }
}

/// What this host is for the VM. Its serde form, the lowercase name ([`Role::name`]), is the
/// `role` of the backup's status file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Receiving checkpoints from a primary (or waiting for one).
    Standby,
    /// The primary is dead; restoring the committed standby.
    Promoting,
    /// The restored VM runs here.
    Active,
    /// The restored VM's run ended (stopped, or the guest exited).
    Ended,
    /// The promotion failed; see `last_error`.
    Failed,
    /// After the takeover, the lease was lost to another host: the restored VM was stopped.
    Fenced,
    /// After the takeover, the VM was handed over to the other host (a planned switchover): the
    /// restored VM was stopped there.
    #[serde(rename = "handed-over")]
    HandedOver,
}

impl Role {
    /// The role's name in status and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Standby => "standby",
            Self::Promoting => "promoting",
            Self::Active => "active",
            Self::Ended => "ended",
            Self::Failed => "failed",
            Self::Fenced => "fenced",
            Self::HandedOver => "handed-over",
        }
    }
}

/// How a backup host's run ended ([`BackupDaemon::supervise`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupExit {
    /// Its owner asked it to stop.
    Stopped,
    /// The restored VM's run ended (stopped, or the guest exited).
    Ended,
    /// The takeover failed; this host's copy was fenced.
    Failed {
        /// The daemon's last error.
        reason: String,
    },
    /// After the takeover, another host got the lease: the restored VM was stopped and this
    /// host's copy fenced.
    Fenced {
        /// The daemon's last error.
        reason: String,
    },
    /// After the takeover, the VM was handed over to the other host (a planned switchover):
    /// this host's copy was stopped and may stand by again.
    HandedOver,
}

impl BackupExit {
    /// How a daemon in `status` has ended, if it has.
    fn of(status: &DaemonStatus) -> Option<Self> {
        let reason = || status.last_error.clone().unwrap_or_default();
        match status.role {
            Role::Failed => Some(Self::Failed { reason: reason() }),
            Role::Fenced => Some(Self::Fenced { reason: reason() }),
            Role::Ended => Some(Self::Ended),
            Role::HandedOver => Some(Self::HandedOver),
            Role::Standby | Role::Promoting | Role::Active => None,
        }
    }
}

/// How the takeover went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromotionTimings {
    /// The epoch the VM was restored from.
    pub epoch: EpochId,
    /// From the primary's last frame to the dead verdict (the detection time).
    pub last_frame_to_dead: Duration,
    /// From the first suspicion (the short timeout) to the dead verdict.
    pub suspected_to_dead: Duration,
    /// Stopping the receiver.
    pub stop_receiver: Duration,
    /// Inside [`promote`].
    pub restore: RestoreTimings,
    /// From the dead verdict to the restored guest's vCPUs being started.
    pub dead_to_resumed: Duration,
    /// From the first suspicion to the restored guest's vCPUs being started.
    pub suspected_to_resumed: Duration,
    /// Frames of input the dead primary had taken in after that epoch, given to the restored VM.
    pub ingress_replayed: u64,
}

/// A snapshot of the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonStatus {
    /// This host's role.
    pub role: Role,
    /// The last committed epoch (restorable or not).
    pub committed: Option<EpochId>,
    /// Whether the committed standby can be resumed.
    pub restorable: bool,
    /// Whether a primary is connected.
    pub connected: bool,
    /// Whether the last session ended on purpose (the primary's goodbye, or a refusal by this
    /// side): no takeover.
    pub primary_left: bool,
    /// Time since the primary's last frame.
    pub last_frame_age: Option<Duration>,
    /// The detector's last verdict.
    pub suspicion: Suspicion,
    /// Set once promoted.
    pub promotion: Option<PromotionTimings>,
    /// How the restored VM's run ended.
    pub exit: Option<MachineExit>,
    /// The last error (promotion failure, "nothing to resume", the machine's run error).
    pub last_error: Option<String>,
    /// What the last probe of the primary's host showed (none sent yet: `None`).
    pub last_probe: Option<ProbeOutcome>,
    /// The dead primary's late input ([`crate::late_input`]); none when not taken.
    pub late_input: Option<LateInputStats>,
    /// How the A-Link is read: "socket" or "io_uring".
    pub receive_io: &'static str,
}

impl DaemonStatus {
    /// A daemon that has just started, reading the A-Link with `receive_io`: standby, nothing
    /// heard yet.
    fn standby(receive_io: &'static str) -> Self {
        Self {
            role: Role::Standby,
            committed: None,
            restorable: false,
            connected: false,
            primary_left: false,
            last_frame_age: None,
            suspicion: Suspicion::NeverSeen,
            promotion: None,
            exit: None,
            last_error: None,
            last_probe: None,
            late_input: None,
            receive_io,
        }
    }
}

/// Why [`BackupDaemon::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonStartError {
    /// The receiver could not start.
    #[error("cannot start the A-Link receiver")]
    Receiver(#[from] BindError),
    /// The daemon thread.
    #[error("cannot start the backup daemon thread")]
    Thread(#[source] std::io::Error),
    /// The late input socket (UDP on the A-Link address) could not be bound.
    #[error("cannot listen for late input on the A-Link address (UDP)")]
    LateInput(#[source] std::io::Error),
}

struct Shared {
    status: Mutex<DaemonStatus>,
    stop: AtomicBool,
    source: Mutex<Option<CheckpointSource>>,
    handle: Mutex<Option<MachineHandle>>,
    run: Mutex<Option<JoinHandle<()>>>,
    /// The restored VM's engine, when it is to be protected again.
    engine: Mutex<Option<EngineHandle>>,
    engine_status: Mutex<Option<Arc<EngineStatus>>>,
    /// What the engine kept of the VM it handed over.
    kept: Mutex<Option<KeptStandby>>,
}

/// The backup host's daemon for one VM. See the module documentation.
pub struct BackupDaemon {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    lease: Lease,
    thread: Option<JoinHandle<()>>,
    /// The dead primary's late input: where it is kept, and the socket it comes on.
    late_input: Option<(Arc<LateInbox>, LateInputListener)>,
}

impl std::fmt::Debug for BackupDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupDaemon").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl BackupDaemon {
    /// Starts the receiver and the watch.
    pub fn start(mut cfg: DaemonConfig) -> Result<Self, DaemonStartError> {
        // The standby disk is the restored VM's, and so the one a later backup is synchronised from.
        let mut standby_disk = DiskSource::new(cfg.receiver.disk_path.clone(), cfg.receiver.disk_bytes);
        // One write-intent record per disk: the receiver reports and resets it, the restored
        // guest's block device marks it, and the engine that protects that guest again clears it.
        if let Some(intent) = &cfg.receiver.intent {
            standby_disk = standby_disk.with_intent(Arc::clone(intent));
            cfg.promote.disk_intent = Some(Arc::clone(intent));
        }
        let inbox = cfg.receiver.late_input.clone();
        let receiver = BackupReceiver::bind_keeping(cfg.receiver, cfg.kept)?;
        let local_addr = receiver.local_addr();
        // UDP on the receiver's own address and port.
        let late_input = match inbox {
            Some(inbox) => Some((
                Arc::clone(&inbox),
                LateInputListener::start(local_addr, Arc::clone(&inbox)).map_err(DaemonStartError::LateInput)?,
            )),
            None => None,
        };
        let shared = Arc::new(Shared {
            status: Mutex::new(DaemonStatus::standby(receiver.stats().receive_io)),
            stop: AtomicBool::new(false),
            source: Mutex::new(None),
            handle: Mutex::new(None),
            run: Mutex::new(None),
            engine: Mutex::new(None),
            engine_status: Mutex::new(None),
            kept: Mutex::new(None),
        });
        let watch = Watch {
            shared: Arc::clone(&shared),
            activity: receiver.link_activity(),
            detector: TimeoutDetector::new(cfg.detector),
            lease: cfg.lease.clone(),
            term_file: cfg.term_file,
            written_term: None,
            poll: cfg.poll_interval.clamp(Duration::from_micros(100), Duration::from_millis(100)),
            probe: cfg.host_probe,
            answered_before: false,
            last_probe: None,
            late_input: late_input.as_ref().map(|(inbox, _)| Arc::clone(inbox)),
        };
        let promote_cfg = cfg.promote;
        let again = cfg.protect_again.map(|p| (p, promote_cfg.block.then_some(standby_disk)));
        let thread = std::thread::Builder::new()
            .name("ftvm-backup-watch".into())
            .spawn(move || watch.run(receiver, promote_cfg, again))
            .map_err(DaemonStartError::Thread)?;
        Ok(Self { shared, local_addr, lease: cfg.lease, thread: Some(thread), late_input })
    }

    /// The lease this host claims to take over, and renews after.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The A-Link address the receiver listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The current status.
    pub fn status(&self) -> DaemonStatus {
        let mut s = lock(&self.shared.status).clone();
        s.late_input = self.late_input.as_ref().map(|(inbox, _)| inbox.stats());
        s
    }

    /// Waits up to `timeout` for `role`; returns the status then, or `None` on timeout.
    pub fn wait_for_role(&self, role: Role, timeout: Duration) -> Option<DaemonStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if s.role == role {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs `f` on the restored machine's checkpoint source, once active.
    pub fn with_source<R>(&self, f: impl FnOnce(&mut CheckpointSource) -> R) -> Option<R> {
        lock(&self.shared.source).as_mut().map(f)
    }

    /// The restored VM's protection, once active under an engine ([`DaemonConfig::protect_again`]).
    pub fn engine_status(&self) -> Option<Arc<EngineStatus>> {
        lock(&self.shared.engine_status).clone()
    }

    /// A handle on the restored machine, once active.
    pub fn machine_handle(&self) -> Option<MachineHandle> {
        lock(&self.shared.handle).clone()
    }

    /// Looks at the daemon every `every` until its run ends or `stop` is set, and says how it
    /// ended. Each change of role is logged. A daemon that failed its takeover or lost the lease
    /// after it must never emit again: `fence` closes this host's copy off the network (at every
    /// look from then on, before `tick`). `tick` gets each look's status (the owner's status
    /// file, its heartbeat responder); the daemon goes on running: [`BackupDaemon::shutdown`]
    /// stops it.
    pub fn supervise(
        &self,
        stop: &AtomicBool,
        fence: &dyn Fence,
        every: Duration,
        mut tick: impl FnMut(&DaemonStatus),
    ) -> BackupExit {
        let mut last_role = None;
        // Bounded by `stop` and by the daemon's own end; one look per period.
        loop {
            let status = self.status();
            if last_role != Some(status.role) {
                tracing::info!(role = ?status.role, committed = ?status.committed, "backup role");
                last_role = Some(status.role);
            }
            if matches!(status.role, Role::Fenced | Role::Failed) {
                fence.fence();
            }
            tick(&status);
            if let Some(exit) = BackupExit::of(&status) {
                return exit;
            }
            if stop.load(Ordering::Relaxed) {
                return BackupExit::Stopped;
            }
            std::thread::sleep(every);
        }
    }

    /// Stops everything: the watch, the receiver, and the restored machine if one runs. Returns
    /// the final status.
    pub fn shutdown(self) -> DaemonStatus {
        self.shutdown_keeping().0
    }

    /// [`Self::shutdown`], with what this host keeps of the VM when it handed it back to the other
    /// host (a planned switchover): its next standby starts from it.
    pub fn shutdown_keeping(mut self) -> (DaemonStatus, Option<KeptStandby>) {
        self.stop_all();
        let kept = lock(&self.shared.kept).take();
        (self.status(), kept)
    }

    fn stop_all(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(h) = lock(&self.shared.handle).as_ref() {
            h.stop();
        }
        let run = lock(&self.shared.run).take();
        if let Some(t) = run {
            let _ = t.join();
        }
        // After the machine: a VM stopped on purpose tells its backup goodbye (no takeover).
        let engine = lock(&self.shared.engine).take();
        match engine.map(EngineHandle::stop) {
            Some(Ok(report)) => *lock(&self.shared.kept) = report.kept,
            Some(Err(e)) => tracing::warn!(error = %ErrorChain(&e), "the restored VM's epoch engine ended with an error"),
            None => {}
        }
        lock(&self.shared.source).take();
    }
}

impl Drop for BackupDaemon {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct Watch {
    shared: Arc<Shared>,
    activity: LinkActivity,
    detector: TimeoutDetector,
    lease: Lease,
    term_file: Option<TermFile>,
    written_term: Option<u64>,
    poll: Duration,
    probe: Option<Box<dyn HostProbe>>,
    /// The primary's host responder answered at least once: its silence now means something.
    answered_before: bool,
    last_probe: Option<(Instant, ProbeOutcome)>,
    /// Given to the restored VM at the takeover.
    late_input: Option<Arc<LateInbox>>,
}

impl Watch {
    fn set_error(&self, role: Option<Role>, msg: String) {
        let mut s = lock(&self.shared.status);
        if let Some(r) = role {
            s.role = r;
        }
        s.last_error = Some(msg);
    }

    /// Keeps the term file in step with the standby: 0 while a synchronisation rewrites it (not a
    /// copy of anything yet), the primary's term once an epoch of that primary made it restorable.
    fn keep_term_file(&mut self, stats: &crate::backup::ReceiverStats) {
        let Some(file) = &self.term_file else { return };
        let want = if stats.sync.is_some() || !stats.restorable {
            0
        } else {
            match stats.standby_term {
                Some(t) => t,
                None => return,
            }
        };
        if self.written_term == Some(want) {
            return;
        }
        match file.write(want) {
            Ok(()) => {
                self.written_term = Some(want);
                self.lease.set_known_term(want);
            }
            Err(e) => tracing::error!(error = %ErrorChain(&e), "cannot store the standby's term"),
        }
    }

    /// The verdict once the primary's host was asked (see the module documentation).
    fn consult_host(&mut self, verdict: Suspicion, now_us: u64) -> Suspicion {
        let (Some(probe), Some(peer)) = (self.probe.as_mut(), self.activity.peer_ip()) else { return verdict };
        let stuck_after = self.detector.config().stuck_after;
        let every = match self.last_probe {
            Some((_, ProbeOutcome::Alive(r))) if r.progress_age.is_some_and(|age| age >= STALE_PROGRESS) => PROBE_STALE_EVERY,
            _ => PROBE_EVERY,
        };
        let outcome = match self.last_probe {
            Some((at, outcome)) if at.elapsed() < every => outcome,
            previous => {
                let mut outcome = ProbeOutcome::NoReply { answered_before: self.answered_before };
                for _ in 0..PROBE_TRIES {
                    match probe.probe(peer) {
                        Ok(Some(reply)) => {
                            outcome = ProbeOutcome::of(Some(reply), stuck_after, true);
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "cannot probe the primary's host");
                            outcome = ProbeOutcome::Error;
                            break;
                        }
                    }
                }
                if !matches!(outcome, ProbeOutcome::NoReply { .. } | ProbeOutcome::Error) {
                    self.answered_before = true;
                }
                let kind = |o: &ProbeOutcome| std::mem::discriminant(o);
                if previous.is_none_or(|(_, p)| kind(&p) != kind(&outcome)) {
                    tracing::warn!(%peer, outcome = %outcome.describe(), "probed the primary's host");
                }
                self.last_probe = Some((Instant::now(), outcome));
                outcome
            }
        };
        let for_ = match verdict {
            Suspicion::Silent { for_ } | Suspicion::Dead { for_, .. } => for_,
            Suspicion::NeverSeen | Suspicion::Alive => return verdict,
        };
        match outcome {
            ProbeOutcome::Alive(_) => {
                self.detector.observe_probe(now_us);
                Suspicion::Silent { for_ }
            }
            ProbeOutcome::DaemonDead(_) => Suspicion::Dead { for_, reason: DeadReason::DaemonDead },
            ProbeOutcome::Stuck(_) => Suspicion::Dead { for_, reason: DeadReason::DaemonStuck },
            ProbeOutcome::NoReply { answered_before: true } if !verdict.is_dead() => {
                Suspicion::Dead { for_, reason: DeadReason::HostSilent }
            }
            ProbeOutcome::NoReply { .. } | ProbeOutcome::Error => verdict,
        }
    }

    fn run(mut self, receiver: BackupReceiver, promote_cfg: PromoteConfig, again: Option<(ProtectAgain, Option<DiskSource>)>) {
        let mut suspected_at: Option<Instant> = None;
        let mut reported_no_takeover = false;
        let mut refused_at: Option<Instant> = None;
        // The takeover's claim is then one round trip to the quorum, not a connection and a
        // handshake first (about 4 ms to the witness here).
        let mut quorum_connected_at: Option<Instant> = None;
        let receiver = loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(self.poll);
            let now = monotonic_us();
            if let Some(t) = self.activity.last_us() {
                self.detector.observe(t);
            }
            let mut verdict = self.detector.suspected(now);
            if !matches!(verdict, Suspicion::Alive | Suspicion::NeverSeen)
                && self.activity.unread_bytes().is_some_and(|n| n > 0)
            {
                // The primary sent something this side has not read yet: it is alive, and the
                // silence is this side's own.
                self.detector.observe(now);
                verdict = self.detector.suspected(now);
            }
            let end = self.activity.session_end();
            if end == SessionEnd::Vanished && verdict != Suspicion::NeverSeen {
                let for_ = self.activity.age(now).unwrap_or_default();
                verdict = Suspicion::Dead { for_, reason: DeadReason::LinkClosed };
            }
            if end == SessionEnd::HandedOver {
                // The primary stopped its VM at this standby's epoch and asked for it: no probe,
                // no timeout, only the quorum (it gives the lease up once told this side takes over).
                let for_ = self.activity.age(now).unwrap_or_default();
                verdict = Suspicion::Dead { for_, reason: DeadReason::HandedOver };
            }
            if !matches!(verdict, Suspicion::NeverSeen | Suspicion::Alive)
                && !matches!(end, SessionEnd::Goodbye | SessionEnd::Refused | SessionEnd::HandedOver)
            {
                verdict = self.consult_host(verdict, now);
            }
            if verdict != Suspicion::NeverSeen
                && !matches!(end, SessionEnd::Goodbye | SessionEnd::Refused | SessionEnd::HandedOver)
                && self.late_input.as_ref().is_some_and(|inbox| inbox.death_noticed())
            {
                // The primary's watchdog says its daemon died and released its lease: no need to
                // wait for the daemon's connection to close or fall silent (its threads may still
                // be ending: tearing its memory down, waiting for a disk flush).
                let for_ = self.activity.age(now).unwrap_or_default();
                verdict = Suspicion::Dead { for_, reason: DeadReason::DaemonDead };
            }
            let stats = receiver.stats();
            self.keep_term_file(&stats);
            {
                let mut s = lock(&self.shared.status);
                s.committed = stats.committed;
                s.restorable = stats.restorable;
                s.connected = stats.connected.is_some();
                s.primary_left = matches!(end, SessionEnd::Goodbye | SessionEnd::Refused);
                s.last_frame_age = self.activity.age(now);
                s.suspicion = verdict;
                s.last_probe = self.last_probe.map(|(_, o)| o);
            }
            match verdict {
                Suspicion::NeverSeen | Suspicion::Alive => {
                    if suspected_at.take().is_some() {
                        tracing::info!("the primary is heard again");
                    }
                    reported_no_takeover = false;
                    if self.lease.has_quorum() && quorum_connected_at.is_none_or(|t| t.elapsed() >= QUORUM_CONNECTION_REFRESH) {
                        self.lease.connect_ahead();
                        quorum_connected_at = Some(Instant::now());
                    }
                }
                Suspicion::Silent { for_ } => {
                    if suspected_at.is_none() {
                        // The suspicion began when the short timeout passed, possibly before this poll.
                        let late = for_.saturating_sub(self.detector.config().silent_after);
                        suspected_at = Some(Instant::now().checked_sub(late).unwrap_or_else(Instant::now));
                        tracing::warn!(silent_for = ?for_, "the primary is silent");
                    }
                }
                Suspicion::Dead { for_, reason } => {
                    if matches!(end, SessionEnd::Goodbye | SessionEnd::Refused) {
                        // A planned departure (shutdown, switchover): the primary stopped its VM
                        // itself, so resuming it here would run a VM nobody wants, or two. After a
                        // refusal the primary goes on alone: the same.
                        if !reported_no_takeover {
                            reported_no_takeover = true;
                            let msg = if end == SessionEnd::Goodbye {
                                "the primary said goodbye: no takeover; waiting for a primary"
                            } else {
                                "this backup refused the primary's session (the primary goes on unprotected): no takeover; waiting for a primary"
                            }
                            .to_string();
                            tracing::warn!("{msg}");
                            self.set_error(None, msg);
                        }
                        continue;
                    }
                    // A refused claim is asked again only after a while: a real quorum is a remote service.
                    let retry = match reason {
                        DeadReason::DaemonDead | DeadReason::HandedOver => QUORUM_RETRY_DAEMON_DEAD,
                        _ => QUORUM_RETRY,
                    };
                    let ask = refused_at.is_none_or(|t: Instant| t.elapsed() >= retry);
                    if stats.restorable && !ask {
                        continue;
                    }
                    if stats.restorable {
                        self.lease.set_known_term(stats.standby_term.unwrap_or(0));
                        match self.lease.claim(Claim::TakeOver) {
                            Ok(grant) => {
                                tracing::error!(silent_for = ?for_, ?reason, term = grant.term, "the primary is dead: taking over");
                                let dead_at = Instant::now();
                                let suspected = suspected_at.unwrap_or(dead_at);
                                break (receiver, dead_at, suspected, for_, grant.previous, reason);
                            }
                            Err(why) => {
                                refused_at = Some(Instant::now());
                                if !reported_no_takeover {
                                    reported_no_takeover = true;
                                    let msg = format!(
                                        "the primary looks dead ({reason:?}, silent for {for_:?}) but the quorum ({}) \
                                         refused the takeover: {why}; staying standby",
                                        self.lease.backend()
                                    );
                                    tracing::error!("{msg}");
                                    self.set_error(None, msg);
                                }
                                continue;
                            }
                        }
                    }
                    if !reported_no_takeover {
                        reported_no_takeover = true;
                        let msg = format!(
                            "the primary is dead ({reason:?}, silent for {for_:?}) but no restorable checkpoint \
                             was ever committed (committed {:?}): nothing to resume; waiting for a primary",
                            stats.committed
                        );
                        tracing::error!("{msg}");
                        self.set_error(None, msg);
                    }
                }
            }
        };
        let (receiver, dead_at, suspected_at, last_frame_to_dead, previous, dead_reason) = receiver;
        lock(&self.shared.status).role = Role::Promoting;
        if let Some(file) = &self.term_file {
            // The standby is the current copy now, for the new term.
            if let Err(e) = file.write(self.lease.term()) {
                tracing::error!(error = %ErrorChain(&e), "cannot store the new term with the disk");
            }
        }
        let renewer = if self.lease.has_quorum() {
            match self.lease.spawn_renewer() {
                Ok(r) => Some(r),
                Err(e) => return self.set_error(Some(Role::Failed), format!("cannot start the lease renewer: {e}")),
            }
        } else {
            None
        };

        let t = Instant::now();
        let rs = receiver.stats();
        tracing::info!(
            held = rs.ingress_frames_held,
            late = rs.ingress_late,
            over_limit = rs.ingress_over_limit,
            "guest input sent ahead by the dead primary"
        );
        let notice = format!("the backup declared the primary dead after {last_frame_to_dead:?} of silence");
        let standby = match receiver.stop_taking_over(&notice) {
            Ok(s) => s,
            Err(e) => return self.set_error(Some(Role::Failed), format!("cannot stop the receiver: {}", ErrorChain(&e))),
        };
        let stop_receiver = t.elapsed();
        if previous == Previous::Expired {
            // The old primary may still let out output it holds a fresh acknowledgement for.
            std::thread::sleep(TAKEOVER_QUIET);
        }
        // Handed over on purpose, the other host keeps the VM as of this epoch: the pages written
        // from the resume on are all it will lack.
        let handed_over_state = (dead_reason == DeadReason::HandedOver).then(|| *blake3::hash(standby.state()).as_bytes());
        let promoted = match promote(standby, promote_cfg) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %ErrorChain(&e), "promotion failed");
                return self.set_error(Some(Role::Failed), format!("promotion failed: {}", ErrorChain(&e)));
            }
        };
        let mut machine = promoted.machine;
        *lock(&self.shared.handle) = Some(machine.handle());
        // After the input the dead primary forwarded itself (the promotion queued it): what reached
        // its host after its death.
        let late_replayed = match (&self.late_input, machine.handle().net_device()) {
            (Some(inbox), Some(net)) => inbox.take_over(Box::new(move |frames| {
                net.lock().unwrap_or_else(std::sync::PoisonError::into_inner).device_mut().replay_rx(frames)
            })),
            _ => 0,
        };
        if late_replayed > 0 {
            tracing::info!(frames = late_replayed, "the restored VM gets the input that reached the dead primary's host after its death");
        }
        let announcer = promoted.announcer;
        // Built before the VM runs, started after: the engine must not hold up the resume.
        let engine = match again {
            None => {
                *lock(&self.shared.source) = Some(promoted.source);
                None
            }
            Some((again, disk)) => {
                let why = format!("took over from the dead primary at epoch {}; looking for a backup", promoted.epoch.0);
                match PrimaryEngine::alone(promoted.source, disk, again.engine.clone(), why) {
                    Ok(e) => {
                        let mut e = e
                            .numbering_after(promoted.epoch)
                            .with_lease(self.lease.clone())
                            .with_switchover_trigger(again.switchover.clone());
                        if let Some(digest) = handed_over_state {
                            e = e.resumed_from(promoted.epoch, digest);
                        }
                        if let Some(hook) = again.ack_authority_hook.clone() {
                            e = e.with_ack_authority_hook(hook);
                        }
                        Some((e, again.rejoin))
                    }
                    Err(e) => {
                        // The VM runs all the same: unprotected for good is better than stopped.
                        tracing::error!(error = %ErrorChain(&e), "cannot build the epoch engine: the restored VM will not be protected again");
                        None
                    }
                }
            }
        };
        let shared = Arc::clone(&self.shared);
        let resumed = Instant::now();
        let run = std::thread::Builder::new().name("ftvm-vm-run".into()).spawn(move || {
            let result = machine.run();
            // The announcer must not outlive the run by much; it ends by itself within its schedule.
            drop(announcer);
            let mut s = lock(&shared.status);
            if matches!(s.role, Role::Active | Role::Promoting) {
                s.role = Role::Ended;
            }
            match result {
                Ok(exit) => s.exit = Some(exit),
                Err(e) => s.last_error = Some(format!("the restored machine failed: {}", ErrorChain(&e))),
            }
        });
        match run {
            Ok(t) => *lock(&self.shared.run) = Some(t),
            Err(e) => return self.set_error(Some(Role::Failed), format!("cannot start the VM thread: {e}")),
        }
        let timings = PromotionTimings {
            epoch: promoted.epoch,
            last_frame_to_dead,
            suspected_to_dead: dead_at.saturating_duration_since(suspected_at),
            stop_receiver,
            restore: promoted.timings,
            dead_to_resumed: resumed.saturating_duration_since(dead_at),
            suspected_to_resumed: resumed.saturating_duration_since(suspected_at),
            ingress_replayed: promoted.ingress_replayed as u64,
        };
        tracing::info!(?timings, "active: the restored guest runs");
        {
            let mut s = lock(&self.shared.status);
            // The run may already have ended (a guest that exits at once): keep its verdict.
            if s.role == Role::Promoting {
                s.role = Role::Active;
            }
            s.promotion = Some(timings);
            s.connected = false;
        }
        match engine {
            Some((engine, rejoin)) => self.run_engine(engine, rejoin, renewer),
            None => {
                if let Some(renewer) = renewer {
                    self.police_lease(renewer);
                }
            }
        }
    }

    /// The restored VM runs under `engine` (alone until `rejoin` finds a backup): the engine
    /// polices the lease itself (paused while it is not valid, fenced when it is lost), and this
    /// loop ends the VM when the engine says it must.
    fn run_engine(&self, engine: PrimaryEngine, rejoin: RejoinConfig, _renewer: Option<Renewer>) {
        let status = engine.status();
        let handle = match engine.spawn() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the epoch engine: the restored VM will not be protected again");
                return;
            }
        };
        let _rejoiner = Rejoiner::spawn(rejoin, self.lease.clone(), status.clone(), handle.attacher())
            .map_err(|e| tracing::error!(error = %e, "cannot start looking for a backup: the restored VM will not be protected again"))
            .ok();
        *lock(&self.shared.engine_status) = Some(status.clone());
        *lock(&self.shared.engine) = Some(handle);
        // Bounded by the stop flag and the VM's run.
        while !self.shared.stop.load(Ordering::SeqCst) && lock(&self.shared.status).role == Role::Active {
            std::thread::sleep(LEASE_POLL);
            let (role, reason) = match status.snapshot().state {
                EngineState::Fenced { reason } => (Role::Fenced, reason),
                EngineState::Failed { reason } => (Role::Failed, reason),
                EngineState::HandedOver { epoch } => {
                    tracing::warn!(epoch = epoch.0, "the VM was handed over to the other host: stopping this copy");
                    lock(&self.shared.status).role = Role::HandedOver;
                    if let Some(h) = lock(&self.shared.handle).clone() {
                        h.stop();
                    }
                    return;
                }
                _ => continue,
            };
            tracing::error!(%reason, "the restored VM's engine ended it: stopping the VM");
            if let Some(h) = lock(&self.shared.handle).clone() {
                let _ = h.pause();
                h.stop();
            }
            return self.set_error(Some(role), reason);
        }
    }

    /// While the restored VM runs: paused while the lease is not valid, stopped for good when it is
    /// lost to another host.
    fn police_lease(&self, _renewer: Renewer) {
        let mut paused = false;
        // Bounded by the stop flag and the VM's run.
        while !self.shared.stop.load(Ordering::SeqCst) && lock(&self.shared.status).role == Role::Active {
            std::thread::sleep(LEASE_POLL);
            let Some(handle) = lock(&self.shared.handle).clone() else { continue };
            if let Some(reason) = self.lease.lost() {
                tracing::error!(%reason, "the lease was lost after the takeover: stopping the VM");
                let _ = handle.pause();
                handle.stop();
                return self.set_error(Some(Role::Fenced), reason);
            }
            let valid = self.lease.is_valid(monotonic_us());
            if !valid && !paused {
                match handle.pause() {
                    Ok(()) => {
                        paused = true;
                        tracing::error!("the lease ran out: the VM is paused until the quorum renews it");
                    }
                    Err(e) => tracing::error!(error = %ErrorChain(&e), "cannot pause the VM whose lease ran out"),
                }
            } else if valid && paused {
                match handle.resume() {
                    Ok(()) => {
                        paused = false;
                        tracing::warn!("the lease is valid again: the VM runs");
                    }
                    Err(e) => tracing::error!(error = %ErrorChain(&e), "cannot resume the VM"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [Role; 7] =
        [Role::Standby, Role::Promoting, Role::Active, Role::Ended, Role::Failed, Role::Fenced, Role::HandedOver];

    #[test]
    fn a_role_is_written_by_its_name() {
        for role in ROLES {
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.name()));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
    }

    #[test]
    fn only_an_ended_failed_fenced_or_handed_over_daemon_has_exited() {
        let mut status = DaemonStatus { last_error: Some("the quorum refused the takeover".into()), ..DaemonStatus::standby("socket") };
        let exits = ROLES.map(|role| {
            status.role = role;
            BackupExit::of(&status)
        });
        let reason = "the quorum refused the takeover".to_string();
        assert_eq!(
            exits,
            [
                None,
                None,
                None,
                Some(BackupExit::Ended),
                Some(BackupExit::Failed { reason: reason.clone() }),
                Some(BackupExit::Fenced { reason }),
                Some(BackupExit::HandedOver),
            ]
        );
    }
}
