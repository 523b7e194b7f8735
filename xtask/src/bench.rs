//! `cargo xtask bench`: the unprotected VM under redis-benchmark; writes bench/results/<name>.json.
//!
//! Needs root and /dev/kvm (it builds a network namespace and boots the reference guest).

use std::process::Command;

use anyhow::{bail, Context, Result};
use ftvm_bench::{run_redis_benchmark, RedisBenchmark, Report};
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
    /// Measure only the unprotected VM.
    #[arg(long)]
    pub no_ft: bool,
}

/// An FT pair brought up with `ftvm site up` for the length of the benchmark.
struct FtSite {
    name: String,
    bin: std::path::PathBuf,
}

impl FtSite {
    fn up(root: &std::path::Path) -> Result<Self> {
        let site = Self { name: format!("fb{}", std::process::id() % 100_000), bin: root.join("target/release/ftvm") };
        let status = Command::new(&site.bin)
            .args(["site", "up", "--name", &site.name, "--guest"])
            .arg(root.join("target/guest/ftvm-guest"))
            .status()
            .context("cannot run ftvm site up")?;
        if !status.success() {
            bail!("ftvm site up failed");
        }
        Ok(site)
    }

    fn client_netns(&self) -> String {
        format!("{}-client", self.name)
    }

    fn status_json(&self) -> Result<serde_json::Value> {
        let out = Command::new(&self.bin).args(["site", "status", "--json", "--name", &self.name]).output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for FtSite {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin).args(["site", "down", "--name", &self.name]).status();
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let root = crate::workspace_root();
    eprintln!("[bench] building the guest and a release ftvm");
    crate::guest::build()?;
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "ftvm"])
        .current_dir(&root)
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p ftvm failed");
    }
    // SAFETY: set before any other thread exists; the helpers read it when starting the VM.
    unsafe { std::env::set_var("FTVM_BIN", root.join("target/release/ftvm")) };

    let load = |netns: &str| -> Result<Vec<_>> {
        let mut results = Vec::new();
        for pipeline in [1, 16] {
            let bench = RedisBenchmark { tests: "ping,set,get,incr", requests: args.requests, clients: args.clients, pipeline };
            eprintln!("[bench] redis-benchmark -n {} -c {} -P {pipeline}", bench.requests, bench.clients);
            results.extend(run_redis_benchmark(netns, &bench)?);
        }
        Ok(results)
    };

    let unprotected = {
        let ns = Netns::new("bench");
        let dir = TempDir::new("bench");
        let opts = VmOptions::new(dir.path().join("disk.img"));
        eprintln!("[bench] booting the unprotected VM in namespace {}", ns.name());
        let _vm = Vm::start(&ns, dir.path(), &opts);
        load(ns.name())?
    };

    let (ft, ft_status) = if args.no_ft {
        (Vec::new(), None)
    } else {
        eprintln!("[bench] bringing up the FT pair (ftvm site up)");
        let site = FtSite::up(&root)?;
        let ft = load(&site.client_netns())?;
        let status = site.status_json()?;
        (ft, Some(status))
    };
    let ratios = ftvm_bench::ratios(&unprotected, &ft);
    let report = Report {
        name: args.name,
        host: std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
        unix_time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        unprotected,
        ft,
        ft_status,
        ratios,
    };
    let path = report.write(&root.join("bench/results"))?;
    print!("{}", report.table());
    eprintln!("[bench] wrote {}", path.display());
    Ok(())
}
