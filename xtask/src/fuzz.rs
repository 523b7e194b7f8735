//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` and runs each under libFuzzer
//! for a fixed time, then reports executions and coverage and fails on any crash.
//!
//! Toolchain: the machine's stable rustc is enough. With `--sanitizer none`, cargo-fuzz passes
//! only stable codegen flags (SanitizerCoverage passes, `--cfg fuzzing`, debug assertions and
//! overflow checks); the targets fuzz safe Rust, where a sanitizer adds little and costs about
//! five times the executions. `--asan` builds with AddressSanitizer instead, which needs the
//! nightly-only `-Zsanitizer`: stable rustc accepts it under `RUSTC_BOOTSTRAP=1`.
//!
//! Layout: `fuzz/corpus/<target>/` is the working corpus (its `seed-*` files, written by
//! `--seed` from the real encoders, are committed; what the fuzzer adds is not);
//! `fuzz/regressions/<target>/` holds every input that once crashed a target, replayed at the
//! start of each run; crashes land in `fuzz/artifacts/<target>/`, logs in `fuzz/target/logs/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Every target, with the largest input libFuzzer may try (a Pages payload needs one 4 KiB page
/// past a 1 KiB head; a machine state holds a 4 KiB XSAVE area per vCPU).
pub const TARGETS: &[(&str, usize)] = &[
    ("alink_frame", 4096),
    ("handshake", 4096),
    ("epoch_payloads", 20_000),
    // The target checks against a set of single page numbers: short inputs keep it fast.
    ("page_ranges", 512),
    ("machine_state", 16_384),
    // A base and a new state of a few KiB each, as the real ones.
    ("state_delta", 16_384),
    // A frame of page deltas, or a page.
    ("page_delta", 8192),
    ("resp_parser", 4096),
    ("witness_request", 512),
    ("etcd_response", 4096),
    // A datagram holds at most one guest frame.
    ("late_input", 2048),
];

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds to run each target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only this target (default: every one).
    #[arg(long)]
    pub target: Option<String>,
    /// First (re)write the seed corpora, fuzz/corpus/<target>/seed-*, from the real encoders.
    #[arg(long)]
    pub seed: bool,
    /// Build with AddressSanitizer (slower; uses RUSTC_BOOTSTRAP=1 on the stable toolchain).
    #[arg(long)]
    pub asan: bool,
}

/// What one run reported.
#[derive(Debug, Default)]
struct Stats {
    execs: u64,
    per_sec: u64,
    cov: String,
    features: String,
    corpus: String,
    crash: Option<String>,
}

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("fuzz")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc").arg("-vV").output().context("cannot run rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV names no host triple")
}

/// Builds the targets, runs each for `args.seconds`, prints what each did; fails if any crashed.
pub fn run(args: &FuzzArgs) -> Result<()> {
    let targets: Vec<(&str, usize)> = match &args.target {
        Some(t) => vec![*TARGETS
            .iter()
            .find(|(name, _)| name == t)
            .with_context(|| format!("no fuzz target {t:?}; there are {:?}", TARGETS.iter().map(|t| t.0).collect::<Vec<_>>()))?],
        None => TARGETS.to_vec(),
    };
    let version = cargo().args(["fuzz", "--version"]).output();
    if !version.is_ok_and(|o| o.status.success()) {
        bail!("cargo-fuzz is not installed: run scripts/install.sh (or `cargo install cargo-fuzz`)");
    }
    let dir = fuzz_dir();
    if args.seed {
        write_seeds(&dir)?;
    }
    build(args, &targets)?;
    let triple = host_triple()?;
    let bin_dir = dir.join("target").join(&triple).join("release");
    let logs = dir.join("target/logs");
    fs::create_dir_all(&logs)?;
    let mut results = Vec::new();
    for &(name, max_len) in &targets {
        eprintln!("[xtask fuzz] {name}: {} s", args.seconds);
        let stats = run_one(&dir, &bin_dir.join(name), name, max_len, args.seconds, &logs)?;
        results.push((name, stats));
    }
    println!("{:<16} {:>12} {:>9} {:>6} {:>7} {:>14}  result", "target", "executions", "exec/s", "cov", "ft", "corpus");
    for (name, s) in &results {
        let result = s.crash.as_deref().map_or("ok".to_string(), |c| format!("CRASH {c}"));
        println!("{name:<16} {:>12} {:>9} {:>6} {:>7} {:>14}  {result}", s.execs, s.per_sec, s.cov, s.features, s.corpus);
    }
    let crashed: Vec<_> = results.iter().filter(|(_, s)| s.crash.is_some()).map(|(n, _)| *n).collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {crashed:?} (inputs above; logs in {})", logs.display());
    }
    Ok(())
}

