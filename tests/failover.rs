//! Failover of a whole `ftvm site`: a client holding open TCP connections runs INCR/SET on many keys
//! and records every acknowledged reply; host A (the primary) is SIGKILLed at a random moment; after
//! B takes over every key is at least its last acknowledged value and the same connections keep
//! working (no reconnect). Also: killing the backup leaves the primary serving (simplex).
//!
//! Needs root and /dev/kvm (fails, never skips). Every site is taken down by a guard on every exit
//! path; its logs are copied to `/tmp/ftvm-test-logs/<site>/` first. The random kill moments
//! come from a seed printed by each test; `FTVM_FAILOVER_SEED=<n>` replays one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ftvm_system_tests::rng::Rng;
use ftvm_system_tests::site::Site;
use ftvm_system_tests::{enter_netns, require_root_and_kvm, Netns, Reply, RespClient};

/// Connections the client holds open across the failover.
const CONNECTIONS: usize = 8;
/// Counters per connection (each owned by exactly one connection, so its INCR replies must be
/// consecutive).
const COUNTERS: usize = 16;
/// Hard caps of the load loop, per connection.
const MAX_OPS_PER_CONN: u64 = 40_000;
const LOAD_HARD_LIMIT: Duration = Duration::from_secs(60);
/// A request may wait this long (in flight at the kill, it completes once B resumes the VM and TCP
/// retransmits). Longer is a failure.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After the kill the load keeps running at least this long, and until every connection has had
/// `POST_KILL_MIN_REPLIES` replies, but at most `POST_KILL_MAX`.
const POST_KILL_MIN: Duration = Duration::from_secs(3);
const POST_KILL_MIN_REPLIES: u64 = 50;
const POST_KILL_MAX: Duration = Duration::from_secs(20);
/// How soon after `site up` returns the early kill must land.
const EARLY_KILL_LIMIT: Duration = Duration::from_secs(1);
/// Pages per millisecond the guest dirties in the dirtying-load scenario: enough to make epochs
/// large and slow on this two-core host. (It once made the backup take a live primary for dead;
/// the backup now counts unread bytes on its socket as life, the primary heartbeats while the
/// backup is behind, and a takeover fences the old primary.)
const DIRTY_LOAD: &str = "200";
/// How long B may take before status says it took over.
const STATUS_TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest gap between consecutive replies on one connection that the test accepts. The target
/// is 500 ms; this nested, shared machine is too noisy to assert that, so the figure is printed.
const GAP_BOUND: Duration = Duration::from_secs(10);
const GAP_TARGET: Duration = Duration::from_millis(500);

// --------------------------------------------------------------------------------------------
// The load.

/// What one connection saw.
#[derive(Debug, Default)]
struct ConnReport {
    conn: usize,
    ops: u64,
    /// Last acknowledged value of each counter `c<conn>:<j>`.
    counters: HashMap<String, i64>,
    /// INCRs acknowledged (an integer reply).
    incr_acked: u64,
    /// Every `n` whose `SET k<conn>:<n> <n>` got +OK.
    sets_acked: Vec<u64>,
    /// INCR replies that were not exactly the previous acknowledged value + 1 (a lost or repeated
    /// write seen through the same connection).
    incr_anomalies: Vec<String>,
    /// Replies other than the expected kind (e.g. -ERR): not acknowledged, reported.
    error_replies: Vec<String>,
    /// The first I/O failure (reset, timeout, close); the connection stops there.
    failure: Option<String>,
    longest_gap: Duration,
    /// When the longest gap ended, relative to the load start.
    longest_gap_end: Duration,
    /// When each reply arrived (for the outage around the kill).
    reply_times: Vec<Instant>,
    replies_after_kill: u64,
    /// Keys read back after the load (counters, SET keys) and whether the final PING answered.
    verified: (usize, usize),
}

struct Shared {
    stop: AtomicBool,
    /// Set (by the main thread) once `ftvm site kill` has returned.
    kill_done: std::sync::Mutex<Option<(Instant, Instant)>>,
    replies_after_kill: Vec<std::sync::atomic::AtomicU64>,
    load_start: Instant,
}

