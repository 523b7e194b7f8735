//! `cargo xtask <task>`: the project's build and measurement tasks.

mod bench;
mod chaos;
mod ebpf;
mod fuzz;
mod guest;
mod kernel;
mod test;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "ftvm project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the reference guest; the ELF lands at target/guest/ftvm-guest.
    BuildGuest,
    /// Build the eBPF programs with Debian's rustc and bpf-linker; the object lands at
    /// target/ebpf/ftvm-ebpf.
    BuildEbpf,
    /// Extract a real Debian bzImage to target/fixtures/vmlinuz for the Linux loader's tests.
    FetchTestKernel,
    /// Build `ftvm` speaking the previous A-Link minor into target/compat/debug/ftvm (the
    /// rolling-upgrade test's older build).
    BuildPreviousMinor,
    /// Run the benchmarks and write bench/results/<name>.json.
    Bench(Box<bench::BenchArgs>),
    /// A site under writers through N random failures and repairs; fails on a lost write, a
    /// failed connection or two hosts emitting at once.
    Chaos(chaos::ChaosArgs),
    /// Build the cargo-fuzz targets (fuzz/) and run each for a while; fails on any crash.
    Fuzz(fuzz::FuzzArgs),
    /// Build every artefact the tests need, then run the whole test suite (as root, with KVM).
    #[command(alias = "ci")]
    Test {
        /// Extra arguments for `cargo test` (e.g. `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        extra: Vec<String>,
    },
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildGuest => guest::build().map(|p| println!("{}", p.display())),
        Task::BuildEbpf => ebpf::build().map(|p| println!("{}", p.display())),
        Task::FetchTestKernel => kernel::fetch().map(|p| println!("{}", p.display())),
        Task::BuildPreviousMinor => test::build_previous_minor(),
        Task::Bench(args) => bench::run(*args),
        Task::Chaos(args) => chaos::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Test { extra } => test::run(&extra),
    }
}
