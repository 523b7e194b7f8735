//! Planned switchovers under writers on open connections: for each, the time the VM's new host
//! took from the handover to the resumed guest (its status' takeover figure), the time until the
//! pair was protected again (the old primary re-synchronised as the new backup), and over all of
//! them the longest gap a client saw between two replies.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use ftvm_system_tests::load::{lost_writes, Load};
use ftvm_system_tests::site::{Site, SiteEnv};

/// One switchover.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchoverRun {
    pub from: String,
    pub to: String,
    /// From the handover to the guest resumed on the new host.
    pub handover_to_resumed_ms: Option<f64>,
    /// From `site switchover` to the pair protected again.
    pub to_protected_s: f64,
}

/// The switchovers of one site.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchoverReport {
    pub runs: Vec<SwitchoverRun>,
    pub connections: usize,
    pub longest_client_gap_ms: f64,
    pub writes_checked: usize,
    pub writes_lost: usize,
}

/// `count` switchovers, back and forth, on a fresh site under `connections` writers.
pub fn run(env: &SiteEnv, count: usize, connections: usize) -> Result<SwitchoverReport> {
    let mut site = Site::try_new(env.clone(), "so")?;
    site.try_up(&[])?;
    let load = Load::start_paced(&site.netns("client"), connections, Duration::from_secs(30), Duration::from_millis(2), Duration::from_secs(600));
    let mut runs = Vec::new();
    for _ in 0..count {
        let st = site.try_status()?;
        let from = if st.role_a == "primary" { "A" } else { "B" };
        let to = if from == "A" { "B" } else { "A" };
        let t = Instant::now();
        site.try_run(&["site", "switchover", "--name", &site.name], Duration::from_secs(330))?;
        let to_protected = t.elapsed();
        let st = site.try_status()?;
        let handover_to_resumed_ms = st.detail(to).and_then(|d| d["takeover_ms"].as_f64());
        let since = load.replies();
        if !load.wait_progress(&since, 10, Duration::from_secs(30)) {
            bail!("the writers are not served after the switchover to {to}");
        }
        eprintln!(
            "[bench] switchover {from} → {to}: guest resumed {:.1} ms after the handover; protected again after {:.1} s",
            handover_to_resumed_ms.unwrap_or(f64::NAN),
            to_protected.as_secs_f64()
        );
        runs.push(SwitchoverRun { from: from.into(), to: to.into(), handover_to_resumed_ms, to_protected_s: to_protected.as_secs_f64() });
    }
    let logs = load.stop();
    if let Some(l) = logs.iter().find(|l| l.failure.is_some()) {
        bail!("connection {} failed across the switchovers: {:?}", l.conn, l.failure);
    }
    let lost = lost_writes(&site.netns("client"), &logs);
    Ok(SwitchoverReport {
        runs,
        connections,
        longest_client_gap_ms: logs.iter().map(|l| l.longest_gap).max().unwrap_or_default().as_secs_f64() * 1e3,
        writes_checked: logs.iter().map(|l| l.sets.len() + l.counters.len()).sum(),
        writes_lost: lost.len(),
    })
}
