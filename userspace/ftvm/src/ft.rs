//! `ftvm primary` and `ftvm backup`: the two halves of a fault-tolerant pair.
//!
//! The primary runs the VM, checkpoints it every epoch over the A-Link and holds the guest's
//! network output until the backup acknowledges the epoch that produced it. The backup keeps the
//! last committed checkpoint and, when the primary falls silent, resumes the VM from it and
//! announces the guest's address. Each writes its status as JSON to `--status-file` several times a
//! second ([`crate::status`]; `ftvm site status` reads them).
//!
//! The hosts' lifecycles are library types: [`ftvm_repl::ha::primary::PrimaryHost`] and
//! [`ftvm_repl::ha::failover::BackupDaemon`]. This module parses their options, builds their
//! configurations, wires in what the library does not know (the eBPF gate and responder, the lease
//! watchdog process, signals, the status file) and turns their outcomes into exit codes.

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
use ftvm_repl::backup::standby::KeptStandby;
use ftvm_repl::disk::intent::{SharedIntent, WriteIntent, DEFAULT_REGION_BYTES};
use ftvm_repl::epoch::engine::{DiskSource, EngineConfig, EngineState, SwitchoverTrigger};
use ftvm_repl::ha::failover::{BackupDaemon, BackupExit, DaemonConfig, ProtectAgain, Role};
use ftvm_repl::ha::lease::Lease;
use ftvm_repl::ha::primary::{claim_start, connect_backup, PrimaryExit, PrimaryHost, PrimaryHostConfig, StartClaimError};
use ftvm_repl::taken_ring::TakenRing;
use ftvm_repl::transport::CheckpointTransport;
use ftvm_repl::ErrorChain;
use ftvm_repl::ha::rejoin::RejoinConfig;
use ftvm_repl::ha::term::TermFile;
use ftvm_repl::late_input::LateInbox;
use ftvm_repl::output::trace::FileTrace;
use ftvm_repl::transport::tcp::TcpOptions;
use ftvm_proto::cpu::CpuidWord;
use ftvm_vmm::devices::DiskWriteIntent;
use ftvm_vmm::dirty::DirtyTracking;
use ftvm_vmm::machine::Machine;

use crate::cli::{parse_cpuid_bit, parse_size, AlinkIoArg, AlinkRdmaArgs, AlinkReadArg, CheckpointCopyArg, DirtyTrackerArg, GuestNetArgs, RunArgs, DEFAULT_NEW_DISK_SIZE};
use crate::ebpf::{EbpfArgs, EbpfHandoff, HostEbpf};
use crate::quorum::{LateInputForwarding, QuorumArgs, QuorumKind, Watchdog};
use crate::run;
use crate::secret::read_secret;
use crate::status::{self, BackupStatus, DiskRecordStatus, PrimaryStatus, ProtectionState};

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
    #[command(flatten)]
    pub engine: EngineArgs,
    /// How long to keep trying to reach the backup at start, in seconds.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// When the backup does not answer within `--connect-timeout`, start the VM alone instead of
    /// failing: it is protected once the backup's service answers (`ftvm host` does this).
    #[arg(long)]
    pub alone_if_no_backup: bool,
    /// Write a trace of the output-commit hold to this file (for tests): one line per frame held,
    /// epoch sealed, release and frame sent, stamped with the real-time clock in nanoseconds (the
    /// clock of packet captures). Format: `ftvm_repl::output::trace::TraceRecord`.
    #[arg(long)]
    pub output_trace: Option<PathBuf>,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

