//! The quorum options of `ftvm primary` and `ftvm backup`, `ftvm witness`, and the lease watchdog.
//!
//! The watchdog is a small child process of the primary (`ftvm lease-watchdog`, not for operators)
//! that outlives it: the primary tells it the term it holds on a pipe, and when that pipe ends
//! without a "stop" (the primary died: SIGKILL, a crash; its kernel closed the pipe), the watchdog
//! releases the lease at the quorum with the reason "holder died", so the backup takes over in
//! milliseconds instead of waiting for the lease to run out. A whole host that dies takes its
//! watchdog with it: then the lease runs out. The watchdog learns of the death from a signal the
//! kernel sends as the primary's threads end, before the pipe does (see
//! [`crate::death_signal`]).
//!
//! The watchdog also inherits the primary's eBPF programs (their links and maps, see
//! `ftvm_ebpf_host::spawn_inheriting`): the fencing gate on the business port and the heartbeat
//! responder on the A-Link, each if attached. When the primary dies, the watchdog first closes the
//! gate (none of the guest's frames pass this host any more), then writes "daemon dead" into the
//! responder's replies (the backup's probes then know at once), then releases the lease, and
//! keeps both attached a moment longer: the kernel detaches them when the watchdog exits, after
//! the backup's takeover, which the detach (under the rtnl lock) would otherwise stall.
//!
//! Once the VM exists, the primary tells the watchdog its TAP's descriptor number ("tap N"), and
//! the watchdog takes a duplicate of it (`pidfd_getfd`). When the primary dies, its TAP lives on
//! in the watchdog: what clients send until the backup has taken over queues there, and the
//! watchdog forwards it to the backup for a short window (`ftvm_repl::late_input`), instead of
//! those clients waiting for their retransmission timeout. The gate then closes only after that
//! window, since its ingress side would drop that input.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ftvm_ebpf_host::{spawn_inheriting, DaemonState, Handoff, InheritedGate, InheritedResponder};
use ftvm_repl::ha::lease::{Lease, LeaseConfig, LeaseView, QUORUM_CONNECTION_REFRESH};
use ftvm_repl::ha::quorum::etcd::{EtcdConfig, EtcdQuorum};
use ftvm_repl::ha::quorum::witness::{WitnessClientConfig, WitnessQuorum};
use ftvm_repl::ha::quorum::{NoQuorum, QuorumClient, ReleaseReason};
use ftvm_repl::late_input::{forward_late_input, send_death_notice, LateForward};
use ftvm_repl::taken_ring::TakenRing;
use ftvm_repl::witness::{Witness, WitnessConfig, DEFAULT_TTL};
use ftvm_proto::late_input::LateInputId;
use ftvm_vmm::machine::MachineHandle;

use crate::death_signal::{ask_for_death_signal, on_parent_death, LastingThread};
use crate::ebpf::EbpfHandoff;
use crate::secret::read_secret;

/// Which quorum decides who may run the VM alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QuorumKind {
    /// No quorum: a cut A-Link makes both hosts run the VM (split-brain). For trying things out.
    None,
    /// The built-in witness (`ftvm witness` on a third machine).
    Witness,
    /// An etcd cluster the site already has (etcd v3 over plain HTTP: a trusted management network).
    Etcd,
}