/// Sets the flag when dropped (also on unwind).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One connection's loop: alternates INCR on its own counters and SET of fresh keys, until told to
/// stop, a cap is reached, or the connection fails.
fn load_loop(mut client: RespClient, conn: usize, shared: &Shared) -> (RespClient, ConnReport) {
    let mut r = ConnReport { conn, ..Default::default() };
    let mut last_reply = shared.load_start;
    r.reply_times.push(shared.load_start);
    let mut n: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed)
        && n < MAX_OPS_PER_CONN
        && shared.load_start.elapsed() < LOAD_HARD_LIMIT
    {
        let (reply, key, kind) = if n.is_multiple_of(2) {
            let key = format!("c{conn}:{}", (n / 2) % COUNTERS as u64);
            (client.try_cmd(&["INCR", &key]), key, "INCR")
        } else {
            let key = format!("k{conn}:{n}");
            (client.try_cmd(&["SET", &key, &n.to_string()]), key, "SET")
        };
        let now = Instant::now();
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                r.failure = Some(format!(
                    "{kind} {key}: {e} ({:?}) after {:.3} s of load, {:.3} s since the last reply",
                    e.kind(),
                    (now - shared.load_start).as_secs_f64(),
                    (now - last_reply).as_secs_f64()
                ));
                break;
            }
        };
        let gap = now - last_reply;
        if gap > r.longest_gap {
            r.longest_gap = gap;
            r.longest_gap_end = now - shared.load_start;
        }
        last_reply = now;
        r.reply_times.push(now);
        if let Some((_, kill_end)) = *shared.kill_done.lock().unwrap() {
            if now > kill_end {
                r.replies_after_kill += 1;
                shared.replies_after_kill[conn].fetch_add(1, Ordering::Relaxed);
            }
        }
        match (kind, reply) {
            ("INCR", Reply::Integer(v)) => {
                let prev = r.counters.get(&key).copied().unwrap_or(0);
                if v != prev + 1 {
                    r.incr_anomalies.push(format!("INCR {key} -> {v}, last acknowledged {prev}"));
                }
                r.counters.insert(key, v);
                r.incr_acked += 1;
            }
            ("SET", Reply::Status(s)) if s == "OK" => r.sets_acked.push(n),
            (_, other) => r.error_replies.push(format!("{kind} {key} -> {other:?}")),
        }
        n += 1;
    }
    r.ops = n;
    (client, r)
}

/// Whether a GET reply shows an acknowledged write.
type Check = Box<dyn Fn(&Reply) -> bool>;

/// Checks, over the connection that wrote them, that every acknowledged write is there (pipelined
/// GETs), then PINGs. Returns the problems found.
fn verify(client: &mut RespClient, r: &mut ConnReport) -> Vec<String> {
    let mut problems = Vec::new();
    r.verified = (r.counters.len(), r.sets_acked.len());
    let mut checks: Vec<(String, Check, String)> = Vec::new();
    for (key, &acked) in &r.counters {
        checks.push((
            key.clone(),
            Box::new(move |rep: &Reply| match rep {
                Reply::Bulk(Some(v)) => String::from_utf8_lossy(v).parse::<i64>().is_ok_and(|v| v >= acked),
                _ => false,
            }),
            format!(">= {acked}"),
        ));
    }
    for &n in &r.sets_acked {
        let want = n.to_string();
        let want2 = want.clone();
        checks.push((
            format!("k{}:{n}", r.conn),
            Box::new(move |rep: &Reply| *rep == Reply::bulk(&want2)),
            format!("= {want}"),
        ));
    }
    let mut missing = 0usize;
    for batch in checks.chunks(128) {
        for (key, _, _) in batch {
            if let Err(e) = client.try_send(&["GET", key]) {
                problems.push(format!("conn {}: sending GET {key}: {e}", r.conn));
                return problems;
            }
        }
        for (key, ok, want) in batch {
            match client.try_read_reply() {
                Ok(rep) if ok(&rep) => {}
                Ok(rep) => {
                    missing += 1;
                    if missing <= 5 {
                        problems.push(format!("conn {}: GET {key} -> {rep:?}, acknowledged {want}", r.conn));
                    }
                }
                Err(e) => {
                    problems.push(format!("conn {}: GET {key}: {e}", r.conn));
                    return problems;
                }
            }
        }
    }
    if missing > 0 {
        problems.push(format!(
            "conn {}: {missing} of {} acknowledged writes missing or older than acknowledged",
            r.conn,
            checks.len()
        ));
    }
    match client.try_cmd(&["PING"]) {
        Ok(Reply::Status(s)) if s == "PONG" => {}
        other => problems.push(format!("conn {}: final PING -> {other:?}", r.conn)),
    }
    problems
}

