//! End-to-end benchmarks: the reference guest under `redis-benchmark`, on this machine, with
//! results written as JSON. Every later protection level is reported as a ratio against the
//! unprotected figures measured in the same run. [`failover`] measures the takeover itself: SIGKILL
//! of the primary to the first reply served by the backup; [`heartbeat`] the A-Link heartbeat's
//! round trip through the XDP responder against a userspace one; [`resync`] a repaired host's
//! synchronisation (repair to protected, bytes and rate); [`pause_sweep`] the pause against dirty
//! pages per epoch for each dirty tracker and checkpoint copy; [`latency`] one client's requests,
//! one at a time, with [`svg`] drawing their distributions.

pub mod failover;
pub mod guest_cost;
pub mod heartbeat;
pub mod idle;
pub mod latency;
pub mod pause_sweep;
pub mod resp;
pub mod resync;
pub mod svg;
pub mod switchover;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use ftvm_system_tests::{run_with_timeout, GUEST_IP};

/// One line of `redis-benchmark --csv`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommandResult {
    pub test: String,
    pub pipeline: u32,
    pub clients: u32,
    pub requests: u32,
    pub rps: f64,
    pub avg_latency_ms: f64,
    pub p50_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
    pub max_latency_ms: f64,
}

/// What one `redis-benchmark` invocation should do.
#[derive(Clone, Debug)]
pub struct RedisBenchmark {
    pub tests: &'static str,
    pub requests: u32,
    pub clients: u32,
    pub pipeline: u32,
}

/// Parses `redis-benchmark --csv` output (redis-tools 7.x columns).
pub fn parse_csv(out: &str, bench: &RedisBenchmark) -> Result<Vec<CommandResult>> {
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = match lines.next() {
        Some(h) => split_csv(h),
        None => bail!("redis-benchmark printed nothing"),
    };
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no {name} column in {header:?}"))
    };
    let (test, rps, avg, p50, p95, p99, max) = (
        col("test")?,
        col("rps")?,
        col("avg_latency_ms")?,
        col("p50_latency_ms")?,
        col("p95_latency_ms")?,
        col("p99_latency_ms")?,
        col("max_latency_ms")?,
    );
    lines
        .map(|line| {
            let f = split_csv(line);
            let num = |i: usize| -> Result<f64> {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("bad number in {line:?}"))
            };
            Ok(CommandResult {
                test: f.get(test).cloned().unwrap_or_default(),
                pipeline: bench.pipeline,
                clients: bench.clients,
                requests: bench.requests,
                rps: num(rps)?,
                avg_latency_ms: num(avg)?,
                p50_latency_ms: num(p50)?,
                p95_latency_ms: num(p95)?,
                p99_latency_ms: num(p99)?,
                max_latency_ms: num(max)?,
            })
        })
        .collect()
}

fn split_csv(line: &str) -> Vec<String> {
    line.split(',')
        .map(|f| f.trim().trim_matches('"').to_string())
        .collect()
}

/// Runs redis-benchmark from inside the named namespace against the guest.
pub fn run_redis_benchmark(netns: &str, bench: &RedisBenchmark) -> Result<Vec<CommandResult>> {
    let ip = GUEST_IP.to_string();
    let (n, c, p) = (
        bench.requests.to_string(),
        bench.clients.to_string(),
        bench.pipeline.to_string(),
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).args([
        "redis-benchmark",
        "-h",
        &ip,
        "-p",
        "6379",
        "-t",
        bench.tests,
        "-n",
        &n,
        "-c",
        &c,
        "-P",
        &p,
        "--csv",
    ]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(900));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_csv(&stdout, bench)
}

/// FT against unprotected for one command, measured in the same run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ratio {
    pub test: String,
    pub pipeline: u32,
    /// requests/s with FT ÷ requests/s unprotected (target ≥ 0.6 for SET with 50 clients).
    pub rps_ratio: f64,
    /// Added p50 latency in µs (target ≤ 200).
    pub added_p50_us: f64,
    /// Added p99 latency in µs (target ≤ 1000).
    pub added_p99_us: f64,
}