/// The quorum options of a host.
#[derive(Clone, Debug, Args)]
pub struct QuorumArgs {
    /// Who decides which host may run the VM alone: `witness` (the built-in witness, on a third
    /// machine), `etcd` (an etcd cluster), or `none` (nothing protects against split-brain).
    #[arg(long, value_enum)]
    pub quorum: QuorumKind,
    /// The witness's address (host:port) on the management network.
    #[arg(long, required_if_eq("quorum", "witness"))]
    pub witness: Option<SocketAddr>,
    /// The witness's secret (at least 16 bytes, mode 0600); the A-Link secret file if not given.
    #[arg(long)]
    pub witness_secret_file: Option<PathBuf>,
    /// etcd's client URLs (`http://addr:port`, comma separated) for `--quorum etcd`.
    #[arg(long, value_delimiter = ',', required_if_eq("quorum", "etcd"))]
    pub etcd_endpoints: Vec<String>,
    /// The lease's length with `--quorum etcd`, in milliseconds (etcd rounds it up to whole
    /// seconds, and to its own minimum); the witness sets its own.
    #[arg(long, default_value_t = 1000)]
    pub lease_ttl_ms: u64,
    /// The VM's id at the quorum (the same on both hosts).
    #[arg(long, default_value = "vm")]
    pub vm_id: String,
    /// This host's name at the quorum (the system's host name if not given).
    #[arg(long)]
    pub host_name: Option<String>,
    /// Longest time for one request to the quorum, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub quorum_timeout_ms: u64,
}

/// This host's name: the option, or the kernel's host name.
fn host_name(args: &QuorumArgs) -> Result<String> {
    if let Some(h) = &args.host_name {
        return Ok(h.clone());
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").context("cannot read the host name; give --host-name")?;
    Ok(name.trim().to_string())
}

impl QuorumArgs {
    /// A client of the chosen quorum.
    pub fn client(&self, alink_secret: &Path) -> Result<Box<dyn QuorumClient>> {
        match self.quorum {
            QuorumKind::None => {
                tracing::warn!("--quorum none: nothing keeps both hosts from running the VM if the A-Link is cut (split-brain)");
                Ok(Box::new(NoQuorum))
            }
            QuorumKind::Witness => {
                let addr = self.witness.context("--quorum witness needs --witness <addr:port>")?;
                let secret = read_secret(self.witness_secret_file.as_deref().unwrap_or(alink_secret))?;
                let client = WitnessQuorum::new(WitnessClientConfig {
                    addr,
                    secret,
                    vm: self.vm_id.clone(),
                    host: host_name(self)?,
                    timeout: Duration::from_millis(self.quorum_timeout_ms.max(10)),
                })?;
                Ok(Box::new(client))
            }
            QuorumKind::Etcd => {
                let mut cfg = EtcdConfig::new(
                    self.etcd_endpoints.clone(),
                    self.vm_id.clone(),
                    host_name(self)?,
                    Duration::from_millis(self.lease_ttl_ms),
                );
                cfg.request_timeout = Duration::from_millis(self.quorum_timeout_ms.max(10));
                Ok(Box::new(EtcdQuorum::new(cfg)?))
            }
        }
    }

    /// The arguments that make the same client in the watchdog.
    fn watchdog_args(&self, alink_secret: &Path) -> Result<Vec<String>> {
        let mut a = vec!["lease-watchdog".to_string(), "--quorum".into()];
        match self.quorum {
            QuorumKind::None => bail!("no watchdog without a quorum"),
            QuorumKind::Witness => {
                a.push("witness".into());
                a.push("--witness".into());
                a.push(self.witness.context("--witness")?.to_string());
            }
            QuorumKind::Etcd => {
                a.push("etcd".into());
                a.push("--etcd-endpoints".into());
                a.push(self.etcd_endpoints.join(","));
            }
        }
        let secret = self.witness_secret_file.as_deref().unwrap_or(alink_secret);
        a.extend(["--witness-secret-file".into(), secret.display().to_string()]);
        a.extend(["--vm-id".into(), self.vm_id.clone(), "--host-name".into(), host_name(self)?]);
        a.extend(["--quorum-timeout-ms".into(), self.quorum_timeout_ms.to_string()]);
        Ok(a)
    }

    /// The lease of this host, not yet claimed, for a copy current as of `term`.
    pub fn lease(&self, alink_secret: &Path, term: u64) -> Result<Lease> {
        Ok(Lease::new(self.client(alink_secret)?, LeaseConfig::default(), term))
    }
}

/// Where a watchdog forwards the guest input that reaches its host after the primary's death.
#[derive(Clone, Copy, Debug)]
pub struct LateInputForwarding {
    /// The backup's A-Link address.
    pub to: SocketAddr,
    /// The primary daemon's id, told to the backup in its A-Link sessions.
    pub id: LateInputId,
}

impl LateInputForwarding {
    /// Forwarding to `peer` under a fresh id, when there is a peer and a quorum (only then does a
    /// watchdog run).
    pub fn with_quorum(quorum: QuorumKind, peer: Option<SocketAddr>) -> Result<Option<Self>> {
        match (quorum, peer) {
            (QuorumKind::Witness | QuorumKind::Etcd, Some(to)) => {
                Ok(Some(Self { to, id: LateInputId::random().context("cannot draw the late input id")? }))
            }
            _ => Ok(None),
        }
    }
}

/// The running watchdog of a primary.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
    stdin: Arc<Mutex<Option<ChildStdin>>>,
    /// The thread that started it, whose end is the watchdog's news of this process's death.
    parent: LastingThread,
}