/// When to kill, and what else to do.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// This long after `site up` returned (the early kill, right after protection starts).
    AfterUp(Duration),
    /// This long after the load started.
    AfterLoad(Duration),
}

#[derive(Debug)]
struct Outcome {
    label: String,
    site: String,
    kill_moment: String,
    /// `ftvm site kill` started and returned (the SIGKILL lands in between).
    kill_window: (Instant, Instant),
    reports: Vec<ConnReport>,
    problems: Vec<String>,
}

/// One site: up, load on CONNECTIONS connections, kill `host` at `at`, keep loading, verify.
fn scenario(label: &str, host: &str, at: KillAt, dirty: bool) -> Outcome {
    scenario_with(label, host, at, dirty, &[])
}

/// The same, with `site up` given `up_args`.
fn scenario_with(label: &str, host: &str, at: KillAt, dirty: bool, up_args: &[&str]) -> Outcome {
    let site = Site::up("fo", up_args).keep_logs();
    let name = site.name.clone();
    let up_returned = site.up_returned;
    let mut problems = Vec::new();

    // Step 1: the pair is protected. (`site status` takes milliseconds; for the early kill the
    // time it takes is inside the 200 ms, and the actual kill moment is checked below.)
    {
        let t = Instant::now();
        let st = site.status();
        println!("[{label}] status after up ({:.3} s): {st}", t.elapsed().as_secs_f64());
        assert!(
            st.is_protected(),
            "[{label}] after site up: want state protected, A primary, B backup; got {} / {} / {}\n{:#}",
            st.state,
            st.role_a,
            st.role_b,
            st.json
        );
        // The primary runs with the copy and the A-Link writer asked for (neither falls back unseen).
        let arg = |name: &str| up_args.windows(2).find(|w| w[0] == name).map(|w| w[1]);
        let checkpoints = &st.json["hosts"][0]["detail"]["checkpoints"];
        assert_eq!(checkpoints["copy"], arg("--checkpoint-copy").unwrap_or("stop"), "[{label}] checkpoint copy\n{:#}", st.json);
        let transport = match arg("--alink-io") {
            Some("uring") => "io_uring",
            Some("uring-zc") => "io_uring+zc",
            _ => "socket",
        };
        assert_eq!(checkpoints["transport"], transport, "[{label}] A-Link writer\n{:#}", st.json);
        let reader = if arg("--alink-read") == Some("uring") { "io_uring" } else { "socket" };
        assert_eq!(st.detail("B").map(|b| &b["alink_receive_io"]), Some(&serde_json::json!(reader)), "[{label}] A-Link reader\n{:#}", st.json);
    }

    let client_ns_name = site.netns("client");
    let client_ns = Netns::existing(&client_ns_name);
    let mut pre_kill_problem = None;
    let (kill_moment, kill_window, reports, mut extra) = client_ns.run(|| {
        let mut clients = Vec::new();
        for i in 0..CONNECTIONS {
            match RespClient::try_connect(READ_TIMEOUT) {
                Ok(c) => clients.push(c),
                Err(e) => panic!("[{label}] connection {i} to the guest: {e}"),
            }
        }
        let mut dirtier = None;
        if dirty {
            let mut c = RespClient::try_connect(READ_TIMEOUT).expect("dirtying connection");
            let rep = c.try_cmd(&["FTVM.LOAD", DIRTY_LOAD]).expect("FTVM.LOAD");
            assert_eq!(rep, Reply::Status("OK".into()), "[{label}] FTVM.LOAD {DIRTY_LOAD}");
            dirtier = Some(c);
        }
        let shared = Shared {
            stop: AtomicBool::new(false),
            kill_done: std::sync::Mutex::new(None),
            replies_after_kill: (0..CONNECTIONS).map(|_| Default::default()).collect(),
            load_start: Instant::now(),
        };
        let barrier = Arc::new(Barrier::new(CONNECTIONS + 1));
        std::thread::scope(|s| {
            let handles: Vec<_> = clients
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let shared = &shared;
                    let barrier = barrier.clone();
                    let client_ns_name = &client_ns_name;
                    s.spawn(move || {
                        // Threads inherit the creating thread's namespace; entering it again keeps
                        // that true whatever spawns them.
                        enter_netns(client_ns_name);
                        barrier.wait();
                        load_loop(c, i, shared)
                    })
                })
                .collect();
            // If anything below panics, the load threads stop at once rather than at their caps.
            let _stop_on_unwind = StopOnDrop(&shared.stop);
            barrier.wait();
            let load_start = shared.load_start;

            // Step 3: the kill, at the chosen moment.
            let target = match at {
                KillAt::AfterUp(d) => up_returned + d,
                KillAt::AfterLoad(d) => load_start + d,
            };
            while Instant::now() < target && !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(1).min(target.saturating_duration_since(Instant::now())));
            }
            // The pair must still be protected at the kill: a backup that took over on its own
            // before (a false failure detection) means two VMs with the guest's address — split brain.
            let pre = site.status();
            if !pre.is_protected() {
                pre_kill_problem = Some(format!(
                    "just before the kill (nobody killed yet) status was {pre}: the pair was no longer protected \
                     (a backup that took over while A lives is split brain)\n{:#}",
                    pre.json
                ));
            }
            // Half a second of load resends the pages every request writes: some went as deltas
            // (the takeover below then resumes a standby they made).
            let deltas = &pre.json["hosts"][0]["detail"]["checkpoints"]["pages_as_deltas"];
            if load_start.elapsed() >= Duration::from_millis(500) && deltas.as_u64().unwrap_or(0) == 0 {
                pre_kill_problem.get_or_insert(format!("after {:?} of load no page went as a delta\n{:#}", load_start.elapsed(), pre.json));
            }
            let kill_wall = wall_clock();
            let (kill_start, kill_end) = site.kill(host);
            *shared.kill_done.lock().unwrap() = Some((kill_start, kill_end));
            let kill_moment = format!(
                "kill {host} started at {kill_wall} UTC, {:.3} s after site up returned ({:.3} s after the load started; status just before: {pre}), `site kill` took {:.3} s",
                (kill_start - up_returned).as_secs_f64(),
                kill_start.saturating_duration_since(load_start).as_secs_f64(),
                (kill_end - kill_start).as_secs_f64()
            );
            println!("[{label}] {kill_moment}");

            // Step 4: keep the load running over the same connections (bounded).
            let post = Instant::now();
            loop {
                let enough = shared.replies_after_kill.iter().all(|c| c.load(Ordering::Relaxed) >= POST_KILL_MIN_REPLIES);
                let all_done = handles.iter().all(|h| h.is_finished());
                if all_done || (enough && post.elapsed() >= POST_KILL_MIN) || post.elapsed() >= POST_KILL_MAX {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            shared.stop.store(true, Ordering::Relaxed);
            let mut results: Vec<(RespClient, ConnReport)> =
                handles.into_iter().map(|h| h.join().expect("load thread panicked")).collect();

            // Step 5: every acknowledged write is there, the same connections still work.
            let mut extra = Vec::new();
            let verified: Vec<Vec<String>> = std::thread::scope(|s2| {
                let hs: Vec<_> = results
                    .iter_mut()
                    .map(|(c, r)| {
                        let client_ns_name = &client_ns_name;
                        s2.spawn(move || {
                            enter_netns(client_ns_name);
                            if r.failure.is_none() {
                                return verify(c, r);
                            }
                            // The connection failed (already a test failure). Still find out
                            // whether its acknowledged writes survived, over a fresh connection
                            // used only for this read-back.
                            let conn = r.conn;
                            match RespClient::try_connect(READ_TIMEOUT) {
                                Ok(mut fresh) => verify(&mut fresh, r)
                                    .into_iter()
                                    .map(|p| format!("{p} (read back over a fresh connection: connection {conn} failed)"))
                                    .collect(),
                                Err(e) => vec![format!("conn {conn} failed, and a fresh connection to read its writes back failed too: {e}")],
                            }
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("verify thread panicked")).collect()
            });
            extra.extend(verified.into_iter().flatten());
            if let Some(mut c) = dirtier {
                match c.try_cmd(&["PING"]) {
                    Ok(Reply::Status(s)) if s == "PONG" => {}
                    other => extra.push(format!("dirtying connection: final PING -> {other:?}")),
                }
            }
            (kill_moment, (kill_start, kill_end), results.into_iter().map(|(_, r)| r).collect::<Vec<_>>(), extra)
        })
    });
    problems.append(&mut extra);
    problems.extend(pre_kill_problem);

    // The early kill aims at the first 200 ms after protection; on a loaded two-core host the
    // harness itself (status, connections, threads) can take a little longer, so what is checked is
    // that it still landed in the first second, i.e. before the pair settled into steady epochs.
    let kill_after_up = kill_window.0 - up_returned;
    if matches!(at, KillAt::AfterUp(_)) && kill_after_up >= EARLY_KILL_LIMIT {
        problems.push(format!(
            "the early kill landed {:.3} s after site up returned, not within {:?} (setup too slow)",
            kill_after_up.as_secs_f64(),
            EARLY_KILL_LIMIT
        ));
    }

    // Step 5 (status): B took over (or, for a killed backup, A runs simplex).
    let polling = Instant::now();
    let (st, ok) = if host == "A" {
        site.wait_status(STATUS_TAKEOVER_TIMEOUT, |s| s.state == "failed over" && s.role_b == "primary" && s.role_a == "killed")
    } else {
        site.wait_status(STATUS_TAKEOVER_TIMEOUT, |s| s.state == "simplex" && s.role_a == "primary" && s.role_b == "killed")
    };
    let took = polling.elapsed();
    let want = if host == "A" { "failed over, A killed, B primary" } else { "simplex, A primary, B killed" };
    let takeover_ms = match &st.json["takeover_ms"] {
        serde_json::Value::Null => "-".to_string(),
        ms => ms.to_string(),
    };
    println!("[{label}] status: {st} (after {:.1} s of polling); takeover_ms reported by B: {takeover_ms}", took.as_secs_f64());
    if !ok {
        problems.push(format!("status after killing {host}: want {want}; got {st}\n{:#}", st.json));
    }

    Outcome { label: label.to_string(), site: name, kill_moment, kill_window, reports, problems }
}

/// Now, as `HH:MM:SS.mmm` UTC (to find the kill in the hosts' logs).
fn wall_clock() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let s = t.as_secs() % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600, s / 60 % 60, s % 60, t.subsec_millis())
}

