//! `ftvm primary` and `ftvm backup`: the two halves of a fault-tolerant pair.
//!
//! The primary runs the VM, checkpoints it every epoch over the A-Link and holds the guest's
//! network output until the backup acknowledges the epoch that produced it. The backup keeps the
//! last committed checkpoint and, when the primary falls silent, resumes the VM from it and
//! announces the guest's address. Each writes its status as JSON to `--status-file` several times a
//! second (`ftvm site status` reads them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ftvm_repl::backup::activate::{PromoteConfig, PromoteNet, DEFAULT_ANNOUNCE_SCHEDULE};
use ftvm_repl::backup::receiver::{DiskSync, ReceiverConfig};
use ftvm_repl::epoch::context::{EpochWindowStats, Percentiles};
use ftvm_repl::epoch::engine::{DiskSource, EngineConfig, EngineState, PrimaryEngine};
use ftvm_repl::ha::failover::{BackupDaemon, DaemonConfig, Role};
use ftvm_repl::ha::quorum::{Claim, ReleaseReason};
use ftvm_repl::ha::term::TermFile;
use ftvm_repl::transport::tcp::{TcpOptions, TcpTransport};
use ftvm_repl::output::trace::FileTrace;
use ftvm_vmm::dirty::DirtyTracking;
use ftvm_vmm::machine::Machine;
use serde::Serialize;

use crate::cli::{parse_size, GuestNetArgs, RunArgs, DEFAULT_NEW_DISK_SIZE};
use crate::ebpf::{EbpfArgs, EbpfStatus, HostEbpf};
use crate::quorum::{QuorumArgs, QuorumKind, QuorumStatus, Watchdog};
use crate::run;

/// Default A-Link port.
pub const DEFAULT_ALINK_PORT: u16 = 7700;

#[derive(Debug, Args)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub vm: RunArgs,
    /// The backup's A-Link address (host:port).
    #[arg(long)]
    pub peer: SocketAddr,
    /// File holding the shared secret of the A-Link (at least 16 bytes, mode 0600).
    #[arg(long)]
    pub secret_file: PathBuf,
    #[command(flatten)]
    pub quorum: QuorumArgs,
    /// Write this host's status here (JSON, mode 0600), several times a second.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Longest time between checkpoints, in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub epoch_us: u64,
    /// Shortest time between checkpoints when guest output waits for one, in microseconds (held
    /// output is latency the clients see); 0 checkpoints only every `--epoch-us`.
    #[arg(long, default_value_t = 200)]
    pub min_epoch_gap_us: u64,
    /// How long to keep trying to reach the backup at start, in seconds.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Milliseconds to wait for an epoch's acknowledgement before declaring the backup lost and
    /// running unprotected (simplex), which releases the held output. Keep it well above the
    /// backup's `--dead-after-ms` (250 by default): when the A-Link fails, the backup must give up
    /// on the primary (and take over) before the primary gives up on the backup, or clients could
    /// see output of epochs the new primary never had.
    #[arg(long, default_value_t = default_ack_timeout_ms(), value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_timeout_ms: u64,
    /// Most guest disk bytes written and not yet acknowledged by the backup, in KiB. A write beyond
    /// it cannot reach the backup: the pair is declared unprotected (the primary goes on alone if
    /// the quorum lets it, and the backup can no longer take over) rather than keep a backup that
    /// lacks a write.
    #[arg(long, default_value_t = default_disk_backlog_kib(), value_parser = clap::value_parser!(u64).range(4..))]
    pub disk_backlog_kib: u64,
    /// Write a trace of the output-commit hold to this file (for tests): one line per frame held,
    /// epoch sealed, release and frame sent, stamped with the real-time clock in nanoseconds (the
    /// clock of packet captures). Format: `ftvm_repl::output::trace::TraceRecord`.
    #[arg(long)]
    pub output_trace: Option<PathBuf>,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

/// The engine's own default, so that the CLI and the library cannot drift apart.
fn default_ack_timeout_ms() -> u64 {
    u64::try_from(EngineConfig::default().ack_timeout.as_millis()).unwrap_or(u64::MAX)
}

