//! A chaos run: one `ftvm site` under continuous writers on open connections, put through a
//! random sequence of failures and repairs (`cargo xtask chaos --events N --seed S`; the test
//! suite runs a short one, `tests/chaos.rs`).
//!
//! Events, each chosen among those that make sense in the site's state (the VM always has a host
//! that can serve it; a host is repaired before the other may fail):
//! - `kill-primary`: SIGKILL of the serving host's service; the other must take over;
//! - `kill-backup`: SIGKILL of the backup's service; the primary goes on alone;
//! - `repair`: a killed host's service started again; the pair must be protected again;
//! - `alink-reset`: the A-Link's TCP connection reset; the pair must be protected again;
//! - `alink-cut`: the A-Link down both ways for 0.3 to 1.5 s, then up; protected again;
//! - `witness-restart`: the witness stopped for 0.5 to 2 s, then started again with its state;
//!   protected again;
//! - `switchover`: a planned switchover (`site switchover`); the other host serves, protected
//!   again with the roles swapped.
//!
//! After each event every connection must get fresh replies within a bound. At the end every
//! acknowledged write is read back, and the business LAN's captures are checked: the guest's
//! frames may change host only at a takeover, so switches of the emitting host beyond the
//! takeovers (and switchovers) counted are moments when two hosts emitted.

use std::collections::BTreeMap;
use std::fmt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::capture::{Capture, Packet};
use crate::load::{lost_writes, Load};
use crate::rng::Rng;
use crate::site::{Site, SiteEnv, Status};
use crate::{SITE_GUEST_MAC, SITE_GUEST_MAC_TEXT};

/// A chaos run's settings.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// Where the site's binaries and logs are.
    pub env: SiteEnv,
    /// Events to survive.
    pub events: usize,
    /// The random sequence's seed (printed, so that a failing run can be repeated).
    pub seed: u64,
    /// Writer connections held open for the whole run.
    pub connections: usize,
}

/// What a chaos run survived.
#[derive(Clone, Debug, Default)]
pub struct ChaosReport {
    pub seed: u64,
    pub events_survived: usize,
    pub events: BTreeMap<&'static str, usize>,
    pub takeovers: usize,
    pub writes_checked: usize,
    pub writes_lost: usize,
    /// Connections that failed (a reset, a timeout): every one must survive.
    pub connections_failed: usize,
    /// Switches of the host emitting the guest's frames beyond the takeovers.
    pub two_host_moments: usize,
    pub time_unprotected: Duration,
    pub elapsed: Duration,
    pub longest_client_gap: Duration,
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "chaos run, seed {}: {} events survived in {:.0} s", self.seed, self.events_survived, self.elapsed.as_secs_f64())?;
        let kinds: Vec<String> = self.events.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(f, "  events: {}", kinds.join(", "))?;
        writeln!(f, "  takeovers: {}", self.takeovers)?;
        writeln!(f, "  acknowledged writes checked: {}", self.writes_checked)?;
        writeln!(f, "  writes lost: {}", self.writes_lost)?;
        writeln!(f, "  connections failed: {}", self.connections_failed)?;
        writeln!(f, "  moments when two hosts emitted guest frames: {}", self.two_host_moments)?;
        writeln!(
            f,
            "  time unprotected: {:.1} s ({:.0} %)",
            self.time_unprotected.as_secs_f64(),
            100.0 * self.time_unprotected.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
        )?;
        write!(f, "  longest client gap: {:.0} ms", self.longest_client_gap.as_secs_f64() * 1e3)
    }
}

/// Each connection's pause between requests: a long run's record of writes stays checkable.
const PACE: Duration = Duration::from_millis(20);
/// A request in flight at a failure waits for the takeover (or the witness's return).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Replies every connection must get after each event.
const REPLIES: u64 = 5;
/// Bounds of the waits after each event.
const SERVE_AGAIN: Duration = Duration::from_secs(60);
const PROTECT_AGAIN: Duration = Duration::from_secs(120);

/// Which host serves, and whether the other holds the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Roles {
    serving: Option<&'static str>,
    protected: bool,
}

fn roles(st: &Status) -> Roles {
    let serving = ["A", "B"].into_iter().find(|h| st.role(h) == "primary");
    Roles { serving, protected: st.state == "protected" }
}

fn other(host: &str) -> &'static str {
    if host == "A" {
        "B"
    } else {
        "A"
    }
}

/// The run's bookkeeping.
struct Run<'a> {
    site: &'a Site,
    load: &'a Load,
    report: ChaosReport,
    /// Since when the pair has not been protected, if it is not.
    unprotected_since: Option<Instant>,
    killed: Option<&'static str>,
}

