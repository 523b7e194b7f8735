//! The pause against dirty pages: for each dirty tracker and checkpoint copy, a protected pair
//! whose guest dirties a set number of pages per epoch (`FTVM.LOAD`), and the primary's own
//! figures over its last epochs (pause, copy in and after it, harvest, dirty pages per epoch,
//! link bytes per dirty byte).
//!
//! Each point gets a fresh site: the primary's window of recent epochs (the last 1024) would
//! otherwise mix loads for minutes at these epoch lengths. Early checkpoints for dirty pages are
//! off (`--dirty-send-budget-us 0`) so that every loaded epoch lasts the interval asked for, and
//! nothing talks to the guest while the load runs (a reply would force a short epoch). The
//! epochs from before the load (the site's start, the `FTVM.LOAD` reply) stay in the window:
//! the point waits until the loaded ones outnumber them at least nine to one, and until the
//! window holds at least [`DEFAULT_WINDOW_EPOCHS`] epochs, so that its p99 is not simply its
//! largest epoch: the start of the load is one epoch far above the others (the guest allocates
//! and clears its dirtying region, [`GUEST_DIRTY_REGION_PAGES`], and the engine's staging buffer grows), and the
//! 99th percentile of 200 leaves out exactly the largest. Both counts are reported. The wait is
//! bounded in epochs (the window's 1024) and in time.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use ftvm_system_tests::site::{Site, SiteEnv};

use crate::resp::{Conn, Reply};

/// The guest's dirtying load cycles through this many pages (`site up --dirty-region-pages`), so
/// no epoch dirties more distinct pages: 64 MiB, room for the largest target.
pub const GUEST_DIRTY_REGION_PAGES: u64 = 16_384;
/// Fastest load asked of the guest: each first write to a page costs it 6–8 µs here, so beyond
/// ~120 pages/ms it cannot keep up and the figure would be the guest's limit, not the target.
const MAX_PAGES_PER_MS: u64 = 100;
/// Epoch lengths tried, shortest first: the shortest that reaches the target at an achievable rate.
const EPOCH_US: [u64; 3] = [50_000, 100_000, 200_000];
/// Loaded epochs a point waits for at least.
const MIN_LOADED_EPOCHS: u64 = 20;
/// Loaded epochs per epoch from before the load that the window must hold.
const LOADED_PER_EARLIER: u64 = 9;
/// Epochs the window must hold before it is read (see the module's comment).
pub const DEFAULT_WINDOW_EPOCHS: u64 = 200;
/// The primary's window holds this many epochs at most (`EpochWindow::LEN`): waiting for more
/// would never end.
const WINDOW_LEN: u64 = 1024;

/// The tracker × copy combinations that work here (copy-on-write is refused with userfaultfd).
pub const COMBOS: [(&str, &str); 5] = [("bitmap", "stop"), ("bitmap", "cow"), ("ring", "stop"), ("ring", "cow"), ("uffd", "stop")];
/// Target dirty pages per epoch.
pub const TARGETS: [u64; 3] = [100, 1_000, 10_000];

/// The epoch interval (µs) and load (pages per ms) for about `target` dirty pages per epoch: the
/// shortest interval whose rate stays achievable, else the longest at the fastest rate.
pub fn plan(target: u64) -> (u64, u64) {
    for e in EPOCH_US {
        let rate = (target * 1000).div_ceil(e).max(1);
        if rate <= MAX_PAGES_PER_MS {
            return (e, rate);
        }
    }
    (EPOCH_US[EPOCH_US.len() - 1], MAX_PAGES_PER_MS)
}

/// The primary's `recent` in its status (microseconds, `[p50, p99]`), as `PrimaryStatus` writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recent {
    pub epochs: u64,
    pub pause_us: [u64; 2],
    pub pause_wait_us: [u64; 2],
    pub harvest_us: [u64; 2],
    pub state_us: [u64; 2],
    pub copy_us: [u64; 2],
    #[serde(default)]
    pub copy_after_resume_us: [u64; 2],
    pub resume_us: [u64; 2],
    pub send_us: [u64; 2],
    pub ack_us: [u64; 2],
    pub dirty_pages_p50: u64,
}