fn build(args: &FuzzArgs, targets: &[(&str, usize)]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["fuzz", "build", "--debug-assertions"]);
    if args.asan {
        cmd.env("RUSTC_BOOTSTRAP", "1").args(["--sanitizer", "address"]);
    } else {
        cmd.args(["--sanitizer", "none"]);
    }
    if let [(only, _)] = targets {
        cmd.arg(only);
    }
    eprintln!("[xtask fuzz] building: {cmd:?}");
    let status = cmd.current_dir(crate::workspace_root()).status().context("cannot run cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    Ok(())
}

fn run_one(dir: &Path, bin: &Path, name: &str, max_len: usize, seconds: u64, logs: &Path) -> Result<Stats> {
    let corpus = dir.join("corpus").join(name);
    let regressions = dir.join("regressions").join(name);
    let artifacts = dir.join("artifacts").join(name);
    fs::create_dir_all(&corpus)?;
    fs::create_dir_all(&artifacts)?;
    let log_path = logs.join(format!("{name}.log"));
    let log = fs::File::create(&log_path)?;
    let mut cmd = Command::new(bin);
    // New inputs go to the first directory; the regressions are only read (and so replayed).
    cmd.arg(&corpus);
    if regressions.is_dir() {
        cmd.arg(&regressions);
    }
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={max_len}"))
        .arg("-print_final_stats=1")
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(Stdio::null())
        .stderr(log);
    let status = cmd.status().with_context(|| format!("cannot run {}", bin.display()))?;
    let text = fs::read_to_string(&log_path)?;
    let mut stats = parse_stats(&text);
    if !status.success() {
        let crash = text
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_string()))
            .unwrap_or_else(|| format!("(no input written; exit {status})"));
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("[xtask fuzz] {name} CRASHED, input {crash}; end of {}:", log_path.display());
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
        stats.crash = Some(crash);
    }
    Ok(stats)
}

/// Reads libFuzzer's final statistics (`-print_final_stats=1`) and its last status line
/// (`#N DONE cov: C ft: F corp: N/Sb ...`).
fn parse_stats(text: &str) -> Stats {
    let mut s = Stats::default();
    let stat = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    s.execs = stat("stat::number_of_executed_units:");
    s.per_sec = stat("stat::average_exec_per_sec:");
    if let Some(line) = text.lines().rev().find(|l| l.starts_with('#') && l.contains(" cov: ")) {
        let field = |key: &str| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == key).and_then(|_| words.next()).unwrap_or("?").to_string()
        };
        s.cov = field("cov:");
        s.features = field("ft:");
        s.corpus = field("corp:");
    }
    s
}

/// Writes the seed corpora with the fuzz crate's seed generator (fuzz/examples/seeds.rs), which
/// uses the project's real encoders.
fn write_seeds(dir: &Path) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "--example", "seeds", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--")
        .arg(dir.join("corpus"));
    eprintln!("[xtask fuzz] writing seeds: {cmd:?}");
    let status = cmd.status().context("cannot run the seed generator")?;
    if !status.success() {
        bail!("the seed generator failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read() {
        let log = "#2\tINITED cov: 6 ft: 7 corp: 1/1b exec/s: 0 rss: 27Mb\n\
                   #4624897\tDONE   cov: 191 ft: 323 corp: 107/33Kb lim: 4096 exec/s: 1156224 rss: 27Mb\n\
                   Done 4624897 runs in 4 second(s)\n\
                   stat::number_of_executed_units: 4624897\n\
                   stat::average_exec_per_sec:     1156224\n";
        let s = parse_stats(log);
        assert_eq!((s.execs, s.per_sec), (4_624_897, 1_156_224));
        assert_eq!((s.cov.as_str(), s.features.as_str(), s.corpus.as_str()), ("191", "323", "107/33Kb"));
    }
}