/// Prints the figures of one scenario and returns its failures.
fn judge(o: &Outcome) -> Vec<String> {
    let mut failures: Vec<String> = o.problems.iter().map(|p| format!("[{}] {p}", o.label)).collect();
    let sets: u64 = o.reports.iter().map(|r| r.sets_acked.len() as u64).sum();
    let incrs: u64 = o.reports.iter().map(|r| r.incr_acked).sum();
    let acked = sets + incrs;
    let worst = o.reports.iter().max_by_key(|r| r.longest_gap).expect("connections");
    // The outage each connection saw around the kill: its longest gap between consecutive replies
    // (the load start counts as one) that overlaps the first 200 ms after `site kill` started (the
    // SIGKILL lands in there, a few ms in; `site kill` itself then waits for the processes to be
    // gone and pulls the links, which takes seconds). Its end, from the kill start, is the takeover
    // as this client saw it.
    let ks = o.kill_window.0;
    let ke = ks + Duration::from_millis(200);
    let outage = |r: &ConnReport| -> Option<(Duration, Duration)> {
        r.reply_times
            .windows(2)
            .filter(|w| w[0] < ke && w[1] > ks)
            .map(|w| (w[1] - w[0], w[1].saturating_duration_since(ks)))
            .max_by_key(|&(gap, _)| gap)
    };
    let outages: Vec<_> = o.reports.iter().map(outage).collect();
    let takeover = outages.iter().flatten().map(|&(_, end)| end).max();
    let worst_outage = outages.iter().flatten().map(|&(gap, _)| gap).max();
    let resets = o.reports.iter().filter(|r| r.failure.is_some()).count();
    println!("[{}] site {}: {}", o.label, o.site, o.kill_moment);
    println!(
        "[{}] requests acknowledged: {acked} ({incrs} INCR, {sets} SET) over {} connections; error replies: {}",
        o.label,
        o.reports.len(),
        o.reports.iter().map(|r| r.error_replies.len()).sum::<usize>()
    );
    println!(
        "[{}] takeover seen by the client (kill start to the end of the slowest connection's outage): {}; longest outage around the kill: {}",
        o.label,
        takeover.map_or("no reply around the kill".into(), |t| format!("{:.3} s", t.as_secs_f64())),
        worst_outage.map_or("-".into(), |t| format!("{:.3} s", t.as_secs_f64()))
    );
    let verified = o.reports.iter().fold((0, 0), |a, r| (a.0 + r.verified.0, a.1 + r.verified.1));
    println!(
        "[{}] read back on the same connections: {} counters and {} SET keys; problems: {}",
        o.label,
        verified.0,
        verified.1,
        o.problems.len()
    );
    println!(
        "[{}] longest gap between consecutive replies: {:.3} s (connection {}, ending {:.3} s into the load; target {:?}, bound {:?})",
        o.label,
        worst.longest_gap.as_secs_f64(),
        worst.conn,
        worst.longest_gap_end.as_secs_f64(),
        GAP_TARGET,
        GAP_BOUND
    );
    println!("[{}] connections reset or timed out: {resets}", o.label);
    for r in &o.reports {
        println!(
            "[{}]   conn {}: {} ops, {} after the kill, longest gap {:.3} s, outage around the kill {}{}",
            o.label,
            r.conn,
            r.ops,
            r.replies_after_kill,
            r.longest_gap.as_secs_f64(),
            outage(r).map_or("-".into(), |(g, _)| format!("{:.3} s", g.as_secs_f64())),
            r.failure.as_ref().map_or(String::new(), |f| format!(", FAILED: {f}"))
        );
        if let Some(f) = &r.failure {
            failures.push(format!("[{}] connection {} failed (no reconnect allowed): {f}", o.label, r.conn));
        }
        for a in r.incr_anomalies.iter().take(5) {
            failures.push(format!("[{}] conn {}: {a}", o.label, r.conn));
        }
        for e in r.error_replies.iter().take(3) {
            println!("[{}]   conn {}: error reply {e}", o.label, r.conn);
        }
        if r.failure.is_none() && r.replies_after_kill == 0 {
            failures.push(format!("[{}] connection {} got no reply after the kill", o.label, r.conn));
        }
    }
    if worst.longest_gap >= GAP_BOUND {
        failures.push(format!("[{}] longest gap {:.3} s >= {:?}", o.label, worst.longest_gap.as_secs_f64(), GAP_BOUND));
    }
    failures
}

