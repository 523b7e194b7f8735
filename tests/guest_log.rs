//! The reference guest's log rewrites itself in the background (`guest/kv/src/aof.rs`): a write
//! load many times the disk's size keeps succeeding, and a VM killed at random moments while
//! rewrites run comes back with every acknowledged write.
//!
//! Writers pipeline `SET`s of known values over a bounded key space from the test's namespace and
//! record, per key, the last acknowledged value and the values sent after it whose replies never
//! came (a write in flight at a kill may or may not have reached the log). After a restart each
//! key must hold its last acknowledged value or one of those later ones.
//!
//! Needs root and /dev/kvm (fails, never skips).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_system_tests::rng::Rng;
use ftvm_system_tests::{
    enter_netns, guest_info, parse_info, require_root_and_kvm, run_with_timeout, Netns, Reply, RespClient, TempDir, Vm,
    VmOptions, GUEST_IP,
};

/// Commands each writer keeps in flight.
const DEPTH: usize = 64;
/// How long a writer waits for a reply (a killed VM never answers).
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Hard cap of each writer's run.
const WRITER_LIMIT: Duration = Duration::from_secs(40);

/// What the writers know about one key.
#[derive(Clone, Debug, Default)]
struct KeyLog {
    /// The last value whose `SET` was acknowledged (or that a check read back).
    acked: Option<String>,
    /// Values sent after it whose replies never came.
    unacked: Vec<String>,
}

/// One writer's end: its keys, the writes acknowledged, and why it stopped early, if it did.
#[derive(Debug)]
struct WriterEnd {
    keys: HashMap<String, KeyLog>,
    acked: u64,
    error: Option<String>,
}

/// Pipelined writers, each over its own keys.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<WriterEnd>>,
}

