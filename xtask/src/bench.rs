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

    let ns = Netns::new("bench");
    let dir = TempDir::new("bench");
    let opts = VmOptions::new(dir.path().join("disk.img"));
    eprintln!("[bench] booting the unprotected VM in namespace {}", ns.name());
    let _vm = Vm::start(&ns, dir.path(), &opts);

    let mut unprotected = Vec::new();
    for pipeline in [1, 16] {
        let bench = RedisBenchmark { tests: "ping,set,get,incr", requests: args.requests, clients: args.clients, pipeline };
        eprintln!("[bench] redis-benchmark -n {} -c {} -P {pipeline}", bench.requests, bench.clients);
        unprotected.extend(run_redis_benchmark(&ns, &bench)?);
    }
    let report = Report {
        name: args.name,
        host: std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
        unix_time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        unprotected,
    };
    let path = report.write(&root.join("bench/results"))?;
    print!("{}", report.table());
    eprintln!("[bench] wrote {}", path.display());
    Ok(())
}