/// The epoch engine's options: the primary's, and the backup's for the VM it runs after a
/// takeover (protected again once the other host is back).
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Longest time between checkpoints while no guest output waits (an idle VM), in
    /// microseconds; output is checkpointed at once whatever this is.
    #[arg(long, default_value_t = 50_000)]
    pub epoch_us: u64,
    /// Shortest time between checkpoints when guest output waits for one, in microseconds (held
    /// output is latency the clients see); 0 checkpoints only every `--epoch-us`.
    #[arg(long, default_value_t = 200)]
    pub min_epoch_gap_us: u64,
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
    /// How the VM's written pages are found for each checkpoint (the backup's: in the VM it runs
    /// after a takeover).
    #[arg(long, value_enum, default_value_t)]
    pub dirty_tracker: DirtyTrackerArg,
    /// How a checkpoint copies the dirty pages: in the pause (`stop`), or after it, the pages
    /// write-protected meanwhile (`cow`; not with `--dirty-tracker uffd`).
    #[arg(long, value_enum, default_value_t)]
    pub checkpoint_copy: CheckpointCopyArg,
    /// While no guest output waits, checkpoint early once the dirty pages would take longer than
    /// this to send at the A-Link's measured rate, in microseconds (0: only output and
    /// `--epoch-us` trigger checkpoints).
    #[arg(long, default_value_t = default_dirty_send_budget_us())]
    pub dirty_send_budget_us: u64,
    /// Do not send the guest's input to the backup as it comes: a takeover then leaves the
    /// requests the dead primary had taken in to the clients' TCP retransmissions (200 ms or
    /// more), and saves a small A-Link frame per batch of input.
    #[arg(long)]
    pub no_input_ahead: bool,
    /// Send every page whole: without this, a page an epoch carries again goes as its difference
    /// from the backup's copy (A-Link 1.9; the primary keeps up to 16 MiB of copies of the pages it
    /// sent).
    #[arg(long)]
    pub no_page_deltas: bool,
    /// How the primary writes to the A-Link: `socket` (writev), `uring` (io_uring) or `uring-zc`
    /// (io_uring, pages zero-copy). The wire is the same: either end may use any.
    #[arg(long, value_enum, default_value_t)]
    pub alink_io: AlinkIoArg,
    /// How this host reads the A-Link as the backup: `socket` (read) or `uring` (io_uring, one
    /// receive with a linked timeout per read). Measured here, io_uring was not faster.
    #[arg(long, value_enum, default_value_t)]
    pub alink_read: AlinkReadArg,
    /// Page payloads by RDMA (`--alink-rdma-*`): the primary's link, and the backup's receiver
    /// and its link as the primary after a takeover.
    #[command(flatten)]
    pub alink_rdma: AlinkRdmaArgs,
}

