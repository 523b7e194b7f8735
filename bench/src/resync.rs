//! Protection coming back: a host's service killed and repaired (`ftvm site repair`) while the VM
//! runs, for each guest memory size. For each repair: the time from the repair command to the
//! site being protected again, and the synchronisation's bytes and rate over the A-Link, from the
//! serving host's log ("initial synchronisation sent"). Both directions are measured: the backup
//! repaired (the first primary copies it), then the primary killed, the backup taking over, and
//! the old primary repaired (the host that took over copies it). Every copy is a full one (memory
//! and the whole disk) until the incremental re-sync lands.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::failover::strip_ansi;
use ftvm_system_tests::site::{Site, SiteEnv};

/// One repair.
#[derive(Clone, Debug, Serialize)]
pub struct ResyncRun {
    pub memory: String,
    /// `backup` or `old primary`.
    pub repaired: &'static str,
    /// From `site repair` to the site protected again.
    pub repair_to_protected_s: f64,
    /// Memory and disk bytes the synchronisation sent.
    pub bytes: u64,
    /// The synchronisation's own time, from the serving host's log.
    pub sync_s: f64,
    pub rate_mib_per_s: f64,
}

/// The last "initial synchronisation sent" line of a host's log: (bytes, seconds).
fn last_sync(log: &str) -> Option<(u64, f64)> {
    let line = log.lines().rev().map(strip_ansi).find(|l| l.contains("initial synchronisation sent"))?;
    // " name=": the span before the message names `disk_bytes=` too.
    let field = |name: &str| -> Option<f64> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        line[at..].split(|c: char| !c.is_ascii_digit() && c != '.').next()?.parse().ok()
    };
    Some((field("bytes")? as u64, field("elapsed_ms")? / 1e3))
}

/// Waits until `want` holds for the site's status, within `limit`.
fn wait(site: &Site, limit: Duration, want: impl Fn(&ftvm_system_tests::site::Status) -> bool) -> Result<()> {
    match site.try_wait_status(limit, want)? {
        (_, true) => Ok(()),
        (st, false) => bail!("not within {limit:?}: {st}"),
    }
}

fn repair(site: &Site, host: &str, serving: &str, memory: &str, repaired: &'static str) -> Result<ResyncRun> {
    let t = Instant::now();
    site.try_run(&["site", "repair", "--name", &site.name, host], Duration::from_secs(600))?;
    let took = t.elapsed();
    let log_path = site.dir().join(format!("host-{}.log", serving.to_ascii_lowercase()));
    let log = std::fs::read_to_string(&log_path).with_context(|| format!("cannot read {}", log_path.display()))?;
    let (bytes, sync_s) = last_sync(&log).context("the serving host logged no synchronisation")?;
    let run = ResyncRun {
        memory: memory.to_string(),
        repaired,
        repair_to_protected_s: took.as_secs_f64(),
        bytes,
        sync_s,
        rate_mib_per_s: bytes as f64 / f64::from(1 << 20) / sync_s.max(1e-9),
    };
    eprintln!(
        "[bench] resync {memory}, {repaired} repaired: protected again after {:.1} s; {} MiB in {:.1} s = {:.0} MiB/s",
        run.repair_to_protected_s,
        bytes >> 20,
        sync_s,
        run.rate_mib_per_s
    );
    Ok(run)
}

/// Both repairs on a fresh site with `memory` of guest RAM.
pub fn run(env: &SiteEnv, memory: &str) -> Result<Vec<ResyncRun>> {
    let mut site = Site::try_new(env.clone(), "rs")?;
    site.try_up(&["--memory", memory])?;
    site.try_kill("B")?;
    wait(&site, Duration::from_secs(30), |s| s.role_a == "primary" && s.role_b == "killed")?;
    let mut runs = vec![repair(&site, "B", "A", memory, "backup")?];
    site.try_kill("A")?;
    wait(&site, Duration::from_secs(30), |s| s.role_b == "primary" && s.state == "failed over")?;
    runs.push(repair(&site, "A", "B", memory, "old primary")?);
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_synchronisation_line_gives_bytes_and_time() {
        let log = "x initial_sync{disk_bytes=99}: INFO initial synchronisation sent elapsed_ms=100 bytes=10 mib_per_s=1\n\
                   \u{1b}[2m2026\u{1b}[0m INFO ftvm_repl: initial synchronisation sent \u{1b}[3melapsed_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m2900 \u{1b}[3mbytes\u{1b}[0m\u{1b}[2m=\u{1b}[0m335544320 mib_per_s=110\n";
        assert_eq!(last_sync(log), Some((335_544_320, 2.9)));
        assert_eq!(last_sync(log.lines().next().unwrap()), Some((10, 0.1)), "the span's disk_bytes is not the sent bytes");
        assert_eq!(last_sync("nothing"), None);
    }
}
