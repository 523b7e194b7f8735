//! Protection coming back: a host's service killed and repaired (`ftvm site repair`) while the VM
//! runs, for each guest memory size. For each repair: the time from the repair command to the
//! site being protected again, and the synchronisation's bytes and rate over the A-Link, from the
//! serving host's status (`last_sync`). Three repairs per size: the backup repaired with its old
//! disk, then the primary killed, the backup taking over, and the old primary repaired with its old
//! disk (both incremental: of the disk, only the regions written since the copies diverged), then
//! the backup repaired with a blank disk (a full copy). Memory is always copied in full.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use ftvm_system_tests::site::{Site, SiteEnv, Status};

/// One repair.
#[derive(Clone, Debug, Serialize)]
pub struct ResyncRun {
    pub memory: String,
    /// `backup`, `old primary` or `blank disk`.
    pub repaired: &'static str,
    /// `incremental` (the disk's regions written since the copies diverged) or `full`.
    pub disk_copy: String,
    /// From `site repair` to the site protected again.
    pub repair_to_protected_s: f64,
    /// Memory and disk bytes the synchronisation sent.
    pub bytes: u64,
    /// Of them, disk bytes.
    pub disk_bytes: u64,
    /// The synchronisation's own time.
    pub sync_s: f64,
    pub rate_mib_per_s: f64,
}

/// Waits until `want` holds for the site's status, within `limit`.
fn wait(site: &Site, limit: Duration, want: impl Fn(&Status) -> bool) -> Result<Status> {
    match site.try_wait_status(limit, want)? {
        (st, true) => Ok(st),
        (st, false) => bail!("not within {limit:?}: {st}"),
    }
}

fn repair(site: &Site, host: &str, serving: &str, memory: &str, repaired: &'static str) -> Result<ResyncRun> {
    let t = Instant::now();
    site.try_run(&["site", "repair", "--name", &site.name, host], Duration::from_secs(600))?;
    let took = t.elapsed();
    let st = wait(site, Duration::from_secs(30), |s| s.last_sync(serving).is_some())?;
    let sync = st.last_sync(serving).context("the serving host reports no synchronisation")?;
    let field = |k: &str| sync[k].as_u64().with_context(|| format!("no {k} in {sync}"));
    let (bytes, disk_bytes, sync_s) = (field("bytes_total")?, field("disk_bytes_total")?, field("elapsed_ms")? as f64 / 1e3);
    let run = ResyncRun {
        memory: memory.to_string(),
        repaired,
        disk_copy: sync["disk_copy"].as_str().unwrap_or("?").to_string(),
        repair_to_protected_s: took.as_secs_f64(),
        bytes,
        disk_bytes,
        sync_s,
        rate_mib_per_s: bytes as f64 / f64::from(1 << 20) / sync_s.max(1e-9),
    };
    eprintln!(
        "[bench] resync {memory}, {repaired} repaired: protected again after {:.1} s; {} MiB ({} KiB of disk, {}) in {:.1} s = {:.0} MiB/s",
        run.repair_to_protected_s,
        bytes >> 20,
        disk_bytes >> 10,
        run.disk_copy,
        sync_s,
        run.rate_mib_per_s
    );
    Ok(run)
}

/// The three repairs on a fresh site with `memory` of guest RAM.
pub fn run(env: &SiteEnv, memory: &str) -> Result<Vec<ResyncRun>> {
    let mut site = Site::try_new(env.clone(), "rs")?;
    site.try_up(&["--memory", memory])?;
    // A fresh disk's record knows its past once its first synchronisation is acknowledged.
    wait(&site, Duration::from_secs(60), Status::disk_records_complete)?;
    site.try_kill("B")?;
    wait(&site, Duration::from_secs(30), |s| s.role_a == "primary" && s.role_b == "killed")?;
    let mut runs = vec![repair(&site, "B", "A", memory, "backup")?];
    site.try_kill("A")?;
    wait(&site, Duration::from_secs(30), |s| s.role_b == "primary" && s.state == "failed over")?;
    runs.push(repair(&site, "A", "B", memory, "old primary")?);
    // A replaced drive: no disk, no term.
    site.try_kill("A")?;
    wait(&site, Duration::from_secs(30), |s| s.role_b == "primary" && s.role_a == "killed")?;
    site.try_blank_disk("A")?;
    runs.push(repair(&site, "A", "B", memory, "blank disk")?);
    Ok(runs)
}