/// What the sweep reads of the primary's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrimaryFigures {
    pub epochs_committed: u64,
    #[serde(default)]
    pub epochs_per_sec: Option<f64>,
    #[serde(default)]
    pub link_per_dirty_byte: Option<f64>,
    pub recent: Recent,
    /// Counts of checkpoints by cause, the copy used, the dirty bound and the link's rate.
    #[serde(default)]
    pub checkpoints: serde_json::Value,
}

/// The primary's figures in `ftvm site status --json` (the host whose role is `primary`).
pub fn primary_figures(site_status: &serde_json::Value) -> Result<PrimaryFigures> {
    let hosts = site_status["hosts"].as_array().context("site status has no hosts")?;
    let primary = hosts
        .iter()
        .find(|h| h["role"] == "primary")
        .with_context(|| format!("no primary in site status (state {})", site_status["state"]))?;
    let detail = primary.get("detail").filter(|d| !d.is_null()).context("the primary reports no status")?;
    PrimaryFigures::deserialize(detail).context("the primary's status lacks the epoch figures")
}

/// One point of the sweep.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PausePoint {
    pub tracker: String,
    pub copy: String,
    pub epoch_us: u64,
    /// `FTVM.LOAD`: pages the guest dirtied per millisecond.
    pub load_pages_per_ms: u64,
    pub target_dirty_pages: u64,
    /// Measured: the median of the window's epochs.
    pub dirty_pages_p50: u64,
    /// Epochs under the load in the window (at least), and all epochs the window's figures cover.
    pub loaded_epochs: u64,
    pub window_epochs: u64,
    pub pause_us: [u64; 2],
    pub copy_us: [u64; 2],
    pub copy_after_resume_us: [u64; 2],
    pub harvest_us: [u64; 2],
    pub link_per_dirty_byte: Option<f64>,
    pub epochs_per_sec: Option<f64>,
    /// The primary's whole `recent` (the pause's other parts, send, acknowledgement).
    pub recent: Recent,
    pub checkpoints: serde_json::Value,
    /// Why the point has no figures (the sweep goes on with the next one).
    pub error: Option<String>,
}

/// The sweep's settings.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub env: SiteEnv,
    pub combos: Vec<(String, String)>,
    pub targets: Vec<u64>,
    /// Epochs the window must hold before it is read ([`DEFAULT_WINDOW_EPOCHS`]; fewer only for
    /// a quick try, whose p99 is then the window's largest epoch).
    pub window_epochs: u64,
}

/// Runs every combination × target, a fresh site each; a point that fails is recorded with its
/// error and the sweep goes on.
pub fn run(cfg: &SweepConfig) -> Vec<PausePoint> {
    let mut points = Vec::new();
    for (tracker, copy) in &cfg.combos {
        for &target in &cfg.targets {
            let (epoch_us, rate) = plan(target);
            let mut p = PausePoint {
                tracker: tracker.clone(),
                copy: copy.clone(),
                epoch_us,
                load_pages_per_ms: rate,
                target_dirty_pages: target,
                ..PausePoint::default()
            };
            let t = Instant::now();
            if let Err(e) = measure(&cfg.env, cfg.window_epochs, &mut p) {
                eprintln!("[bench] pause sweep {tracker}/{copy} target {target}: {e:#}");
                p.error = Some(format!("{e:#}"));
            } else {
                eprintln!(
                    "[bench] pause sweep {tracker}/{copy} {rate} pages/ms × {} ms: {} dirty pages p50, pause p50 {} µs p99 {} µs ({} of {} epochs loaded, {:.1} s)",
                    epoch_us / 1000,
                    p.dirty_pages_p50,
                    p.pause_us[0],
                    p.pause_us[1],
                    p.loaded_epochs,
                    p.window_epochs,
                    t.elapsed().as_secs_f64()
                );
            }
            points.push(p);
        }
    }
    points
}

