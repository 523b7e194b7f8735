//! `cargo xtask bench`: the unprotected VM and the FT pair under redis-benchmark, then failovers
//! (SIGKILL of the primary of a fresh site, repeated), then the A-Link heartbeat's round trip (XDP
//! responder against userspace), the pause against dirty pages per tracker and copy, and one
//! client's request latency (unprotected and FT); writes bench/results/<name>.json and the
//! latency CDF as bench/results/<name>-latency.svg.
//!
//! Needs root and /dev/kvm (it builds network namespaces and boots the reference guest). The ftvm
//! binary is `$FTVM_BIN` if set (used as it is, not built), else a release build made here in
//! `$CARGO_TARGET_DIR` (or `target/`).

use std::time::Duration;
use std::process::Command;

use anyhow::{bail, Context, Result};
use ftvm_bench::{guest_cost, run_redis_benchmark, RedisBenchmark, Report};
use ftvm_system_tests::site::{Site, SiteEnv};
use ftvm_system_tests::{Netns, TempDir, Vm, VmOptions};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Name of the results file (bench/results/<name>.json).
    #[arg(long, default_value = "baseline")]
    pub name: String,
    /// Requests per redis-benchmark run.
    #[arg(long, default_value_t = 100_000)]
    pub requests: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 50)]
    pub clients: u32,
    /// Measure only the unprotected VM (no FT pair, no failover).
    #[arg(long)]
    pub no_ft: bool,
    /// Failover repetitions (a fresh site each, primary SIGKILLed at a random moment).
    #[arg(long, default_value_t = 5)]
    pub failovers: u32,
    /// Client connections held open across each failover.
    #[arg(long, default_value_t = 4)]
    pub failover_connections: usize,
    /// Skip the failover measurement.
    #[arg(long, conflicts_with = "failover_only")]
    pub no_failover: bool,
    /// Only the failover measurement (no redis-benchmark runs).
    #[arg(long, conflicts_with = "no_ft")]
    pub failover_only: bool,
    /// Guest memory sizes whose repairs are measured (`site repair` of the backup, then of the
    /// old primary after a takeover); empty skips it.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G")]
    pub resync_memory: Vec<String>,
    /// Planned switchovers under writers (back and forth); 0 skips them.
    #[arg(long, default_value_t = 4)]
    pub switchovers: usize,
    /// Heartbeat probes per responder (XDP and userspace); 0 skips the heartbeat measurement.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_probes: usize,
    /// Seconds of no load over which the idle VM's CPU use is measured, unprotected and
    /// protected (0: skip).
    #[arg(long, default_value_t = 10)]
    pub idle_seconds: u64,
    /// Skip the pause sweep (a fresh site per dirty tracker × checkpoint copy × dirty pages per
    /// epoch, each read once its window holds 200 epochs: about 4 minutes for the default points).
    #[arg(long)]
    pub no_pause_sweep: bool,
    /// The sweep's `tracker/copy` combinations (`--dirty-tracker` / `--checkpoint-copy`).
    #[arg(long, value_delimiter = ',', default_value = "bitmap/stop,bitmap/cow,ring/stop,ring/cow,uffd/stop")]
    pub pause_sweep_combos: Vec<String>,
    /// The sweep's target dirty pages per epoch (the guest's load and the epoch length are chosen
    /// to reach each; the report gives the measured median).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub pause_sweep_targets: Vec<u64>,
    /// Epochs each sweep point's window must hold before it is read (fewer: a quicker try whose
    /// p99 is the window's largest epoch, the start of the load).
    #[arg(long, default_value_t = ftvm_bench::pause_sweep::DEFAULT_WINDOW_EPOCHS, hide = true)]
    pub pause_sweep_window: u64,
    /// Timed GETs and SETs each of the one-client latency measurement (one connection, one request
    /// at a time, unprotected and FT; also drawn as bench/results/<name>-latency.svg); 0 skips it.
    #[arg(long, default_value_t = 5000)]
    pub one_client_requests: usize,
    /// The FT pair under redis-benchmark (and its one-client latency and idle CPU) with page
    /// payloads by RDMA through this verbs device: the hosts' `--alink-rdma-device`, with an
    /// `ftvm` built with the cargo feature `rdma`. The failover, pause-sweep, resync and switchover
    /// sites stay on TCP.
    #[arg(long, value_name = "NAME")]
    pub alink_rdma_device: Option<String>,
    /// With `--alink-rdma-device`: the hosts' `--alink-rdma-gid-index`.
    #[arg(long, value_name = "N", requires = "alink_rdma_device")]
    pub alink_rdma_gid_index: Option<u8>,
    /// The FT pair without guest input sent ahead (`site up --no-input-ahead`), to compare.
    #[arg(long)]
    pub no_input_ahead: bool,
    /// The FT pair sending every page whole (`site up --no-page-deltas`), to compare.
    #[arg(long)]
    pub no_page_deltas: bool,
    /// The FT pair's dirty tracker under load (`site up --dirty-tracker`: bitmap, bitmap-exact,
    /// ring, uffd), to compare; the hosts' default when not given.
    #[arg(long, value_name = "TRACKER")]
    pub dirty_tracker: Option<String>,
    /// The FT pair's A-Link writes under load (`site up --alink-io`: socket, uring, uring-zc), to
    /// compare; the hosts' default (socket) when not given.
    #[arg(long, value_name = "IO")]
    pub alink_io: Option<String>,
    /// The FT pair's A-Link reads on the backup (`site up --alink-read`: socket, uring).
    #[arg(long, value_name = "IO")]
    pub alink_read: Option<String>,
}

