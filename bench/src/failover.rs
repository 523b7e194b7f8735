//! Failover benchmark: a fresh `ftvm site` per repetition, K client connections looping INCR on
//! their own key, host A (the primary) SIGKILLed at a random moment, and what the clients and B saw.
//!
//! Per repetition it measures, from the SIGKILL instant (taken by this process right before it
//! sends SIGKILL to A's pid from the site's state file):
//! - the first reply served by B on any connection, and the moment every connection has had one;
//! - the longest gap between consecutive replies a connection saw from the kill on;
//! - what B reports: `takeover_ms` in `ftvm site status --json`, and its `PromotionTimings` log
//!   line (detection, restore, resume), including when B logged that the restored guest runs.
//!
//! A failed repetition (site up failing, a connection reset, no reply within the bound) is recorded
//! with its reason and the next one runs; nothing here panics on the site's behaviour. Every site is
//! taken down by a guard on every path, after its logs are copied to
//! `/tmp/ftvm-bench-logs/<site>/`.
//!
//! The pure parts (per-connection analysis, statistics, log parsing) are unit-tested below.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use ftvm_system_tests::rng::Rng;
use ftvm_system_tests::site::{Site, SiteEnv};
use ftvm_system_tests::{try_enter_netns, GUEST_IP, KV_PORT};

/// The product target: SIGKILL of the primary to serving on B.
pub const TARGET_MS: f64 = 50.0;
/// How the target is judged (written into the results).
pub const TARGET_RULE: &str =
    "met when every repetition succeeded and the slowest repetition's SIGKILL→first reply from B is ≤ target_ms";

/// The kill lands this long after the load started, drawn uniformly per repetition.
const KILL_AFTER_MIN: Duration = Duration::from_millis(500);
const KILL_AFTER_MAX: Duration = Duration::from_secs(2);
/// After the kill the load goes on at least this long (to see gaps after the takeover too) and
/// until every connection has had `POST_KILL_B_REPLIES` replies from B, but at most `POST_KILL_MAX`.
const POST_KILL_MIN: Duration = Duration::from_secs(1);
const POST_KILL_B_REPLIES: u64 = 20;
const POST_KILL_MAX: Duration = Duration::from_secs(15);
/// A connection's loop never runs longer than this, whatever happens to the main thread.
const LOAD_HARD_LIMIT: Duration = Duration::from_secs(60);
/// The socket read timeout: only a poll interval (to notice the stop flag and the hard limit); a
/// request waiting on the failover is never abandoned or resent by us (TCP retransmits it).
const READ_POLL: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long B may take until status says "failed over" with a takeover time.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the benchmark copies its sites' logs (`<dir>/<site>/`).
pub const LOGS_DIR: &str = "/tmp/ftvm-bench-logs";
/// The environment variable that replays the kill moments of a run.
pub const SEED_VAR: &str = "FTVM_BENCH_SEED";

/// What to run.
#[derive(Clone, Debug)]
pub struct FailoverConfig {
    /// The `ftvm` binary (a release build).
    pub ftvm: PathBuf,
    /// The guest ELF.
    pub guest: PathBuf,
    pub repetitions: u32,
    /// Client connections held open across each failover.
    pub connections: usize,
    /// Seed of the kill moments.
    pub seed: u64,
}

// ---------------------------------------------------------------------------------------------
// Pure parts: per-connection analysis, statistics, log parsing.

/// One request and its reply on a connection, as offsets from the load start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// Just before the request was written.
    pub sent: Duration,
    /// Just after its reply was read.
    pub received: Duration,
}

/// What one connection saw around the kill. Times in ms from the SIGKILL.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConnFigures {
    pub conn: usize,
    pub replies_before_kill: u64,
    pub replies_after_kill: u64,
    /// Replies served by B (see [`analyze_connection`]).
    pub replies_from_b: u64,
    /// The first reply received after the SIGKILL, whoever served it (a reply A released just
    /// before dying may still be on its way).
    pub first_reply_after_kill_ms: Option<f64>,
    /// The first reply served by B: see [`analyze_connection`].
    pub first_b_reply_ms: Option<f64>,
    /// The first reply to a request sent after the SIGKILL (B's by the first rule alone; a
    /// cross-check that does not depend on B's log).
    pub first_post_kill_request_reply_ms: Option<f64>,
    /// The longest gap between consecutive replies among those ending after the kill (the load
    /// start counts as a reply). If B never answered this connection, the gap is left open until
    /// the end of the observation (a lower bound).
    pub longest_gap_ms: Option<f64>,
    /// When that gap ended, from the kill.
    pub longest_gap_end_ms: Option<f64>,
    /// When it began, from the kill (negative: before the kill). A long gap that began after the
    /// kill followed a reply the primary released just before dying: the connection's next
    /// request went to the dead primary, and only the client's retransmission could bring it to B.
    pub longest_gap_start_ms: Option<f64>,
    /// INCR replies that were not the previous reply + 1 (a lost or repeated write).
    pub incr_anomalies: u64,
    /// Why the connection stopped early (reset, close, error reply, no reply in time).
    pub failure: Option<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Analyses one connection's exchanges against the SIGKILL instant `kill`, with B's resume instant