/// One point on a fresh site (taken down on every path when the guard drops).
fn measure(env: &SiteEnv, window_epochs: u64, p: &mut PausePoint) -> Result<()> {
    let mut site = Site::try_new(env.clone(), "ps")?;
    let epoch = p.epoch_us.to_string();
    let region = GUEST_DIRTY_REGION_PAGES.to_string();
    site.try_up(&[
        "--dirty-region-pages",
        &region,
        "--epoch-us",
        &epoch,
        "--dirty-send-budget-us",
        "0",
        "--dirty-tracker",
        &p.tracker,
        "--checkpoint-copy",
        &p.copy,
    ])?;
    let mut conn = Conn::connect_in_netns(&site.netns("client"), Duration::from_secs(10))?;
    match conn.cmd(&["FTVM.LOAD", &p.load_pages_per_ms.to_string()])? {
        Reply::Status(s) if s == "OK" => {}
        other => bail!("FTVM.LOAD: unexpected reply {other:?}"),
    }
    // The reply came after its checkpoint was acknowledged: every epoch committed from here on ran
    // under the load. The window holds every epoch since the pair was protected (far fewer than
    // its 1024), and its figures are refreshed only every 250 ms or so, so the epochs committed
    // (counted at once) bound the earlier epochs it holds from above.
    let before = primary_figures(&site.try_status()?.json)?;
    let earlier = before.epochs_committed.max(before.recent.epochs);
    let loaded = (earlier * LOADED_PER_EARLIER).max(MIN_LOADED_EPOCHS);
    let want = (earlier + loaded).max(window_epochs).min(WINDOW_LEN);
    // Twice the epochs' time, and room for the status calls on a busy machine.
    let patience = Duration::from_micros(2 * want.saturating_sub(earlier) * p.epoch_us) + Duration::from_secs(10);
    let deadline = Instant::now() + patience;
    let mut now = before.clone();
    while now.recent.epochs < want {
        if Instant::now() > deadline {
            bail!(
                "the window held {} epochs of {want} after {patience:?} ({} committed under the load; state {})",
                now.recent.epochs,
                now.epochs_committed.saturating_sub(before.epochs_committed),
                site.try_status()?.state
            );
        }
        std::thread::sleep(Duration::from_micros(p.epoch_us * 5).min(Duration::from_millis(500)));
        now = primary_figures(&site.try_status()?.json)?;
    }
    p.loaded_epochs = now.recent.epochs.saturating_sub(earlier);
    p.window_epochs = now.recent.epochs;
    p.dirty_pages_p50 = now.recent.dirty_pages_p50;
    p.pause_us = now.recent.pause_us;
    p.copy_us = now.recent.copy_us;
    p.copy_after_resume_us = now.recent.copy_after_resume_us;
    p.harvest_us = now.recent.harvest_us;
    p.link_per_dirty_byte = now.link_per_dirty_byte;
    p.epochs_per_sec = now.epochs_per_sec;
    p.checkpoints = now.checkpoints.clone();
    p.recent = now.recent;
    if p.checkpoints["copy"].as_str().is_some_and(|c| c != p.copy) {
        bail!("asked for --checkpoint-copy {} and the primary reports {}", p.copy, p.checkpoints["copy"]);
    }
    Ok(())
}