impl BenchArgs {
    /// `ftvm site up`'s options for the FT pair under load.
    fn ft_pair_up_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(device) = &self.alink_rdma_device {
            v.extend(["--alink-rdma-device".to_string(), device.clone()]);
        }
        if let Some(index) = self.alink_rdma_gid_index {
            v.extend(["--alink-rdma-gid-index".to_string(), index.to_string()]);
        }
        if self.no_input_ahead {
            v.push("--no-input-ahead".to_string());
        }
        if self.no_page_deltas {
            v.push("--no-page-deltas".to_string());
        }
        if let Some(tracker) = &self.dirty_tracker {
            v.extend(["--dirty-tracker".to_string(), tracker.clone()]);
        }
        if let Some(io) = &self.alink_io {
            v.extend(["--alink-io".to_string(), io.clone()]);
        }
        if let Some(read) = &self.alink_read {
            v.extend(["--alink-read".to_string(), read.clone()]);
        }
        v
    }
}

/// `tracker/copy` pairs, checked for shape (the site refuses values it does not know, or
/// combinations it does not support, with its own message).
fn parse_combos(combos: &[String]) -> Result<Vec<(String, String)>> {
    combos
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| match c.split_once('/') {
            Some((t, k)) if !t.is_empty() && !k.is_empty() && !k.contains('/') => Ok((t.to_string(), k.to_string())),
            _ => bail!("--pause-sweep-combos: {c:?} is not tracker/copy (e.g. ring/cow)"),
        })
        .collect()
}

/// One client's requests from `netns`, bounded in time by the request count.
fn one_client(netns: &str, requests: usize, target: &str) -> Result<ftvm_bench::latency::Samples> {
    eprintln!("[bench] one client, {requests} SETs then {requests} GETs one at a time ({target})");
    let limit = Duration::from_secs(60) + Duration::from_millis(20) * u32::try_from(2 * requests).unwrap_or(u32::MAX);
    ftvm_bench::latency::measure(netns, requests, limit).with_context(|| format!("one-client latency ({target})"))
}

/// The release ftvm the benchmark runs: `$FTVM_BIN`, else `<target dir>/release/ftvm`.
fn ftvm_bin(root: &std::path::Path) -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("FTVM_BIN") {
        return bin.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), std::path::PathBuf::from);
    target.join("release/ftvm")
}

/// Builds a release ftvm with the cargo `features` (unless `$FTVM_BIN` names one) and points
/// `$FTVM_BIN` at it; returns its path. Call before any other thread exists.
pub fn release_ftvm(tag: &str, features: &[&str]) -> Result<std::path::PathBuf> {
    let root = crate::workspace_root();
    if std::env::var_os("FTVM_BIN").is_some() {
        eprintln!("[{tag}] using FTVM_BIN as it is (not building ftvm)");
    } else {
        eprintln!("[{tag}] building a release ftvm (features: {features:?})");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.args(["build", "--release", "-p", "ftvm"]);
        if !features.is_empty() {
            cargo.args(["--features", &features.join(",")]);
        }
        let status = cargo
            .current_dir(&root)
            .status()
            .context("cannot run cargo build")?;
        if !status.success() {
            bail!("cargo build --release -p ftvm {features:?} failed");
        }
    }
    let bin = ftvm_bin(&root);
    if !bin.exists() {
        bail!("{} missing after the build (set FTVM_BIN?)", bin.display());
    }
    // SAFETY: set before any other thread exists (the caller's promise); the helpers read it when
    // starting the VM.
    unsafe { std::env::set_var("FTVM_BIN", &bin) };
    Ok(bin)
}