impl Writers {
    /// Starts `n` writers of `keys` keys each; `round` makes their values unique across runs, and
    /// `known` is what earlier runs left.
    fn start(ns: &Netns, n: usize, keys: usize, round: u32, known: &HashMap<String, KeyLog>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|id| {
                let (ns, stop) = (ns.name().to_string(), stop.clone());
                let mine: HashMap<String, KeyLog> =
                    (0..keys).map(|k| format!("gl{id}:{k}")).map(|k| (k.clone(), known.get(&k).cloned().unwrap_or_default())).collect();
                std::thread::spawn(move || write_keys(&ns, round, mine, &stop))
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops the writers and merges what they know.
    fn stop(self) -> (HashMap<String, KeyLog>, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut keys, mut acked, mut errors) = (HashMap::new(), 0, Vec::new());
        for t in self.threads {
            let end = t.join().expect("writer panicked");
            keys.extend(end.keys);
            acked += end.acked;
            errors.extend(end.error);
        }
        (keys, acked, errors)
    }
}

fn write_keys(ns: &str, round: u32, mut keys: HashMap<String, KeyLog>, stop: &AtomicBool) -> WriterEnd {
    enter_netns(ns);
    let names: Vec<String> = {
        let mut v: Vec<String> = keys.keys().cloned().collect();
        v.sort();
        v
    };
    let end = |keys, acked, error| WriterEnd { keys, acked, error };
    let mut client = match RespClient::try_connect(READ_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return end(keys, 0, Some(format!("connect: {e}"))),
    };
    let (started, mut acked, mut n) = (Instant::now(), 0u64, 0usize);
    let mut inflight: VecDeque<(String, String)> = VecDeque::new();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < WRITER_LIMIT {
        for _ in 0..DEPTH {
            let key = &names[n % names.len()];
            let value = format!("{round}:{n}:{}", "v".repeat(40 + n % 60));
            n += 1;
            keys.get_mut(key).expect("own key").unacked.push(value.clone());
            if let Err(e) = client.try_send(&["SET", key, &value]) {
                return end(keys, acked, Some(format!("send: {e}")));
            }
            inflight.push_back((key.clone(), value));
        }
        while let Some((key, value)) = inflight.pop_front() {
            match client.try_read_reply() {
                Ok(Reply::Status(s)) if s == "OK" => {
                    let log = keys.get_mut(&key).expect("own key");
                    // Replies come in order: everything sent before this value is settled.
                    let at = log.unacked.iter().position(|v| *v == value).expect("sent");
                    log.unacked.drain(..=at);
                    log.acked = Some(value);
                    acked += 1;
                }
                Ok(other) => return end(keys, acked, Some(format!("SET {key}: {other:?}"))),
                Err(e) => return end(keys, acked, Some(format!("read: {e}"))),
            }
        }
    }
    end(keys, acked, None)
}

/// Reads every key back (pipelined) and checks it holds its last acknowledged value or a later
/// one sent; afterwards what was read is what is acknowledged. Returns the problems found.
fn check_keys(ns: &Netns, keys: &mut HashMap<String, KeyLog>) -> Vec<String> {
    let names: Vec<String> = keys.keys().cloned().collect();
    let got: Vec<Option<String>> = ns.run(|| {
        let mut c = RespClient::try_connect(Duration::from_secs(10)).expect("connect to check the keys");
        names
            .chunks(DEPTH)
            .flat_map(|batch| {
                for k in batch {
                    c.try_send(&["GET", k]).expect("send GET");
                }
                batch
                    .iter()
                    .map(|k| match c.try_read_reply().expect("read GET") {
                        Reply::Bulk(v) => v.map(|v| String::from_utf8_lossy(&v).into_owned()),
                        other => panic!("GET {k}: {other:?}"),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    });
    let mut problems = Vec::new();
    for (name, value) in names.iter().zip(got) {
        let log = keys.get_mut(name).expect("known key");
        let fine = value == log.acked || value.as_ref().is_some_and(|v| log.unacked.contains(v));
        if !fine {
            problems.push(format!("{name}: holds {value:?}, last acknowledged {:?} ({} sent after it)", log.acked, log.unacked.len()));
        }
        *log = KeyLog { acked: value, unacked: Vec::new() };
    }
    problems
}

/// The `INFO` field `name` as a number.
fn info_field(c: &mut RespClient, name: &str) -> Option<u64> {
    let Ok(Reply::Bulk(Some(info))) = c.try_cmd(&["INFO", "persistence"]) else { return None };
    parse_info(&info).get(name)?.parse().ok()
}

fn num(info: &HashMap<String, String>, field: &str) -> u64 {
    info.get(field).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {field} in INFO: {info:?}"))
}

fn dbsize(ns: &Netns) -> Reply {
    ns.run(|| RespClient::connect().cmd(&["DBSIZE"]))
}

fn boot(tag: &str, disk_size: &str) -> (Netns, TempDir, VmOptions) {
    require_root_and_kvm();
    let ns = Netns::new(tag);
    let dir = TempDir::new(tag);
    let mut opts = VmOptions::new(dir.path().join("disk.img"));
    opts.extra_args = vec!["--disk-size".into(), disk_size.into()];
    (ns, dir, opts)
}

const MIB: u64 = 1 << 20;

#[test]
fn a_write_load_several_times_the_disk_size_keeps_succeeding() {
    let disk = 8 * MIB;
    let (ns, dir, opts) = boot("glload", "8M");
    let mut vm = Vm::start(&ns, dir.path(), &opts);
    let writers = Writers::start(&ns, 4, 250, 1, &HashMap::new());
    // 2 x 400 000 writes of at least 50 bytes of log each over 2 000 keys: about 5 times the disk.
    let ip = GUEST_IP.to_string();
    let out = run_with_timeout(
        &mut ns.exec(&[
            "redis-benchmark", "-h", &ip, "-t", "set,incr", "-r", "1000", "-n", "400000", "-c", "50", "-P", "16", "-q",
        ]),
        Duration::from_secs(120),
    );
    let (mut keys, acked, errors) = writers.stop();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "redis-benchmark failed: {stdout}\n{stderr}");
    for text in [&stdout, &stderr] {
        assert!(!text.contains("ERR") && !text.to_lowercase().contains("error"), "redis-benchmark saw errors: {text}");
    }
    assert!(errors.is_empty(), "writers: {errors:?}");
    assert!(acked > 1000, "the writers got {acked} writes through");

    let i = guest_info(&ns);
    println!(
        "rewrites {}, log {} of a {}-byte region, last rewrite {} bytes, {} writes",
        i["aof_rewrites"], i["aof_current_size"], i["aof_region_size"], i["aof_last_rewrite_bytes"], i["aof_last_seq"]
    );
    assert!(num(&i, "aof_last_seq") * 50 >= 4 * disk, "the load logged less than 4 times the disk: {i:?}");
    assert!(num(&i, "aof_rewrites") >= 1, "{i:?}");
    assert_eq!(i["aof_rewrites_abandoned"], "0");
    assert_eq!(i["aof_last_bgrewrite_status"], "ok");
    assert!(num(&i, "aof_current_size") < num(&i, "aof_region_size"), "{i:?}");
    assert!(num(&i, "aof_region_size") <= disk / 2, "{i:?}");
    assert!(vm.console().contains("log rewrite done"), "{}", vm.console());
    // The guest's own counters (the bench's cost per command): every idle wait ends a turn of
    // its main loop, and a load of pipelined requests takes far fewer turns than commands.
    let (turns, waits) = (num(&i, "ftvm_loop_turns"), num(&i, "ftvm_idle_waits"));
    assert!(waits > 0 && waits <= turns && turns < num(&i, "total_commands_processed"), "{i:?}");
    let problems = check_keys(&ns, &mut keys);
    assert!(problems.is_empty(), "{problems:#?}");
    // redis-benchmark's 1 000 keys and 1 000 counters, and the writers' 1 000 keys.
    let size = dbsize(&ns);
    assert_eq!(size, Reply::Integer(3000));

    assert!(vm.stop().success(), "ftvm did not exit cleanly on SIGTERM:\n{}", vm.stderr());
    drop(vm);
    let vm = Vm::start(&ns, dir.path(), &opts);
    let problems = check_keys(&ns, &mut keys);
    assert!(problems.is_empty(), "after the restart: {problems:#?}\n{}", vm.console());
    assert!(keys.values().all(|k| k.acked.is_some()));
    assert_eq!(dbsize(&ns), size);
    let i = guest_info(&ns);
    assert!(num(&i, "aof_replayed_records") > 0 && num(&i, "aof_current_size") < num(&i, "aof_region_size"), "{i:?}");
}

#[test]
fn a_power_cut_mid_rewrite_keeps_every_acknowledged_write() {
    const ITERATIONS: u32 = 6;
    let (ns, dir, opts) = boot("glcut", "16M");
    let mut rng = Rng::from_env_or_clock("guest_log power cut");
    let mut keys = HashMap::new();
    let (mut mid_rewrite, mut writes) = (0, 0);
    let test_started = Instant::now();
    for round in 1..=ITERATIONS {
        let vm = Vm::start(&ns, dir.path(), &opts);
        let problems = check_keys(&ns, &mut keys);
        assert!(problems.is_empty(), "round {round}, after the restart: {problems:#?}\n{}", vm.console());
        let writers = Writers::start(&ns, 4, 1500, round, &keys);
        // Let the log grow past a rewrite or two, then kill the VM at a random moment once a
        // rewrite runs (asking for one if none has started by the deadline).
        let warm = rng.duration(Duration::from_millis(300), Duration::from_millis(1500));
        let seen = ns.run(|| {
            std::thread::sleep(warm);
            let mut c = RespClient::try_connect(READ_TIMEOUT).expect("connect for INFO");
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut asked = false;
            while Instant::now() < deadline {
                if info_field(&mut c, "aof_rewrite_in_progress") == Some(1) {
                    return true;
                }
                if !asked && Instant::now() + Duration::from_secs(4) > deadline {
                    asked = c.try_cmd(&["BGREWRITEAOF"]).is_ok();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        });
        std::thread::sleep(rng.duration(Duration::ZERO, Duration::from_millis(15)));
        let console = vm.console();
        drop(vm); // SIGKILL
        mid_rewrite += u32::from(seen);
        let (after, acked, errors) = writers.stop();
        writes += acked;
        // A writer ends with an I/O error when the VM dies; never with an error reply.
        assert!(errors.iter().all(|e| !e.starts_with("SET")), "round {round}: {errors:?}\n{console}");
        keys = after;
        assert!(console.contains("log rewrite started"), "round {round}: no rewrite ran\n{console}");
        assert!(test_started.elapsed() < Duration::from_secs(240), "the test overran");
    }
    let vm = Vm::start(&ns, dir.path(), &opts);
    let problems = check_keys(&ns, &mut keys);
    assert!(problems.is_empty(), "after the last kill: {problems:#?}\n{}", vm.console());
    let i = guest_info(&ns);
    println!(
        "{ITERATIONS} kills, {mid_rewrite} seen mid-rewrite, {writes} acknowledged writes; log {} of {} bytes",
        i["aof_current_size"], i["aof_region_size"]
    );
    assert_eq!(dbsize(&ns), Reply::Integer(6000));
    assert!(mid_rewrite * 2 >= ITERATIONS, "only {mid_rewrite} of {ITERATIONS} kills came while a rewrite ran");
}