/// The sweep as a table for the printed summary.
pub fn table(points: &[PausePoint]) -> String {
    if points.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "\npause against dirty pages (µs p50/p99; a fresh site per point, no early checkpoint for dirty pages)\n{:<12} {:>7} {:>8} {:>7} {:>13} {:>13} {:>13} {:>11} {:>7}\n",
        "tracker/copy", "epoch", "target", "dirty", "pause", "copy", "copy after", "harvest", "link/B"
    );
    let pair = |v: [u64; 2]| format!("{}/{}", v[0], v[1]);
    for p in points {
        let combo = format!("{}/{}", p.tracker, p.copy);
        if let Some(e) = &p.error {
            let first = e.lines().next().unwrap_or_default();
            s += &format!("{combo:<12} {:>5}ms {:>8} failed: {first}\n", p.epoch_us / 1000, p.target_dirty_pages);
            continue;
        }
        s += &format!(
            "{combo:<12} {:>5}ms {:>8} {:>7} {:>13} {:>13} {:>13} {:>11} {:>7}\n",
            p.epoch_us / 1000,
            p.target_dirty_pages,
            p.dirty_pages_p50,
            pair(p.pause_us),
            pair(p.copy_us),
            pair(p.copy_after_resume_us),
            pair(p.harvest_us),
            p.link_per_dirty_byte.map_or("-".to_string(), |l| format!("{l:.2}")),
        );
    }
    if points.iter().any(|p| p.target_dirty_pages > GUEST_DIRTY_REGION_PAGES) {
        s += &format!(
            "(the guest's dirtying region holds {GUEST_DIRTY_REGION_PAGES} pages: no epoch dirties more distinct pages)\n"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_reach_the_target_at_an_achievable_rate() {
        assert_eq!(plan(100), (50_000, 2));
        assert_eq!(plan(1_000), (50_000, 20));
        assert_eq!(plan(10_000), (100_000, 100));
        assert_eq!(plan(0), (50_000, 1));
        assert_eq!(plan(1), (50_000, 1));
        assert_eq!(plan(u64::MAX / 2000), (200_000, MAX_PAGES_PER_MS));
    }

    fn status(primary: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "state": "protected",
            "hosts": [
                { "name": "A", "role": "backup", "detail": { "role": "standby" } },
                { "name": "B", "role": "primary", "detail": primary },
            ]
        })
    }

    #[test]
    fn reads_the_primary_wherever_it_runs() {
        let pair = |a: u64, b: u64| serde_json::json!([a, b]);
        let s = status(serde_json::json!({
            "epochs_committed": 69, "epochs_per_sec": 19.9, "link_per_dirty_byte": 1.0,
            "checkpoints": { "copy": "cow", "at_interval": 61 },
            "recent": {
                "epochs": 67, "pause_us": pair(335, 12632), "pause_wait_us": pair(1, 2),
                "harvest_us": pair(15, 303), "state_us": pair(1, 2), "copy_us": pair(86, 12117),
                "copy_after_resume_us": pair(779, 4686), "resume_us": pair(1, 2),
                "send_us": pair(1, 2), "ack_us": pair(1, 2), "dirty_pages_p50": 1034
            }
        }));
        let f = primary_figures(&s).unwrap();
        assert_eq!((f.epochs_committed, f.recent.epochs, f.recent.dirty_pages_p50), (69, 67, 1034));
        assert_eq!(f.recent.copy_after_resume_us, [779, 4686]);
        assert_eq!(f.checkpoints["copy"], "cow");
    }

    #[test]
    fn missing_figures_are_errors() {
        assert!(primary_figures(&serde_json::json!({})).is_err());
        assert!(primary_figures(&serde_json::json!({ "hosts": [] })).is_err());
        assert!(primary_figures(&status(serde_json::Value::Null)).is_err());
        assert!(primary_figures(&status(serde_json::json!({ "epochs_committed": 3 }))).is_err());
        let e = primary_figures(&status(serde_json::json!({ "epochs_committed": "x", "recent": {} })));
        assert!(format!("{:#}", e.unwrap_err()).contains("epoch figures"));
    }

    #[test]
    fn table_shows_points_and_failures() {
        let ok = PausePoint {
            tracker: "ring".into(),
            copy: "cow".into(),
            epoch_us: 100_000,
            target_dirty_pages: 20_000,
            dirty_pages_p50: 4100,
            pause_us: [300, 900],
            ..PausePoint::default()
        };
        let bad = PausePoint { error: Some("site up failed\nstderr: ...".into()), ..ok.clone() };
        let t = table(&[ok, bad]);
        assert!(t.contains("ring/cow") && t.contains("300/900") && t.contains("4100"));
        assert!(t.contains("failed: site up failed") && !t.contains("stderr"));
        assert!(t.contains("region holds 16384 pages"), "a target past the region is explained");
        assert_eq!(table(&[]), "");
    }
}