/// The engine's own default, in KiB.
fn default_disk_backlog_kib() -> u64 {
    EngineConfig::default().disk_backlog >> 10
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Address to listen on for the primary (this host's A-Link address; never 0.0.0.0).
    #[arg(long)]
    pub listen: SocketAddr,
    /// File holding the shared secret of the A-Link (mode 0600).
    #[arg(long)]
    pub secret_file: PathBuf,
    #[command(flatten)]
    pub quorum: QuorumArgs,
    /// Guest RAM (must equal the primary's).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// The standby disk (a raw file; created sparse if missing).
    #[arg(long)]
    pub disk: PathBuf,
    /// Size of the standby disk (must equal the primary's).
    #[arg(long, default_value = DEFAULT_NEW_DISK_SIZE, value_parser = parse_size)]
    pub disk_size: u64,
    /// The guest on this host's network once it takes over (the MAC and address are announced
    /// by gratuitous ARP).
    #[command(flatten)]
    pub net: GuestNetArgs,
    /// Write this host's status here (JSON), several times a second.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Declare the primary dead after this many milliseconds of silence on the A-Link. 100 ms gave
    /// false takeovers on a loaded two-core host (a primary stalled by a huge epoch looks dead).
    #[arg(long, default_value_t = 250)]
    pub dead_after_ms: u64,
    /// fdatasync the standby disk before acknowledging each epoch that wrote to it. Off by
    /// default: the standby memory is in RAM, so a crash of this host loses the standby whatever
    /// the disk holds, and a sync per epoch adds milliseconds to every acknowledgement (and so to
    /// the guest's replies); a background flush every second keeps the page cache from growing.
    #[arg(long)]
    pub sync_every_epoch: bool,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

/// Reads a secret (the A-Link's, the witness's): the file's bytes without a trailing newline. A
/// file that group or others may read is refused: the secret is the whole of the link's security.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read secret file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "secret file {} is readable by group or others (mode {:o}): `chmod 600` it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let mut secret = std::fs::read(path).with_context(|| format!("cannot read secret file {}", path.display()))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < ftvm_proto::handshake::MIN_SECRET_LEN {
        bail!(
            "secret file {} holds {} bytes; the A-Link needs at least {}",
            path.display(),
            secret.len(),
            ftvm_proto::handshake::MIN_SECRET_LEN
        );
    }
    Ok(secret)
}

/// Writes `value` as JSON to `path` atomically (write, then rename), readable by root only, never
/// through a symbolic link planted at the temporary name (the rename replaces a link at `path`
/// itself rather than following it).
fn write_status(path: &Path, value: &impl Serialize) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = serde_json::to_vec_pretty(value).ok().is_some_and(|json| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&json))
            .is_ok()
    });
    if !(written && std::fs::rename(&tmp, path).is_ok()) {
        tracing::debug!(path = %path.display(), "cannot write the status file");
    }
}

/// The primary's status file.
#[derive(Debug, Serialize)]
pub struct PrimaryStatus {
    pub role: &'static str,
    pub state: String,
    pub detail: String,
    pub epochs_committed: u64,
    pub epochs_per_sec: f64,
    pub last_pause_us: u64,
    pub last_ack_us: Option<u64>,
    pub lag_epochs: u64,
    pub link_per_dirty_byte: Option<f64>,
    /// A guest disk write could not be recorded for the backup (its backlog was full): the backup
    /// lacks it, so the pair is not protected until a new synchronisation.
    pub disk_replication_lost: bool,
    /// Percentiles over the last epochs, in microseconds: `<part>: [p50, p99]`.
    pub recent: RecentEpochs,
    /// The lease.
    pub quorum: QuorumStatus,
    /// The fencing gate and the heartbeat responder.
    pub ebpf: EbpfStatus,
}

/// The pause and its parts, and the acknowledgement round trip, over the last epochs: `[p50, p99]`
/// in microseconds.
#[derive(Debug, Serialize)]
pub struct RecentEpochs {
    pub epochs: usize,
    pub pause_us: [u64; 2],
    pub pause_wait_us: [u64; 2],
    pub harvest_us: [u64; 2],
    pub state_us: [u64; 2],
    pub copy_us: [u64; 2],
    pub resume_us: [u64; 2],
    pub send_us: [u64; 2],
    pub ack_us: [u64; 2],
    pub dirty_pages_p50: u64,
}