impl Watchdog {
    /// Starts the watchdog and keeps it told of `lease`'s term; it inherits what `handoff` holds.
    /// With `late`, it forwards to the backup what reaches the VM's TAP after this process died
    /// (once told the TAP, [`Self::hand_tap`]).
    pub fn start(
        args: &QuorumArgs,
        alink_secret: &Path,
        lease: &Lease,
        handoff: EbpfHandoff,
        late: Option<LateInputForwarding>,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the ftvm binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(args.watchdog_args(alink_secret)?).stdin(Stdio::piped()).stdout(Stdio::null());
        if let Some(late) = late {
            cmd.args(["--late-input-to".to_string(), late.to.to_string(), "--late-input-id".into(), late.id.to_hex()]);
            cmd.args(["--alink-secret-file".to_string(), alink_secret.display().to_string()]);
            cmd.args(["--primary-pid".to_string(), std::process::id().to_string()]);
        }
        ask_for_death_signal(&mut cmd);
        let spawned = LastingThread::spawn("ftvm-watchdog-parent", move || {
            // The flags of `WatchdogArgs`.
            let mut inherit: Vec<(&str, &dyn Handoff)> = Vec::new();
            if let Some(r) = &handoff.responder {
                inherit.push(("--responder-fds", r));
            }
            if let Some(g) = &handoff.gate {
                inherit.push(("--gate-fds", g));
            }
            // This process's duplicates (`handoff`) go once the child has its own.
            spawn_inheriting(&mut cmd, &inherit)
        });
        let (mut child, parent) = spawned.context("cannot start the lease watchdog")?;
        let stdin = Arc::new(Mutex::new(child.stdin.take()));
        let pipe = Arc::clone(&stdin);
        lease.subscribe(move |v: LeaseView| {
            tell(&pipe, &if v.held { format!("term {}\n", v.term) } else { "none\n".to_string() });
        });
        Ok(Self { child, stdin, parent })
    }

    /// Tells the watchdog the VM's TAP (its descriptor in this process), so that it can forward
    /// what reaches the TAP after this process died. A failure only costs that; a VM without a
    /// network device has nothing to tell.
    pub fn hand_tap(&self, machine: &MachineHandle) {
        if let Some(fd) = machine.net_backend_fd() {
            tell(&self.stdin, &format!("tap {fd}\n"));
        }
    }

    /// Tells the watchdog the ring where the VM's input is kept until sent ahead, so that after
    /// this process died it sends the backup what had not gone (see `ftvm_repl::taken_ring`).
    pub fn hand_taken_ring(&self, ring: &TakenRing) {
        tell(&self.stdin, &format!("ring {}\n", ring.fd().as_raw_fd()));
    }

    /// This process stops on purpose: the watchdog exits without releasing anything.
    pub fn stop(mut self) {
        if let Some(mut w) = self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.write_all(b"stop\n");
        }
        if self.child.wait().is_ok() {
            self.parent.end();
        }
    }
}