/// Pairs up FT and unprotected results of the same command and pipeline depth.
pub fn ratios(unprotected: &[CommandResult], ft: &[CommandResult]) -> Vec<Ratio> {
    ft.iter()
        .filter_map(|f| {
            let u = unprotected
                .iter()
                .find(|u| u.test == f.test && u.pipeline == f.pipeline)?;
            Some(Ratio {
                test: f.test.clone(),
                pipeline: f.pipeline,
                rps_ratio: if u.rps > 0.0 { f.rps / u.rps } else { 0.0 },
                added_p50_us: (f.p50_latency_ms - u.p50_latency_ms) * 1e3,
                added_p99_us: (f.p99_latency_ms - u.p99_latency_ms) * 1e3,
            })
        })
        .collect()
}

/// A results file: bench/results/<name>.json.
#[derive(Debug, Serialize)]
pub struct Report {
    pub name: String,
    pub host: String,
    pub unix_time: u64,
    pub unprotected: Vec<CommandResult>,
    /// The same load against the FT pair (`ftvm site up`), empty when not measured.
    pub ft: Vec<CommandResult>,
    /// `ftvm site status --json` of the pair right after the load: epoch rate, pause, lag.
    pub ft_status: Option<serde_json::Value>,
    pub ratios: Vec<Ratio>,
    /// SIGKILL of the primary to serving on the backup, over fresh sites; `None` when skipped.
    pub failover: Option<failover::FailoverReport>,
    /// The heartbeat's round trip, XDP against userspace; `None` when skipped.
    pub heartbeat: Option<heartbeat::HeartbeatReport>,
    /// Repairs of each host, per guest memory size; empty when skipped.
    #[serde(default)]
    pub resync: Vec<resync::ResyncRun>,
    /// Planned switchovers under writers; `None` when skipped.
    #[serde(default)]
    pub switchover: Option<switchover::SwitchoverReport>,
    /// What an idle VM costs, unprotected and protected; `None` when skipped.
    #[serde(default)]
    pub idle: Option<idle::IdleReport>,
    /// The pause against dirty pages per epoch, per tracker and copy; empty when skipped.
    #[serde(default)]
    pub pause_sweep: Vec<pause_sweep::PausePoint>,
    /// One client's GET and SET, one at a time, unprotected and FT; `None` when skipped.
    #[serde(default)]
    pub one_client: Option<latency::OneClientReport>,
    /// The guest's own vCPU time per command under the load, per pipeline depth.
    #[serde(default)]
    pub guest_cost: GuestCostReport,
}

/// [`guest_cost::GuestCost`] of each load run, unprotected and FT.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GuestCostReport {
    pub unprotected: Vec<guest_cost::GuestCost>,
    pub ft: Vec<guest_cost::GuestCost>,
}