// --------------------------------------------------------------------------------------------
// The tests.

/// One FT site at a time: two pairs on this machine's two cores would measure contention, not
/// failover (and could starve a primary into a false takeover).
static ONE_SITE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_site_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_SITE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn failover_keeps_every_acknowledged_write_and_the_connections() {
    require_root_and_kvm();
    let _serial = one_site_at_a_time();
    let mut rng = Rng::from_env_or_clock("failover");
    let plan = [
        ("early kill (first 200 ms after site up)", KillAt::AfterUp(rng.duration(Duration::ZERO, Duration::from_millis(200))), false),
        ("random kill", KillAt::AfterLoad(rng.duration(Duration::from_millis(300), Duration::from_secs(3))), false),
        ("kill under the dirtying load", KillAt::AfterLoad(rng.duration(Duration::from_millis(300), Duration::from_secs(3))), true),
    ];
    let mut failures = Vec::new();
    for (label, at, dirty) in plan {
        println!("[{label}] planned: {at:?}{}", if dirty { format!(", dirtying load FTVM.LOAD {DIRTY_LOAD}") } else { String::new() });
        let outcome = scenario(label, "A", at, dirty);
        failures.extend(judge(&outcome));
    }
    assert!(failures.is_empty(), "failover failures:\n{}", failures.join("\n"));
}