/// The engine's own default, in microseconds.
fn default_dirty_send_budget_us() -> u64 {
    EngineConfig::default().dirty_send_budget.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
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
    /// The other host's A-Link address: after a takeover, the VM is protected again as soon as a
    /// backup listens there (the other host's service, restarted after a repair). Without it the
    /// VM runs alone after a takeover until it ends.
    #[arg(long)]
    pub peer: Option<SocketAddr>,
    /// The epoch engine of the VM this host runs after a takeover (with `--peer`).
    #[command(flatten)]
    pub engine: EngineArgs,
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
    /// For tests only: announce this host's CPU capabilities to the primary without one CPUID
    /// feature bit, `<leaf>:<subleaf>:<reg>:<bit>` (e.g. `1:0:edx:26`, SSE2; may be repeated), so
    /// that a primary whose guest sees it refuses this backup as unable to resume it.
    #[arg(long, hide = true, value_parser = parse_cpuid_bit)]
    pub test_mask_cpuid: Vec<(CpuidWord, u8)>,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

/// How often the backup's daemon is looked at (and its status written).
const BACKUP_LOOK_EVERY: Duration = Duration::from_millis(50);

/// The epoch engine's settings from the options.
fn engine_config(args: &EngineArgs) -> EngineConfig {
    EngineConfig {
        epoch_interval: Duration::from_micros(args.epoch_us.max(100)),
        min_epoch_gap: (args.min_epoch_gap_us > 0).then(|| Duration::from_micros(args.min_epoch_gap_us.max(50))),
        ack_timeout: Duration::from_millis(args.ack_timeout_ms),
        disk_backlog: args.disk_backlog_kib.saturating_mul(1024),
        copy: args.checkpoint_copy.copy(),
        dirty_send_budget: (args.dirty_send_budget_us > 0).then(|| Duration::from_micros(args.dirty_send_budget_us)),
        input_ahead: !args.no_input_ahead,
        ..EngineConfig::default()
    }
}

/// The ring where the VM's input waits until sent ahead, for this host's lease watchdog (see
/// `ftvm_repl::taken_ring`); a failure only costs that.
fn taken_ring() -> Option<Arc<TakenRing>> {
    TakenRing::create()
        .map(Arc::new)
        .map_err(|e| tracing::warn!(error = %ErrorChain(&e), "no taken-input ring: input not yet sent ahead is lost with this process"))
        .ok()
}

/// Fails when this host cannot run the dirty tracker and copy asked for (userfaultfd's tracker
/// depends on the kernel's version; copy-on-write needs the userfaultfd the uffd tracker holds),
/// before anything is claimed or started.
fn check_dirty_tracker(args: &EngineArgs) -> Result<()> {
    if args.dirty_tracker == DirtyTrackerArg::Uffd {
        if args.checkpoint_copy == CheckpointCopyArg::Cow {
            bail!(
                "`--checkpoint-copy cow` cannot go with `--dirty-tracker uffd`: both write-protect guest memory \
                 through userfaultfd, and memory takes one; use `--dirty-tracker bitmap` or `ring` with `cow`"
            );
        }
        ftvm_vmm::dirty::UffdWp::check_host().context("`--dirty-tracker uffd` cannot run on this host (it needs Linux 6.7 or later)")?;
    }
    Ok(())
}

/// Claims the lease to start the VM (keeping the disk's term file in step with it) and starts the
/// watchdog that releases it if this process dies; it inherits `handoff`. Without a quorum:
/// nothing to claim, no watchdog. The inner error is the quorum's answer that this host may not
/// start the VM (another host runs it, or this disk is older); the outer one, anything else (the
/// quorum not reached within the wait among them).
fn start_lease(
    args: &PrimaryArgs,
    handoff: EbpfHandoff,
    late: Option<LateInputForwarding>,
) -> Result<Result<(Lease, Option<Watchdog>), StartClaimError>> {
    let term_file = TermFile::for_disk(&args.vm.disk, &args.quorum.vm_id);
    let known = term_file.read().context("cannot read the disk's term")?;
    let lease = args.quorum.lease(&args.secret_file, known)?;
    match claim_start(&lease, &term_file, Duration::from_secs(args.connect_timeout)) {
        Ok(None) => Ok(Ok((lease, None))),
        Ok(Some(_)) => {
            let watchdog = Watchdog::start(&args.quorum, &args.secret_file, &lease, handoff, late)?;
            Ok(Ok((lease, Some(watchdog))))
        }
        Err(refusal @ StartClaimError::Refused(_)) if lease.last_error().is_none() => Ok(Err(refusal)),
        Err(e) => Err(e.into()),
    }
}

/// How a start as the primary went.
pub enum PrimaryStart {
    /// The VM ran here, and ended with this code.
    Ran(ExitCode),
    /// The quorum answered that this host may not start the VM: another host runs it, or this
    /// host's disk is older than the VM's current copy. Nothing was started.
    NotCurrent(StartClaimError),
    /// The VM ran here and was handed over to the backup (a planned switchover); what this host
    /// kept of it, for its standby.
    HandedOver(Option<KeptStandby>),
}

pub fn primary(args: PrimaryArgs) -> Result<ExitCode> {
    match start_primary(args)? {
        PrimaryStart::Ran(code) => Ok(code),
        PrimaryStart::NotCurrent(refusal) => Err(refusal.into()),
        PrimaryStart::HandedOver(_) => Ok(ExitCode::SUCCESS),
    }
}

/// Runs the VM as the primary if the quorum lets this host start it (see [`PrimaryStart`]).
pub fn start_primary(args: PrimaryArgs) -> Result<PrimaryStart> {
    let secret = read_secret(&args.secret_file)?;
    check_dirty_tracker(&args.engine)?;
    let rdma = args.engine.alink_rdma.options()?;
    let mut config = run::prepare_vm(&args.vm, args.engine.dirty_tracker.tracking())?;
    let disk_bytes = args.vm.disk_size_bytes()?;
    let intent = open_intent(&args.vm.disk, &args.quorum.vm_id, disk_bytes)?;
    config.devices.block = config.devices.block.map(|b| b.with_intent(Arc::clone(&intent) as Arc<dyn DiskWriteIntent>));
    // In the host's namespace (prepare_vm entered it), before the lease and the VM: the guest is
    // fenced until the lease says otherwise, and the watchdog inherits the responder and the gate.
    let mut host_ebpf = HostEbpf::attach(&args.ebpf, args.vm.net.mac)?;
    // With a quorum, the watchdog forwards to the backup what reaches the VM's TAP after this
    // process died; the backup learns this daemon's id in each A-Link session.
    let late = LateInputForwarding::with_quorum(args.quorum.quorum, Some(args.peer))?;
    let (lease, watchdog) = match start_lease(&args, host_ebpf.handoff(), late)? {
        Ok(started) => started,
        Err(refusal) => return Ok(PrimaryStart::NotCurrent(refusal)),
    };
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
        cpu_needs: Some(ftvm_vmm::compat::guest_cpu_needs().context("cannot read what this guest's CPU state needs")?),
        io: args.engine.alink_io.io(),
        rdma,
        late_input: late.filter(|_| watchdog.is_some()).map(|l| l.id),
        page_delta_pages: page_delta_pages(&args.engine),
        ..TcpOptions::default()
    };
    // Reach the backup before the VM starts, so that a misconfiguration stops here, with nothing
    // half-started.
    let transport: Result<Box<dyn CheckpointTransport>, String> =
        match connect_backup(args.peer, &secret, &options, Duration::from_secs(args.connect_timeout)) {
            Ok(link) => {
                tracing::info!(peer = %args.peer, "A-Link up");
                Ok(Box::new(link))
            }
            Err(e) if args.alone_if_no_backup => {
                let why = format!("{:#}", anyhow::Error::from(e));
                tracing::warn!(error = %why, "no backup: the VM starts alone, and is protected once its backup answers");
                Err(format!("no backup at start ({why}); looking for it"))
            }
            Err(e) => return Err(e.into()),
        };
    let machine = Machine::create(config)?;
    let taken_ring = late.and_then(|_| taken_ring());
    if let Some(w) = &watchdog {
        w.hand_tap(&machine.handle());
        if let Some(r) = &taken_ring {
            w.hand_taken_ring(r);
        }
    }
    let _stop = run::stop_on_signal(machine.handle())?;
    let mut host = PrimaryHostConfig::new(machine, transport, lease.clone(), host_ebpf.fence_hook());
    host.engine = EngineConfig { taken_ring, ..engine_config(&args.engine) };
    let disk_record = Arc::clone(&intent);
    host.disk = Some(DiskSource::new(args.vm.disk.clone(), disk_bytes).with_intent(intent));
    host.renewer = Some(renewer);
    // Whenever the backup is lost, its host is looked for again: its service, restarted, becomes
    // the backup by itself.
    host.rejoin = Some(RejoinConfig::new(args.peer, secret.clone(), options.clone()));
    // Without a quorum the gate is open for ever: no acknowledgement needs to extend it.
    host.ack_authority_hook = host_ebpf.ack_authority_hook().filter(|_| lease.has_quorum());
    host.output_trace = match &args.output_trace {
        Some(path) => Some(FileTrace::create(path).with_context(|| format!("cannot create the output trace {}", path.display()))?),
        None => None,
    };
    let host = PrimaryHost::new(host)?;
    let switchover = host.switchover_trigger();
    let _switchover = crate::signals::on_switchover_signal(move || switchover.request());
    let engine_status = host.engine_status();
    {
        let lease = lease.clone();
        host_ebpf.spawn_publisher(move || {
            let s = engine_status.snapshot();
            // Progress: epochs and heartbeats leaving (an idle pair takes no checkpoint); a simplex
            // VM has no link, its daemon's loop is the progress.
            let marker = match s.state {
                EngineState::Simplex { .. } => None,
                _ => Some(s.last_sent.map_or(0, |e| e.0 + 1).wrapping_add(s.heartbeats_sent)),
            };
            (lease.term(), s.last_acked.map_or(0, |e| e.0), marker)
        })?;
    }
    let mut last_state = None;
    let exit = host.run(|snap| {
        let (state, detail) = ProtectionState::of(&snap.state);
        if last_state != Some(state) {
            tracing::info!(state = state.name(), %detail, "protection");
            last_state = Some(state);
        }
        if let Some(path) = &args.status_file {
            let mut st = PrimaryStatus::of(snap, &lease, host_ebpf.status());
            st.disk_record = Some(DiskRecordStatus::of(&disk_record.lock()));
            status::write(path, &st);
        }
    });
    if let Some(w) = watchdog {
        w.stop();
    }
    let code = match exit? {
        PrimaryExit::Stopped(exit) => run::exit_code(exit)?,
        PrimaryExit::Failed { reason } => bail!(
            "{reason}: this VM was stopped without a goodbye, so that the backup resumes it from the last committed epoch"
        ),
        PrimaryExit::Fenced { reason } => {
            bail!("this VM was stopped because another copy runs it ({reason}); the other host serves the guest now")
        }
        PrimaryExit::HandedOver { epoch, kept } => {
            tracing::info!(epoch = epoch.0, "the VM was handed over to the backup, which serves it now");
            return Ok(PrimaryStart::HandedOver(kept));
        }
    };
    Ok(PrimaryStart::Ran(code))
}