/// Writes one line to the watchdog; a watchdog found gone is said once.
fn tell(pipe: &Mutex<Option<ChildStdin>>, line: &str) {
    let mut guard = pipe.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(w) = guard.as_mut() {
        if let Err(e) = w.write_all(line.as_bytes()).and_then(|()| w.flush()) {
            tracing::warn!(error = %e, "the lease watchdog is gone: a death of this process will not release the lease");
            *guard = None;
        }
    }
}

/// How long the watchdog keeps the responder answering "daemon dead", and the closed gate
/// attached, after the primary died (the backup takes over within milliseconds of the release).
const DEAD_ANSWER_LINGER: Duration = Duration::from_millis(300);

/// `ftvm lease-watchdog` options.
#[derive(Clone, Debug, Args)]
pub struct WatchdogArgs {
    #[command(flatten)]
    pub quorum: QuorumArgs,
    /// The heartbeat responder's descriptors, inherited from the primary.
    #[arg(long)]
    pub responder_fds: Option<String>,
    /// The fencing gate's descriptors, inherited from the primary.
    #[arg(long)]
    pub gate_fds: Option<String>,
    /// Forward what reaches the VM's TAP after the primary's death to this address (the
    /// backup's A-Link address).
    #[arg(long, requires_all = ["late_input_id", "alink_secret_file", "primary_pid"])]
    pub late_input_to: Option<SocketAddr>,
    /// The primary daemon's late input id (32 hex digits).
    #[arg(long, value_parser = parse_late_input_id)]
    pub late_input_id: Option<LateInputId>,
    /// The A-Link secret, to tag the late input with.
    #[arg(long)]
    pub alink_secret_file: Option<PathBuf>,
    /// The primary's process id, to take its TAP from.
    #[arg(long)]
    pub primary_pid: Option<i32>,
}

fn parse_late_input_id(s: &str) -> std::result::Result<LateInputId, String> {
    LateInputId::from_hex(s).ok_or_else(|| "expected 32 hex digits".to_string())
}

/// What the watchdog needs to forward late input: the primary's process, to take its TAP from,
/// and where and how to send.
struct LateInputSetup {
    primary: OwnedFd,
    to: SocketAddr,
    id: LateInputId,
    secret: Vec<u8>,
}

impl LateInputSetup {
    /// From the options; `None` (said why) when forwarding cannot work.
    fn of(args: &WatchdogArgs) -> Option<Self> {
        let (to, id, secret_file, pid) =
            (args.late_input_to?, args.late_input_id?, args.alink_secret_file.as_ref()?, args.primary_pid?);
        let secret = match read_secret(secret_file) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %format_args!("{e:#}"), "no late input forwarding");
                return None;
            }
        };
        let primary = match pidfd_open(pid) {
            // The parent may have died before the pidfd was taken: the pid could be another
            // process's now, unless it is still this process's parent.
            Ok(fd) if std::os::unix::process::parent_id() == pid as u32 => fd,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the primary's process: no late input forwarding");
                return None;
            }
        };
        Some(Self { primary, to, id, secret })
    }

    /// Where and how to send for the dead daemon that held lease `term`.
    fn forward(&self, term: u64) -> LateForward {
        LateForward::new(self.to, &self.secret, &self.id, term)
    }

    /// The primary's descriptor `fd`, duplicated into this process.
    fn take_fd(&self, fd: RawFd) -> std::io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags (0), and touches no
        // memory of this process; it returns a new descriptor or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.primary.as_raw_fd(), fd, 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `r` is a fresh descriptor (close-on-exec) that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags (0) and touches no memory of this process.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `r` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Forwards `taken` (the input the dead primary's VM had taken and not sent ahead), then what
