//! `ftvm site`: a whole site on this one machine, for trying ftvm out and for the tests.
//!
//! `up` builds the network ([`topology`]), starts the witness in its namespace and one service
//! per host (`ftvm host`, configured by `host-a.toml` / `host-b.toml` as a server's
//! `/etc/ftvm/host.toml` would be): host A's first, which claims the VM and runs it, then host
//! B's, which stands by and becomes its backup. It returns once the pair is protected and the
//! guest serves; the processes keep running in the background until `down`. `repair` starts a
//! killed host's service again, which becomes the backup of the VM wherever it runs. Everything a site owns lives under
//! `/run/ftvm/sites/<name>/`: its state file, the guest disks, the secrets, the witness's state, the
//! console and process logs.

pub mod topology;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ftvm_repl::ha::failover::Role;
use serde::{Deserialize, Serialize};

use crate::cli::{parse_size, AlinkIoArg, AlinkReadArg, CheckpointCopyArg, DirtyTrackerArg, DEFAULT_GUEST_ELF, DEFAULT_KV_PORT};
use crate::status::{self, EbpfStatus, HostReport, HostRole, ProtectionState, ProtectionStatus, StatusFile};
use topology::SiteNames;

/// Where sites keep their state.
const SITES_DIR: &str = "/run/ftvm/sites";
/// Host A's output trace in the site's directory (`site up --output-trace`).
pub const OUTPUT_TRACE_FILE: &str = "output-trace.txt";

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Build the site's namespaces and networks, start the VM, and return once it serves.
    Up(UpArgs),
    /// Show each host's role and the site's state.
    Status(StatusArgs),
    /// SIGKILL a host's ftvm process (its watchdog, its links and the rest of the host live on,
    /// as on a host whose ftvm service crashed); `--power`: every process of the host and all its
    /// links (the host lost power). `witness`: stop the witness.
    Kill(KillArgs),
    /// Start a killed host's service again: it becomes the backup of the VM where it runs now,
    /// receives memory and disk while the VM serves, and the pair is protected again.
    Repair(RepairArgs),
    /// Hand the VM over to the other host at an epoch boundary (a planned switchover): one pause,
    /// the clients' connections kept; the old primary then becomes the backup and the pair is
    /// protected again, the roles swapped.
    Switchover(RepairWaitArgs),
    /// Stop everything and remove the site.
    Down(NameArg),
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// Site name (prefix of its namespaces).
    #[arg(long, default_value = "ftvm")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub site: NameArg,
    /// The guest ELF.
    #[arg(long, default_value = DEFAULT_GUEST_ELF)]
    pub guest: PathBuf,
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// The guest's `--dirty-region-pages`: the region its benchmark load (`FTVM.LOAD`) cycles
    /// through, in 4 KiB pages (the guest's default, 4 096, when not given).
    #[arg(long)]
    pub dirty_region_pages: Option<u32>,
    /// Seconds to wait for the guest to serve.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Return as soon as both hosts run and the initial synchronisation has started, without
    /// waiting for the pair to be protected (`site status` tells when it is).
    #[arg(long)]
    pub no_wait: bool,
    /// Host A's `--ack-timeout-ms`: how long the primary waits for an acknowledgement before it
    /// goes on unprotected (the primary's default when not given).
    #[arg(long)]
    pub ack_timeout_ms: Option<u64>,
    /// Host A's `--epoch-us` (longest time between checkpoints).
    #[arg(long)]
    pub epoch_us: Option<u64>,
    /// Host A's `--disk-backlog-kib` (guest disk bytes written and not yet acknowledged beyond
    /// which the pair is declared unprotected).
    #[arg(long)]
    pub disk_backlog_kib: Option<u64>,
    /// Host A's `--min-epoch-gap-us` (shortest time between checkpoints when output waits).
    #[arg(long)]
    pub min_epoch_gap_us: Option<u64>,
    /// The hosts' `--dirty-send-budget-us` (0: no early checkpoint for dirty pages).
    #[arg(long)]
    pub dirty_send_budget_us: Option<u64>,
    /// The hosts' `--dirty-tracker` (their default, `bitmap`, when not given).
    #[arg(long, value_enum)]
    pub dirty_tracker: Option<DirtyTrackerArg>,
    /// The hosts' `--checkpoint-copy` (their default, `stop`, when not given).
    #[arg(long, value_enum)]
    pub checkpoint_copy: Option<CheckpointCopyArg>,
    /// The hosts' `--alink-io` (their default, `socket`, when not given).
    #[arg(long, value_enum)]
    pub alink_io: Option<AlinkIoArg>,
    /// The hosts' `--alink-read` (their default, `socket`, when not given).
    #[arg(long, value_enum)]
    pub alink_read: Option<AlinkReadArg>,
    /// The hosts' `--no-input-ahead`.
    #[arg(long)]
    pub no_input_ahead: bool,
    /// The hosts' `--no-page-deltas`.
    #[arg(long)]
    pub no_page_deltas: bool,
    /// The hosts' `--alink-rdma-device`: page payloads by RDMA through this verbs device (an
    /// `ftvm` built with the cargo feature `rdma`, and a device both hosts' namespaces reach).
    #[arg(long, value_name = "NAME")]
    pub alink_rdma_device: Option<String>,
    /// The hosts' `--alink-rdma-gid-index` (their default, 0, when not given).
    #[arg(long, value_name = "N")]
    pub alink_rdma_gid_index: Option<u8>,
    /// The hosts' `--alink-rdma-port` (their default, 1, when not given).
    #[arg(long, value_name = "N")]
    pub alink_rdma_port: Option<u8>,
    /// The hosts' `--alink-rdma-ring-mib` (their default, 64, when not given).
    #[arg(long, value_name = "N")]
    pub alink_rdma_ring_mib: Option<u64>,
    /// Have host A trace its output-commit hold to `/run/ftvm/sites/<name>/output-trace.txt` (the
    /// primary's `--output-trace`; for tests).
    #[arg(long)]
    pub output_trace: bool,
    /// Host B's `--test-mask-cpuid` (hidden; for tests): B's KVM pretends not to offer this CPUID
    /// bit, so that pairing refuses it.
    #[arg(long, hide = true)]
    pub test_mask_cpuid_b: Option<String>,
    /// The quorum: `witness` (a witness in its own namespace on the management network), `etcd`
    /// (a one-member etcd there instead), or `none` (no protection against split-brain).
    #[arg(long, value_enum, default_value = "witness")]
    pub quorum: crate::quorum::QuorumKind,
    /// Run host A's service from this `ftvm` build instead of this one (a rolling upgrade on one
    /// machine: two builds speaking adjacent A-Link protocol versions).
    #[arg(long)]
    pub host_a_binary: Option<PathBuf>,
    /// The same for host B.
    #[arg(long)]
    pub host_b_binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub site: NameArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    #[command(flatten)]
    pub site: NameArg,
    /// The host: A, B, or witness.
    pub host: String,
    /// The whole host: every process in its namespace and all its links, management included.
    #[arg(long)]
    pub power: bool,
}