/// The same guarantees with copy-on-write checkpoints (the guest writing pages while they are
/// copied) over an io_uring A-Link sending pages zero-copy, and with the userfaultfd dirty tracker
/// over a plain io_uring A-Link that the backup reads through io_uring too: a kill under the
/// dirtying load for each.
#[test]
fn failover_with_copy_on_write_and_uffd_tracker_over_io_uring() {
    require_root_and_kvm();
    let _serial = one_site_at_a_time();
    let mut rng = Rng::from_env_or_clock("failover cow/uffd");
    let mut failures = Vec::new();
    for (label, up_args) in [
        ("copy-on-write, io_uring zero-copy, kill under the dirtying load", &["--checkpoint-copy", "cow", "--alink-io", "uring-zc"][..]),
        ("uffd tracker, io_uring both ways, kill under the dirtying load", &["--dirty-tracker", "uffd", "--alink-io", "uring", "--alink-read", "uring"][..]),
    ] {
        let at = KillAt::AfterLoad(rng.duration(Duration::from_millis(300), Duration::from_secs(3)));
        println!("[{label}] planned: {at:?}, dirtying load FTVM.LOAD {DIRTY_LOAD}");
        let outcome = scenario_with(label, "A", at, true, up_args);
        failures.extend(judge(&outcome));
    }
    assert!(failures.is_empty(), "failover failures:\n{}", failures.join("\n"));
}