/// reaches its TAP, from a thread (the release must not wait).
fn start_forwarding(
    setup: &LateInputSetup,
    tap: OwnedFd,
    taken: Vec<Vec<u8>>,
    term: u64,
) -> Option<std::thread::JoinHandle<()>> {
    let cfg = setup.forward(term);
    let tap = std::fs::File::from(tap);
    if !taken.is_empty() {
        tracing::warn!(frames = taken.len(), "the dead primary's VM had taken input it had not sent ahead: it goes first");
    }
    let spawned = std::thread::Builder::new().name("ftvm-late-input".into()).spawn(move || {
        match forward_late_input(&tap, &taken, &cfg) {
            Ok(r) => tracing::warn!(frames = r.frames, send_errors = r.send_errors, to = %cfg.to, "forwarded the input that reached the dead primary's TAP"),
            Err(e) => tracing::warn!(error = %e, "cannot forward the input that reaches the dead primary's TAP"),
        }
    });
    spawned.map_err(|e| tracing::warn!(error = %e, "no late input forwarding")).ok()
}

/// What reaches the watchdog from its primary.
enum FromPrimary {
    /// A line on its pipe.
    Line(String),
    /// Its pipe ended: all its threads are gone.
    PipeEnded,
    /// Its threads are ending (see [`crate::death_signal`]).
    Died,
}

/// What the primary told the watchdog so far.
struct PrimaryLines<'a> {
    late_setup: Option<&'a LateInputSetup>,
    /// The lease term it holds.
    term: Option<u64>,
    /// Its TAP, duplicated.
    tap: Option<OwnedFd>,
    /// The ring of its VM's input not yet sent ahead, mapped here too.
    ring: Option<TakenRing>,
}

#[derive(Debug, PartialEq, Eq)]
enum Told {
    Stop,
    More,
}

impl PrimaryLines<'_> {
    /// The primary's descriptor named by `line` after `prefix`, duplicated here; `None` when
    /// nothing is forwarded or the number does not parse.
    fn take_fd(&self, line: &str, prefix: &str) -> Option<std::io::Result<OwnedFd>> {
        let fd = line.strip_prefix(prefix)?.parse::<RawFd>().ok()?;
        Some(self.late_setup?.take_fd(fd))
    }

    /// Takes one of the lines `term N`, `none`, `tap N`, `ring N` and `stop`.
    fn take(&mut self, line: &str) -> Told {
        match line.trim() {
            "stop" => return Told::Stop,
            "none" => self.term = None,
            other if other.starts_with("ring ") => match self.take_fd(other, "ring ") {
                Some(Ok(f)) => match TakenRing::open(f) {
                    Ok(r) => self.ring = Some(r),
                    Err(e) => tracing::warn!(error = %ftvm_repl::ErrorChain(&e), "cannot map the primary's taken-input ring: what it had not sent ahead is lost at its death"),
                },
                Some(Err(e)) => tracing::warn!(error = %e, "cannot take the primary's taken-input ring: what it had not sent ahead is lost at its death"),
                None => {}
            },
            other if other.starts_with("tap ") => match self.take_fd(other, "tap ") {
                Some(Ok(t)) => self.tap = Some(t),
                Some(Err(e)) => tracing::warn!(error = %e, "cannot take the primary's TAP: no late input forwarding"),
                None => {}
            },
            other => self.term = other.strip_prefix("term ").and_then(|t| t.parse::<u64>().ok()).or(self.term),
        }
        Told::More
    }
}