#[derive(Debug, Args)]
pub struct RepairWaitArgs {
    #[command(flatten)]
    pub site: NameArg,
    /// Return once the other host serves, without waiting for the pair to be protected again.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for the pair to be protected again.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct RepairArgs {
    #[command(flatten)]
    pub site: NameArg,
    /// The host: A, B, or witness (started again with its state: the terms it granted).
    pub host: String,
    /// Return once the host's service runs, without waiting for the pair to be protected again
    /// (the witness: always at once).
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for the pair to be protected again.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Start the host's service from this `ftvm` build from now on (an upgrade; by default the
    /// build it ran before).
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// One host of the site, as recorded in the state file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub netns: String,
    /// Pids of this host's processes.
    pub pids: Vec<i32>,
    pub role: String,
    pub killed: bool,
    /// What `site repair` starts on this host: its service as a standby that becomes the backup
    /// of the VM wherever it runs (empty for the witness).
    #[serde(default)]
    pub service_args: Vec<String>,
    /// The `ftvm` build this host's service runs, when not the site's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
}

/// The state file of a site (`/run/ftvm/sites/<name>/site.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteRecord {
    pub name: String,
    pub client_netns: String,
    pub guest_ip: String,
    pub guest_port: u16,
    pub hosts: Vec<HostRecord>,
    /// The witness, when the site has one.
    #[serde(default)]
    pub witness: Option<HostRecord>,
}

/// What `status --json` prints.
#[derive(Debug, Serialize)]
struct StatusReport<'a> {
    site: &'a str,
    state: &'a str,
    client_netns: &'a str,
    guest_ip: &'a str,
    guest_port: u16,
    connect: String,
    epochs_per_sec: Option<f64>,
    last_pause_us: Option<f64>,
    replication_lag_epochs: Option<f64>,
    takeover_ms: Option<f64>,
    /// Frames of input the dead primary had taken in, given to the VM at that takeover.
    #[serde(skip_serializing_if = "Option::is_none")]
    takeover_ingress_replayed: Option<u64>,
    hosts: Vec<HostStatus<'a>>,
    /// Whether the witness process runs (none: the site has no witness).
    witness_running: Option<bool>,
}

#[derive(Debug, Serialize)]
struct HostStatus<'a> {
    name: &'a str,
    netns: &'a str,
    role: String,
    /// What the host says it is for its VM (none: not running, or no report yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    host_role: Option<HostRole>,
    running: bool,
    /// The host's own status report, as it wrote it.
    detail: Option<&'a HostReport>,
    /// Why the host's status file could not be read (it runs, but its report is not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    unreadable_status: Option<&'a str>,
}

fn site_dir(name: &str) -> PathBuf {
    Path::new(SITES_DIR).join(name)
}

/// Where the logs of a site that failed to come up are kept (`<this>/<name>`, replaced by the
/// next failure of the same name).
const FAILED_SITES_DIR: &str = "/run/ftvm/failed-sites";

/// Copies the site's `*.log` files to `FAILED_SITES_DIR/<name>` (root-only) and returns that
/// directory.
fn keep_logs(dir: &Path, name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let kept = Path::new(FAILED_SITES_DIR).join(name);
    let _ = std::fs::remove_dir_all(&kept);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&kept)
        .with_context(|| format!("cannot create {}", kept.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if let Some(file) = path.file_name().filter(|_| path.extension().is_some_and(|e| e == "log")) {
            std::fs::copy(&path, kept.join(file)).with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    Ok(kept)
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 16
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-');
    if !ok {
        bail!("invalid site name {name:?} (letters, digits and '-', at most 16)");
    }
    Ok(())
}

fn load(name: &str) -> Result<SiteRecord> {
    let path = site_dir(name).join("site.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("site {name} is not up (`ftvm site up --name {name}`)")
        } else {
            anyhow::anyhow!("cannot read {}: {e}", path.display())
        }
    })?;
    serde_json::from_str(&text).with_context(|| format!("corrupt site state {}", path.display()))
}

fn save(record: &SiteRecord) -> Result<()> {
    let path = site_dir(&record.name).join("site.json");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(record)? + "\n")
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// Whether process `pid` runs. A child of this process that exited stays a zombie until reaped,
/// and signal 0 still finds a zombie: `site up` starts the hosts and must see one that exited at
/// once (a refused pairing, a bad option), so a zombie counts as gone.
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if pid <= 0 || unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    // /proc/<pid>/stat: "pid (comm) S ...", the state after the last ')'.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| state == 'Z' || state == 'X');
    // A killed process's main thread is a zombie before its other threads have exited, and its
    // sockets close only with the last of them: until then it is not gone (a `site kill` that
    // took the links down at that moment would keep its peer from seeing the connection close).
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    !zombie || threads > 1
}