/// `b_resumed` when known; `end` is when the observation stopped (all offsets from the load start).
///
/// Which reply was served by B. Not simply the first reply after the SIGKILL: a reply to a request
/// in flight at the kill may have been released by A just before it died (output commit: B had
/// acknowledged its epoch, the frame was already on the wire) and would make the failover look
/// instantaneous. A reply counts as B's when either
/// - its request was *sent* after the SIGKILL: A cannot have answered it, since A would have had
///   to run an epoch and get it acknowledged first, far longer than SIGKILL takes to land; or
/// - it arrived after B resumed the guest (B's log line, same machine clock, written just after
///   the vCPUs start, so a little late if anything): a frame A released before dying does not
///   spend that long (tens of ms) on a veth and a bridge.
///
/// The first rule alone would overstate the takeover by one round trip on B whenever the in-flight
/// request was answered by B (the loop sends its next request only then), and the first round
/// trip on a just-resumed guest can take several ms; the second rule catches that reply.
pub fn analyze_connection(
    conn: usize,
    exchanges: &[Exchange],
    kill: Duration,
    b_resumed: Option<Duration>,
    end: Duration,
) -> ConnFigures {
    let by_b = |e: &Exchange| e.sent >= kill || b_resumed.is_some_and(|r| e.received >= r);
    let since_kill = |e: &Exchange| ms(e.received - kill);
    let mut f = ConnFigures {
        conn,
        ..Default::default()
    };
    for e in exchanges {
        if e.received < kill {
            f.replies_before_kill += 1;
        } else {
            f.replies_after_kill += 1;
        }
        if by_b(e) {
            f.replies_from_b += 1;
        }
    }
    f.first_reply_after_kill_ms = exchanges
        .iter()
        .find(|e| e.received >= kill)
        .map(since_kill);
    f.first_b_reply_ms = exchanges.iter().find(|e| by_b(e)).map(since_kill);
    f.first_post_kill_request_reply_ms = exchanges.iter().find(|e| e.sent >= kill).map(since_kill);
    let mut points: Vec<Duration> = std::iter::once(Duration::ZERO)
        .chain(exchanges.iter().map(|e| e.received))
        .collect();
    if f.first_b_reply_ms.is_none() {
        points.push(end.max(kill));
    }
    let longest = points
        .windows(2)
        .filter(|w| w[1] > kill)
        .map(|w| (w[1].saturating_sub(w[0]), w[1]))
        .max_by_key(|&(gap, _)| gap);
    if let Some((gap, gap_end)) = longest {
        f.longest_gap_ms = Some(ms(gap));
        f.longest_gap_end_ms = Some(ms(gap_end.saturating_sub(kill)));
        f.longest_gap_start_ms = Some(ms(gap_end - gap) - ms(kill));
    }
    f
}

/// Checks that consecutive INCR replies on one key go up by one; returns how many did not.
pub fn incr_anomalies(values: &[i64]) -> u64 {
    values.windows(2).filter(|w| w[1] != w[0] + 1).count() as u64
}

/// Minimum, median and maximum of a set of figures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for an empty set; NaNs are ignored.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            n,
            min: v[0],
            median,
            max: v[n - 1],
        })
    }
}

/// Parses a `Duration`'s `Debug` text: `250.084ms`, `437.671µs`, `1.5s`, `900ns`.
pub fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = s.strip_suffix("µs").or_else(|| s.strip_suffix("us")) {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v * scale))
}

/// Removes ANSI colour sequences (`ESC [ ... letter`), which tracing writes to the hosts' logs.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// B's `PromotionTimings` log line, parsed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PromotionLog {
    /// The epoch B restored.
    pub epoch: Option<u64>,
    /// Every duration of the line in ms, nested names joined by dots (`last_frame_to_dead`,
    /// `restore.total`, `dead_to_resumed`, …).
    pub ms: BTreeMap<String, f64>,
    /// The line's own timestamp (B logs it right after starting the restored guest's vCPUs), as
    /// seconds since the Unix epoch.
    pub logged_at_unix: Option<f64>,
    /// Frames of guest input the dead primary had taken in after that epoch, given to the
    /// restored VM (`ingress_replayed`; none from builds before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_replayed: Option<u64>,
}

#[derive(Debug, PartialEq)]
enum Token<'a> {
    Word(&'a str),
    Punct(char),
}

