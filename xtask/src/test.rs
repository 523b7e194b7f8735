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
    build_previous_minor()?;
    let mut test = cargo();
    test.args(["test", "--workspace"]).args(extra);
    step("run the tests", test)?;
    rdma_feature()?;
    eprintln!("[xtask test] fuzzing each target for {FUZZ_SECONDS} s");
    crate::fuzz::run(&crate::fuzz::FuzzArgs { seconds: FUZZ_SECONDS, target: None, seed: false, asan: false })
}

/// The RDMA A-Link (ftvm-repl's `rdma` feature: rdma-sys, libibverbs-dev, libclang) builds, and
/// its device-free tests pass with the feature on (the unit tests, and the receiver's end-to-end
/// test through a simulated NIC). These machines have no RDMA device, so nothing
/// more of it can run here (the README's "RDMA (lab procedure)" is for hosts that have one).
fn rdma_feature() -> Result<()> {
    let mut build = cargo();
    build.args(["build", "-p", "ftvm-repl", "--features", "rdma"]);
    step("build the RDMA transport", build)?;
    let mut test = cargo();
    test.args(["test", "-p", "ftvm-repl", "--features", "rdma", "--lib", "transport::rdma"]);
    step("test the RDMA transport's device-free parts", test)?;
    let mut e2e = cargo();
    e2e.args(["test", "-p", "ftvm-repl", "--features", "rdma", "--test", "rdma_loopback"]);
    step("test the backup's RDMA path through a simulated NIC", e2e)
}

/// Where the build that speaks the previous A-Link minor goes (its own target directory: the same
/// binary name built with other features would overwrite this build's).
pub const COMPAT_TARGET_DIR: &str = "target/compat";

/// Builds `ftvm` speaking the previous minor of the A-Link protocol (the `previous-minor`
/// feature of ftvm-proto) into [`COMPAT_TARGET_DIR`], for the rolling-upgrade test
/// (`tests/upgrade.rs`): two builds of one site's hosts that must pair.
pub fn build_previous_minor() -> Result<()> {
    let root = crate::workspace_root();
    let mut build = cargo();
    build.args(["build", "-p", "ftvm", "--bin", "ftvm", "--features", "ftvm-proto/previous-minor", "--target-dir", COMPAT_TARGET_DIR]);
    step("build ftvm speaking the previous A-Link minor", build)?;
    // That build looks for the eBPF object in its own target directory: the one built above.
    let link = root.join(COMPAT_TARGET_DIR).join("ebpf");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(root.join("target/ebpf"), &link).with_context(|| format!("cannot link {}", link.display()))?;
    }
    Ok(())
}

/// Seconds each fuzz target runs in the test suite: enough to replay its corpus and regressions
/// and explore a little; the long runs are `cargo xtask fuzz --seconds N`.
const FUZZ_SECONDS: u64 = 5;