impl Run<'_> {
    fn status(&mut self) -> Result<Status> {
        let st = self.site.try_status()?;
        let protected = roles(&st).protected;
        match (protected, self.unprotected_since) {
            (true, Some(since)) => {
                self.report.time_unprotected += since.elapsed();
                self.unprotected_since = None;
            }
            (false, None) => self.unprotected_since = Some(Instant::now()),
            _ => {}
        }
        Ok(st)
    }

    /// Polls status until `want` holds, within `limit`.
    fn wait(&mut self, what: &str, limit: Duration, want: impl Fn(&Status) -> bool) -> Result<Status> {
        let start = Instant::now();
        loop {
            let st = self.status()?;
            if want(&st) {
                return Ok(st);
            }
            if start.elapsed() > limit {
                bail!("{what}: not within {limit:?} (status: {st})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn served(&self, what: &str) -> Result<()> {
        let since = self.load.replies();
        if !self.load.wait_progress(&since, REPLIES, SERVE_AGAIN) {
            let failures: Vec<String> =
                self.load.logs().iter().filter_map(|l| l.failure.as_ref().map(|f| format!("connection {}: {f}", l.conn))).collect();
            bail!(
                "{what}: not every connection is served within {SERVE_AGAIN:?} ({:?} then {:?}; {})",
                since,
                self.load.replies(),
                if failures.is_empty() { "no connection failed".to_string() } else { failures.join("; ") }
            );
        }
        Ok(())
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("cannot run ip")?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn ftvm(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["site"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--name", &self.site.name]);
        self.site.try_run(&all, Duration::from_secs(330)).map(drop)
    }

    /// Picks the next event among those the site's state allows.
    fn pick(&self, rng: &mut Rng, now: Roles) -> &'static str {
        if self.killed.is_some() {
            return "repair";
        }
        if !now.protected {
            // Not protected with both hosts up: wait for it rather than stack failures.
            return "settle";
        }
        const EVENTS: [(&str, u64); 6] = [
            ("kill-primary", 4),
            ("kill-backup", 2),
            ("alink-reset", 2),
            ("alink-cut", 2),
            ("witness-restart", 1),
            ("switchover", 2),
        ];
        let total: u64 = EVENTS.iter().map(|e| e.1).sum();
        let mut r = rng.below(total);
        for (name, weight) in EVENTS {
            if r < weight {
                return name;
            }
            r -= weight;
        }
        "kill-primary"
    }

    /// One event and the waits that check the site came through it.
    fn event(&mut self, name: &'static str, rng: &mut Rng, before: Roles) -> Result<()> {
        let serving = before.serving.context("no host serves")?;
        match name {
            "kill-primary" => {
                self.site.try_kill(serving)?;
                self.killed = Some(serving);
                let by = other(serving);
                self.wait(&format!("{by} takes over"), SERVE_AGAIN, |s| s.role(by) == "primary" && s.state == "failed over")?;
                self.report.takeovers += 1;
            }
            "kill-backup" => {
                let backup = other(serving);
                self.site.try_kill(backup)?;
                self.killed = Some(backup);
            }
            "repair" => {
                let host = self.killed.take().context("nothing to repair")?;
                self.ftvm(&["repair", host])?;
            }
            "alink-reset" => {
                let ns = self.site.netns(&other(serving).to_ascii_lowercase());
                self.ip(&["netns", "exec", &ns, "ss", "-K", "sport = :7700"])?;
            }
            "alink-cut" => {
                let down_for = rng.duration(Duration::from_millis(300), Duration::from_millis(1500));
                for h in ["a", "b"] {
                    self.ip(&["-n", &self.site.netns(h), "link", "set", "alink0", "down"])?;
                }
                std::thread::sleep(down_for);
                for h in ["a", "b"] {
                    self.ip(&["-n", &self.site.netns(h), "link", "set", "alink0", "up"])?;
                }
            }
            "witness-restart" => {
                let down_for = rng.duration(Duration::from_millis(500), Duration::from_millis(2000));
                self.ftvm(&["kill", "witness"])?;
                std::thread::sleep(down_for);
                self.ftvm(&["repair", "witness"])?;
            }
            "switchover" => {
                self.ftvm(&["switchover"])?;
                let to = other(serving);
                self.wait(&format!("{to} serves after the switchover"), SERVE_AGAIN, |s| s.role(to) == "primary")?;
                self.report.takeovers += 1;
            }
            "settle" => {}
            other => bail!("unknown event {other}"),
        }
        self.served(&format!("after {name}"))?;
        if self.killed.is_none() {
            // Every failure the pair survives with both hosts up ends protected, the roles as
            // the rules give them.
            let st = self.wait(&format!("protected again after {name}"), PROTECT_AGAIN, |s| roles(s).protected)?;
            let after = roles(&st);
            if after.serving != before.serving && !matches!(name, "repair" | "switchover") {
                // A cut A-Link can move the VM (the backup took over and the primary was
                // fenced): a takeover too.
                self.report.takeovers += 1;
            }
        }
        Ok(())
    }
}

/// The captures of the guest's frames on the business LAN, one per host's bridge port, and of the
/// clients' side of their connections; the files stay in `dir` when the run fails.
struct Captures {
    a: Capture,
    b: Capture,
    client: Capture,
    dir: std::path::PathBuf,
}

/// How many times the host emitting the guest's frames changed.
fn emitter_switches(a: &[Packet], b: &[Packet]) -> usize {
    let guest = |p: &&Packet| p.src_mac() == Some(SITE_GUEST_MAC);
    let mut frames: Vec<(u64, bool)> = a.iter().filter(guest).map(|p| (p.t_ns, true)).collect();
    frames.extend(b.iter().filter(guest).map(|p| (p.t_ns, false)));
    frames.sort_unstable();
    frames.windows(2).filter(|w| w[0].1 != w[1].1).count()
}

/// Runs the chaos sequence on a fresh site; the site is removed at the end (its logs kept under
/// the environment's logs directory when the run fails).
pub fn run(cfg: &ChaosConfig) -> Result<ChaosReport> {
    let mut site = Site::try_new(cfg.env.clone(), "chaos")?;
    let result = run_on(&mut site, cfg);
    if result.is_err() {
        let kept = site.save_logs();
        eprintln!("[chaos] the site's logs are kept in {}", kept.display());
        if std::env::var_os("FTVM_CHAOS_KEEP_SITE").is_some() {
            // For a post-mortem on the live site: `ftvm site down --name <name>` removes it.
            eprintln!("[chaos] FTVM_CHAOS_KEEP_SITE: site {} is left up", site.name);
            std::mem::forget(site);
        }
    }
    result
}

fn run_on(site: &mut Site, cfg: &ChaosConfig) -> Result<ChaosReport> {
    site.try_up(&[])?;
    let site: &Site = site;
    let dir = std::env::temp_dir().join(format!("ftvm-chaos-captures-{}", site.name));
    std::fs::create_dir_all(&dir)?;
    let lan = site.netns("lan");
    let filter = format!("ether src {SITE_GUEST_MAC_TEXT}");
    let caps = Captures {
        a: Capture::start(&lan, "a0", &filter, &dir, "lan-a"),
        b: Capture::start(&lan, "b0", &filter, &dir, "lan-b"),
        client: Capture::start(&site.netns("client"), "eth0", "tcp port 6379", &dir, "client"),
        dir: dir.clone(),
    };
    let result = run_with(site, cfg, caps);
    if result.is_err() {
        eprintln!("[chaos] the captures are kept in {}", dir.display());
    }
    result
}

fn run_with(site: &Site, cfg: &ChaosConfig, caps: Captures) -> Result<ChaosReport> {
    // Bounded by the run itself: a few minutes per ten events at most.
    let limit = Duration::from_secs(600 + 60 * cfg.events as u64);
    let load = Load::start_paced(&site.netns("client"), cfg.connections, READ_TIMEOUT, PACE, limit);
    let started = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let mut run = Run { site, load: &load, report: ChaosReport { seed: cfg.seed, ..ChaosReport::default() }, unprotected_since: None, killed: None };
    run.served("at the start")?;
    let mut done = 0;
    while done < cfg.events {
        let st = run.status()?;
        let now = roles(&st);
        let name = run.pick(&mut rng, now);
        let t = Instant::now();
        run.event(name, &mut rng, now).with_context(|| format!("event {} ({name}), seed {}", done + 1, cfg.seed))?;
        if name != "settle" {
            done += 1;
            *run.report.events.entry(name).or_default() += 1;
            eprintln!("[chaos] event {done}/{}: {name} ({:.1} s)", cfg.events, t.elapsed().as_secs_f64());
        }
    }
    if run.killed.is_some() {
        // End with the pair whole, as the run began.
        let now = roles(&run.status()?);
        run.event("repair", &mut rng, now)?;
    }
    run.status()?;
    let mut report = run.report;
    report.events_survived = done;
    if let Some(since) = run.unprotected_since {
        report.time_unprotected += since.elapsed();
    }
    report.elapsed = started.elapsed();
    let logs = load.stop();
    report.connections_failed = logs.iter().filter(|l| l.failure.is_some() || !l.anomalies.is_empty()).count();
    for l in logs.iter().filter(|l| l.failure.is_some() || !l.anomalies.is_empty()) {
        eprintln!("[chaos] connection {}: {:?} {:?}", l.conn, l.failure, l.anomalies);
    }
    report.longest_client_gap = logs.iter().map(|l| l.longest_gap).max().unwrap_or_default();
    report.writes_checked = logs.iter().map(|l| l.sets.len() + l.counters.len()).sum();
    let lost = lost_writes(&site.netns("client"), &logs);
    for problem in lost.iter().take(10) {
        eprintln!("[chaos] {problem}");
    }
    report.writes_lost = lost.len();
    let (a, dropped_a) = caps.a.stop();
    let (b, dropped_b) = caps.b.stop();
    let _ = caps.client.stop();
    let _ = std::fs::remove_dir_all(&caps.dir);
    if dropped_a + dropped_b > 0 {
        bail!("the captures dropped {} frames: the emission check cannot be trusted", dropped_a + dropped_b);
    }
    report.two_host_moments = emitter_switches(&a, &b).saturating_sub(report.takeovers);
    Ok(report)
}