fn tokenize(s: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices() {
        let punct = matches!(c, '{' | '}' | '(' | ')' | ',' | ':');
        if punct || c.is_whitespace() {
            if let Some(st) = start.take() {
                out.push(Token::Word(&s[st..i]));
            }
            if punct {
                out.push(Token::Punct(c));
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(st) = start {
        out.push(Token::Word(&s[st..]));
    }
    out
}

/// Parses the last `PromotionTimings { … }` line of a host log (ANSI colours allowed).
pub fn parse_promotion_log(log: &str) -> Option<PromotionLog> {
    let line = strip_ansi(
        log.lines()
            .rev()
            .find(|l| l.contains("PromotionTimings {"))?,
    );
    let body = &line[line.find("PromotionTimings {")? + "PromotionTimings {".len()..];
    let toks = tokenize(body);
    let mut p = PromotionLog {
        logged_at_unix: line.split_whitespace().next().and_then(parse_rfc3339_utc),
        ..Default::default()
    };
    let mut path: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match (&toks[i], toks.get(i + 1)) {
            (Token::Word(key), Some(Token::Punct(':'))) => {
                let name = path
                    .iter()
                    .chain(std::iter::once(key))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(".");
                match (toks.get(i + 2), toks.get(i + 3), toks.get(i + 4)) {
                    // `restore: RestoreTimings { … }`
                    (Some(Token::Word(_)), Some(Token::Punct('{')), _) => {
                        path.push(key);
                        i += 4;
                    }
                    // `epoch: EpochId(170)`
                    (Some(Token::Word(_)), Some(Token::Punct('(')), Some(Token::Word(v))) => {
                        if *key == "epoch" && path.is_empty() {
                            p.epoch = v.parse().ok();
                        }
                        i += 5;
                    }
                    (Some(Token::Word(v)), _, _) => {
                        if let Some(d) = parse_debug_duration(v) {
                            p.ms.insert(name, ms(d));
                        } else if name == "ingress_replayed" {
                            p.ingress_replayed = v.parse().ok();
                        }
                        i += 3;
                    }
                    _ => i += 2,
                }
            }
            (Token::Punct('}'), _) => {
                if path.pop().is_none() {
                    break;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    (!p.ms.is_empty()).then_some(p)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `2026-11-26T11:02:53.304235Z` (tracing's UTC timestamps) to seconds since the epoch.
pub fn parse_rfc3339_utc(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || !(0..24).contains(&h)
        || !(0..60).contains(&mi)
    {
        return None;
    }
    Some((days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60) as f64 + sec)
}

// ---------------------------------------------------------------------------------------------
// Results.

/// One repetition.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverRun {
    pub site: String,
    pub ok: bool,
    /// Why the repetition failed (its figures, where measured, are kept but not summarised).
    pub error: Option<String>,
    /// The planned kill moment, from the load start.
    pub kill_after_load_ms: f64,
    /// The actual one (after a last status check).
    pub kill_at_load_ms: Option<f64>,
    /// The SIGKILL, as Unix time (to find it in the hosts' logs).
    pub kill_unix: Option<f64>,
    /// How long the kill(2) calls took.
    pub kill_syscall_us: Option<f64>,
    /// How long `ftvm site kill A` took; it starts right after the SIGKILL, waits until A is
    /// gone, then takes A's links down.
    pub site_kill_ms: Option<f64>,
    /// SIGKILL → A's process gone (reaped; polled every 2 ms while the load runs).
    pub a_gone_ms: Option<f64>,
    /// SIGKILL → the first reply from B on any connection.
    pub first_b_reply_ms: Option<f64>,
    /// SIGKILL → every connection has had a reply from B (the slowest connection).
    pub all_served_ms: Option<f64>,
    /// SIGKILL → the first reply of any kind after it (may be A's, already released).
    pub first_reply_after_kill_ms: Option<f64>,
    /// SIGKILL → the first reply to a request sent after it (the cross-check without B's log).
    pub first_post_kill_request_reply_ms: Option<f64>,
    /// The longest gap between consecutive replies on any connection, from the kill on.
    pub longest_gap_ms: Option<f64>,
    /// `takeover_ms` from `ftvm site status --json` (B: first suspicion → restored guest resumed).
    pub takeover_ms: Option<f64>,
    /// Frames that reached A's TAP after its death, forwarded by its watchdog and given to B's VM
    /// (B's status `late_input.delivered`; none from builds before it).
    pub late_input_delivered: Option<u64>,
    /// SIGKILL → B's "the restored guest runs" log line (same clock: this machine's).
    pub b_resumed_ms: Option<f64>,
    /// B's `PromotionTimings` line.
    pub promotion: Option<PromotionLog>,
    pub status_state: Option<String>,
    pub connections: Vec<ConnFigures>,
    /// Where the site's logs were copied.
    pub logs: Option<String>,
}

/// The `failover` section of a results file.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    pub repetitions: u32,
    pub succeeded: u32,
    pub connections: usize,
    pub seed: u64,
    pub target_ms: f64,
    pub target_met: bool,
    pub target_rule: &'static str,
    /// Repetitions whose SIGKILL → every connection served is within `target_ms` (the issue's
    /// measure, stricter than `target_met`'s first reply).
    pub every_connection_served_within_target: u32,
    /// Connections (over the successful repetitions) whose longest gap exceeded `target_ms` and
    /// began after the kill: their request went to the already dead primary.
    pub requests_to_the_dead_primary: u32,
    /// Connections whose longest gap exceeded `target_ms` and began before the kill: a request
    /// the primary had not taken in or sent ahead when it died.
    pub requests_lost_with_the_primary: u32,
    /// Over the successful repetitions: SIGKILL → first reply from B (earliest connection).
    pub sigkill_to_first_b_reply_ms: Option<Stats>,
    /// SIGKILL → every connection served by B.
    pub sigkill_to_all_served_ms: Option<Stats>,
    /// The longest gap a client saw, from the kill on.
    pub longest_gap_ms: Option<Stats>,
    /// B's `takeover_ms` (status).
    pub takeover_ms: Option<Stats>,
    /// SIGKILL → B's "restored guest runs" log line.
    pub sigkill_to_b_resumed_ms: Option<Stats>,
    /// From B's `PromotionTimings`.
    pub b_last_frame_to_dead_ms: Option<Stats>,
    pub b_restore_total_ms: Option<Stats>,
    pub b_dead_to_resumed_ms: Option<Stats>,
    pub runs: Vec<FailoverRun>,
}

impl FailoverReport {
    /// Summarises the repetitions (only successful ones enter the statistics).
    pub fn summarize(runs: Vec<FailoverRun>, connections: usize, seed: u64) -> Self {
        let ok: Vec<&FailoverRun> = runs.iter().filter(|r| r.ok).collect();
        let stat = |f: &dyn Fn(&FailoverRun) -> Option<f64>| {
            Stats::of(&ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        let promo = |key: &'static str| {
            move |r: &FailoverRun| r.promotion.as_ref().and_then(|p| p.ms.get(key).copied())
        };
        let first = stat(&|r| r.first_b_reply_ms);
        let succeeded = ok.len() as u32;
        let repetitions = runs.len() as u32;
        let target_met = repetitions > 0
            && succeeded == repetitions
            && first.is_some_and(|s| s.max <= TARGET_MS);
        let every_connection_served_within_target =
            ok.iter().filter(|r| r.all_served_ms.is_some_and(|t| t <= TARGET_MS)).count() as u32;
        let waited: Vec<&ConnFigures> =
            ok.iter().flat_map(|r| &r.connections).filter(|c| c.longest_gap_ms.is_some_and(|g| g > TARGET_MS)).collect();
        let after_kill = |c: &&&ConnFigures| c.longest_gap_start_ms.is_some_and(|s| s >= 0.0);
        let requests_to_the_dead_primary = waited.iter().filter(after_kill).count() as u32;
        let requests_lost_with_the_primary = waited.len() as u32 - requests_to_the_dead_primary;
        Self {
            repetitions,
            succeeded,
            connections,
            seed,
            target_ms: TARGET_MS,
            target_met,
            target_rule: TARGET_RULE,
            every_connection_served_within_target,
            requests_to_the_dead_primary,
            requests_lost_with_the_primary,
            sigkill_to_first_b_reply_ms: first,
            sigkill_to_all_served_ms: stat(&|r| r.all_served_ms),
            longest_gap_ms: stat(&|r| r.longest_gap_ms),
            takeover_ms: stat(&|r| r.takeover_ms),
            sigkill_to_b_resumed_ms: stat(&|r| r.b_resumed_ms),
            b_last_frame_to_dead_ms: stat(&promo("last_frame_to_dead")),
            b_restore_total_ms: stat(&promo("restore.total")),
            b_dead_to_resumed_ms: stat(&promo("dead_to_resumed")),
            runs,
        }
    }

    /// A short table for the terminal and for closing notes.
    pub fn table(&self) -> String {
        let mut s = format!(
            "\nfailover: {} of {} repetitions ok, {} connections each; target SIGKILL→serving on B ≤ {} ms: {}\n",
            self.succeeded,
            self.repetitions,
            self.connections,
            self.target_ms,
            if self.target_met { "met" } else { "NOT met" }
        );
        s += &format!(
            "{:<36} {:>9} {:>9} {:>9}\n",
            "ms (over successful repetitions)", "min", "median", "max"
        );
        let rows: [(&str, &Option<Stats>); 8] = [
            (
                "SIGKILL → first reply from B",
                &self.sigkill_to_first_b_reply_ms,
            ),
            (
                "SIGKILL → every connection served",
                &self.sigkill_to_all_served_ms,
            ),
            ("longest gap a client saw", &self.longest_gap_ms),
            ("B takeover_ms (status)", &self.takeover_ms),
            (
                "SIGKILL → B resumed (B's log)",
                &self.sigkill_to_b_resumed_ms,
            ),
            ("B: last frame → dead", &self.b_last_frame_to_dead_ms),
            ("B: restore total", &self.b_restore_total_ms),
            ("B: dead → resumed", &self.b_dead_to_resumed_ms),
        ];
        for (name, st) in rows {
            match st {
                Some(st) => {
                    s += &format!(
                        "{name:<36} {:>9.1} {:>9.1} {:>9.1}\n",
                        st.min, st.median, st.max
                    )
                }
                None => s += &format!("{name:<36} {:>9} {:>9} {:>9}\n", "-", "-", "-"),
            }
        }
        s += &format!(
            "every connection served within {} ms in {} of {} repetitions; waited for a retransmission: {} connection(s) whose request went to the already dead primary, {} whose request died with it\n",
            self.target_ms,
            self.every_connection_served_within_target,
            self.succeeded,
            self.requests_to_the_dead_primary,
            self.requests_lost_with_the_primary
        );
        let late: Vec<u64> = self.runs.iter().filter_map(|r| r.late_input_delivered).filter(|&n| n > 0).collect();
        s += &format!(
            "input that reached A after its death, forwarded by its watchdog to B: in {} repetitions, {} frames\n",
            late.len(),
            late.iter().sum::<u64>()
        );
        for r in self.runs.iter().filter(|r| !r.ok) {
            s += &format!(
                "failed: {}: {}\n",
                r.site,
                r.error.as_deref().unwrap_or("?")
            );
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Running it.

/// A seed from the clock (or `FTVM_BENCH_SEED`).
pub fn seed_from_env_or_clock() -> u64 {
    ftvm_system_tests::rng::seed_from_env_or_clock(SEED_VAR)
}

/// Runs every repetition, one site at a time.
pub fn run(cfg: &FailoverConfig) -> FailoverReport {
    let mut rng = Rng::new(cfg.seed);
    eprintln!(
        "[failover] seed {} (replay with {SEED_VAR}={})",
        cfg.seed, cfg.seed
    );
    let mut runs = Vec::new();
    for i in 0..cfg.repetitions {
        let kill_after = rng.duration(KILL_AFTER_MIN, KILL_AFTER_MAX);
        eprintln!(
            "[failover] repetition {}/{}: kill A {:.0} ms into the load",
            i + 1,
            cfg.repetitions,
            ms(kill_after)
        );
        let r = repetition(cfg, kill_after);
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        eprintln!(
            "[failover]   {}: {}; from the SIGKILL: B resumed {} (takeover_ms {}), first reply from B {}, \
             all connections served {}, longest gap {}; A gone {}, site kill took {}; late input given to B: {}",
            r.site,
            r.error.as_deref().map_or("ok".to_string(), |e| format!("FAILED: {e}")),
            f(r.b_resumed_ms),
            f(r.takeover_ms),
            f(r.first_b_reply_ms),
            f(r.all_served_ms),
            f(r.longest_gap_ms),
            f(r.a_gone_ms),
            f(r.site_kill_ms),
            r.late_input_delivered.map_or("-".to_string(), |n| format!("{n} frames"))
        );
        runs.push(r);
    }
    FailoverReport::summarize(runs, cfg.connections, cfg.seed)
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// Connects `n` TCP connections to the guest from inside network namespace `netns`. The sockets
/// stay in that namespace whichever thread uses them afterwards.
fn connect_in_netns(netns: &str, n: usize) -> Result<Vec<TcpStream>> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<TcpStream>> {
            // Only this short-lived thread enters the namespace.
            try_enter_netns(netns)?;
            let addr = SocketAddrV4::new(GUEST_IP, KV_PORT);
            (0..n)
                .map(|i| {
                    let s = TcpStream::connect_timeout(&addr.into(), CONNECT_TIMEOUT)
                        .with_context(|| format!("connection {i} to {addr} from {netns}"))?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(READ_POLL))?;
                    s.set_write_timeout(Some(Duration::from_secs(5)))?;
                    Ok(s)
                })
                .collect()
        })
        .join()
        .map_err(|_| anyhow!("the connecting thread panicked"))?
    })
}

/// State shared by the load threads and the main thread.
struct Shared {
    origin: Instant,
    stop: AtomicBool,
    /// The SIGKILL as µs from `origin`; `u64::MAX` before it.
    kill_at_us: AtomicU64,
    /// Per connection: replies to requests sent after the kill.
    b_replies: Vec<AtomicU64>,
}

/// Sets the flag when dropped (also on unwind), so the load threads never outlive a failure.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What one connection's loop recorded.
#[derive(Debug, Default)]
struct ConnTrace {
    exchanges: Vec<Exchange>,
    values: Vec<i64>,
    failure: Option<String>,
}

/// One connection: INCR on its own key, one request at a time, until told to stop.
fn load_loop(mut stream: TcpStream, conn: usize, shared: &Shared) -> ConnTrace {
    let key = format!("fo:{conn}");
    let request = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len());
    let mut t = ConnTrace::default();
    let mut buf: Vec<u8> = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    'requests: while !shared.stop.load(Ordering::Relaxed) {
        if shared.origin.elapsed() > LOAD_HARD_LIMIT {
            t.failure = Some(format!("load ran over {LOAD_HARD_LIMIT:?}"));
            break;
        }
        let sent = shared.origin.elapsed();
        if let Err(e) = stream.write_all(request.as_bytes()) {
            t.failure = Some(format!("sending INCR {key}: {e}"));
            break;
        }
        let line = loop {
            if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
                buf.drain(..pos + 2);
                break line;
            }
            match stream.read(&mut chunk) {
                Ok(0) => {
                    t.failure = Some(format!(
                        "connection closed by the guest waiting for INCR {key}"
                    ));
                    break 'requests;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                // Only the poll interval: keep waiting for this reply.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    // Stopping with a request in flight is not a failure.
                    if shared.stop.load(Ordering::Relaxed) {
                        break 'requests;
                    }
                    if shared.origin.elapsed() > LOAD_HARD_LIMIT {
                        t.failure = Some(format!(
                            "no reply to INCR {key} within {:.1} s",
                            (shared.origin.elapsed() - sent).as_secs_f64()
                        ));
                        break 'requests;
                    }
                }
                Err(e) => {
                    t.failure = Some(format!("waiting for INCR {key}: {e} ({:?})", e.kind()));
                    break 'requests;
                }
            }
        };
        let received = shared.origin.elapsed();
        let Some(v) = line.strip_prefix(':').and_then(|v| v.parse::<i64>().ok()) else {
            t.failure = Some(format!("INCR {key} -> {line:?}"));
            break;
        };
        t.values.push(v);
        t.exchanges.push(Exchange { sent, received });
        let kill = shared.kill_at_us.load(Ordering::Acquire);
        if kill != u64::MAX && u64::try_from(sent.as_micros()).unwrap_or(u64::MAX) >= kill {
            shared.b_replies[conn].fetch_add(1, Ordering::Relaxed);
        }
    }
    t
}

/// One repetition: a fresh site, the load, the kill, the figures. Never panics on the site's
/// behaviour; a failure is recorded in `error`.
fn repetition(cfg: &FailoverConfig, kill_after: Duration) -> FailoverRun {
    let mut run = FailoverRun {
        kill_after_load_ms: ms(kill_after),
        ..Default::default()
    };
    let env = SiteEnv {
        ftvm: cfg.ftvm.clone(),
        guest: cfg.guest.clone(),
        logs: LOGS_DIR.into(),
    };
    match Site::try_new(env, "fb") {
        // From here on the guard owns the site, even if `site up` fails half way.
        Ok(mut site) => {
            run.site.clone_from(&site.name);
            if let Err(e) = measure(&mut site, cfg.connections, kill_after, &mut run) {
                run.error = Some(format!("{e:#}"));
            }
            run.logs = Some(site.save_logs().display().to_string());
        }
        Err(e) => run.error = Some(format!("{e:#}")),
    }
    run.ok = run.error.is_none();
    run
}

fn measure(
    site: &mut Site,
    connections: usize,
    kill_after: Duration,
    run: &mut FailoverRun,
) -> Result<()> {
    site.try_up(&[])?;
    let site = &*site;
    let st = site.try_status()?.json;
    if st["state"] != "protected" {
        bail!("after site up the state is {}, not protected", st["state"]);
    }
    let client_ns = st["client_netns"]
        .as_str()
        .map_or_else(|| site.netns("client"), String::from);
    let pids = site.host_pids("A")?;
    let streams = connect_in_netns(&client_ns, connections)?;

    let shared = Shared {
        origin: Instant::now(),
        stop: AtomicBool::new(false),
        kill_at_us: AtomicU64::new(u64::MAX),
        b_replies: (0..connections).map(|_| AtomicU64::new(0)).collect(),
    };
    let mut problems = Vec::new();
    let (kill, end, traces) =
        std::thread::scope(|s| -> Result<(Duration, Duration, Vec<ConnTrace>)> {
            let shared = &shared;
            let handles: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(i, st)| s.spawn(move || load_loop(st, i, shared)))
                .collect();
            let _stop = StopOnDrop(&shared.stop);

            // The load runs until the kill moment (unless every connection already failed).
            while shared.origin.elapsed() < kill_after && !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(
                    Duration::from_millis(1)
                        .min(kill_after.saturating_sub(shared.origin.elapsed())),
                );
            }
            if handles.iter().any(|h| h.is_finished()) {
                problems.push("a connection stopped before the kill".to_string());
            }
            if let Some(&p) = pids.iter().find(|&&p| !alive(p)) {
                bail!("host A (pid {p}) was already dead at the kill moment");
            }
            let st = site.try_status()?.json;
            if st["state"] != "protected" {
                problems.push(format!(
                    "just before the kill the state was {}, not protected",
                    st["state"]
                ));
            }

            // The SIGKILL, at an instant this process knows exactly.
            run.kill_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs_f64());
            let before = Instant::now();
            let kill = before - shared.origin;
            run.kill_at_load_ms = Some(ms(kill));
            shared.kill_at_us.store(
                u64::try_from(kill.as_micros()).unwrap_or(u64::MAX - 1),
                Ordering::Release,
            );
            for &p in &pids {
                // SAFETY: SIGKILL to host A's process, recorded in the site's state file and alive a
                // moment ago (the site's processes are not our children, so a pid cannot be reused
                // by a process we start).
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            run.kill_syscall_us = Some(before.elapsed().as_secs_f64() * 1e6);

            // `site kill` finishes the job (waits for A to be gone, takes its links down, records
            // it), on its own thread so that the load and A's exit are watched meanwhile.
            let site_kill = s.spawn(|| site.try_kill("A"));

            // The load goes on over the same connections, bounded.
            let after = |d: Duration| shared.origin.elapsed() >= kill + d;
            loop {
                if run.a_gone_ms.is_none() && pids.iter().all(|&p| !alive(p)) {
                    run.a_gone_ms = Some(ms(shared.origin.elapsed().saturating_sub(kill)));
                }
                let enough = shared
                    .b_replies
                    .iter()
                    .all(|c| c.load(Ordering::Relaxed) >= POST_KILL_B_REPLIES);
                if handles.iter().all(|h| h.is_finished())
                    || (enough && after(POST_KILL_MIN) && site_kill.is_finished())
                    || after(POST_KILL_MAX)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            shared.stop.store(true, Ordering::Relaxed);
            let end = shared.origin.elapsed();
            let traces = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect();
            match site_kill.join() {
                Ok(Ok((start, end))) => run.site_kill_ms = Some(ms(end - start)),
                Ok(Err(e)) => problems.push(format!("{e:#}")),
                Err(_) => problems.push("the site kill thread panicked".to_string()),
            }
            Ok((kill, end, traces))
        })?;

    // What B says: status (polled until it has failed over), then its log line.
    let start = Instant::now();
    loop {
        match site.try_status() {
            Ok(status) => {
                run.late_input_delivered = status.detail("B").and_then(|b| b["late_input"]["delivered"].as_u64());
                let st = status.json;
                run.status_state = st["state"].as_str().map(String::from);
                run.takeover_ms = st["takeover_ms"].as_f64();
                if run.status_state.as_deref() == Some("failed over") && run.takeover_ms.is_some() {
                    break;
                }
            }
            Err(e) => run.status_state = Some(format!("status failed: {e:#}")),
        }
        if start.elapsed() > STATUS_TIMEOUT {
            problems.push(format!(
                "status did not say \"failed over\" with a takeover time within {STATUS_TIMEOUT:?} (last: {})",
                run.status_state.as_deref().unwrap_or("-")
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(site.dir().join("host-b.log")).unwrap_or_default();
    run.promotion = parse_promotion_log(&log);
    if let (Some(at), Some(k)) = (
        run.promotion.as_ref().and_then(|p| p.logged_at_unix),
        run.kill_unix,
    ) {
        run.b_resumed_ms = Some((at - k) * 1e3);
    }
    // B's resume instant as an offset from the load start (same clock: this machine's).
    let b_resumed = match run.b_resumed_ms {
        Some(m) if m >= 0.0 => Some(kill + Duration::from_secs_f64(m / 1e3)),
        Some(m) => {
            problems.push(format!(
                "B logged its takeover {:.1} ms before the SIGKILL (a false takeover?)",
                -m
            ));
            None
        }
        None => {
            problems.push("no PromotionTimings line in host B's log".to_string());
            None
        }
    };

    // Per-connection figures.
    for (i, t) in traces.iter().enumerate() {
        let mut f = analyze_connection(i, &t.exchanges, kill, b_resumed, end);
        f.incr_anomalies = incr_anomalies(&t.values);
        f.failure = t.failure.clone();
        if let Some(e) = &f.failure {
            problems.push(format!("connection {i}: {e}"));
        } else if f.first_b_reply_ms.is_none() {
            problems.push(format!(
                "connection {i}: no reply from B within {:.1} s of the kill",
                ms(end - kill) / 1e3
            ));
        }
        if f.incr_anomalies > 0 {
            problems.push(format!(
                "connection {i}: {} INCR replies were not the previous + 1",
                f.incr_anomalies
            ));
        }
        run.connections.push(f);
    }
    let firsts: Vec<f64> = run
        .connections
        .iter()
        .filter_map(|c| c.first_b_reply_ms)
        .collect();
    run.first_b_reply_ms = firsts.iter().copied().reduce(f64::min);
    run.all_served_ms = if firsts.len() == run.connections.len() {
        firsts.iter().copied().reduce(f64::max)
    } else {
        None
    };
    run.first_reply_after_kill_ms = run
        .connections
        .iter()
        .filter_map(|c| c.first_reply_after_kill_ms)
        .reduce(f64::min);
    run.first_post_kill_request_reply_ms = run
        .connections
        .iter()
        .filter_map(|c| c.first_post_kill_request_reply_ms)
        .reduce(f64::min);
    run.longest_gap_ms = run
        .connections
        .iter()
        .filter_map(|c| c.longest_gap_ms)
        .reduce(f64::max);

    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
    fn x(sent: u64, received: u64) -> Exchange {
        Exchange {
            sent: d(sent),
            received: d(received),
        }
    }

    #[test]
    fn a_reply_released_by_a_does_not_count_as_b() {
        // Replies every 1 ms; the kill at 10.5 ms; the in-flight request (sent at 10) is answered
        // at 10.6 (released by A before it died); the next, sent at 10.6, waits for B until 400.
        let mut ex: Vec<Exchange> = (0..10).map(|i| x(i, i + 1)).collect();
        ex.push(Exchange {
            sent: d(10),
            received: Duration::from_micros(10_600),
        });
        ex.push(Exchange {
            sent: Duration::from_micros(10_600),
            received: d(400),
        });
        ex.push(x(400, 401));
        // B resumed at 300 (its log), long after A's last reply landed.
        let f = analyze_connection(0, &ex, Duration::from_micros(10_500), Some(d(300)), d(1000));
        assert!((f.first_reply_after_kill_ms.unwrap() - 0.1).abs() < 1e-9);
        assert!((f.first_b_reply_ms.unwrap() - 389.5).abs() < 1e-9);
        assert_eq!(
            (
                f.replies_before_kill,
                f.replies_after_kill,
                f.replies_from_b
            ),
            (10, 3, 2)
        );
        assert!((f.longest_gap_ms.unwrap() - 389.4).abs() < 1e-9);
        assert!((f.longest_gap_end_ms.unwrap() - 389.5).abs() < 1e-9);
        assert!((f.longest_gap_start_ms.unwrap() - 0.1).abs() < 1e-9, "after A's last reply, 0.1 ms after the kill");
    }

    #[test]
    fn the_outage_gap_spans_the_kill() {
        // In flight at the kill (sent at 5, kill at 6), answered by B at 300.
        let ex = [x(0, 1), x(1, 5), x(5, 300), x(300, 301)];
        let f = analyze_connection(1, &ex, d(6), None, d(500));
        assert_eq!(f.first_reply_after_kill_ms, Some(294.0));
        // Without B's resume instant, only the reply to a request sent after the kill counts:
        // one round trip later.
        assert_eq!(f.first_b_reply_ms, Some(295.0));
        assert_eq!(f.first_post_kill_request_reply_ms, Some(295.0));
        assert_eq!(f.longest_gap_ms, Some(295.0));
        assert_eq!(f.replies_from_b, 1);
        // B resumed at 250: the in-flight request's reply at 300 was B's.
        let f = analyze_connection(1, &ex, d(6), Some(d(250)), d(500));
        assert_eq!(f.first_b_reply_ms, Some(294.0));
        assert_eq!(f.first_post_kill_request_reply_ms, Some(295.0));
        assert_eq!(f.replies_from_b, 2);
        // Gaps before the kill do not count, however long.
        let ex = [x(0, 900), x(900, 901), x(1000, 1100)];
        let f = analyze_connection(0, &ex, d(950), None, d(2000));
        assert_eq!(f.longest_gap_ms, Some(199.0));
    }

    #[test]
    fn a_connection_b_never_answered_has_an_open_gap() {
        let ex = [x(0, 1), x(1, 2)];
        let f = analyze_connection(0, &ex, d(3), None, d(15_003));
        assert_eq!(f.first_b_reply_ms, None);
        assert_eq!(f.first_reply_after_kill_ms, None);
        assert_eq!(f.longest_gap_ms, Some(15_001.0));
        let f = analyze_connection(0, &[], d(3), None, d(10));
        assert_eq!(f.longest_gap_ms, Some(10.0));
    }

    #[test]
    fn incr_replies_must_be_consecutive() {
        assert_eq!(incr_anomalies(&[]), 0);
        assert_eq!(incr_anomalies(&[5, 6, 7]), 0);
        assert_eq!(incr_anomalies(&[1, 2, 2, 3, 5]), 2);
    }

    #[test]
    fn stats_min_median_max() {
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(
            Stats::of(&[3.0]),
            Some(Stats {
                n: 1,
                min: 3.0,
                median: 3.0,
                max: 3.0
            })
        );
        assert_eq!(
            Stats::of(&[5.0, 1.0, 3.0]),
            Some(Stats {
                n: 3,
                min: 1.0,
                median: 3.0,
                max: 5.0
            })
        );
        assert_eq!(
            Stats::of(&[4.0, 1.0, 2.0, 10.0]),
            Some(Stats {
                n: 4,
                min: 1.0,
                median: 3.0,
                max: 10.0
            })
        );
        assert_eq!(Stats::of(&[f64::NAN, 2.0]).map(|s| s.n), Some(1));
    }

    #[test]
    fn parses_debug_durations() {
        let close =
            |s: &str, want_ms: f64| (ms(parse_debug_duration(s).unwrap()) - want_ms).abs() < 1e-6;
        assert!(close("250.084ms", 250.084));
        assert!(close("437.671µs", 0.437671));
        assert!(close("1.5s", 1500.0));
        assert!(close("900ns", 0.0009));
        assert!(close("0ns", 0.0));
        assert_eq!(parse_debug_duration("12"), None);
        assert_eq!(parse_debug_duration("ms"), None);
        assert_eq!(parse_debug_duration("-1ms"), None);
    }

    const LINE: &str = "\x1b[2m2026-11-26T11:02:53.304235Z\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mftvm_repl::ha::failover\x1b[0m\x1b[2m:\x1b[0m active: the restored guest runs \x1b[3mtimings\x1b[0m\x1b[2m=\x1b[0mPromotionTimings { epoch: EpochId(170), last_frame_to_dead: 250.084ms, suspected_to_dead: 220.26337ms, stop_receiver: 250.76µs, restore: RestoreTimings { decode: 437.671µs, restore: 40.460859ms, release: 28.884µs, source: 5.911µs, total: 40.991344ms }, dead_to_resumed: 41.291828ms, suspected_to_resumed: 261.555198ms, ingress_replayed: 3 }";

    #[test]
    fn parses_the_promotion_timings_line() {
        let log = format!("some line\n{LINE}\nanother line\n");
        let p = parse_promotion_log(&log).unwrap();
        assert_eq!(p.epoch, Some(170));
        let get = |k: &str| p.ms[k];
        assert!((get("last_frame_to_dead") - 250.084).abs() < 1e-9);
        assert!((get("stop_receiver") - 0.25076).abs() < 1e-9);
        assert!((get("restore.decode") - 0.437671).abs() < 1e-9);
        assert!((get("restore.restore") - 40.460859).abs() < 1e-9);
        assert!((get("restore.total") - 40.991344).abs() < 1e-9);
        assert!((get("dead_to_resumed") - 41.291828).abs() < 1e-9);
        assert!((get("suspected_to_resumed") - 261.555198).abs() < 1e-9);
        assert_eq!(p.ingress_replayed, Some(3));
        assert_eq!(p.ms.len(), 10);
        let at = p.logged_at_unix.unwrap();
        assert!((at - (1_795_690_973.0 + 0.304235)).abs() < 1e-6, "{at}");
        assert_eq!(parse_promotion_log("no such line\n"), None);
        assert_eq!(parse_promotion_log("PromotionTimings { }"), None);
    }

    #[test]
    fn parses_utc_timestamps() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_rfc3339_utc("2000-03-01T00:00:01.5Z"),
            Some(951_868_801.5)
        );
        assert_eq!(
            parse_rfc3339_utc("2024-02-29T23:59:59Z"),
            Some(1_709_251_199.0)
        );
        assert_eq!(parse_rfc3339_utc("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_utc("2024-01-01 00:00:00"), None);
    }

    #[test]
    fn strips_ansi() {
        assert_eq!(strip_ansi("\x1b[2ma\x1b[0mb\x1b[32m c"), "ab c");
    }

    fn run(ok: bool, first: f64) -> FailoverRun {
        FailoverRun {
            site: "s".into(),
            ok,
            error: (!ok).then(|| "boom".into()),
            first_b_reply_ms: Some(first),
            all_served_ms: Some(first),
            promotion: Some(PromotionLog {
                ms: [("restore.total".to_string(), 40.0)].into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn summary_uses_successful_runs_and_judges_the_target() {
        let r = FailoverReport::summarize(
            vec![run(true, 30.0), run(true, 45.0), run(true, 40.0)],
            4,
            1,
        );
        assert!(r.target_met);
        assert_eq!(r.sigkill_to_first_b_reply_ms.unwrap().median, 40.0);
        assert_eq!(r.b_restore_total_ms.unwrap().n, 3);
        assert_eq!(r.takeover_ms, None);
        let r = FailoverReport::summarize(vec![run(true, 30.0), run(true, 60.0)], 4, 1);
        assert!(!r.target_met);
        // A failed repetition is left out of the figures, and the target is not met.
        let r = FailoverReport::summarize(vec![run(true, 30.0), run(false, 1.0)], 4, 1);
        assert_eq!((r.succeeded, r.repetitions), (1, 2));
        assert_eq!(r.sigkill_to_first_b_reply_ms.unwrap().min, 30.0);
        assert!(!r.target_met);
        assert!(r.table().contains("failed: s: boom"));
        assert!(!FailoverReport::summarize(Vec::new(), 4, 1).target_met);
    }

    /// Every connection served within the target is counted per repetition; a long gap that began
    /// after the kill is a request sent to the dead primary, one that began before is not.
    #[test]
    fn summary_counts_connections_that_asked_the_dead_primary() {
        let conn = |gap: f64, start: f64| ConnFigures {
            longest_gap_ms: Some(gap),
            longest_gap_start_ms: Some(start),
            ..Default::default()
        };
        let mut slow = run(true, 14.0);
        slow.all_served_ms = Some(206.0);
        slow.connections = vec![conn(15.0, -1.0), conn(206.1, 0.08), conn(207.0, -0.5)];
        let r = FailoverReport::summarize(vec![run(true, 14.0), slow], 3, 1);
        assert_eq!(
            (r.every_connection_served_within_target, r.requests_to_the_dead_primary, r.requests_lost_with_the_primary),
            (1, 1, 1)
        );
        assert!(r.table().contains("within 50 ms in 1 of 2 repetitions; waited for a retransmission: 1 connection(s)"), "{}", r.table());
    }

    #[test]
    fn kill_moments_stay_in_range() {
        let mut rng = Rng::new(42);
        for _ in 0..1000 {
            let t = rng.duration(KILL_AFTER_MIN, KILL_AFTER_MAX);
            assert!((KILL_AFTER_MIN..KILL_AFTER_MAX).contains(&t));
        }
    }
}
