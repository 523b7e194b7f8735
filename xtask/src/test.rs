//! `cargo xtask test`: everything the README's test command runs, in order.
//!
//! The system tests need artefacts that cargo does not build by itself (the guest ELF, the eBPF
//! object, the `ftvm` binary, a real bzImage for the Linux loader's test), so they are built first;
//! then the whole workspace's tests run, KVM and root tests included, and last every fuzz target
//! runs briefly (its regression inputs first), so a decoder change that breaks one shows here.

use std::process::Command;

use anyhow::{bail, Context, Result};

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn step(name: &str, mut cmd: Command) -> Result<()> {
    eprintln!("[xtask test] {name}: {cmd:?}");
    let status = cmd.current_dir(crate::workspace_root()).status().with_context(|| format!("cannot run {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

pub fn run(extra: &[String]) -> Result<()> {
    eprintln!("[xtask test] building the guest");
    crate::guest::build()?;
    eprintln!("[xtask test] building the eBPF programs");
    crate::ebpf::build()?;
    eprintln!("[xtask test] fetching a real bzImage for the Linux loader's tests");
    crate::kernel::fetch()?;
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    step("build the binaries", build)?;
    let mut test = cargo();
    test.args(["test", "--workspace"]).args(extra);
    step("run the tests", test)?;
    eprintln!("[xtask test] fuzzing each target for {FUZZ_SECONDS} s");
    crate::fuzz::run(&crate::fuzz::FuzzArgs { seconds: FUZZ_SECONDS, target: None, seed: false, asan: false })
}

/// Seconds each fuzz target runs in the test suite: enough to replay its corpus and regressions
/// and explore a little; the long runs are `cargo xtask fuzz --seconds N`.
const FUZZ_SECONDS: u64 = 5;