/// SIGKILLs the processes and waits (at most 5 s) until they are gone.
fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        if alive(pid) {
            // SAFETY: SIGKILL to a pid this site started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        // Reap those that are our own children (`site up` failing): `alive` already counts a
        // zombie as gone, but none should be left behind.
        // SAFETY: waitpid with WNOHANG on any child has no preconditions.
        unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn run(cmd: SiteCommand) -> Result<()> {
    match cmd {
        SiteCommand::Up(args) => up(args),
        SiteCommand::Status(args) => status(args),
        SiteCommand::Kill(args) => kill(args),
        SiteCommand::Repair(args) => repair(args),
        SiteCommand::Switchover(args) => switchover(args),
        SiteCommand::Down(args) => down(&args.name),
    }
}

fn up(args: UpArgs) -> Result<()> {
    let name = &args.site.name;
    check_name(name)?;
    if !args.guest.exists() {
        bail!("guest ELF {} not found (build it with `cargo xtask build-guest`)", args.guest.display());
    }
    let dir = site_dir(name);
    if dir.join("site.json").exists() {
        bail!("site {name} is already up (`ftvm site down --name {name}` first)");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let names = SiteNames::new(name);
    eprintln!("site {name}: building namespaces and networks");
    if let Err(e) = topology::build(&names) {
        let _ = topology::teardown(&names);
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    if let Err(e) = start_vm(&args, &names, &dir) {
        // The logs say why; the site's directory goes with the site, so they are kept apart.
        let kept = keep_logs(&dir, name);
        let _ = down(name);
        let _ = topology::teardown(&names);
        let _ = std::fs::remove_dir_all(&dir);
        return Err(match kept {
            Ok(logs) => e.context(format!("site {name} did not come up (its logs are kept in {})", logs.display())),
            Err(keep) => e.context(format!("site {name} did not come up (its logs could not be kept: {keep:#})")),
        });
    }
    if args.no_wait {
        println!("site {name} is starting: primary on host A, synchronising host B (`ftvm site status --name {name}` says when it is protected)");
    } else {
        println!("site {name} is up: the VM serves on {}:{DEFAULT_KV_PORT}, primary on host A, protected by host B", topology::GUEST_IP);
    }
    println!("  ip netns exec {} redis-cli -h {} PING", names.client, topology::GUEST_IP);
    println!("  ftvm site status --name {name}; ftvm site down --name {name}");
    Ok(())
}

/// Each host's fencing gate goes on its business port, its heartbeat responder on its A-Link end
/// (the eBPF object is the one next to the binary: `cargo xtask build-ebpf`).
const EBPF_PORTS: [&str; 4] = ["--business-port", "biz0", "--alink-port", "alink0"];

/// The A-Link port the backup listens on.
const ALINK_PORT: u16 = crate::ft::DEFAULT_ALINK_PORT;

/// Starts one host's ftvm process in its namespace, detached from this terminal: this build, or
/// `binary`.
fn spawn_host(dir: &Path, host: &str, args: &[String], binary: Option<&Path>) -> Result<i32> {
    let exe = match binary {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe().context("cannot find the ftvm binary")?,
    };
    let log = dir.join(format!("host-{host}.log"));
    // Appended to: a repaired host's log keeps what its earlier life said.
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log);
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file.with_context(|| format!("cannot create {}", log.display()))?)
        // Its own process group: a Ctrl-C typed at `site up` must not reach the VM.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start host {host}"))?;
    Ok(child.id() as i32)
}

/// An `ftvm` build given for a host: it must answer `--version` (it then names its protocol).
fn check_binary(binary: &Path) -> Result<()> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run the ftvm build {}", binary.display()))?;
    if !out.status.success() {
        bail!("{} --version failed: is it an ftvm build?", binary.display());
    }
    tracing::info!(binary = %binary.display(), version = %String::from_utf8_lossy(&out.stdout).trim(), "a host runs another ftvm build");
    Ok(())
}

/// A fresh random A-Link secret, readable by root only.
fn write_secret(path: &Path) -> Result<()> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 32];
    File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw)).context("cannot read /dev/urandom")?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(hex.as_bytes())?;
    Ok(())
}

/// Starts the witness in its namespace, with a new secret, and waits until it listens.
fn start_witness(names: &SiteNames, dir: &Path, secret: &Path) -> Result<i32> {
    write_secret(secret)?;
    run_witness(names, dir, secret)
}

/// Starts the witness process (its state directory keeps the terms across restarts) and waits
/// until it listens.
fn run_witness(names: &SiteNames, dir: &Path, secret: &Path) -> Result<i32> {
    let listen = format!("{}:{}", topology::WITNESS_IP, topology::WITNESS_PORT);
    let s = |p: &Path| p.display().to_string();
    let args: Vec<String> = [
        "witness", "--netns", &names.witness, "--listen", &listen, "--secret-file", &s(secret),
        "--state-dir", &s(&dir.join("witness-state")),
    ]
    .map(String::from)
    .to_vec();
    let log = dir.join("host-witness.log");
    let since = log_len(&log);
    let pid = spawn_host(dir, "witness", &args, None)?;
    wait_for_log(pid, &log, since, "witness serving", "the witness did not start")?;
    Ok(pid)
}

/// How much a log holds now (what a process started next will append after).
fn log_len(log: &Path) -> usize {
    std::fs::metadata(log).map_or(0, |m| m.len() as usize)
}

/// etcd's client port on the management network (`site up --quorum etcd`).
const ETCD_PORT: u16 = 2379;