/// How a backup's run ended, when it did not fail.
pub enum BackupEnd {
    /// Stopped, or the VM it took over ended: the process's exit code.
    Exit(ExitCode),
    /// It took the VM over, then handed it back to the other host (a planned switchover): it
    /// may stand by again, from what it kept of the VM.
    HandedOver(Option<KeptStandby>),
}

pub fn backup(args: BackupArgs) -> Result<ExitCode> {
    match run_backup(args, None)? {
        BackupEnd::Exit(code) => Ok(code),
        BackupEnd::HandedOver(_) => Ok(ExitCode::SUCCESS),
    }
}

/// Runs this host as the standby of the VM (see [`BackupEnd`]), starting from `kept` (the VM
/// this host just handed over) rather than a blank standby when there is one.
pub fn run_backup(args: BackupArgs, kept: Option<KeptStandby>) -> Result<BackupEnd> {
    run::enter_process_context(args.net.netns.as_deref())?;
    let secret = read_secret(&args.secret_file)?;
    let rdma = args.engine.alink_rdma.options()?;
    run::prepare_disk(&args.disk, args.disk_size)?;
    // The guest is fenced here until this host takes over with a lease; the heartbeat responder
    // comes with the takeover.
    let host_ebpf = HostEbpf::attach_standby(&args.ebpf, args.net.mac)?;
    let console = run::open_console(args.net.console_log.as_deref())?;
    let mut receiver = ReceiverConfig::new(args.listen, secret.clone(), args.memory, args.disk.clone(), args.disk_size);
    // What reaches a dead primary's host before this one takes over, forwarded by its watchdog.
    receiver.late_input = Some(LateInbox::new(&secret));
    receiver.uring = args.engine.alink_read == AlinkReadArg::Uring;
    if !args.sync_every_epoch {
        receiver.disk_sync = DiskSync::NoSync;
    }
    let disk_record = open_intent(&args.disk, &args.quorum.vm_id, args.disk_size)?;
    receiver.intent = Some(Arc::clone(&disk_record));
    receiver.rdma = rdma.clone();
    if !args.test_mask_cpuid.is_empty() {
        let mut caps = ftvm_vmm::compat::host_cpu_caps().context("cannot read this host's CPU capabilities")?;
        for &(word, bit) in &args.test_mask_cpuid {
            caps.mask_bit(word, bit);
            tracing::warn!(%word, bit, "test knob: this backup announces its CPU without this feature bit");
        }
        receiver.cpu_caps = Some(caps);
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
        disk_intent: None,
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
    // SIGUSR1 asks the VM this host runs after a takeover to go back to the other host.
    let switchover = SwitchoverTrigger::default();
    let _switchover_guard = {
        let trigger = switchover.clone();
        crate::signals::on_switchover_signal(move || trigger.request())
    };
    // Once this host runs the VM, its own watchdog forwards late input to the other host.
    let late = LateInputForwarding::with_quorum(args.quorum.quorum, args.peer)?;
    let taken_ring = late.and_then(|_| taken_ring());
    if let Some(peer) = args.peer {
        // The restored VM tracks its pages from the start: a backup may join at any time. A
        // tracker this kernel lacks must fail now, not at the takeover.
        check_dirty_tracker(&args.engine)?;
        daemon_config.promote.dirty_tracking = args.engine.dirty_tracker.tracking();
        let options = TcpOptions {
            memory_bytes: Some(args.memory),
            disk_bytes: Some(args.disk_size),
            cpu_needs: Some(ftvm_vmm::compat::guest_cpu_needs().context("cannot read what this guest's CPU state needs")?),
            io: args.engine.alink_io.io(),
            rdma,
            late_input: late.map(|l| l.id),
            page_delta_pages: page_delta_pages(&args.engine),
            ..TcpOptions::default()
        };
        daemon_config.protect_again = Some(ProtectAgain {
            switchover,
            rejoin: RejoinConfig::new(peer, secret.clone(), options),
            engine: EngineConfig { taken_ring: taken_ring.clone(), ..engine_config(&args.engine) },
            ack_authority_hook: host_ebpf.ack_authority_hook().filter(|_| daemon_config.lease.has_quorum()),
        });
    }
    daemon_config.kept = kept;
    daemon_config.detector.dead_after = Duration::from_millis(args.dead_after_ms.max(10));
    daemon_config.detector.silent_after = daemon_config.detector.silent_after.min(daemon_config.detector.dead_after);
    let daemon = BackupDaemon::start(daemon_config).context("cannot start the backup")?;
    tracing::info!(listen = %daemon.local_addr(), "backup waiting for the primary");

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = {
        let stop = Arc::clone(&stop);
        crate::signals::on_stop_signal(move |_| stop.store(true, Ordering::Relaxed))?
    };
    let flusher = (!args.sync_every_epoch).then(|| spawn_disk_flusher(args.disk.clone(), Arc::clone(&stop)));
    let mut responder_wanted = true;
    let mut watchdog = None;
    let exit = daemon.supervise(&stop, &*host_ebpf.fence_hook(), BACKUP_LOOK_EVERY, |st| {
        // The status first: the attaches below take a while once, and status must say at once
        // that this host serves.
        host_ebpf.publish_progress(daemon.lease().term(), st.committed.map_or(0, |e| e.0));
        if let Some(path) = &args.status_file {
            let serving = daemon.engine_status().map(|s| s.snapshot());
            let mut status = BackupStatus::of(st, daemon.lease(), host_ebpf.status(), serving.as_ref());
            status.disk_record = Some(DiskRecordStatus::of(&disk_record.lock()));
            status::write(path, &status);
        }
        // Once the restored VM runs (not before: the takeover must not wait for it), this host
        // is the primary: it answers probes, and its death releases the lease at once, as the
        // primary's does (the other host, once back, takes over without waiting for the lease
        // to run out). One try each, a failure said once.
        if responder_wanted && st.role == Role::Active {
            responder_wanted = false;
            if let Err(e) = host_ebpf.attach_responder() {
                tracing::error!(error = %format_args!("{e:#}"), "no heartbeat responder on the new primary");
            }
            if args.quorum.quorum != QuorumKind::None {
                match Watchdog::start(&args.quorum, &args.secret_file, daemon.lease(), host_ebpf.handoff(), late) {
                    Ok(w) => {
                        if let Some(machine) = daemon.machine_handle() {
                            w.hand_tap(&machine);
                        }
                        if let Some(r) = &taken_ring {
                            w.hand_taken_ring(r);
                        }
                        watchdog = Some(w);
                    }
                    Err(e) => tracing::error!(error = %format_args!("{e:#}"), "no lease watchdog: a death of this host will hold the lease until it runs out"),
                }
            }
        }
    });
    stop.store(true, Ordering::Relaxed);
    let (final_status, kept) = daemon.shutdown_keeping();
    if let Some(w) = watchdog {
        w.stop();
    }
    if let Some(Ok(t)) = flusher {
        let _ = t.join();
    }
    tracing::info!(role = ?final_status.role, "backup stopped");
    match exit {
        BackupExit::Stopped | BackupExit::Ended => Ok(BackupEnd::Exit(ExitCode::SUCCESS)),
        BackupExit::HandedOver => Ok(BackupEnd::HandedOver(kept)),
        BackupExit::Failed { reason } => bail!("takeover failed: {reason}"),
        BackupExit::Fenced { reason } => bail!("this VM was stopped because another host holds its lease now: {reason}"),
    }
}

/// The write-intent record of this host's disk (see [`ftvm_repl::disk::intent`]): the guest's
/// block device marks it before every write, and a rejoin copies only the regions it and the other
/// host's record name.
fn open_intent(disk: &Path, vm_id: &str, disk_bytes: u64) -> Result<Arc<SharedIntent>> {
    let record = WriteIntent::open(disk, vm_id, disk_bytes, DEFAULT_REGION_BYTES)
        .with_context(|| format!("cannot open the write-intent record of {}", disk.display()))?;
    if !record.is_complete() {
        tracing::info!(disk = %disk.display(), "this disk's write-intent record does not know its past: the next synchronisation copies all of it");
    }
    Ok(SharedIntent::new(record))
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

/// The copies of sent pages the primary keeps for page deltas (none: every page goes whole).
fn page_delta_pages(engine: &EngineArgs) -> usize {
    if engine.no_page_deltas {
        0
    } else {
        TcpOptions::default().page_delta_pages
    }
}