#[test]
fn killing_the_backup_leaves_the_primary_serving() {
    require_root_and_kvm();
    let _serial = one_site_at_a_time();
    let mut rng = Rng::from_env_or_clock("backup killed");
    let at = KillAt::AfterLoad(rng.duration(Duration::from_millis(300), Duration::from_secs(3)));
    let label = "backup killed";
    println!("[{label}] planned: {at:?}");
    let outcome = scenario(label, "B", at, false);
    let failures = judge(&outcome);
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// A kill during the initial synchronisation. Until the first checkpoint after the sync commits,
/// the backup holds no consistent image (the sync streams memory while the guest runs), so it must
/// never resume what it has: it says there is nothing to resume, the site says "failed", and B
/// never serves. (The VM is not protected before the sync ends, as status says: writes
/// acknowledged then were never promised to survive.)
#[test]
fn killing_the_primary_during_the_initial_sync_never_resumes_a_partial_copy() {
    require_root_and_kvm();
    let _serial = one_site_at_a_time();
    let mut rng = Rng::from_env_or_clock("kill during sync");
    let label = "kill during the initial sync";
    let site = Site::up("fs", &["--no-wait"]).keep_logs();
    // The sync of 256 MiB of memory and a 64 MiB disk takes seconds here; kill somewhere in it.
    let delay = rng.duration(Duration::ZERO, Duration::from_millis(800));
    std::thread::sleep(delay);
    let pre = site.status();
    assert!(
        pre.state == "syncing" && pre.role_a == "primary" && pre.role_b == "backup",
        "[{label}] want the pair still syncing {delay:?} after `site up --no-wait`; got {pre}\n{:#}",
        pre.json
    );
    // The primary's status says how far the sync is, in figures a user can act on (or, in the
    // moment before it begins, that it is being prepared, never a made-up figure).
    let sync = &pre.json["hosts"][0]["detail"]["sync"];
    let detail = pre.json["hosts"][0]["detail"]["detail"].as_str().unwrap_or("");
    if sync.is_null() {
        assert_eq!(detail, "preparing the initial synchronisation", "[{label}] no sync figures in the primary's status");
    } else {
        let (sent, total, percent) = (sync["bytes_sent"].as_u64(), sync["bytes_total"].as_u64(), sync["percent"].as_u64());
        assert!(
            matches!((sent, total, percent), (Some(s), Some(t), Some(p)) if t >= 320 << 20 && s <= t && p <= 100),
            "[{label}] bad sync figures in the primary's status: {sync}"
        );
        assert!(detail.contains('%') && detail.contains("MiB"), "[{label}] sync detail {detail:?}");
    }
    let (kill_start, _) = site.kill("A");
    println!("[{label}] killed A {:.3} s after site up returned, while {} ({detail})", (kill_start - site.up_returned).as_secs_f64(), pre.state);

    // B must not take over: watch it for a while (its dead timeout is 250 ms; the link closes at once).
    let watch = Duration::from_secs(3);
    let until = Instant::now() + watch;
    let mut last = site.status();
    while Instant::now() < until {
        assert!(
            last.role_b != "primary" && last.state != "failed over",
            "[{label}] B took over from a partial synchronisation: {last}\n{:#}",
            last.json
        );
        std::thread::sleep(Duration::from_millis(100));
        last = site.status();
    }
    assert!(
        last.state == "failed" && last.role_a == "killed" && last.role_b == "backup",
        "[{label}] after {watch:?}: want failed / A killed / B backup; got {last}\n{:#}",
        last.json
    );
    assert!(
        last.json.to_string().contains("nothing to resume"),
        "[{label}] B does not say why it did not take over:\n{:#}",
        last.json
    );

    // And nothing answers for the guest.
    let client_ns = Netns::existing(&site.netns("client"));
    let reached = client_ns.run(|| RespClient::try_connect(Duration::from_secs(1)).and_then(|mut c| c.try_cmd(&["PING"])));
    assert!(reached.is_err(), "[{label}] something answered for the guest after the primary died in the sync: {reached:?}");
    println!("[{label}] B stayed backup and said: nothing to resume; site state {}", last.state);
}