/// Starts a one-member etcd in the witness namespace (`site up --quorum etcd`) and waits until it
/// serves. Short election timeouts keep etcd's minimum lease at one second.
fn start_etcd(names: &SiteNames, dir: &Path) -> Result<i32> {
    let client = format!("http://{}:{ETCD_PORT}", topology::WITNESS_IP);
    let peer = "http://127.0.0.1:2380";
    let data = dir.join("etcd-data");
    let log = dir.join("host-witness.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &names.witness, "etcd", "--name", "site"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
        .args(["--initial-cluster", &format!("site={peer}"), "--heartbeat-interval", "50", "--election-timeout", "500"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).with_context(|| format!("cannot create {}", log.display()))?)
        .process_group(0)
        .spawn()
        .context("cannot start etcd (install etcd-server)")?;
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Bounded: etcd says it serves within a second or two, or exits with its reason.
    loop {
        if std::fs::read_to_string(&log).unwrap_or_default().contains("ready to serve client requests") {
            return Ok(pid);
        }
        if !alive(pid) || Instant::now() > deadline {
            bail!("etcd did not start: {}", last_error_line(&log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The quorum options of host `host` (A or B).
fn quorum_args(args: &UpArgs, host: &str, witness_secret: &Path) -> Vec<String> {
    match args.quorum {
        crate::quorum::QuorumKind::None => vec!["--quorum".into(), "none".into()],
        crate::quorum::QuorumKind::Witness => vec![
            "--quorum".into(),
            "witness".into(),
            "--witness".into(),
            format!("{}:{}", topology::WITNESS_IP, topology::WITNESS_PORT),
            "--witness-secret-file".into(),
            witness_secret.display().to_string(),
            "--vm-id".into(),
            args.site.name.clone(),
            "--host-name".into(),
            host.into(),
        ],
        crate::quorum::QuorumKind::Etcd => vec![
            "--quorum".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            format!("http://{}:{ETCD_PORT}", topology::WITNESS_IP),
            "--vm-id".into(),
            args.site.name.clone(),
            "--host-name".into(),
            host.into(),
        ],
    }
}

fn start_vm(args: &UpArgs, names: &SiteNames, dir: &Path) -> Result<()> {
    let secret = dir.join("alink.secret");
    write_secret(&secret)?;
    let witness_secret = dir.join("witness.secret");
    let witness_pid = match args.quorum {
        crate::quorum::QuorumKind::Witness => Some(start_witness(names, dir, &witness_secret)?),
        crate::quorum::QuorumKind::Etcd => Some(start_etcd(names, dir)?),
        crate::quorum::QuorumKind::None => None,
    };
    let s = |p: &Path| p.display().to_string();
    let guest_cidr = format!("{}/{}", topology::GUEST_IP, topology::LAN_PREFIX);
    let memory = args.memory.to_string();
    // Each host's service configuration, as a server's /etc/ftvm/host.toml would be.
    let config = |i: usize| -> Result<PathBuf> {
        let host = ["a", "b"][i];
        let mut v: Vec<String> = [
            "--netns", &names.hosts[i], "--listen", &format!("{}:{ALINK_PORT}", topology::ALINK_IPS[i]),
            "--peer", &format!("{}:{ALINK_PORT}", topology::ALINK_IPS[1 - i]), "--secret-file", &s(&secret),
            "--guest", &s(&args.guest), "--memory", &memory, "--disk", &s(&dir.join(format!("disk-{host}.img"))),
            "--tap", topology::GUEST_TAP, "--ip", &guest_cidr, "--console-log", &s(&dir.join(format!("host-{host}.console.log"))),
            "--status-file", &s(&dir.join(format!("host-{host}.status.json"))),
        ]
        .map(String::from)
        .to_vec();
        v.extend(engine_args(args));
        if let Some(pages) = args.dirty_region_pages {
            v.extend(["--dirty-region-pages".to_string(), pages.to_string()]);
        }
        v.extend(quorum_args(args, &host.to_ascii_uppercase(), &witness_secret));
        v.extend(EBPF_PORTS.map(String::from));
        if i == 0 && args.output_trace {
            v.extend(["--output-trace".to_string(), s(&dir.join(OUTPUT_TRACE_FILE))]);
        }
        if let (1, Some(mask)) = (i, &args.test_mask_cpuid_b) {
            v.extend(["--test-mask-cpuid".to_string(), mask.clone()]);
        }
        let path = dir.join(format!("host-{host}.toml"));
        std::fs::write(&path, toml_of_options(&v)).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    };
    // What starts a host's service: at `up`, and at each `repair`. With a quorum the service finds
    // its role itself; without one it must be told (and a repaired host is the backup).
    let no_quorum = args.quorum == crate::quorum::QuorumKind::None;
    let service = |config: &Path, start_as: &str| -> Vec<String> {
        let mut v = vec!["host".to_string(), "--config".to_string(), s(config)];
        if no_quorum {
            v.extend(["--start-as".to_string(), start_as.to_string()]);
        }
        v
    };
    let (config_a, config_b) = (config(0)?, config(1)?);
    // A first: it claims the VM's lease (granted, nobody runs it) before B asks, which then
    // stands by as the backup; A waits for B's listener meanwhile.
    for b in [&args.host_a_binary, &args.host_b_binary].into_iter().flatten() {
        check_binary(b)?;
    }
    let primary_pid = spawn_host(dir, "a", &service(&config_a, "primary"), args.host_a_binary.as_deref())?;
    if !no_quorum {
        wait_for_log(primary_pid, &dir.join("host-a.log"), 0, "lease held", "host A did not claim the VM's lease")?;
    }
    let backup_pid = spawn_host(dir, "b", &service(&config_b, "backup"), args.host_b_binary.as_deref())?;
    let record = SiteRecord {
        name: args.site.name.clone(),
        client_netns: names.client.clone(),
        guest_ip: topology::GUEST_IP.to_string(),
        guest_port: DEFAULT_KV_PORT,
        hosts: vec![
            HostRecord {
                name: "A".into(),
                netns: names.hosts[0].clone(),
                pids: vec![primary_pid],
                role: "primary".into(),
                killed: false,
                service_args: service(&config_a, "backup"),
                binary: args.host_a_binary.clone(),
            },
            HostRecord {
                name: "B".into(),
                netns: names.hosts[1].clone(),
                pids: vec![backup_pid],
                role: "backup".into(),
                killed: false,
                service_args: service(&config_b, "backup"),
                binary: args.host_b_binary.clone(),
            },
        ],
        witness: witness_pid.map(|pid| HostRecord {
            name: "witness".into(),
            netns: names.witness.clone(),
            pids: vec![pid],
            role: "witness".into(),
            killed: false,
            service_args: Vec::new(),
            binary: None,
        }),
    };
    save(&record)?;
    if args.no_wait {
        // The primary reports "syncing" once it reached the backup and its engine runs.
        let wanted = [ProtectionState::Syncing, ProtectionState::Protected];
        return wait_state(primary_pid, backup_pid, dir, Duration::from_secs(args.timeout), &wanted);
    }
    wait_state(primary_pid, backup_pid, dir, Duration::from_secs(args.timeout), &[ProtectionState::Protected])?;
    check_from_client(names)
}

/// A host configuration (`ftvm host --config`) holding the options `argv` (`--key value` pairs, a
/// `--flag` alone for `true`).
fn toml_of_options(argv: &[String]) -> String {
    let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = String::from("# Written by `ftvm site up`: this host's service configuration (see deploy/host.toml).\n");
    let mut i = 0;
    while i < argv.len() {
        let key = argv[i].trim_start_matches("--");
        match argv.get(i + 1).filter(|v| !v.starts_with("--")) {
            Some(value) => {
                out.push_str(&format!("{key} = {}\n", quote(value)));
                i += 2;
            }
            None => {
                out.push_str(&format!("{key} = true\n"));
                i += 1;
            }
        }
    }
    out
}

/// Waits until process `pid` says `what` in `log`, after its first `since` bytes (bounded: the
/// process says it within seconds, or exits).
fn wait_for_log(pid: i32, log: &Path, since: usize, what: &str, failure: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        if String::from_utf8_lossy(text.get(since..).unwrap_or_default()).contains(what) {
            return Ok(());
        }
        if !alive(pid) || Instant::now() > deadline {
            bail!("{failure}: {}", last_error_line(log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The epoch engine's options given to `up`, for whichever host runs the VM.
fn engine_args(args: &UpArgs) -> Vec<String> {
    let mut v = Vec::new();
    let options = [
        ("--epoch-us", args.epoch_us),
        ("--min-epoch-gap-us", args.min_epoch_gap_us),
        ("--ack-timeout-ms", args.ack_timeout_ms),
        ("--disk-backlog-kib", args.disk_backlog_kib),
        ("--dirty-send-budget-us", args.dirty_send_budget_us),
        ("--alink-rdma-gid-index", args.alink_rdma_gid_index.map(u64::from)),
        ("--alink-rdma-port", args.alink_rdma_port.map(u64::from)),
        ("--alink-rdma-ring-mib", args.alink_rdma_ring_mib),
    ];
    for (name, value) in options {
        if let Some(value) = value {
            v.extend([name.to_string(), value.to_string()]);
        }
    }
    if let Some(t) = args.dirty_tracker {
        v.extend(["--dirty-tracker".to_string(), t.name().to_string()]);
    }
    if let Some(c) = args.checkpoint_copy {
        v.extend(["--checkpoint-copy".to_string(), c.name().to_string()]);
    }
    if let Some(io) = args.alink_io {
        v.extend(["--alink-io".to_string(), io.name().to_string()]);
    }
    if let Some(read) = args.alink_read {
        v.extend(["--alink-read".to_string(), read.name().to_string()]);
    }
    if let Some(device) = &args.alink_rdma_device {
        v.extend(["--alink-rdma-device".to_string(), device.clone()]);
    }
    if args.no_input_ahead {
        v.push("--no-input-ahead".to_string());
    }
    if args.no_page_deltas {
        v.push("--no-page-deltas".to_string());
    }
    v
}

/// Waits until the primary reports one of the `wanted` states, printing progress once a second.
fn wait_state(primary: i32, backup: i32, dir: &Path, timeout: Duration, wanted: &[ProtectionState]) -> Result<()> {
    let start = Instant::now();
    let mut last_report = start;
    loop {
        // Not written yet, or unreadable: no state yet.
        let report = match status::read(&dir.join("host-a.status.json")) {
            StatusFile::Report(r) => match *r {
                HostReport::Primary(p) => Some(p),
                HostReport::Backup(_) => None,
            },
            StatusFile::Missing | StatusFile::Unreadable(_) => None,
        };
        let state = report.as_ref().map(|p| p.protection.state);
        let name = state.map_or("", ProtectionState::name);
        if state.is_some_and(|s| wanted.contains(&s)) {
            eprintln!("site: {name} after {:.1} s", start.elapsed().as_secs_f64());
            return Ok(());
        }
        for (pid, host) in [(primary, "a"), (backup, "b")] {
            if !alive(pid) {
                bail!("host {} exited before the pair was protected: {}", host.to_uppercase(), last_error_line(&dir.join(format!("host-{host}.log"))));
            }
        }
        if let Some(p) = report.as_ref().filter(|p| p.protection.state == ProtectionState::Simplex) {
            // No backup at start, one that refused (its reason is in the detail), or one lost
            // during the initial synchronisation: the pair is not protected.
            let why = p.protection.backup_refused.as_deref().unwrap_or(&p.protection.detail);
            bail!("host A runs the VM unprotected: {why}");
        }
        if start.elapsed() > timeout {
            let wanted: Vec<_> = wanted.iter().map(|s| s.name()).collect();
            bail!("the pair was not {} within {} s (state: {name:?}; logs in {})", wanted.join(" or "), timeout.as_secs(), dir.display());
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            let detail = report.as_ref().map_or("", |p| p.protection.detail.as_str());
            eprintln!("site: {} {detail} ({} s)", if name.is_empty() { "starting" } else { name }, start.elapsed().as_secs());
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last line of a host log that names an error, for one-line failure reports.
fn last_error_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().find(|l| l.contains("error") || l.contains("ERROR")).unwrap_or("no reason logged").trim().to_string()
}

/// Proves the business LAN path: a PING from the client namespace through the bridges.
fn check_from_client(names: &SiteNames) -> Result<()> {
    let ip = topology::GUEST_IP.to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", &names.client, "redis-cli", "-h", &ip, "-p"])
        .arg(DEFAULT_KV_PORT.to_string())
        .arg("PING")
        .output()
        .context("cannot run redis-cli in the client namespace (install redis-tools)")?;
    let reply = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || reply.trim() != "PONG" {
        bail!("the guest does not answer from the client namespace: {} {}", reply.trim(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// What one host says about itself.
#[derive(Debug)]
struct HostView {
    /// Whether one of its processes runs.
    running: bool,
    /// Its status file, read while it runs ([`StatusFile::Missing`] once it stopped).
    file: StatusFile,
}

impl HostView {
    /// Host `h`'s view: its status file if its process runs.
    fn of(dir: &Path, h: &HostRecord) -> Self {
        let running = h.pids.iter().any(|&p| alive(p));
        let path = dir.join(format!("host-{}.status.json", h.name.to_ascii_lowercase()));
        Self { running, file: if running { status::read(&path) } else { StatusFile::Missing } }
    }

    fn report(&self) -> Option<&HostReport> {
        match &self.file {
            StatusFile::Report(r) => Some(r),
            StatusFile::Missing | StatusFile::Unreadable(_) => None,
        }
    }

    fn unreadable(&self) -> Option<&str> {
        match &self.file {
            StatusFile::Unreadable(why) => Some(why),
            StatusFile::Missing | StatusFile::Report(_) => None,
        }
    }

    /// Whether the host runs the VM now, and then how well it is protected: a primary that was
    /// not fenced or stopped, or a standby that took over (alone until a backup joins it).
    fn serving(&self) -> Option<Serving> {
        if !self.running {
            return None;
        }
        match self.report()? {
            HostReport::Primary(p) => match p.protection.state {
                ProtectionState::Fenced | ProtectionState::Stopped | ProtectionState::Failed | ProtectionState::HandedOver => None,
                _ => Some(Serving { protection: p.protection.clone(), took_over: false }),
            },
            HostReport::Backup(b) if matches!(b.role, Role::Active | Role::Promoting) => Some(Serving {
                protection: b.serving.clone().unwrap_or_else(|| ProtectionStatus::alone("took over")),
                took_over: true,
            }),
            HostReport::Backup(_) => None,
        }
    }

    /// The host's role for the site: what it runs now, from its own report (`fallback`, its role
    /// at `up`, when it has none).
    fn role(&self, fallback: &str) -> String {
        let role = match self.report() {
            // A primary that another host superseded runs nothing any more.
            Some(HostReport::Primary(p))
                if matches!(p.protection.state, ProtectionState::Fenced | ProtectionState::Stopped | ProtectionState::HandedOver) =>
            {
                p.protection.state.name()
            }
            Some(HostReport::Primary(_)) => "primary",
            // The backup's daemon reports its own view; "active" means it now runs the VM.
            Some(HostReport::Backup(b)) => match b.role {
                Role::Active | Role::Promoting => "primary",
                Role::Standby => "backup",
                other => other.name(),
            },
            None => fallback,
        };
        role.to_string()
    }
}

/// The host that runs the VM: how it says its VM is protected.
#[derive(Debug, Clone)]
struct Serving {
    protection: ProtectionStatus,
    /// It runs the VM since a takeover (its service started as the standby).
    took_over: bool,
}

/// The site's state from the hosts' own reports: which one runs the VM, and whether the other
/// holds it.
fn site_state(views: &[HostView]) -> &'static str {
    let mut serving: Vec<(usize, Serving)> = views.iter().enumerate().filter_map(|(i, v)| v.serving().map(|s| (i, s))).collect();
    // A report is up to a status period old: a host that handed the VM over or was taken over a
    // moment ago may still say it serves. Its term says otherwise: only the highest term can hold
    // the lease, so a lower one's copy cannot emit (its gate follows the lease it lost).
    let term = |i: usize| views[i].report().map_or(0, |r| r.quorum().term);
    if let Some(top) = serving.iter().map(|(i, _)| term(*i)).max() {
        serving.retain(|(i, _)| term(*i) == top);
    }
    match serving.as_slice() {
        // Both copies running is the one state that must never be: say it.
        [_, _, ..] => "split-brain",
        [] => "failed",
        [(i, s)] => {
            let other_runs = views.iter().enumerate().any(|(j, v)| j != *i && v.running);
            match s.protection.state {
                ProtectionState::Protected if other_runs => "protected",
                ProtectionState::Syncing if other_runs => "syncing",
                _ if s.took_over => "failed over",
                _ => "simplex",
            }
        }
    }
}

fn status(args: StatusArgs) -> Result<()> {
    let record = load(&args.site.name)?;
    let dir = site_dir(&record.name);
    let views: Vec<_> = record.hosts.iter().map(|h| HostView::of(&dir, h)).collect();
    let state = site_state(&views);
    let hosts: Vec<_> = record
        .hosts
        .iter()
        .zip(&views)
        .map(|(h, view)| {
            let role = if h.killed {
                "killed".to_string()
            } else if !view.running {
                "stopped".to_string()
            } else {
                view.role(&h.role)
            };
            HostStatus {
                name: &h.name,
                netns: &h.netns,
                role,
                host_role: view.report().map(HostReport::host_role),
                running: view.running,
                detail: view.report(),
                unreadable_status: view.unreadable(),
            }
        })
        .collect();
    let serving = views.iter().find_map(HostView::serving).map(|s| s.protection);
    // The last takeover's: the host that runs the VM since one, else any that took over.
    let takeover = views
        .iter()
        .filter_map(|v| match v.report() {
            Some(HostReport::Backup(b)) if v.running => {
                b.takeover_ms.map(|t| (v.serving().is_some(), t, b.takeover_ingress_replayed))
            }
            _ => None,
        })
        .max_by_key(|(serves, ..)| *serves);
    let takeover_ms = takeover.map(|(_, t, _)| t);
    let takeover_ingress_replayed = takeover.and_then(|(.., n)| n);
    let report = StatusReport {
        site: &record.name,
        state,
        client_netns: &record.client_netns,
        guest_ip: &record.guest_ip,
        guest_port: record.guest_port,
        connect: format!("ip netns exec {} redis-cli -h {} -p {}", record.client_netns, record.guest_ip, record.guest_port),
        epochs_per_sec: serving.as_ref().map(|s| s.epochs_per_sec),
        last_pause_us: serving.as_ref().map(|s| s.last_pause_us as f64),
        replication_lag_epochs: serving.as_ref().map(|s| s.lag_epochs as f64),
        takeover_ms,
        takeover_ingress_replayed,
        hosts,
        witness_running: record.witness.as_ref().map(|w| w.pids.iter().any(|&p| alive(p))),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "site {}: {}   guest {}:{}", report.site, report.state, report.guest_ip, report.guest_port)?;
    for h in &report.hosts {
        let quorum = h.detail.map_or(String::new(), |d| {
            let q = d.quorum();
            let lease = if q.lease_valid { "lease held" } else { "no lease" };
            let err = q.error.as_ref().map_or(String::new(), |e| format!(" ({e})"));
            format!("  quorum {} term {} {lease}{err}", q.backend, q.term)
        });
        let host_role = h.host_role.map_or("-", HostRole::name);
        writeln!(
            out,
            "  host {:<2} {:<10} {:<18} {:<8} {}{quorum}",
            h.name,
            h.role,
            host_role,
            if h.running { "running" } else { "stopped" },
            h.netns
        )?;
        if let Some(d) = h.detail {
            writeln!(out, "           {}", ebpf_line(d.ebpf()))?;
        }
        if let Some(why) = h.unreadable_status {
            writeln!(out, "           unreadable status: {why}")?;
        }
    }
    if let Some(w) = report.witness_running {
        writeln!(out, "  witness {}", if w { "running" } else { "stopped" })?;
    }
    if let Some(why) = serving.as_ref().and_then(|s| s.backup_refused.as_ref()) {
        writeln!(out, "  the other host refused to be the backup: {why}")?;
    }
    let fmt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.0}{unit}"));
    writeln!(
        out,
        "  epochs/s {}   last pause {}   lag {} epochs   takeover {}{}",
        fmt(report.epochs_per_sec, ""),
        fmt(report.last_pause_us, " µs"),
        fmt(report.replication_lag_epochs, ""),
        fmt(report.takeover_ms, " ms"),
        report.takeover_ingress_replayed.filter(|n| *n > 0).map_or(String::new(), |n| format!(" ({n} frames of input replayed)"))
    )?;
    writeln!(out, "  connect: {}", report.connect)?;
    Ok(())
}

/// One line about a host's fencing gate, heartbeat responder and last probe.
fn ebpf_line(e: &EbpfStatus) -> String {
    if !e.enabled {
        return format!("eBPF {}", e.detail);
    }
    let gate = match &e.gate {
        Some(g) => {
            let open = match (g.active, g.expiry_left_ms) {
                (true, Some(ms)) => format!("open {ms} ms"),
                (true, None) => "open".to_string(),
                (false, _) => "closed".to_string(),
            };
            format!(
                "gate {open}: out {} passed, {} dropped (inactive), {} dropped (expired); in {} dropped",
                g.egress_passed, g.egress_dropped_inactive, g.egress_dropped_expired, g.ingress_dropped
            )
        }
        None => "no gate".to_string(),
    };
    let probe = e.last_probe.as_ref().map_or(String::new(), |p| format!("; last probe: {p}"));
    format!("{gate}{probe}")
}

/// Every process in a namespace.
fn netns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

fn kill(args: KillArgs) -> Result<()> {
    let mut record = load(&args.site.name)?;
    if args.host.eq_ignore_ascii_case("witness") {
        let w = record.witness.as_mut().with_context(|| format!("site {} has no witness", args.site.name))?;
        kill_pids(&netns_pids(&w.netns));
        w.killed = true;
        save(&record)?;
        println!("witness killed (SIGKILL)");
        return Ok(());
    }
    let wanted = args.host.to_ascii_uppercase();
    let host = record
        .hosts
        .iter_mut()
        .find(|h| h.name == wanted)
        .with_context(|| format!("no host {:?} in site {} (A, B or witness)", args.host, args.site.name))?;
    // A crashed service leaves its host and cables as they were: clients keep sending to the
    // host until the other one announces the guest, and the watchdog forwards what arrives. A
    // lost host takes everything with it.
    if args.power {
        kill_pids(&netns_pids(&host.netns));
        topology::isolate_host(&host.netns)?;
    } else {
        kill_pids(&host.pids);
    }
    host.killed = true;
    let netns = host.netns.clone();
    save(&record)?;
    if args.power {
        println!("host {wanted} powered off: every process killed (SIGKILL) and all its links ({netns}) taken down");
    } else {
        println!("host {wanted}: ftvm killed (SIGKILL); its watchdog and links ({netns}) live on");
    }
    Ok(())
}

fn repair(args: RepairArgs) -> Result<()> {
    let mut record = load(&args.site.name)?;
    if args.host.eq_ignore_ascii_case("witness") {
        return repair_witness(record);
    }
    let wanted = args.host.to_ascii_uppercase();
    let i = record
        .hosts
        .iter()
        .position(|h| h.name == wanted)
        .with_context(|| format!("no host {:?} in site {} (A or B)", args.host, args.site.name))?;
    let host = &record.hosts[i];
    if host.pids.iter().any(|&p| alive(p)) {
        bail!("host {wanted}'s service runs: there is nothing to repair (`ftvm site kill` stops it)");
    }
    if host.service_args.is_empty() {
        bail!("site {} was made by an older ftvm: it cannot repair its hosts (`site down`, then `site up`)", args.site.name);
    }
    if let Some(b) = &args.binary {
        check_binary(b)?;
        record.hosts[i].binary = Some(b.clone());
    }
    let host = &record.hosts[i];
    let dir = site_dir(&record.name);
    // As a host's reboot would: whatever still runs there goes (the dead service's lease
    // watchdog), its cables go back, and its service starts afresh as a standby.
    kill_pids(&netns_pids(&host.netns));
    topology::reconnect_host(&host.netns)?;
    let lower = wanted.to_ascii_lowercase();
    // The dead service's report must not be read as the new one's.
    let _ = std::fs::remove_file(dir.join(format!("host-{lower}.status.json")));
    let pid = spawn_host(&dir, &lower, &host.service_args, host.binary.as_deref())?;
    let host = &mut record.hosts[i];
    host.pids = vec![pid];
    host.killed = false;
    host.role = "backup".into();
    save(&record)?;
    println!("host {wanted}: service started (pid {pid}); it joins the VM as its backup");
    if args.no_wait {
        return Ok(());
    }
    wait_protected(&record, i, Duration::from_secs(args.timeout))
}

fn switchover(args: RepairWaitArgs) -> Result<()> {
    let record = load(&args.site.name)?;
    let dir = site_dir(&record.name);
    let views: Vec<_> = record.hosts.iter().map(|h| HostView::of(&dir, h)).collect();
    if site_state(&views) != "protected" {
        bail!("site {} is {}: a switchover needs a protected pair", record.name, site_state(&views));
    }
    let from = views.iter().position(|v| v.serving().is_some()).context("no host serves")?;
    let to = 1 - from;
    let (from_name, to_name) = (&record.hosts[from].name, &record.hosts[to].name);
    let refused_before = views[from].serving().and_then(|s| s.protection.switchover_refused);
    let pid = *record.hosts[from].pids.first().context("no pid for the serving host")?;
    let started = Instant::now();
    // SAFETY: a signal to the service process this site started (its pid is in the site's record
    // and the process runs: checked just above through its status).
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        bail!("cannot signal host {from_name}'s service: {}", std::io::Error::last_os_error());
    }
    // Bounded: the handover takes milliseconds, or is refused with a reason in status.
    loop {
        let views: Vec<_> = record.hosts.iter().map(|h| HostView::of(&dir, h)).collect();
        if views[to].serving().is_some() {
            break;
        }
        let refused = views[from].serving().and_then(|s| s.protection.switchover_refused);
        if let Some(why) = refused.filter(|r| Some(r) != refused_before.as_ref()) {
            bail!("host {from_name} refused the switchover: {why}");
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("host {to_name} does not serve 30 s after the switchover was asked for (logs in {})", dir.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let resumed = match HostView::of(&dir, &record.hosts[to]).report() {
        Some(HostReport::Backup(b)) => b.takeover_ms.map_or(String::new(), |ms| format!(", its VM resumed {ms:.0} ms after the handover")),
        _ => String::new(),
    };
    println!("switchover: host {to_name} serves the VM{resumed}");
    if args.no_wait {
        return Ok(());
    }
    wait_protected(&record, from, Duration::from_secs(args.timeout))
}

/// Starts the site's quorum service again (the witness, or etcd), with the state it kept.
fn repair_witness(mut record: SiteRecord) -> Result<()> {
    let names = SiteNames::new(&record.name);
    let dir = site_dir(&record.name);
    let w = record.witness.as_mut().with_context(|| format!("site {} has no witness", record.name))?;
    if w.pids.iter().any(|&p| alive(p)) {
        bail!("the witness runs: there is nothing to repair (`ftvm site kill witness` stops it)");
    }
    let pid = if dir.join("etcd-data").exists() {
        start_etcd(&names, &dir)?
    } else {
        run_witness(&names, &dir, &dir.join("witness.secret"))?
    };
    w.pids = vec![pid];
    w.killed = false;
    save(&record)?;
    println!("witness started again (pid {pid})");
    Ok(())
}

/// Waits until the host `joining` holds the VM again (the site protected), printing the
/// synchronisation's progress once a second.
fn wait_protected(record: &SiteRecord, joining: usize, timeout: Duration) -> Result<()> {
    let dir = site_dir(&record.name);
    let start = Instant::now();
    let mut last_report = start;
    let name = &record.hosts[joining].name;
    let log = dir.join(format!("host-{}.log", name.to_ascii_lowercase()));
    // Since when the site has looked failed or split: reports lag by a status period, so a state
    // seen once at a role change is not believed before it lasts.
    let mut bad_since: Option<Instant> = None;
    // Bounded by `timeout`; one look every 50 ms.
    loop {
        let views: Vec<_> = record.hosts.iter().map(|h| HostView::of(&dir, h)).collect();
        let state = site_state(&views);
        // The joining host's own word that it holds the copy: the other may still say
        // "protected" about the backup it has not noticed is gone.
        let holds_copy = views[joining].report().map(HostReport::host_role) == Some(HostRole::Backup);
        if state == "protected" && holds_copy {
            eprintln!("site: protected again after {:.1} s", start.elapsed().as_secs_f64());
            return Ok(());
        }
        if !views[joining].running {
            bail!("host {name}'s service exited: {}", last_error_line(&log));
        }
        if state == "failed" || state == "split-brain" {
            if bad_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2) {
                bail!("the site is {state}: no single host runs the VM for {name} to join (logs in {})", dir.display());
            }
        } else {
            bad_since = None;
        }
        if start.elapsed() > timeout {
            bail!("host {name} did not protect the VM within {} s (site {state}; logs in {})", timeout.as_secs(), dir.display());
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            let detail = views.iter().find_map(HostView::serving).map(|s| s.protection.detail);
            eprintln!("site: {state} {} ({} s)", detail.unwrap_or_default(), start.elapsed().as_secs());
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn down(name: &str) -> Result<()> {
    check_name(name)?;
    let names = SiteNames::new(name);
    if let Ok(record) = load(name) {
        for h in record.hosts.iter().chain(&record.witness) {
            kill_pids(&h.pids);
        }
    }
    // Also anything else still inside the namespaces (the watchdogs, a process started by hand).
    for ns in names.all() {
        kill_pids(&netns_pids(ns));
    }
    topology::teardown(&names)?;
    let dir = site_dir(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    println!("site {name} is down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn up(argv: &[&str]) -> Result<UpArgs, clap::Error> {
        match Cli::try_parse_from([&["ftvm", "site", "up"], argv].concat())?.command {
            Command::Site { command: SiteCommand::Up(args) } => Ok(args),
            other => panic!("not `site up`: {other:?}"),
        }
    }

    /// The engine's options given to `up` reach the hosts' configurations; a tracker that does not
    /// exist is refused by `up` itself.
    #[test]
    fn up_passes_the_engine_options_on() {
        assert!(engine_args(&up(&[]).unwrap()).is_empty());
        let v = engine_args(&up(&["--dirty-tracker", "uffd", "--epoch-us", "2000"]).unwrap());
        assert_eq!(v, ["--epoch-us", "2000", "--dirty-tracker", "uffd"]);
        let toml = toml_of_options(&v);
        assert!(toml.contains("dirty-tracker = \"uffd\"") && toml.contains("epoch-us = \"2000\""), "{toml}");
        let v = engine_args(&up(&["--checkpoint-copy", "cow"]).unwrap());
        assert_eq!(v, ["--checkpoint-copy", "cow"]);
        assert!(toml_of_options(&v).contains("checkpoint-copy = \"cow\""));
        let v = engine_args(&up(&["--alink-io", "uring-zc"]).unwrap());
        assert_eq!(v, ["--alink-io", "uring-zc"]);
        let v = engine_args(&up(&["--alink-rdma-device", "mlx5_0", "--alink-rdma-gid-index", "3"]).unwrap());
        assert_eq!(v, ["--alink-rdma-gid-index", "3", "--alink-rdma-device", "mlx5_0"]);
        assert!(toml_of_options(&v).contains("alink-rdma-device = \"mlx5_0\""));
        let v = engine_args(&up(&["--alink-rdma-port", "2", "--alink-rdma-ring-mib", "128"]).unwrap());
        assert_eq!(v, ["--alink-rdma-port", "2", "--alink-rdma-ring-mib", "128"]);
        let v = engine_args(&up(&["--no-input-ahead"]).unwrap());
        assert_eq!(v, ["--no-input-ahead"]);
        assert!(toml_of_options(&v).contains("no-input-ahead = true"));
        let e = up(&["--dirty-tracker", "pml"]).unwrap_err().to_string();
        assert!(e.contains("possible values: bitmap, bitmap-exact, ring, uffd"), "{e}");
    }
}