impl RecentEpochs {
    fn of(w: &EpochWindowStats, ack: &Percentiles) -> Self {
        let us = |p: &Percentiles| [p.p50.as_micros() as u64, p.p99.as_micros() as u64];
        Self {
            epochs: w.epochs,
            pause_us: us(&w.pause),
            pause_wait_us: us(&w.pause_wait),
            harvest_us: us(&w.harvest),
            state_us: us(&w.state),
            copy_us: us(&w.copy),
            resume_us: us(&w.resume),
            send_us: us(&w.send),
            ack_us: us(ack),
            dirty_pages_p50: w.pages_p50,
        }
    }
}

fn engine_state(state: &EngineState) -> (&'static str, String) {
    match state {
        EngineState::Syncing(p) => (
            "syncing",
            format!(
                "memory {}/{} pages, disk {}/{} MiB",
                p.pages_sent,
                p.pages_total,
                p.disk_bytes_sent >> 20,
                p.disk_bytes_total >> 20
            ),
        ),
        EngineState::Protected => ("protected", String::new()),
        EngineState::Simplex { reason } => ("simplex", reason.clone()),
        EngineState::Fenced { reason } => ("fenced", reason.clone()),
        EngineState::Failed { reason } => ("failed", reason.clone()),
        EngineState::Stopped => ("stopped", String::new()),
    }
}