impl Report {
    pub fn write(&self, dir: &Path) -> Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.name));
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// A short table for the terminal and for closing notes.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if !self.unprotected.is_empty() {
            s += &format!(
                "{:<12} {:>3} {:>10} {:>8} {:>8} {:>8}\n",
                "command", "P", "req/s", "p50 ms", "p99 ms", "max ms"
            );
        }
        for r in &self.unprotected {
            s += &format!(
                "{:<12} {:>3} {:>10.0} {:>8.3} {:>8.3} {:>8.3}\n",
                r.test, r.pipeline, r.rps, r.p50_latency_ms, r.p99_latency_ms, r.max_latency_ms
            );
        }
        if !self.ratios.is_empty() {
            s += &format!(
                "\n{:<12} {:>3} {:>10} {:>12} {:>12}\n",
                "FT vs unprot", "P", "req/s ×", "+p50 µs", "+p99 µs"
            );
            for r in &self.ratios {
                s += &format!(
                    "{:<12} {:>3} {:>10.2} {:>12.0} {:>12.0}\n",
                    r.test, r.pipeline, r.rps_ratio, r.added_p50_us, r.added_p99_us
                );
            }
        }
        for (u, f) in self.guest_cost.unprotected.iter().zip(&self.guest_cost.ft) {
            s += &format!(
                "guest vCPU per command, P{}: unprotected {:.1} µs ({:.2} loop turns), FT {:.1} µs ({:.2}): ×{:.2}\n",
                u.pipeline,
                u.vcpu_us_per_command,
                u.loop_turns_per_command,
                f.vcpu_us_per_command,
                f.loop_turns_per_command,
                if u.vcpu_us_per_command > 0.0 { f.vcpu_us_per_command / u.vcpu_us_per_command } else { 0.0 }
            );
        }
        if let Some(f) = &self.failover {
            s += &f.table();
        }
        if let Some(h) = &self.heartbeat {
            s += &h.table();
        }
        if let Some(so) = &self.switchover {
            for r in &so.runs {
                let resumed = r.handover_to_resumed_ms.map_or("-".to_string(), |ms| format!("{ms:.1} ms"));
                s += &format!(
                    "switchover {} -> {}: guest resumed {resumed} after the handover; protected again after {:.1} s\n",
                    r.from, r.to, r.to_protected_s
                );
            }
            s += &format!(
                "switchovers: longest client gap {:.0} ms over {} connections; {} writes checked, {} lost\n",
                so.longest_client_gap_ms, so.connections, so.writes_checked, so.writes_lost
            );
        }
        if let Some(i) = &self.idle {
            let pct = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.1} %"));
            s += &format!(
                "idle for {:.0} s: unprotected VM {} of a core; FT primary {}, backup {} ({} checkpoints/s)\n",
                i.seconds,
                pct(i.unprotected_pct),
                pct(i.primary_pct),
                pct(i.backup_pct),
                i.epochs_per_sec.map_or("-".to_string(), |e| format!("{e:.0}"))
            );
        }
        for r in &self.resync {
            s += &format!(
                "resync {:>5} guest, {:<11} repaired: protected again after {:5.1} s; {:5} MiB ({:6} KiB of disk, {}) in {:4.1} s = {:4.0} MiB/s\n",
                r.memory,
                r.repaired,
                r.repair_to_protected_s,
                r.bytes >> 20,
                r.disk_bytes >> 10,
                r.disk_copy,
                r.sync_s,
                r.rate_mib_per_s
            );
        }
        if let Some(o) = &self.one_client {
            s += &o.table();
        }
        s += &pause_sweep::table(&self.pause_sweep);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_7_csv() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"SET\",\"41666.67\",\"1.120\",\"0.200\",\"1.055\",\"1.655\",\"2.311\",\"9.999\"\n\
                   \"GET\",\"45454.55\",\"1.020\",\"0.180\",\"0.975\",\"1.455\",\"2.011\",\"8.100\"\n";
        let b = RedisBenchmark {
            tests: "set,get",
            requests: 1000,
            clients: 50,
            pipeline: 1,
        };
        let r = parse_csv(out, &b).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].test, "SET");
        assert!((r[0].rps - 41666.67).abs() < 1e-6);
        assert!((r[1].p99_latency_ms - 2.011).abs() < 1e-9);
        assert_eq!(r[1].clients, 50);
    }

    #[test]
    fn ratios_pair_the_same_command_and_depth() {
        let r = |test: &str, pipeline, rps, p50, p99| CommandResult {
            test: test.into(),
            pipeline,
            clients: 50,
            requests: 1,
            rps,
            avg_latency_ms: 0.0,
            p50_latency_ms: p50,
            p95_latency_ms: 0.0,
            p99_latency_ms: p99,
            max_latency_ms: 0.0,
        };
        let u = [
            r("SET", 1, 1000.0, 1.0, 2.0),
            r("SET", 16, 5000.0, 1.0, 2.0),
        ];
        let f = [r("SET", 1, 600.0, 1.2, 2.5), r("GET", 1, 1.0, 1.0, 1.0)];
        let got = ratios(&u, &f);
        assert_eq!(got.len(), 1);
        assert!((got[0].rps_ratio - 0.6).abs() < 1e-9);
        assert!((got[0].added_p50_us - 200.0).abs() < 1e-6);
        assert!((got[0].added_p99_us - 500.0).abs() < 1e-6);
    }

    #[test]
    fn refuses_garbage() {
        let b = RedisBenchmark {
            tests: "set",
            requests: 1,
            clients: 1,
            pipeline: 1,
        };
        assert!(parse_csv("", &b).is_err());
        assert!(parse_csv("\"test\",\"rps\"\n\"SET\",\"1\"\n", &b).is_err());
    }
}
