//! Protection comes back (issue 9): a live `ftvm site` (witness quorum) whose hosts fail and are
//! repaired while writers keep their connections open.
//!
//! - Cycles: kill the primary → the backup takes over → `site repair` the dead host → protected
//!   again (the repaired host is the backup now) → kill the new primary → … After each cycle every
//!   acknowledged write reads back and every connection opened at the start still answers; the
//!   captures of the business LAN show the guest's frames leaving one host at a time, switching
//!   host only at a takeover. In the third cycle the killed host comes back with a blank disk
//!   (a replaced drive): it gets a full copy, and at a quiet point at the end both disks are equal.
//! - A backup that dies and comes back with an older disk and term: the primary goes on alone
//!   (a new term), the repaired backup never emits a guest frame, receives the current copy, and
//!   holds every acknowledged write (the primary is killed afterwards and the backup serves them);
//!   at a quiet point both disks are equal.
//! - Planned switchovers (`site switchover`) there and back under writes: one pause each, every
//!   connection and write kept, the frames leaving one host at a time.
//! - Both hosts die and the one with the older copy comes back first: it stands by and never
//!   serves; the other then restarts the VM from its disk, every acknowledged write there.
//!
//! Needs root, /dev/kvm and tcpdump (fails, never skips). One site at a time (two VMs each on a
//! two-core machine); every site is removed by its guard, its logs kept under
//! `/tmp/ftvm-test-logs/<site>/` when a test fails.

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use ftvm_system_tests::capture::{Capture, Packet};
    use ftvm_system_tests::load::{lost_writes, ConnLog, Load};
    use ftvm_system_tests::site::{Site, Status};
    use ftvm_system_tests::{guest_info, require_root_and_kvm, run_with_timeout, Netns, Reply, RespClient, TempDir};

    use ftvm_system_tests::{SITE_GUEST_MAC as GUEST_MAC, SITE_GUEST_MAC_TEXT as GUEST_MAC_TEXT};
    const CONNECTIONS: usize = 4;
    /// A request in flight at a kill waits for the takeover.
    const READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// Each connection sleeps this long between requests: the record of acknowledged writes of a
    /// minute-long test stays quick to check after every cycle.
    const PACE: Duration = Duration::from_millis(5);
    /// The writers stop by themselves after this long (the test is far shorter).
    const LOAD_LIMIT: Duration = Duration::from_secs(600);
    /// Replies each connection must get after each step.
    const REPLIES: u64 = 20;
    const SERVE_AGAIN: Duration = Duration::from_secs(30);
    const TAKEOVER: Duration = Duration::from_secs(30);
    const CYCLES: usize = 5;
    /// Values written while a host is away (the stretch its repair copies).
    const BURST_VALUES: usize = 256;
    const BURST_VALUE_BYTES: usize = 4096;
    /// The cycle whose killed host comes back with a blank disk.
    const BLANK_DISK_CYCLE: usize = 3;

    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn other(host: &str) -> &'static str {
        if host == "A" {
            "B"
        } else {
            "A"
        }
    }

    /// The business LAN's captures of the guest's frames, one per host's bridge port.
    struct Captures {
        a: Capture,
        b: Capture,
        _dir: TempDir,
    }

    impl Captures {
        fn start(site: &Site, tag: &str) -> Self {
            let dir = TempDir::new(tag);
            let lan = site.netns("lan");
            let filter = format!("ether src {GUEST_MAC_TEXT}");
            let a = Capture::start(&lan, "a0", &filter, dir.path(), "lan-a");
            let b = Capture::start(&lan, "b0", &filter, dir.path(), "lan-b");
            Self { a, b, _dir: dir }
        }

        /// The hosts that emitted guest frames, in the order of their turns: a new turn begins
        /// when the other host's frame comes. Two hosts serving at once would interleave their
        /// frames into many turns.
        fn turns(self, name: &str) -> Vec<&'static str> {
            let (a, dropped_a) = self.a.stop();
            let (b, dropped_b) = self.b.stop();
            assert_eq!((dropped_a, dropped_b), (0, 0), "[{name}] the captures dropped frames");
            let guest = |p: &&Packet| p.src_mac() == Some(GUEST_MAC);
            let mut frames: Vec<(u64, &'static str)> = a.iter().filter(guest).map(|p| (p.t_ns, "A")).collect();
            frames.extend(b.iter().filter(guest).map(|p| (p.t_ns, "B")));
            frames.sort_unstable();
            println!("[{name}] guest frames on the LAN: {} in all", frames.len());
            let mut turns: Vec<&'static str> = Vec::new();
            let mut last_of_turn = 0;
            for (t, host) in frames {
                if turns.last() != Some(&host) {
                    if let Some(prev) = turns.last() {
                        println!("[{name}] {host} emits {:.1} ms after {prev}'s last frame", (t - last_of_turn) as f64 / 1e6);
                    }
                    turns.push(host);
                }
                last_of_turn = t;
            }
            turns
        }
    }

    /// One test's site at a time: the site (`site up`), the captures of its LAN, and writers on
    /// open connections already served. Bound in this order, they go in reverse: the writers and
    /// captures, the site, then the turn of the next test.
    fn begin(tag: &str) -> (std::sync::MutexGuard<'static, ()>, Site, Captures, Load) {
        begin_with(tag, &[])
    }

    /// [`begin`], with `extra` arguments for `site up`.
    fn begin_with(tag: &str, extra: &[&str]) -> (std::sync::MutexGuard<'static, ()>, Site, Captures, Load) {
        let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        require_root_and_kvm();
        let site = Site::up(tag, extra);
        let caps = Captures::start(&site, tag);
        let load = Load::start_paced(&site.netns("client"), CONNECTIONS, READ_TIMEOUT, PACE, LOAD_LIMIT);
        serve_again(&site, &load, "at the start");
        (one, site, caps, load)
    }

    /// Checks the writes acknowledged since the last check (`checked` SETs per connection, moved
    /// on) and that every connection still answers on its first socket.
    fn check_writes(site: &Site, load: &Load, checked: &mut [usize], when: &str) {
        let name = &site.name;
        let logs = load.logs();
        for l in &logs {
            assert!(l.failure.is_none(), "[{name}] {when}: connection {} failed: {:?}", l.conn, l.failure);
            assert!(l.anomalies.is_empty(), "[{name}] {when}: connection {}: {:?}", l.conn, l.anomalies);
        }
        let fresh: Vec<ConnLog> = logs.iter().zip(checked.iter()).map(|(l, &c)| l.sets_after(c)).collect();
        let count: usize = fresh.iter().map(|l| l.sets.len() + l.counters.len()).sum();
        let lost = lost_writes(&site.netns("client"), &fresh);
        assert!(lost.is_empty(), "[{name}] {when}: {} acknowledged writes lost: {:?}", lost.len(), &lost[..lost.len().min(10)]);
        for (c, l) in checked.iter_mut().zip(&logs) {
            *c = l.sets.len();
        }
        println!("[{name}] {when}: {count} acknowledged writes read back");
    }

    fn serve_again(site: &Site, load: &Load, when: &str) {
        let since = load.replies();
        assert!(
            load.wait_progress(&since, REPLIES, SERVE_AGAIN),
            "[{}] {when}: not every connection is served: {:?} then {:?}",
            site.name,
            since,
            load.replies()
        );
    }

    fn wait_takeover(site: &Site, by: &str) -> Status {
        let (st, ok) = site.wait_status(TAKEOVER, |s| s.state == "failed over" && s.role(by) == "primary");
        assert!(ok, "[{}] host {by} did not take over: {st}\n{:#}", site.name, st.json);
        st
    }

    #[test]
    fn the_vm_survives_kill_and_repair_cycles_on_the_same_connections() {
        let (_one, site, caps, load) = begin("cyc");
        let name = site.name.clone();
        let mut checked = vec![0; CONNECTIONS];
        let mut primary = "A";
        wait_records_complete(&site);
        let started = Instant::now();
        for cycle in 1..=CYCLES {
            let backup = other(primary);
            let (killed, _) = site.kill(primary);
            let st = wait_takeover(&site, backup);
            let took_over = killed.elapsed();
            serve_again(&site, &load, &format!("cycle {cycle}, after the takeover by {backup}"));
            if cycle == BLANK_DISK_CYCLE {
                // This host comes back with a blank disk (a replaced drive): no term, no data.
                site.try_blank_disk(primary).unwrap_or_else(|e| panic!("[{name}] {e:#}"));
                println!("[{name}] cycle {cycle}: {primary}'s disk removed before its repair");
            }
            let repair = site.repair(primary);
            let st2 = site.status();
            assert!(
                st2.state == "protected" && st2.role(backup) == "primary" && st2.role(primary) == "backup",
                "[{name}] cycle {cycle}: after the repair of {primary}: {st2}"
            );
            serve_again(&site, &load, &format!("cycle {cycle}, protected again"));
            check_writes(&site, &load, &mut checked, &format!("cycle {cycle}"));
            // The repaired host's old disk gets the regions written since it died; a blank one
            // gets all of it.
            let sync = last_sync(&st2, backup);
            let want = if cycle == BLANK_DISK_CYCLE { "full" } else { "incremental" };
            assert_eq!(sync["disk_copy"], want, "[{name}] cycle {cycle}: the copy to {primary}'s disk: {sync}");
            println!("[{name}] cycle {cycle}: {} of {} disk bytes copied to {primary} ({want})", sync["disk_bytes_total"], sync["disk_size"]);
            println!(
                "[{name}] cycle {cycle}: {primary} killed, {backup} took over (status after {:.0} ms, takeover {}), \
                 {primary} repaired and the pair protected again in {:.1} s",
                took_over.as_secs_f64() * 1e3,
                st.json["takeover_ms"],
                repair.as_secs_f64()
            );
            primary = backup;
        }
        let logs = load.stop();
        // A quiet point: every host's disk is the one copy of the VM's disk, the blank one too.
        let (st, caught_up) = site.wait_status(Duration::from_secs(10), |s| {
            // A primary's report has the lag at its top, a host that took over under `serving`.
            let lag = s.detail(primary).and_then(|d| d["lag_epochs"].as_u64().or(d["serving"]["lag_epochs"].as_u64()));
            s.state == "protected" && lag.is_some_and(|l| l <= 1)
        });
        assert!(caught_up, "[{name}] the backup does not catch up at the quiet point: {st}");
        std::thread::sleep(Duration::from_millis(500));
        let (disk_a, disk_b) = (sha256(&site.dir().join("disk-a.img")), sha256(&site.dir().join("disk-b.img")));
        assert!(!disk_a.is_empty() && disk_a == disk_b, "[{name}] the disks differ at a quiet point: A {disk_a}, B {disk_b}");
        let longest = logs.iter().map(|l| l.longest_gap).max().unwrap_or_default();
        println!(
            "[{name}] {CYCLES} cycles in {:.1} s on the same {CONNECTIONS} connections; longest client gap {:.0} ms",
            started.elapsed().as_secs_f64(),
            longest.as_secs_f64() * 1e3
        );
        for l in &logs {
            assert!(l.failure.is_none(), "[{name}] connection {} failed: {:?}", l.conn, l.failure);
        }
        let turns = caps.turns(&name);
        let expected: Vec<&str> = (0..=CYCLES).map(|i| if i % 2 == 0 { "A" } else { "B" }).collect();
        assert_eq!(turns, expected, "[{name}] the guest's frames left the hosts in these turns");
    }

    /// The last synchronisation host `name` sent (see [`Status::last_sync`]).
    fn last_sync(st: &Status, name: &str) -> serde_json::Value {
        st.last_sync(name).unwrap_or_else(|| panic!("{name} reports no synchronisation: {st}")).clone()
    }

    /// Waits until both hosts' write-intent records know the past (see
    /// [`Status::disk_records_complete`]).
    fn wait_records_complete(site: &Site) {
        let (st, known) = site.wait_status(Duration::from_secs(30), Status::disk_records_complete);
        assert!(known, "[{}] the disks' write-intent records are not complete: {st}\n{:#}", site.name, st.json);
    }

    /// Host `name`'s `host_role` in status.
    fn host_role(st: &Status, name: &str) -> String {
        st.json["hosts"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["name"] == name))
            .and_then(|h| h["host_role"].as_str())
            .unwrap_or("-")
            .to_string()
    }

    /// Both hosts die, the one with the older copy comes back first: its service learns from the
    /// quorum that its copy is stale, stands by and never serves; the host with the current copy
    /// then starts the VM from its disk (every acknowledged write there), and the stale one
    /// becomes its backup.
    #[test]
    fn a_host_with_an_older_copy_never_serves_and_the_current_one_restarts_the_vm() {
        let (_one, site, caps, load) = begin("old");
        let name = site.name.clone();
        site.kill("A");
        wait_takeover(&site, "B");
        serve_again(&site, &load, "after the takeover by B");
        // B dies too: the VM runs nowhere. What was acknowledged is on B's disk.
        site.kill("B");
        let logs = load.stop();
        let writes: usize = logs.iter().map(|l| l.sets.len() + l.counters.len()).sum();

        // A's copy is from before B's takeover: its service must stand by, whatever it waits for.
        site.start_service("A");
        let (st, standing_by) = site.wait_status(Duration::from_secs(60), |s| host_role(s, "A") == "standby");
        assert!(standing_by, "[{name}] A's service did not stand by: {st}
{:#}", st.json);
        std::thread::sleep(Duration::from_secs(3));
        let st = site.status();
        assert_eq!(host_role(&st, "A"), "standby", "[{name}] A with an older copy: {st}");
        assert_eq!(st.state, "failed", "[{name}] nobody may serve: {st}");

        // B comes back: its copy is the current one, it runs the VM from its disk, A joins it.
        site.start_service("B");
        let (st, protected) = site.wait_status(Duration::from_secs(120), |s| s.state == "protected" && s.role_b == "primary");
        assert!(protected, "[{name}] B did not run the VM with A as its backup: {st}
{:#}", st.json);
        let lost = lost_writes(&site.netns("client"), &logs);
        assert!(lost.is_empty(), "[{name}] {} of {writes} acknowledged writes lost: {:?}", lost.len(), &lost[..lost.len().min(10)]);
        println!("[{name}] B restarted the VM from its disk with all {writes} acknowledged writes; A is its backup");
        let turns = caps.turns(&name);
        assert_eq!(turns, ["A", "B"], "[{name}] A emitted guest frames after its kill");
    }

    /// Planned switchovers under write load: A hands the VM to B at an epoch boundary, B protects
    /// it with A, then B hands it back. No write lost, no connection reset, the longest client gap
    /// printed and bounded, the frames leaving A, then B, then A again, never both.
    #[test]
    fn switchovers_under_writes_keep_every_connection_and_write() {
        let (_one, site, caps, load) = begin("swo");
        let name = site.name.clone();
        let mut checked = vec![0; CONNECTIONS];
        wait_records_complete(&site);
        for (from, to) in [("A", "B"), ("B", "A")] {
            let t = Instant::now();
            let out = site
                .try_run(&["site", "switchover", "--name", &name], Duration::from_secs(330))
                .unwrap_or_else(|e| panic!("[{name}] switchover {from} to {to}: {e:#}"));
            let took = t.elapsed();
            let st = site.status();
            assert!(
                st.state == "protected" && st.role(to) == "primary" && st.role(from) == "backup",
                "[{name}] after the switchover from {from}: {st}"
            );
            serve_again(&site, &load, &format!("after the switchover to {to}"));
            check_writes(&site, &load, &mut checked, &format!("switchover to {to}"));
            // The old primary kept the VM as it handed it over (memory, state, disk): it gets only
            // what was written since, no copy of memory or disk.
            let sync = last_sync(&st, to);
            assert_eq!(sync["disk_copy"], "incremental", "[{name}] the copy to {from}'s disk after the switchover: {sync}");
            assert_eq!(sync["memory_copy"], "incremental", "[{name}] the copy to {from}'s memory after the switchover: {sync}");
            let (memory_sent, memory) = (sync["memory_bytes_total"].as_u64().unwrap_or(u64::MAX), sync["memory_size"].as_u64().unwrap_or(0));
            assert!(memory_sent <= memory / 8, "[{name}] {memory_sent} bytes of memory sent to {from} of {memory}: {sync}");
            println!(
                "[{name}] switchover {from} → {to}: {memory_sent} of {memory} memory bytes and {} of {} disk bytes sent back to {from}",
                sync["disk_bytes_total"], sync["disk_size"]
            );
            println!("[{name}] switchover {from} → {to}: {}; protected again after {:.1} s", out.trim(), took.as_secs_f64());
        }
        let logs = load.stop();
        let longest = logs.iter().map(|l| l.longest_gap).max().unwrap_or_default();
        println!("[{name}] longest client gap over both switchovers: {:.0} ms", longest.as_secs_f64() * 1e3);
        for l in &logs {
            assert!(l.failure.is_none(), "[{name}] connection {} failed: {:?}", l.conn, l.failure);
        }
        let lost = lost_writes(&site.netns("client"), &logs);
        assert!(lost.is_empty(), "[{name}] {} acknowledged writes lost: {:?}", lost.len(), &lost[..lost.len().min(10)]);
        // One pause each, not a retransmission timeout's worth of them.
        assert!(longest < Duration::from_secs(2), "[{name}] a client waited {longest:?}");
        let turns = caps.turns(&name);
        assert_eq!(turns, ["A", "B", "A"], "[{name}] the guest's frames left the hosts in these turns");
    }

    /// `ftvm --version` of a build.
    fn version_of(binary: &std::path::Path) -> String {
        let out = run_with_timeout(std::process::Command::new(binary).arg("--version"), Duration::from_secs(30));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A rolling upgrade with two builds, the older speaking the previous A-Link minor (built by
    /// `cargo xtask build-previous-minor`, which the test command runs): both hosts start on the
    /// older build; the backup is upgraded (killed, started from the new build: it pairs with the
    /// older primary at the older minor); a switchover moves the VM to it; the old primary is
    /// upgraded the same way, and a switchover brings the VM back. Writers keep their connections
    /// and every acknowledged write throughout, and the frames leave one host at a time.
    #[test]
    fn a_rolling_upgrade_across_two_builds_keeps_every_connection_and_write() {
        let old = ftvm_system_tests::workspace_root().join("target/compat/debug/ftvm");
        assert!(old.is_file(), "{} is missing: `cargo xtask build-previous-minor` builds it", old.display());
        let new = ftvm_system_tests::ftvm_bin();
        let (old_version, new_version) = (version_of(&old), version_of(&new));
        let current = format!("protocol {}.{}", ftvm_proto::frame::PROTOCOL_MAJOR, ftvm_proto::frame::PROTOCOL_MINOR);
        assert!(old_version.contains("protocol 1.4") && new_version.contains(&current), "builds: {old_version:?} and {new_version:?}");
        let old_arg = old.display().to_string();
        let (_one, site, caps, load) = begin_with("upg", &["--host-a-binary", &old_arg, "--host-b-binary", &old_arg]);
        let name = site.name.clone();
        let mut checked = vec![0; CONNECTIONS];
        let new_arg = new.display().to_string();
        let upgrade = |host: &str| {
            site.kill(host);
            let t = Instant::now();
            site.try_run(&["site", "repair", "--name", &name, host, "--binary", &new_arg], Duration::from_secs(330))
                .unwrap_or_else(|e| panic!("[{name}] upgrading {host}: {e:#}"));
            let st = site.status();
            assert!(st.state == "protected" && st.role(host) == "backup", "[{name}] after upgrading {host}: {st}");
            println!("[{name}] {host} upgraded to {new_version:?} and protected again after {:.1} s", t.elapsed().as_secs_f64());
        };
        let switch_over = |from: &str, to: &str| {
            let out = site
                .try_run(&["site", "switchover", "--name", &name], Duration::from_secs(330))
                .unwrap_or_else(|e| panic!("[{name}] switchover {from} to {to}: {e:#}"));
            let st = site.status();
            assert!(st.state == "protected" && st.role(to) == "primary", "[{name}] after the switchover from {from}: {st}");
            println!("[{name}] switchover {from} → {to}: {}", out.trim());
            st
        };
        upgrade("B");
        serve_again(&site, &load, "B upgraded");
        check_writes(&site, &load, &mut checked, "B upgraded, A on the older build");
        switch_over("A", "B");
        serve_again(&site, &load, "on B");
        upgrade("A");
        serve_again(&site, &load, "A upgraded");
        check_writes(&site, &load, &mut checked, "both upgraded");
        let st = switch_over("B", "A");
        // Both on the new build now: the switchover back copies only what changed.
        assert_eq!(last_sync(&st, "A")["memory_copy"], "incremental", "[{name}] {st}");
        serve_again(&site, &load, "back on A");
        check_writes(&site, &load, &mut checked, "back on A");
        let logs = load.stop();
        for l in &logs {
            assert!(l.failure.is_none(), "[{name}] connection {} failed: {:?}", l.conn, l.failure);
        }
        let turns = caps.turns(&name);
        assert_eq!(turns, ["A", "B", "A"], "[{name}] the guest's frames left the hosts in these turns");
    }

    /// The sha256 of a file.
    fn sha256(path: &std::path::Path) -> String {
        let out = run_with_timeout(std::process::Command::new("sha256sum").arg(path), Duration::from_secs(60));
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
    }

    /// The guest's append-only log: its size and how many times it was rewritten.
    fn guest_log(site: &Site) -> (u64, u64) {
        let info = guest_info(&Netns::existing(&site.netns("client")));
        let field = |k: &str| info.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("[{}] INFO has no {k}: {info:?}", site.name));
        (field("aof_current_size"), field("aof_rewrites"))
    }

    /// Writes `count` values of `bytes` each on a connection of its own; returns the keys and
    /// values acknowledged (every one must be).
    fn write_burst(site: &Site, count: usize, bytes: usize) -> Vec<(String, String)> {
        Netns::existing(&site.netns("client")).run(|| {
            let mut c = RespClient::connect();
            (0..count)
                .map(|i| {
                    let (key, value) = (format!("burst:{i}"), format!("{i:08}").repeat(bytes / 8));
                    let reply = c.cmd(&["SET", &key, &value]);
                    assert!(matches!(reply, Reply::Status(ref s) if s == "OK"), "[{}] SET {key}: {reply:?}", site.name);
                    (key, value)
                })
                .collect()
        })
    }

    /// A backup that dies and comes back with its old disk (and term): it never serves, and its
    /// repair copies of the disk only the regions written since the copies diverged (the
    /// write-intent records of both hosts), close to the bytes the guest wrote meanwhile and far
    /// below the disk's size; at a quiet point both disks are equal, and when the primary then
    /// dies the repaired backup serves every acknowledged write.
    #[test]
    fn a_backup_back_with_an_old_disk_never_serves_and_gets_the_current_copy() {
        let (_one, site, caps, load) = begin("stale");
        let name = site.name.clone();
        let term_before = site.status().detail("A").and_then(|d| d["quorum"]["term"].as_u64()).unwrap_or_default();
        wait_records_complete(&site);

        // B dies: A goes on alone under a new term; B's disk and term are from before it.
        site.kill("B");
        // A's own word: the site says "simplex" as soon as B's process is gone.
        let (st, ok) = site.wait_status(TAKEOVER, |s| host_role(s, "A") == "simplex-primary");
        assert!(ok, "[{name}] A did not go on alone: {st}");
        let term_alone = st.detail("A").and_then(|d| d["quorum"]["term"].as_u64()).unwrap_or_default();
        assert!(term_alone > term_before, "[{name}] running alone took no new term: {term_before} then {term_alone}");
        serve_again(&site, &load, "A alone");
        // What the guest writes while the copies differ: about 1 MiB of values, and the writers.
        let (log_before, rewrites_before) = guest_log(&site);
        let burst = write_burst(&site, BURST_VALUES, BURST_VALUE_BYTES);
        let (log_after, rewrites_after) = guest_log(&site);
        let written = log_after.saturating_sub(log_before);

        let repair = site.repair("B");
        let st = site.status();
        assert!(st.is_protected(), "[{name}] after the repair of B: {st}");
        let b_term = st.detail("B").and_then(|d| d["quorum"]["term"].as_u64());
        println!("[{name}] B repaired and the pair protected again in {:.1} s; terms: {term_before} before, {term_alone} alone, B's now {b_term:?}", repair.as_secs_f64());
        let sync = &last_sync(&st, "A");
        let (copied, disk_size) = (sync["disk_bytes_total"].as_u64().unwrap_or(u64::MAX), sync["disk_size"].as_u64().unwrap_or(0));
        println!(
            "[{name}] B's disk: {copied} bytes copied of {disk_size} ({}); the guest's log grew by {written} bytes while the copies differed",
            sync["disk_copy"]
        );
        assert_eq!(sync["disk_copy"], "incremental", "[{name}] B came back with its old disk: {sync}");
        assert!(copied <= disk_size / 8, "[{name}] {copied} bytes copied of a {disk_size}-byte disk");
        if rewrites_after == rewrites_before {
            // The regions written (256 KiB each), a region at either end of the stretch, and the
            // regions the writers and the log's header touched around it.
            assert!(written >= (BURST_VALUES * BURST_VALUE_BYTES) as u64, "[{name}] the log grew by only {written} bytes");
            assert!(copied >= written, "[{name}] {copied} bytes copied, but {written} were written");
            assert!(copied <= written + (2 << 20), "[{name}] {copied} bytes copied for {written} written");
        }
        serve_again(&site, &load, "protected again");

        // A quiet point: the writers stop, the last epochs are acknowledged; both disks are then
        // one copy (the whole disk was sent to B, then every write since).
        let logs = load.stop();
        for l in &logs {
            assert!(l.failure.is_none(), "[{name}] connection {} failed: {:?}", l.conn, l.failure);
            assert!(l.anomalies.is_empty(), "[{name}] connection {}: {:?}", l.conn, l.anomalies);
        }
        let (st, ok) = site.wait_status(Duration::from_secs(10), |s| {
            s.state == "protected" && s.detail("A").and_then(|d| d["lag_epochs"].as_u64()).is_some_and(|l| l <= 1)
        });
        assert!(ok, "[{name}] the backup does not catch up at the quiet point: {st}");
        std::thread::sleep(Duration::from_millis(500));
        let (disk_a, disk_b) = (sha256(&site.dir().join("disk-a.img")), sha256(&site.dir().join("disk-b.img")));
        assert!(!disk_a.is_empty() && disk_a == disk_b, "[{name}] the disks differ at a quiet point: A {disk_a}, B {disk_b}");

        // A dies: B serves every acknowledged write, from the copy it received.
        site.kill("A");
        wait_takeover(&site, "B");
        let lost = lost_writes(&site.netns("client"), &logs);
        assert!(lost.is_empty(), "[{name}] {} acknowledged writes lost: {:?}", lost.len(), &lost[..lost.len().min(10)]);
        let burst_lost = Netns::existing(&site.netns("client")).run(|| {
            let mut c = RespClient::connect();
            burst.iter().filter(|(k, v)| c.cmd(&["GET", k]) != Reply::Bulk(Some(v.clone().into_bytes()))).count()
        });
        assert_eq!(burst_lost, 0, "[{name}] values written while B was away are gone after B's takeover");
        let writes: usize = logs.iter().map(|l| l.sets.len() + l.counters.len()).sum();
        println!("[{name}] B took over with all {writes} acknowledged writes and the {BURST_VALUES} values written while it was away");
        let turns = caps.turns(&name);
        assert_eq!(turns, ["A", "B"], "[{name}] B emitted guest frames before its takeover");
    }
}