/// Connects to the backup, retrying (with a line of progress every few seconds) until `timeout`.
fn connect_backup(peer: SocketAddr, secret: &[u8], options: &TcpOptions, timeout: Duration) -> Result<TcpTransport> {
    let start = Instant::now();
    let mut last_report = start;
    loop {
        match TcpTransport::connect(peer, secret, options) {
            Ok(t) => return Ok(t),
            // Only "nobody answers yet" is worth waiting for; a wrong secret, another protocol
            // version or a size mismatch will not fix itself.
            Err(e) if e.is_transient() && start.elapsed() < timeout => {
                if last_report.elapsed() >= Duration::from_secs(3) {
                    tracing::info!(%peer, error = %ftvm_repl::ErrorChain(&e), "waiting for the backup");
                    last_report = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.is_transient() => {
                return Err(e).with_context(|| format!("cannot reach the backup at {peer} within {} s", timeout.as_secs()))
            }
            Err(e) => return Err(e).with_context(|| format!("the backup at {peer} refused this primary")),
        }
    }
}

/// Claims the lease to start the VM and keeps the term file and the watchdog in step with it.
fn start_lease(
    args: &PrimaryArgs,
    responder: Option<ftvm_ebpf_host::ResponderHandoff>,
) -> Result<(ftvm_repl::ha::lease::Lease, Option<Watchdog>)> {
    let term_file = TermFile::for_disk(&args.vm.disk, &args.quorum.vm_id);
    let known = term_file.read().context("cannot read the disk's term")?;
    let lease = args.quorum.lease(&args.secret_file, known)?;
    if !lease.has_quorum() {
        return Ok((lease, None));
    }
    // An unreachable quorum is waited for (it may be starting too); a refusal is final.
    let started = Instant::now();
    let grant = loop {
        match lease.claim(Claim::Start) {
            Ok(g) => break g,
            Err(why) if lease.last_error().is_some() && started.elapsed() < Duration::from_secs(args.connect_timeout) => {
                tracing::info!(%why, "waiting for the quorum");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(why) => bail!("the quorum refused to let this host start the VM: {why}"),
        }
    };
    term_file.write(grant.term).context("cannot store the new term with the disk")?;
    tracing::info!(term = grant.term, backend = lease.backend(), "lease held");
    // A later change of term (going on alone) is stored before the VM serves under it.
    let file = term_file.clone();
    lease.subscribe(move |v| {
        if v.held {
            if let Err(e) = file.write(v.term) {
                tracing::error!(error = %ftvm_repl::ErrorChain(&e), "cannot store the term with the disk");
            }
        }
    });
    let watchdog = Watchdog::start(&args.quorum, &args.secret_file, &lease, responder)?;
    Ok((lease, Some(watchdog)))
}

pub fn primary(args: PrimaryArgs) -> Result<ExitCode> {
    let secret = read_secret(&args.secret_file)?;
    let config = run::prepare_vm(&args.vm, DirtyTracking::KvmBitmap)?;
    // In the host's namespace (prepare_vm entered it), before the lease and the VM: the guest is
    // fenced until the lease says otherwise, and the watchdog inherits the responder.
    let mut host_ebpf = HostEbpf::attach(&args.ebpf, args.vm.net.mac)?;
    let (lease, watchdog) = start_lease(&args, host_ebpf.handoff())?;
    if lease.has_quorum() {
        host_ebpf.follow_lease(&lease);
    } else {
        host_ebpf.activate_for_ever();
    }
    let renewer = lease.spawn_renewer().context("cannot start the lease renewer")?;
    let options = TcpOptions {
        memory_bytes: Some(args.vm.memory),
        disk_bytes: Some(args.vm.disk_size_bytes()?),
        lease_term: lease.has_quorum().then(|| lease.term()),
        ..TcpOptions::default()
    };
    // Reach the backup before the VM starts, so that a misconfiguration stops here, with nothing
    // half-started.
    let transport = connect_backup(args.peer, &secret, &options, Duration::from_secs(args.connect_timeout))?;
    tracing::info!(peer = %args.peer, "A-Link up");
    let mut machine = Machine::create(config)?;
    run::stop_on_signal(machine.handle())?;
    let source = machine.checkpoint_source().context("cannot set up checkpoints")?;
    let engine_config = EngineConfig {
        epoch_interval: Duration::from_micros(args.epoch_us.max(100)),
        min_epoch_gap: (args.min_epoch_gap_us > 0).then(|| Duration::from_micros(args.min_epoch_gap_us.max(50))),
        ack_timeout: Duration::from_millis(args.ack_timeout_ms),
        disk_backlog: args.disk_backlog_kib.saturating_mul(1024),
        ..EngineConfig::default()
    };
    let disk = DiskSource { path: args.vm.disk.clone(), bytes: args.vm.disk_size_bytes()? };
    let engine = PrimaryEngine::new(source, Box::new(transport), Some(disk), engine_config)
        .context("cannot start the epoch engine")?
        .with_lease(lease.clone());
    // Without a quorum the gate is open for ever: no acknowledgement needs to extend it.
    let engine = match host_ebpf.ack_authority_hook().filter(|_| lease.has_quorum()) {
        Some(hook) => engine.with_ack_authority_hook(hook),
        None => engine,
    };
    // Before the engine runs: the hold takes its first frame at the first checkpoint.
    let output_trace = match &args.output_trace {
        Some(path) => {
            let trace = FileTrace::create(path).with_context(|| format!("cannot create the output trace {}", path.display()))?;
            let hold = engine.output_hold().context("the output trace needs the userspace output hold")?;
            hold.set_trace(Some(trace.clone()));
            Some(trace)
        }
        None => None,
    };
    let status = engine.status();
    {
        let (status, lease) = (status.clone(), lease.clone());
        host_ebpf.spawn_publisher(move || {
            let s = status.snapshot();
            // Progress: epochs leaving; a simplex VM has no epochs, its daemon's loop is the progress.
            let marker = match s.state {
                EngineState::Simplex { .. } => None,
                _ => Some(s.last_sent.map_or(0, |e| e.0 + 1)),
            };
            (lease.term(), s.last_acked.map_or(0, |e| e.0), marker)
        })?;
    }
    let host_ebpf = Arc::new(host_ebpf);
    let handle = engine.spawn().context("cannot start the epoch engine thread")?;

    let done = Arc::new(AtomicBool::new(false));
    let fenced = Arc::new(std::sync::Mutex::new(None::<String>));
    let failed = Arc::new(std::sync::Mutex::new(None::<String>));
    let reporter = {
        let done = Arc::clone(&done);
        let fenced = Arc::clone(&fenced);
        let failed = Arc::clone(&failed);
        let machine_handle = machine.handle();
        let path = args.status_file.clone();
        let lease = lease.clone();
        let host_ebpf = Arc::clone(&host_ebpf);
        std::thread::Builder::new().name("status".into()).spawn(move || {
            let mut last_state = String::new();
            while !done.load(Ordering::Relaxed) {
                let snap = status.snapshot();
                let (state, detail) = engine_state(&snap.state);
                if state != last_state {
                    tracing::info!(state, %detail, "protection");
                    last_state = state.to_string();
                }
                if let EngineState::Fenced { reason } = &snap.state {
                    // The other host runs the VM now; this copy (already paused) must end.
                    host_ebpf.fence();
                    *fenced.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
                    machine_handle.stop();
                }
                if let EngineState::Failed { reason } = &snap.state {
                    // This copy can no longer be protected, and its output stays held: it ends,
                    // and the backup resumes the VM from the last committed epoch.
                    host_ebpf.fence();
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
                    machine_handle.stop();
                }
                if let Some(path) = &path {
                    write_status(
                        path,
                        &PrimaryStatus {
                            role: "primary",
                            state: state.to_string(),
                            detail,
                            epochs_committed: snap.epochs_committed,
                            epochs_per_sec: snap.epochs_per_sec,
                            last_pause_us: snap.last_epoch.pause.as_micros() as u64,
                            last_ack_us: snap.last_ack_round_trip.map(|d| d.as_micros() as u64),
                            lag_epochs: snap.lag_epochs(),
                            link_per_dirty_byte: snap.link_per_dirty_byte(),
                            disk_replication_lost: snap.disk_replication_lost,
                            recent: RecentEpochs::of(&snap.recent, &snap.recent_ack),
                            quorum: QuorumStatus::of(&lease),
                            ebpf: host_ebpf.status(),
                        },
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })?
    };
    let exit = machine.run();
    done.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    if let Err(e) = handle.stop() {
        tracing::warn!(error = %ftvm_repl::ErrorChain(&e), "epoch engine ended with an error");
    }
    if let Some(Err(e)) = output_trace.map(|t| t.flush()) {
        tracing::warn!(error = %e, "cannot write the end of the output trace");
    }
    drop(renewer);
    let failed = failed.lock().unwrap_or_else(|e| e.into_inner()).take();
    // The VM no longer runs here: the lease goes (a fenced host no longer holds it anyway). After
    // a failure the backup must take over at once, as if this process had died.
    lease.release(if failed.is_some() { ReleaseReason::HolderDied } else { ReleaseReason::Stopped });
    if let Some(w) = watchdog {
        w.stop();
    }
    if let Some(reason) = failed {
        bail!("{reason}: this VM was stopped without a goodbye, so that the backup resumes it from the last committed epoch");
    }
    if let Some(reason) = fenced.lock().unwrap_or_else(|e| e.into_inner()).take() {
        bail!("this VM was stopped because another copy runs it ({reason}); the other host serves the guest now");
    }
    run::exit_code(exit?)
}

/// The backup's status file.
#[derive(Debug, Serialize)]
pub struct BackupStatus {
    pub role: String,
    /// The lease (claimed at a takeover).
    pub quorum: QuorumStatus,
    pub committed_epoch: Option<u64>,
    pub restorable: bool,
    pub connected: bool,
    pub last_frame_age_ms: Option<f64>,
    pub takeover_ms: Option<f64>,
    pub last_error: Option<String>,
    /// The fencing gate, the heartbeat responder, and the last probe of the primary's host.
    pub ebpf: EbpfStatus,
}

pub fn backup(args: BackupArgs) -> Result<ExitCode> {
    run::enter_process_context(args.net.netns.as_deref())?;
    let secret = read_secret(&args.secret_file)?;
    run::prepare_disk(&args.disk, args.disk_size)?;
    // The guest is fenced here until this host takes over with a lease.
    let host_ebpf = HostEbpf::attach(&args.ebpf, args.net.mac)?;
    let console = run::open_console(args.net.console_log.as_deref())?;
    let mut receiver = ReceiverConfig::new(args.listen, secret, args.memory, args.disk.clone(), args.disk_size);
    if !args.sync_every_epoch {
        receiver.disk_sync = DiskSync::NoSync;
    }
    let promote = PromoteConfig {
        net: Some(PromoteNet {
            tap_name: args.net.tap.clone(),
            mac: args.net.mac,
            guest_ipv4: args.net.ip.0,
            host_ipv4: args.net.host_ip,
            announce: DEFAULT_ANNOUNCE_SCHEDULE.to_vec(),
        }),
        block: true,
        console: Box::new(console),
        dirty_tracking: DirtyTracking::Off,
    };
    let term_file = TermFile::for_disk(&args.disk, &args.quorum.vm_id);
    let known = term_file.read().context("cannot read the standby disk's term")?;
    let mut daemon_config = DaemonConfig::new(receiver, promote);
    daemon_config.lease = args.quorum.lease(&args.secret_file, known)?;
    // The claim at a takeover tells the gate before it returns, so before the VM resumes.
    host_ebpf.follow_lease(&daemon_config.lease);
    daemon_config.host_probe = host_ebpf.host_probe(args.listen.ip());
    if args.quorum.quorum != QuorumKind::None {
        daemon_config.term_file = Some(term_file);
    }
    daemon_config.detector.dead_after = Duration::from_millis(args.dead_after_ms.max(10));
    daemon_config.detector.silent_after = daemon_config.detector.silent_after.min(daemon_config.detector.dead_after);
    let daemon = BackupDaemon::start(daemon_config).context("cannot start the backup")?;
    tracing::info!(listen = %daemon.local_addr(), "backup waiting for the primary");

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        crate::signals::on_stop_signal(move |_| stop.store(true, Ordering::Relaxed))?;
    }
    let flusher = (!args.sync_every_epoch).then(|| spawn_disk_flusher(args.disk.clone(), Arc::clone(&stop)));
    let mut last_role = None;
    let result = loop {
        let st = daemon.status();
        if last_role != Some(st.role) {
            tracing::info!(role = ?st.role, committed = ?st.committed, "backup role");
            last_role = Some(st.role);
        }
        host_ebpf.publish_progress(daemon.lease().term(), st.committed.map_or(0, |e| e.0));
        if matches!(st.role, Role::Fenced | Role::Failed) {
            host_ebpf.fence();
        }
        if let Some(path) = &args.status_file {
            write_status(
                path,
                &BackupStatus {
                    role: format!("{:?}", st.role).to_lowercase(),
                    quorum: QuorumStatus::of(daemon.lease()),
                    committed_epoch: st.committed.map(|e| e.0),
                    restorable: st.restorable,
                    connected: st.connected,
                    last_frame_age_ms: st.last_frame_age.map(|d| d.as_secs_f64() * 1e3),
                    takeover_ms: st.promotion.map(|p| p.suspected_to_resumed.as_secs_f64() * 1e3),
                    last_error: st.last_error.clone(),
                    ebpf: EbpfStatus { last_probe: st.last_probe.map(|p| p.describe()), ..host_ebpf.status() },
                },
            );
        }
        match st.role {
            Role::Failed => break Err(anyhow::anyhow!("takeover failed: {}", st.last_error.unwrap_or_default())),
            Role::Fenced => {
                break Err(anyhow::anyhow!(
                    "this VM was stopped because another host holds its lease now: {}",
                    st.last_error.unwrap_or_default()
                ))
            }
            Role::Ended => break Ok(ExitCode::SUCCESS),
            _ => {}
        }
        if stop.load(Ordering::Relaxed) {
            break Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, Ordering::Relaxed);
    let final_status = daemon.shutdown();
    if let Some(Ok(t)) = flusher {
        let _ = t.join();
    }
    tracing::info!(role = ?final_status.role, "backup stopped");
    result
}

/// Flushes the standby disk to stable storage every second until `stop`, so that the writes
/// applied without a sync per epoch do not pile up in the page cache.
fn spawn_disk_flusher(path: PathBuf, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("disk-flush".into()).spawn(move || {
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            if last.elapsed() < Duration::from_secs(1) {
                continue;
            }
            last = Instant::now();
            // Any descriptor of the file flushes its dirty pages.
            if let Err(e) = std::fs::File::open(&path).and_then(|f| f.sync_data()) {
                tracing::warn!(path = %path.display(), error = %e, "cannot flush the standby disk");
            }
        }
    })
}

impl RunArgs {
    /// The disk's size: the file's when it exists, the size it will be created with otherwise.
    pub fn disk_size_bytes(&self) -> Result<u64> {
        match std::fs::metadata(&self.disk) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(self.disk_size),
            Err(e) => Err(e).with_context(|| format!("cannot open disk {}", self.disk.display())),
        }
    }
}