pub fn run(args: BenchArgs) -> Result<()> {
    eprintln!("[bench] building the guest");
    let guest = crate::guest::build()?;
    let features: &[&str] = if args.alink_rdma_device.is_some() { &["rdma"] } else { &[] };
    let bin = release_ftvm("bench", features)?;

    // The load, and what each run of it cost the guest (`vmm`: the process with its vCPUs).
    let load = |netns: &str, vmm: i32| -> Result<(Vec<_>, Vec<_>)> {
        let mut results = Vec::new();
        let mut costs = Vec::new();
        // Each run's cost is from the probe before it to the next (one probe between runs).
        let mut before = guest_cost::probe(netns, vmm)?;
        for pipeline in [1, 16] {
            let bench = RedisBenchmark {
                tests: "ping,set,get,incr",
                requests: args.requests,
                clients: args.clients,
                pipeline,
            };
            eprintln!(
                "[bench] redis-benchmark -n {} -c {} -P {pipeline}",
                bench.requests, bench.clients
            );
            results.extend(run_redis_benchmark(netns, &bench)?);
            let after = guest_cost::probe(netns, vmm)?;
            costs.push(guest_cost::between(&before, &after, pipeline));
            before = after;
        }
        Ok((results, costs))
    };
    let mut guest_cost = ftvm_bench::GuestCostReport::default();

    let idle_for = Duration::from_secs(args.idle_seconds);
    let mut idle = ftvm_bench::idle::IdleReport { seconds: idle_for.as_secs_f64(), ..Default::default() };
    let combos = parse_combos(&args.pause_sweep_combos)?;
    let mut one_client_unprotected = None;
    let mut one_client_ft = None;
    let unprotected = if args.failover_only {
        Vec::new()
    } else {
        let ns = Netns::new("bench");
        let dir = TempDir::new("bench");
        let opts = VmOptions::new(dir.path().join("disk.img"));
        eprintln!(
            "[bench] booting the unprotected VM in namespace {}",
            ns.name()
        );
        let vm = Vm::start(&ns, dir.path(), &opts);
        let (results, costs) = load(ns.name(), vm.pid().context("the unprotected VM has no process")?)?;
        guest_cost.unprotected = costs;
        if args.one_client_requests > 0 {
            one_client_unprotected = Some(one_client(ns.name(), args.one_client_requests, "unprotected")?);
        }
        if let (Some(pid), true) = (vm.pid(), idle_for > Duration::ZERO) {
            eprintln!("[bench] the unprotected VM idle for {} s", idle_for.as_secs());
            idle.unprotected_pct = Some(ftvm_bench::idle::cpu_percent(&[pid], idle_for)?);
        }
        results
    };

    let (ft, ft_status) = if args.no_ft || args.failover_only {
        (Vec::new(), None)
    } else {
        let up = args.ft_pair_up_args();
        eprintln!("[bench] bringing up the FT pair (ftvm site up {})", up.join(" "));
        let env = SiteEnv {
            ftvm: bin.clone(),
            guest: guest.clone(),
            logs: ftvm_bench::failover::LOGS_DIR.into(),
        };
        // Taken down when dropped, on every path.
        let mut site = Site::try_new(env, "fb")?;
        site.try_up(&up.iter().map(String::as_str).collect::<Vec<_>>())?;
        let vmm = guest_cost::vmm_pid(&site.host_pids("A")?).context("host A runs no VMM")?;
        let (ft, costs) = load(&site.netns("client"), vmm)?;
        guest_cost.ft = costs;
        let status = site.try_status()?.json;
        if args.one_client_requests > 0 {
            one_client_ft = Some(one_client(&site.netns("client"), args.one_client_requests, "FT")?);
        }
        if idle_for > Duration::ZERO {
            eprintln!("[bench] the protected pair idle for {} s", idle_for.as_secs());
            idle.primary_pct = Some(ftvm_bench::idle::cpu_percent(&site.host_pids("A")?, idle_for)?);
            idle.backup_pct = Some(ftvm_bench::idle::cpu_percent(&site.host_pids("B")?, idle_for)?);
            idle.epochs_per_sec = site.try_status()?.json["epochs_per_sec"].as_f64();
        }
        (ft, Some(status))
    };
    // After the pair above is down: each point brings up a site of its own.
    let pause_sweep = if args.no_ft || args.failover_only || args.no_pause_sweep {
        Vec::new()
    } else {
        eprintln!(
            "[bench] pause sweep: {} tracker/copy × {} targets, a fresh site each",
            combos.len(),
            args.pause_sweep_targets.len()
        );
        ftvm_bench::pause_sweep::run(&ftvm_bench::pause_sweep::SweepConfig {
            env: SiteEnv { ftvm: bin.clone(), guest: guest.clone(), logs: ftvm_bench::failover::LOGS_DIR.into() },
            combos,
            targets: args.pause_sweep_targets.clone(),
            window_epochs: args.pause_sweep_window,
        })
    };
    let failover = if args.no_ft || args.no_failover || args.failovers == 0 {
        None
    } else {
        eprintln!(
            "[bench] failover: {} repetitions, {} connections each",
            args.failovers, args.failover_connections
        );
        Some(ftvm_bench::failover::run(
            &ftvm_bench::failover::FailoverConfig {
                ftvm: bin.clone(),
                guest: guest.clone(),
                repetitions: args.failovers,
                connections: args.failover_connections.max(1),
                seed: ftvm_bench::failover::seed_from_env_or_clock(),
            },
        ))
    };
    let heartbeat = if args.heartbeat_probes == 0 || args.failover_only {
        None
    } else {
        eprintln!("[bench] heartbeat round trip: {} probes per responder", args.heartbeat_probes);
        let object = crate::ebpf::build()?;
        Some(ftvm_bench::heartbeat::run(&object, args.heartbeat_probes)?)
    };
    let mut resync = Vec::new();
    if !(args.no_ft || args.failover_only) {
        let env = SiteEnv { ftvm: bin.clone(), guest: guest.clone(), logs: ftvm_bench::failover::LOGS_DIR.into() };
        for memory in args.resync_memory.iter().filter(|m| !m.is_empty()) {
            eprintln!("[bench] resync: {memory} guest, the backup and the old primary repaired with their old disks, then a blank disk");
            resync.extend(ftvm_bench::resync::run(&env, memory)?);
        }
    }
    let switchover = if args.no_ft || args.failover_only || args.switchovers == 0 {
        None
    } else {
        eprintln!("[bench] switchover: {} under {} writers", args.switchovers, args.failover_connections.max(1));
        let env = SiteEnv { ftvm: bin.clone(), guest: guest.clone(), logs: ftvm_bench::failover::LOGS_DIR.into() };
        Some(ftvm_bench::switchover::run(&env, args.switchovers, args.failover_connections.max(1))?)
    };
    let ratios = ftvm_bench::ratios(&unprotected, &ft);
    let results_dir = crate::workspace_root().join("bench/results");
    let one_client = (one_client_unprotected.is_some() || one_client_ft.is_some()).then(|| {
        let mut r = ftvm_bench::latency::OneClientReport::new(
            args.one_client_requests,
            one_client_unprotected.as_ref(),
            one_client_ft.as_ref(),
        );
        r.svg = Some(format!("{}-latency.svg", args.name));
        r
    });
    if let Some(file) = one_client.as_ref().and_then(|r| r.svg.as_ref()) {
        let svg = ftvm_bench::latency::cdf_svg(&args.name, one_client_unprotected.as_ref(), one_client_ft.as_ref());
        std::fs::create_dir_all(&results_dir)?;
        let path = results_dir.join(file);
        std::fs::write(&path, svg).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("[bench] wrote {}", path.display());
    }
    let report = Report {
        name: args.name,
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_string(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        unprotected,
        ft,
        ft_status,
        ratios,
        failover,
        heartbeat,
        resync,
        switchover,
        idle: (idle_for > Duration::ZERO && !args.failover_only).then_some(idle),
        pause_sweep,
        one_client,
        guest_cost,
    };
    let path = report.write(&results_dir)?;
    print!("{}", report.table());
    eprintln!("[bench] wrote {}", path.display());
    Ok(())
}
