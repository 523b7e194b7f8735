//! Exactly one copy serves: a live `ftvm site` (witness quorum) under a matrix of faults.
//!
//! Each case: `site up`, two captures on the business LAN (the bridge ports of host A and host B,
//! frames whose source is the guest's MAC), writers on open connections from the client namespace
//! recording every acknowledged INCR and SET; then the fault; then, once the VM serves again:
//! - the captures show the guest's frames leaving one host, then possibly the other, never both
//!   at once (no frame of the first after the first frame of the second), and the host expected
//!   to serve is the one that does;
//! - every acknowledged write reads back, no INCR skipped or repeated on a connection;
//! - the same connections keep working (no reconnect), each with fresh replies after the fault;
//! - status names the roles the rules give; after a fault the backup survived ((a), (g)) the
//!   primary finds it again and the pair is protected again by itself.
//!
//! Faults: (a) the A-Link's TCP connection reset; (b) the A-Link down both ways; (c) the A-Link
//! down and the witness unreachable from A; (d) the witness unreachable from B only; (e) the
//! witness stopped, then the primary killed (no takeover until the witness is back); (f) the
//! primary stopped 400 ms, then continued; (g) the backup stopped 2 s; (h) the primary killed;
//! (k) the primary stopped 3 s, longer than its lease, then continued; (l) the primary killed in
//! the middle of a rewrite of the guest's log (the standby's disk holds a half-written region);
//! (j) (b), (c) and (h) with a real etcd (Debian's etcd-server, started by `site up --quorum etcd`)
//! as the quorum.
//!
//! Needs root, /dev/kvm and tcpdump (fails, never skips). Cases run one at a time (two VMs each on
//! a two-core machine); every site is removed by its guard, its logs kept under
//! `/tmp/ftvm-test-logs/<site>/` when a case fails.

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::process::{Command, Stdio};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use ftvm_system_tests::capture::{Capture, Packet};
    use ftvm_system_tests::load::{lost_writes, ConnLog, Load};
    use ftvm_system_tests::rng::Rng;
    use ftvm_system_tests::site::{Site, Status};
    use ftvm_system_tests::{guest_info, redis_cli, require_root_and_kvm, run_with_timeout, Netns, TempDir, GUEST_IP};

    use ftvm_system_tests::{SITE_GUEST_MAC as GUEST_MAC, SITE_GUEST_MAC_TEXT as GUEST_MAC_TEXT};
    const CONNECTIONS: usize = 4;
    /// A request in flight at a fault may wait for the takeover (the lease runs out in about a
    /// second, case (e) waits for the witness to come back).
    const READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// Replies each connection must get before the fault and after it.
    const REPLIES: u64 = 30;
    /// How long the VM may take to serve again after a fault (the documented bound is 2 s; this
    /// shared machine gets slack).
    const SERVE_AGAIN: Duration = Duration::from_secs(20);

    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// Which host must be serving after the fault.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Serving {
        A,
        B,
    }

    struct Case {
        site: Site,
        caps: Option<(Capture, Capture)>,
        load: Option<Load>,
        _dir: TempDir,
        fault_at: Instant,
    }

    fn ftvm_in(site: &Site, args: &[&str]) {
        let out = Command::new("ip").args(args).stdin(Stdio::null()).output().expect("ip");
        assert!(out.status.success(), "[{}] ip {}: {}", site.name, args.join(" "), String::from_utf8_lossy(&out.stderr));
    }

    fn signal(pid: i32, sig: i32) {
        // SAFETY: a signal to a process of the site this test owns.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    impl Case {
        fn begin(tag: &str) -> Self {
            Self::begin_with(tag, &[])
        }

        /// With `site up <extra>` (e.g. `--quorum etcd`).
        fn begin_with(tag: &str, extra: &[&str]) -> Self {
            require_root_and_kvm();
            let site = Site::up(tag, extra);
            let dir = TempDir::new(tag);
            let lan = site.netns("lan");
            let filter = format!("ether src {GUEST_MAC_TEXT}");
            let caps = (
                Capture::start(&lan, "a0", &filter, dir.path(), "lan-a"),
                Capture::start(&lan, "b0", &filter, dir.path(), "lan-b"),
            );
            let load = Load::start(&site.netns("client"), CONNECTIONS, READ_TIMEOUT);
            assert!(
                load.wait_progress(&[0; CONNECTIONS], REPLIES, Duration::from_secs(30)),
                "[{}] the load did not start: {:?}",
                site.name,
                load.replies()
            );
            let st = site.status();
            assert!(st.is_protected(), "[{}] not protected before the fault: {st}", site.name);
            Self { site, caps: Some(caps), load: Some(load), _dir: dir, fault_at: Instant::now() }
        }

        fn mark_fault(&mut self) {
            self.fault_at = Instant::now();
        }

        fn pid(&self, host: &str) -> i32 {
            self.site.host_pids(host).expect("host pid")[0]
        }

        /// Waits until every connection got fresh replies (the VM serves again, on the same
        /// connections), then stops the load and the captures and checks writes and frames.
        fn finish(&mut self, serving: Serving) -> Status {
            let name = self.site.name.clone();
            let load = self.load.take().expect("load");
            let at_fault = load.replies();
            let served = load.wait_progress(&at_fault, REPLIES, SERVE_AGAIN);
            let serve_again = self.fault_at.elapsed();
            let logs = load.stop();
            let (cap_a, cap_b) = self.caps.take().expect("captures");
            let (frames_a, dropped_a) = cap_a.stop();
            let (frames_b, dropped_b) = cap_b.stop();
            print_conns(&name, &logs);
            assert!(served, "[{name}] the VM did not serve every connection again within {SERVE_AGAIN:?}");
            // The wait above starts only after the case's own checks (status polling), so the
            // client-side figure is the longest silence any connection saw.
            let longest_gap = logs.iter().map(|l| l.longest_gap).max().unwrap_or_default();
            println!(
                "[{name}] every connection served again {:.0} ms after the fault; longest client gap {:.0} ms",
                serve_again.as_secs_f64() * 1e3,
                longest_gap.as_secs_f64() * 1e3
            );
            for l in &logs {
                assert!(l.failure.is_none(), "[{name}] connection {} failed: {:?}", l.conn, l.failure);
                assert!(l.anomalies.is_empty(), "[{name}] connection {}: {:?}", l.conn, l.anomalies);
            }
            let lost = lost_writes(&self.site.netns("client"), &logs);
            assert!(lost.is_empty(), "[{name}] {} acknowledged writes lost: {:?}", lost.len(), &lost[..lost.len().min(10)]);
            assert_eq!((dropped_a, dropped_b), (0, 0), "[{name}] the captures dropped frames");
            one_host_at_a_time(&name, &frames_a, &frames_b, serving);
            self.site.status()
        }
    }

    fn print_conns(name: &str, logs: &[ConnLog]) {
        for l in logs {
            println!(
                "[{name}] conn {}: {} counters, {} sets, longest gap {:.0} ms, failure {:?}",
                l.conn,
                l.counters.len(),
                l.sets.len(),
                l.longest_gap.as_secs_f64() * 1e3,
                l.failure
            );
        }
    }

    /// The guest's frames leave A, then possibly B, never both at once; `serving` is the host that
    /// emits last.
    fn one_host_at_a_time(name: &str, a: &[Packet], b: &[Packet], serving: Serving) {
        let guest = |p: &&Packet| p.src_mac() == Some(GUEST_MAC);
        let a: Vec<u64> = a.iter().filter(guest).map(|p| p.t_ns).collect();
        let b: Vec<u64> = b.iter().filter(guest).map(|p| p.t_ns).collect();
        println!("[{name}] guest frames on the LAN: {} from A, {} from B", a.len(), b.len());
        assert!(!a.is_empty(), "[{name}] no guest frame from A at all: the capture is broken");
        match serving {
            Serving::A => assert!(b.is_empty(), "[{name}] B emitted {} guest frames while A serves", b.len()),
            Serving::B => {
                let first_b = *b.first().unwrap_or_else(|| panic!("[{name}] B never emitted: it does not serve"));
                let late_a: Vec<_> = a.iter().filter(|&&t| t >= first_b).collect();
                assert!(
                    late_a.is_empty(),
                    "[{name}] {} guest frames left A after B's first ({} ns after)",
                    late_a.len(),
                    late_a.last().map_or(0, |&&t| t - first_b)
                );
                println!("[{name}] last frame from A {:.1} ms before B's first", (first_b - a[a.len() - 1]) as f64 / 1e6);
            }
        }
    }

    fn host_detail(st: &Status, host: &str, key: &str) -> String {
        st.detail(host).and_then(|d| d.get(key)).map(|v| v.to_string()).unwrap_or_default()
    }

    #[test]
    fn a_reset_alink_connection_leaves_one_primary() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin("fma");
        c.mark_fault();
        ftvm_in(&c.site, &["netns", "exec", &c.site.netns("b"), "ss", "-K", "sport = :7700"]);
        let st = c.finish(Serving::A);
        assert_eq!((st.role_a.as_str(), st.role_b.as_str()), ("primary", "backup"), "{st}");
        protected_again(&c.site, "the A-Link was reset");
    }

    /// The primary, alone after a fault its backup survived, finds that backup again by itself:
    /// the pair is protected again, the roles as they were.
    fn protected_again(site: &Site, after: &str) {
        let started = Instant::now();
        let (st, ok) = site.wait_status(Duration::from_secs(60), Status::is_protected);
        assert!(ok, "[{}] not protected again after {after}: {st}", site.name);
        println!("[{}] protected again {:.1} s after {after} was over", site.name, started.elapsed().as_secs_f64());
    }

    #[test]
    fn a_cut_alink_leaves_the_primary_serving_alone() {
        cut_alink("fmb", &[]);
    }

    /// (j) The same three faults with etcd as the quorum.
    #[test]
    fn with_etcd_a_cut_alink_leaves_the_primary_serving_alone() {
        cut_alink("fjb", &["--quorum", "etcd"]);
    }

    #[test]
    fn with_etcd_a_cut_alink_and_a_primary_cut_off_from_etcd_moves_the_vm_to_b() {
        cut_alink_and_quorum_from_a("fjc", &["--quorum", "etcd"]);
    }

    #[test]
    fn with_etcd_a_killed_primary_is_taken_over_at_once() {
        kill_primary("fjh", &["--quorum", "etcd"], WatchdogPipe::Closes);
    }

    fn cut_alink(tag: &str, extra: &[&str]) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin_with(tag, extra);
        c.mark_fault();
        for h in ["a", "b"] {
            ftvm_in(&c.site, &["-n", &c.site.netns(h), "link", "set", "alink0", "down"]);
        }
        let st = c.finish(Serving::A);
        assert_eq!(st.state, "simplex", "{st}");
        assert!(host_detail(&st, "B", "last_error").contains("refused the takeover"), "{st}: {:?}", st.detail("B"));
    }

    #[test]
    fn a_cut_alink_and_a_primary_cut_off_from_the_witness_moves_the_vm_to_b() {
        cut_alink_and_quorum_from_a("fmc", &[]);
    }

    fn cut_alink_and_quorum_from_a(tag: &str, extra: &[&str]) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin_with(tag, extra);
        c.mark_fault();
        ftvm_in(&c.site, &["-n", &c.site.netns("witness"), "link", "set", "wit-a", "down"]);
        for h in ["a", "b"] {
            ftvm_in(&c.site, &["-n", &c.site.netns(h), "link", "set", "alink0", "down"]);
        }
        let st = c.finish(Serving::B);
        assert_eq!(st.role_b, "primary", "{st}");
        assert_ne!(st.role_a, "primary", "{st}");
        assert_eq!(st.state, "failed over", "{st}");
    }

    #[test]
    fn a_witness_unreachable_from_the_backup_changes_nothing() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin("fmd");
        c.mark_fault();
        ftvm_in(&c.site, &["-n", &c.site.netns("witness"), "link", "set", "wit-b", "down"]);
        std::thread::sleep(Duration::from_secs(2));
        let st = c.finish(Serving::A);
        assert!(st.is_protected(), "{st}");
    }

    #[test]
    fn with_the_witness_down_the_pair_stays_protected_and_a_dead_primary_waits_for_it() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin("fme");
        c.site.kill("witness");
        // Longer than a lease: the pair goes on, protected, on the backup's acknowledgements.
        let before = c.load.as_ref().unwrap().replies();
        std::thread::sleep(Duration::from_secs(2));
        assert!(c.load.as_ref().unwrap().wait_progress(&before, REPLIES, Duration::from_secs(10)), "writes stalled without the witness");
        let st = c.site.status();
        assert!(st.is_protected(), "[{}] without the witness: {st}", c.site.name);
        // The primary dies: the backup may not take over without the quorum, and says why.
        c.mark_fault();
        c.site.kill("A");
        std::thread::sleep(Duration::from_secs(2));
        let st = c.site.status();
        assert_eq!(st.role_b, "backup", "[{}] took over without the quorum: {st}", c.site.name);
        let why = host_detail(&st, "B", "last_error");
        assert!(why.contains("refused the takeover") && why.contains("unreachable"), "[{}] {why}", c.site.name);
        // The witness comes back: the lease of the dead primary runs out, B takes over.
        let dir = c.site.dir();
        let s = |p: &str| dir.join(p).display().to_string();
        let log = std::fs::File::create(dir.join("host-witness-2.log")).unwrap();
        let _w = Reaped(Command::new(ftvm_system_tests::ftvm_bin())
            .args(["witness", "--netns", &c.site.netns("witness"), "--listen", "10.88.0.10:7800"])
            .args(["--secret-file", &s("witness.secret"), "--state-dir", &s("witness-state")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart the witness"));
        let st = c.finish(Serving::B);
        assert_eq!(st.role_b, "primary", "{st}");
    }

    /// A child process killed and waited for on every exit path.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_primary_stalled_400_ms_carries_on_and_nothing_else_serves() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin("fmf");
        let pid = c.pid("A");
        c.mark_fault();
        signal(pid, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(400));
        signal(pid, libc::SIGCONT);
        let st = c.finish(Serving::A);
        assert_eq!(st.role_a, "primary", "{st}");
        assert_eq!(st.role_b, "backup", "{st}");
    }

    /// (k) The primary stopped longer than its lease (3 s): B takes over once A's lease ran out,
    /// and A, continued, releases nothing it held (the captures show no frame of A after B's
    /// first) and stops its copy.
    #[test]
    fn a_primary_stalled_past_its_lease_is_taken_over_and_releases_nothing_after() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin("fmk");
        let pid = c.pid("A");
        c.mark_fault();
        signal(pid, libc::SIGSTOP);
        let (st, took_over) = c.site.wait_status(Duration::from_secs(10), |s| s.role_b == "primary");
        let stalled = c.fault_at.elapsed();
        std::thread::sleep(Duration::from_secs(3).saturating_sub(stalled));
        signal(pid, libc::SIGCONT);
        assert!(took_over, "[{}] B did not take over from a stopped primary: {st}", c.site.name);
        println!("[{}] B serving {:.0} ms after A was stopped", c.site.name, stalled.as_secs_f64() * 1e3);
        // A, continued, learns that its lease is gone and stops its copy.
        let (st, fenced) = c.site.wait_status(Duration::from_secs(10), |s| s.role_a != "primary");
        assert!(fenced, "[{}] A still says primary after it was continued: {st}", c.site.name);
        let st = c.finish(Serving::B);
        assert_eq!(st.role_b, "primary", "{st}");
    }

    #[test]
    fn a_backup_stalled_2_s_leaves_the_primary_serving() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin("fmg");
        let pid = c.pid("B");
        c.mark_fault();
        signal(pid, libc::SIGSTOP);
        std::thread::sleep(Duration::from_secs(2));
        signal(pid, libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(500));
        let st = c.finish(Serving::A);
        assert_eq!(st.role_a, "primary", "{st}");
        assert_ne!(st.role_b, "primary", "{st}");
        protected_again(&c.site, "the backup's stall");
    }

    /// The guest's `DBSIZE`, asked from the client namespace.
    fn dbsize(client: &Netns) -> u64 {
        let out = redis_cli(client, &["DBSIZE"]);
        out.trim_start_matches("(integer) ").parse().unwrap_or_else(|e| panic!("DBSIZE {out:?}: {e}"))
    }

    /// The `INFO` field `name` as a number.
    fn info_num(info: &HashMap<String, String>, name: &str) -> Option<u64> {
        info.get(name)?.parse().ok()
    }

    #[test]
    fn a_primary_killed_mid_rewrite_of_the_guest_log_loses_nothing() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut rng = Rng::from_env_or_clock("a_primary_killed_mid_rewrite");
        let mut c = Case::begin("fml");
        let name = c.site.name.clone();
        let client = Netns::existing(&c.site.netns("client"));
        // About 10 MB of live data, so that a rewrite (a bounded step per guest loop turn) lasts.
        let ip = GUEST_IP.to_string();
        let mut preload = Command::new("ip");
        preload.args(["netns", "exec", &c.site.netns("client"), "redis-benchmark", "-h", &ip, "-q"]);
        preload.args(["-t", "set", "-d", "2048", "-r", "5000", "-n", "10000", "-c", "20", "-P", "8"]);
        let out = run_with_timeout(&mut preload, Duration::from_secs(120));
        assert!(out.status.success(), "[{name}] preload: {}", String::from_utf8_lossy(&out.stderr));
        let before = info_num(&guest_info(&client), "aof_rewrites").expect("INFO aof_rewrites");
        // The writers only add keys: none of these may be missing on B.
        let keys_before = dbsize(&client);
        let started = redis_cli(&client, &["BGREWRITEAOF"]);
        assert!(started.contains("rewriting started"), "[{name}] BGREWRITEAOF: {started}");
        std::thread::sleep(rng.duration(Duration::from_millis(1), Duration::from_millis(40)));
        // Still running as the kill is sent (the reply left after an epoch that has it running
        // was committed, so B's copy is at or after that point).
        assert_eq!(info_num(&guest_info(&client), "aof_rewrite_in_progress"), Some(1), "[{name}] the rewrite ended before the kill (preload more data)");
        c.mark_fault();
        let (killed, _) = c.site.kill("A");
        let (st, active) = c.site.wait_status(Duration::from_secs(20), |s| s.role_b == "primary");
        assert!(active, "[{name}] B did not take over: {st}");
        println!("[{name}] B serving {:.0} ms after the kill", killed.elapsed().as_secs_f64() * 1e3);
        // Every write acknowledged by A, on the same connections, and one host at a time.
        let st = c.finish(Serving::B);
        assert_eq!(st.state, "failed over", "{st}");
        // The restored guest carries the rewrite on, on B's copy of the disk, and ends it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let done = loop {
            let info = guest_info(&client);
            let (running, count) = (info_num(&info, "aof_rewrite_in_progress"), info_num(&info, "aof_rewrites"));
            if running == Some(0) && count.is_some_and(|n| n > before) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(done, "[{name}] the rewrite begun on A did not end on B");
        let keys_after = dbsize(&client);
        assert!(keys_after >= keys_before, "[{name}] keys lost: {keys_before} before the kill, {keys_after} on B");
    }

    #[test]
    fn a_killed_primary_is_taken_over_at_once() {
        kill_primary("fmh", &[], WatchdogPipe::Closes);
    }

    #[test]
    fn a_killed_primary_is_taken_over_at_once_before_its_descriptors_close() {
        kill_primary("fmp", &[], WatchdogPipe::Held);
    }

    /// What becomes of the killed primary's pipe to its lease watchdog.
    #[derive(PartialEq)]
    enum WatchdogPipe {
        /// It ends with the primary.
        Closes,
        /// The test holds it open past the takeover, as a slow end of the primary would (its
        /// descriptors close only once its memory is torn down and every thread is out of the
        /// kernel): the watchdog must learn of the death without it.
        Held,
    }

    fn kill_primary(tag: &str, extra: &[&str], pipe: WatchdogPipe) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Case::begin_with(tag, extra);
        let held = (pipe == WatchdogPipe::Held)
            .then(|| c.site.hold_watchdog_pipe("A").unwrap_or_else(|e| panic!("[{}] {e:#}", c.site.name)));
        c.mark_fault();
        let (killed, _) = c.site.kill("A");
        // "primary" already while B promotes; its takeover time comes once the VM runs.
        let (st, active) =
            c.site.wait_status(Duration::from_secs(20), |s| s.role_b == "primary" && s.json["takeover_ms"].is_number());
        let seen = killed.elapsed();
        assert!(active, "[{}] B did not take over: {st}", c.site.name);
        let takeover_ms = st.json["takeover_ms"].as_f64().unwrap_or(f64::NAN);
        println!("[{}] B serving {:.0} ms after the kill was sent (seen by polling); takeover {takeover_ms:.1} ms", c.site.name, seen.as_secs_f64() * 1e3);
        // The watchdog released the lease: no wait for it to run out (1 s).
        assert!(takeover_ms < 1000.0, "[{}] takeover {takeover_ms} ms: the lease was waited out", c.site.name);
        drop(held);
        // The watchdog told B of the death as soon as it had released the lease.
        let notices = st.json["hosts"][1]["detail"]["late_input"]["death_notices"].as_u64();
        assert!(notices >= Some(1), "[{}] B got no death notice from A's watchdog: {}", c.site.name, st.json["hosts"][1]["detail"]["late_input"]);
        let st = c.finish(Serving::B);
        assert_eq!(st.state, "failed over", "{st}");
        // B is the primary now: its heartbeat responder answers probes (a backup has none). It is
        // attached once the restored VM runs (the takeover does not wait for it), in a moment.
        let responder_of = |s: &Status| s.json["hosts"][1]["detail"]["ebpf"]["responder"].clone();
        let (st, attached) = c.site.wait_status(Duration::from_secs(10), |s| responder_of(s)["daemon_state"] == "running");
        assert!(attached, "[{}] no heartbeat responder on B after the takeover: {}", c.site.name, responder_of(&st));
    }
}
