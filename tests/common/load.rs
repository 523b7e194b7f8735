//! A write load for fault tests: connections held open from the client namespace, each writing
//! its own keys (INCR on counters, SET of numbered keys) and recording every acknowledged reply;
//! afterwards every acknowledged write is checked through a fresh connection.
//!
//! Connections never reconnect: a connection that fails is reported, so "the same connections
//! keep working" is what a passing check means.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{enter_netns, Reply, RespClient};

/// Counters per connection.
const COUNTERS: u64 = 4;
/// Hard caps of each connection's loop.
const MAX_OPS: u64 = 200_000;
const HARD_LIMIT: Duration = Duration::from_secs(120);

/// What one connection saw.
#[derive(Clone, Debug, Default)]
pub struct ConnLog {
    pub conn: usize,
    /// Last acknowledged value of each counter.
    pub counters: HashMap<String, i64>,
    /// Every `n` whose `SET k<conn>:<n> <n>` was acknowledged.
    pub sets: Vec<u64>,
    /// INCR replies that skipped or repeated a value (a lost write seen on the connection).
    pub anomalies: Vec<String>,
    /// The I/O failure that ended the connection, if one did.
    pub failure: Option<String>,
    /// The longest time between two replies.
    pub longest_gap: Duration,
}

impl ConnLog {
    /// The same log without its first `checked` acknowledged SETs (already checked); the
    /// counters are few and always kept.
    pub fn sets_after(&self, checked: usize) -> Self {
        Self { sets: self.sets.get(checked..).unwrap_or_default().to_vec(), ..self.clone() }
    }
}

/// The running load.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    replies: Vec<Arc<AtomicU64>>,
    logs: Vec<Arc<Mutex<ConnLog>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `conns` connections from `client_ns`, each answering within `read_timeout`, as fast
    /// as the guest answers.
    pub fn start(client_ns: &str, conns: usize, read_timeout: Duration) -> Self {
        Self::start_paced(client_ns, conns, read_timeout, Duration::ZERO, HARD_LIMIT)
    }

    /// The same, each connection sleeping `pace` between requests (a long test keeps its record
    /// of writes small enough to check) and stopping by itself after `limit`.
    pub fn start_paced(client_ns: &str, conns: usize, read_timeout: Duration, pace: Duration, limit: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut replies = Vec::new();
        let mut logs = Vec::new();
        let mut threads = Vec::new();
        for conn in 0..conns {
            let (stop, count, ns) = (stop.clone(), Arc::new(AtomicU64::new(0)), client_ns.to_string());
            let log = Arc::new(Mutex::new(ConnLog { conn, ..ConnLog::default() }));
            replies.push(count.clone());
            logs.push(log.clone());
            let pacing = Pacing { pace, limit, read_timeout };
            threads.push(std::thread::spawn(move || run_conn(conn, &ns, &stop, &count, &log, pacing)));
        }
        Self { stop, replies, logs, threads }
    }

    /// What each connection saw so far (it goes on).
    pub fn logs(&self) -> Vec<ConnLog> {
        self.logs.iter().map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone()).collect()
    }

    /// Replies so far on each connection.
    pub fn replies(&self) -> Vec<u64> {
        self.replies.iter().map(|c| c.load(Ordering::SeqCst)).collect()
    }

    /// Waits until every connection got `more` replies beyond `since` (as returned by
    /// [`Load::replies`]); false on timeout.
    pub fn wait_progress(&self, since: &[u64], more: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.replies().iter().zip(since).all(|(now, then)| *now >= then + more) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stops the load and returns what each connection saw.
    pub fn stop(mut self) -> Vec<ConnLog> {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            t.join().expect("load thread panicked");
        }
        self.logs()
    }
}

/// How a connection paces itself.
#[derive(Clone, Copy, Debug)]
struct Pacing {
    pace: Duration,
    limit: Duration,
    read_timeout: Duration,
}

fn run_conn(conn: usize, ns: &str, stop: &AtomicBool, count: &AtomicU64, shared: &Mutex<ConnLog>, pacing: Pacing) {
    enter_netns(ns);
    let log = || shared.lock().unwrap_or_else(|e| e.into_inner());
    let mut client = match RespClient::try_connect(pacing.read_timeout) {
        Ok(c) => c,
        Err(e) => {
            log().failure = Some(format!("connect: {e}"));
            return;
        }
    };
    let started = Instant::now();
    let mut last = Instant::now();
    for n in 0..MAX_OPS {
        if stop.load(Ordering::SeqCst) || started.elapsed() > pacing.limit {
            break;
        }
        if !pacing.pace.is_zero() {
            std::thread::sleep(pacing.pace);
        }
        let (key, reply) = if n % 2 == 0 {
            let key = format!("c{conn}:{}", (n / 2) % COUNTERS);
            let r = client.try_cmd(&["INCR", &key]);
            (key, r)
        } else {
            let key = format!("k{conn}:{n}");
            let r = client.try_cmd(&["SET", &key, &n.to_string()]);
            (key, r)
        };
        let mut log = log();
        match reply {
            Ok(Reply::Integer(v)) => {
                let prev = log.counters.insert(key.clone(), v);
                if prev.is_some_and(|p| v != p + 1) || (prev.is_none() && v != 1) {
                    log.anomalies.push(format!("{key}: {prev:?} then {v}"));
                }
            }
            Ok(Reply::Status(s)) if s == "OK" => log.sets.push(n),
            Ok(other) => log.anomalies.push(format!("{key}: unexpected reply {other:?}")),
            Err(e) => {
                log.failure = Some(format!("{key}: {e}"));
                break;
            }
        }
        // The gap counts the pacing sleep out: it is the client's, not the VM's.
        log.longest_gap = log.longest_gap.max(last.elapsed().saturating_sub(pacing.pace));
        drop(log);
        count.fetch_add(1, Ordering::SeqCst);
        last = Instant::now();
    }
}

/// A key and what its value must satisfy.
type Expectation = (String, Box<dyn Fn(&Reply) -> bool + Send>);

/// Checks every acknowledged write through a fresh connection from `client_ns`; returns the
/// problems found (empty: nothing acknowledged was lost).
pub fn lost_writes(client_ns: &str, logs: &[ConnLog]) -> Vec<String> {
    let ns = client_ns.to_string();
    let wanted: Vec<Expectation> = logs
        .iter()
        .flat_map(|l| {
            let counters = l.counters.iter().map(|(k, &v)| {
                let check: Box<dyn Fn(&Reply) -> bool + Send> = Box::new(move |r: &Reply| match r {
                    Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).parse::<i64>().is_ok_and(|got| got >= v),
                    _ => false,
                });
                (k.clone(), check)
            });
            let sets = l.sets.iter().map(move |&n| {
                let check: Box<dyn Fn(&Reply) -> bool + Send> = Box::new(move |r: &Reply| *r == Reply::bulk(&n.to_string()));
                (format!("k{}:{n}", l.conn), check)
            });
            counters.chain(sets).collect::<Vec<_>>()
        })
        .collect();
    std::thread::spawn(move || {
        enter_netns(&ns);
        let mut problems = Vec::new();
        let mut client = match RespClient::try_connect(Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => return vec![format!("cannot connect to check the writes: {e}")],
        };
        for (key, ok) in &wanted {
            match client.try_cmd(&["GET", key]) {
                Ok(r) if ok(&r) => {}
                Ok(r) => problems.push(format!("{key}: acknowledged write lost (GET gives {r:?})")),
                Err(e) => {
                    problems.push(format!("{key}: {e}"));
                    break;
                }
            }
        }
        problems
    })
    .join()
    .expect("check thread panicked")
}