/// `ftvm lease-watchdog`: see the module documentation. Reads `term N`, `none`, `tap N`,
/// `ring N` and `stop` lines.
pub fn watchdog(args: WatchdogArgs) -> Result<ExitCode> {
    // Ctrl-C at the primary's terminal reaches this process group too: this process must outlive
    // its parent to do its work, and ends once its parent has died or told it to stop.
    crate::signals::block_stop_signals()?;
    // Before any thread starts (see `on_parent_death`).
    let (news_tx, news) = std::sync::mpsc::channel::<FromPrimary>();
    let death_tx = news_tx.clone();
    if let Err(e) = on_parent_death(std::os::unix::process::parent_id(), move || {
        let _ = death_tx.send(FromPrimary::Died);
    }) {
        tracing::warn!(error = %e, "cannot watch for the primary's death signal: its pipe's end tells it, later");
    }
    let responder = match &args.responder_fds {
        // SAFETY: the primary started this process through `spawn_inheriting` with this argument
        // for its responder, and nothing else in this process touches those descriptors; taken
        // once.
        Some(spec) => Some(unsafe { InheritedResponder::from_inherited(spec) }.context("cannot take the heartbeat responder")?),
        None => None,
    };
    let gate = match &args.gate_fds {
        // SAFETY: as for the responder, with the argument for its gate.
        Some(spec) => Some(unsafe { InheritedGate::from_inherited(spec) }.context("cannot take the fencing gate")?),
        None => None,
    };
    let late_setup = LateInputSetup::of(&args);
    let args = args.quorum;
    let secret = args.witness_secret_file.clone().unwrap_or_default();
    let mut client = args.client(&secret)?;
    // The primary's lines come through a thread, so that the connection to the quorum can be
    // kept open meanwhile: when the primary dies, the release is then one round trip instead of a
    // connection and a handshake (about 4 ms here), and the backup's takeover waits for it.
    std::thread::Builder::new().name("ftvm-watchdog-stdin".into()).spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if news_tx.send(FromPrimary::Line(line)).is_err() {
                return;
            }
        }
        let _ = news_tx.send(FromPrimary::PipeEnded);
    })?;
    connect_ahead(client.as_mut());
    let mut primary = PrimaryLines { late_setup: late_setup.as_ref(), term: None, tap: None, ring: None };
    // Bounded by the primary's life: its pipe ends, at the latest, when it does.
    loop {
        match news.recv_timeout(QUORUM_CONNECTION_REFRESH) {
            Ok(FromPrimary::Line(line)) => {
                if primary.take(&line) == Told::Stop {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Ok(FromPrimary::Died) => {
                // What it wrote before its death has been read by now (its threads took at least
                // a wake-up to end); none of it waits.
                while let Ok(FromPrimary::Line(line)) = news.try_recv() {
                    if primary.take(&line) == Told::Stop {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                tracing::warn!("the primary's threads are ending: it died");
                break;
            }
            Ok(FromPrimary::PipeEnded) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => connect_ahead(client.as_mut()),
        }
    }
    let PrimaryLines { term, tap, ring, .. } = primary;
    // The primary died (its threads are ending, or its pipe ended without "stop"). What its VM
    // had taken in and not sent ahead, then what reaches its TAP, goes to the backup from now on,
    // beside the release.
    let forwarder = match (&late_setup, tap, term) {
        (Some(setup), Some(tap), Some(term)) => {
            start_forwarding(setup, tap, ring.map(|r| r.unsent()).unwrap_or_default(), term)
        }
        _ => None,
    };
    // Once the lease is released, the backup may take over at once: tell it so.
    let notify = || {
        if let (Some(setup), Some(term)) = (&late_setup, term) {
            match send_death_notice(&setup.forward(term)) {
                Ok(()) => tracing::warn!(to = %setup.to, "the primary died: the backup is told so"),
                Err(e) => tracing::warn!(error = %e, "cannot send the backup the death notice (it sees the death later)"),
            }
        }
    };
    // While this process forwards, the gate stays as it was: closed, it would also drop in the
    // kernel the very input forwarded (its ingress side drops frames for an inactive guest).
    // Nothing can emit the guest's frames meanwhile: the VMM's threads are ending with the
    // primary's and run none of its code (a write to the TAP already in the kernel can still
    // complete: a frame of an acknowledged epoch, which the backup's copy counts as sent), and this
    // process only reads the TAP. The gate closes once the forwarding is over.
    let mut gate = gate;
    match forwarder {
        Some(t) => {
            let ended = after_death(None, responder.as_ref(), term, client.as_mut(), &notify);
            let _ = t.join();
            if let Some(g) = &mut gate {
                close_gate(g);
            }
            ended
        }
        None => after_death(gate.as_mut(), responder.as_ref(), term, client.as_mut(), &notify),
    }
}

/// The dead primary's guest lets nothing pass this host any more (the gate stays attached, see
/// the module documentation).
fn close_gate(gate: &mut InheritedGate) {
    match gate.close() {
        Ok(entries) => tracing::warn!(entries, "the primary died: its fencing gate is closed"),
        Err(e) => tracing::warn!(error = %ftvm_repl::ErrorChain(&e), "cannot close the dead primary's fencing gate (its entries expire with the lease)"),
    }
}

/// The primary died: close its gate (when given), say so in the heartbeat replies, release its
/// lease, then call `released`.
fn after_death(
    gate: Option<&mut InheritedGate>,
    responder: Option<&InheritedResponder>,
    term: Option<u64>,
    client: &mut dyn QuorumClient,
    released: &dyn Fn(),
) -> Result<ExitCode> {
    let had_gate = gate.is_some();
    if let Some(g) = gate {
        close_gate(g);
    }
    // Then said in the heartbeat replies: that needs no network round trip.
    if let Some(r) = responder {
        match r.control().set_daemon_state(DaemonState::Dead) {
            Ok(()) => tracing::warn!("the primary died: its heartbeat responder says so"),
            Err(e) => tracing::warn!(error = %ftvm_repl::ErrorChain(&e), "cannot mark the daemon dead in the heartbeat responder"),
        }
    }
    let linger = || {
        if responder.is_some() || had_gate {
            std::thread::sleep(DEAD_ANSWER_LINGER);
        }
    };
    let Some(term) = term else {
        linger();
        return Ok(ExitCode::SUCCESS);
    };
    tracing::warn!(term, "the primary died: releasing its lease so that the backup takes over at once");
    // A few tries: the quorum may be briefly busy.
    for attempt in 0..5 {
        match client.release(term, ReleaseReason::HolderDied) {
            Ok(()) => {
                released();
                linger();
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) if attempt < 4 => {
                tracing::warn!(error = %e, "cannot release the lease yet");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("cannot release the lease of the dead primary (it runs out by itself): {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the quorum connection ahead of the release; a failure only costs the release a fresh
/// connection.
fn connect_ahead(client: &mut dyn ftvm_repl::ha::quorum::QuorumClient) {
    if let Err(e) = client.connect_ahead() {
        tracing::debug!(error = %e, "the lease watchdog cannot reach the quorum ahead of time");
    }
}

/// `ftvm witness` options.
#[derive(Debug, Args)]
pub struct WitnessArgs {
    /// Address to listen on (the management address; never 0.0.0.0).
    #[arg(long)]
    pub listen: SocketAddr,
    /// File holding the witness secret (at least 16 bytes, mode 0600), shared with the hosts.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Where the leases are kept (made 0700).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Length of the leases it grants, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TTL.as_millis() as u64)]
    pub ttl_ms: u64,
    /// Run inside this network namespace.
    #[arg(long)]
    pub netns: Option<String>,
}

/// `ftvm witness`: serves until SIGINT or SIGTERM.
pub fn witness(args: WitnessArgs) -> Result<ExitCode> {
    crate::run::enter_process_context(args.netns.as_deref())?;
    let secret = read_secret(&args.secret_file)?;
    let w = Witness::start(WitnessConfig {
        listen: args.listen,
        secret,
        state_dir: args.state_dir.clone(),
        ttl: Duration::from_millis(args.ttl_ms),
    })
    .context("cannot start the witness")?;
    tracing::info!(listen = %w.local_addr(), state_dir = %args.state_dir.display(), ttl_ms = args.ttl_ms, "witness serving");
    let (tx, rx) = std::sync::mpsc::channel();
    let _stop = crate::signals::on_stop_signal(move |_| {
        let _ = tx.send(());
    })?;
    let _ = rx.recv();
    tracing::info!("witness stopped");
    Ok(ExitCode::SUCCESS)
}
