//! A request the primary took in but never committed is answered by the backup after a takeover,
//! without the client retransmitting it: the primary sends its VM's input ahead on the A-Link, and
//! the takeover gives the restored VM what the dead primary had taken after the committed epoch.
//!
//! The site checkpoints only every 3 s, so the request's reply is still held when host A is
//! SIGKILLed half a second after the request. Captures on the LAN show that A never released the
//! reply, that B sent it, and that the client sent the request again neither between the kill and
//! B's reply (so B answered the input it replayed, not a retransmission) nor at all, as far as its
//! namespace allows (`rto_min` of 30 s on its route to the guest, no tail loss probe).
//!
//! A second test sends a request to host A right after its service was SIGKILLed, before B took
//! over: the request reaches A's TAP, which A's lease watchdog holds, and the watchdog forwards it
//! to B (`ftvm_repl::late_input`). B answers it without the client retransmitting. Then A is
//! repaired (the backup of B now), B is killed the same way, and A answers.
//!
//! Needs root, /dev/kvm, tcpdump and the eBPF object; fails, never skips. The site is removed by
//! its guard on every exit path.

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use ftvm_system_tests::capture::{Capture, Packet};
    use ftvm_system_tests::site::Site;
    use ftvm_system_tests::{
        require_root_and_kvm, run_ok, Netns, Reply, RespClient, TempDir, GUEST_IP, SITE_GUEST_MAC_TEXT,
    };

    fn realtime_ns() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }

    /// Checkpoints every 3 s and at no other time: the request's reply waits up to that long.
    const EPOCH_US: &str = "3000000";
    /// The client's smallest retransmission timeout: far beyond the test.
    const CLIENT_RTO_MIN: &str = "30s";
    /// From the request to the kill: the primary has taken it in and forwarded it long before.
    const KILL_AFTER: Duration = Duration::from_millis(500);
    /// From the kill to the request sent to the dead primary's host.
    const SEND_AFTER_KILL: Duration = Duration::from_millis(3);
    /// How long the reply may take after the kill (the takeover takes tens of milliseconds).
    const REPLY_TIMEOUT: Duration = Duration::from_secs(8);

    /// TCP payload of an IPv4 frame from port `from` to port `to`, if it is one.
    fn tcp_payload(p: &Packet, from: u16, to: u16) -> Option<&[u8]> {
        let d = &p.data;
        if d.len() < 14 + 20 || d[12..14] != [0x08, 0x00] || d[23] != 6 {
            return None;
        }
        let ihl = usize::from(d[14] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([d[16], d[17]]));
        let tcp = 14 + ihl;
        let ports = d.get(tcp..tcp + 4)?;
        if u16::from_be_bytes([ports[0], ports[1]]) != from || u16::from_be_bytes([ports[2], ports[3]]) != to {
            return None;
        }
        let doff = usize::from(d.get(tcp + 12)? >> 4) * 4;
        d.get(tcp + doff..(14 + total).min(d.len()))
    }

    /// The client's namespace retransmits nothing for the test's length; returns its name.
    fn no_retransmission_from_the_client(site: &Site) -> String {
        let client_ns = site.netns("client");
        let route = run_ok(Command::new("ip").args(["-n", &client_ns, "-o", "route", "get", &GUEST_IP.to_string()]));
        let dev = route.split_whitespace().skip_while(|w| *w != "dev").nth(1).expect("the client's route to the guest").to_string();
        run_ok(Command::new("ip").args(["-n", &client_ns, "route", "replace", &format!("{GUEST_IP}/32"), "dev", &dev, "rto_min", CLIENT_RTO_MIN]));
        run_ok(Command::new("ip").args(["netns", "exec", &client_ns, "sysctl", "-q", "-w", "net.ipv4.tcp_early_retrans=0"]));
        client_ns
    }

    #[test]
    fn a_request_the_dead_primary_took_in_is_answered_by_the_backup_without_a_retransmission() {
        require_root_and_kvm();
        let site = Site::up("ing", &["--epoch-us", EPOCH_US, "--min-epoch-gap-us", "0"]).keep_logs();
        let name = site.name.clone();
        let st = site.status();
        assert!(st.is_protected(), "[{name}] not protected after up: {st}");

        let client_ns = no_retransmission_from_the_client(&site);

        let dir = TempDir::new("ing");
        let ns = Netns::existing(&client_ns);
        let (port, reply, after_kill, retrans, value) = ns.run(|| {
            let mut c = RespClient::try_connect(REPLY_TIMEOUT).expect("connect to the guest");
            // A reply comes right after a checkpoint: the next is 3 s away.
            assert_eq!(c.try_cmd(&["SET", "warm", "1"]).expect("SET warm"), Reply::Status("OK".into()), "[{name}]");
            let port = c.local_port();
            let filter = format!("ether src {SITE_GUEST_MAC_TEXT} and tcp src port 6379 and tcp dst port {port}");
            let cap_a = Capture::start(&site.netns("lan"), "a0", &filter, dir.path(), "lan-a");
            let cap_b = Capture::start(&site.netns("lan"), "b0", &filter, dir.path(), "lan-b");
            let cap_c = Capture::start(&site.netns("lan"), "c0", &format!("tcp src port {port} and tcp dst port 6379"), dir.path(), "lan-c");
            c.try_send(&["INCR", "taken-by-a"]).expect("send the INCR");
            let sent = Instant::now();
            std::thread::sleep(KILL_AFTER.saturating_sub(sent.elapsed()));
            let kill_ns = realtime_ns();
            let (_, killed) = site.kill("A");
            assert!(
                sent.elapsed() < Duration::from_millis(2500),
                "[{name}] the kill came {:?} after the request: a checkpoint may have committed it",
                sent.elapsed()
            );
            let reply = c.try_read_reply();
            let after_kill = killed.elapsed();
            let retrans = c.total_retransmits();
            let value = c.try_cmd(&["GET", "taken-by-a"]);
            std::thread::sleep(Duration::from_millis(200));
            let (a, dropped_a) = cap_a.stop();
            let (b, dropped_b) = cap_b.stop();
            let (from_client, dropped_c) = cap_c.stop();
            assert_eq!((dropped_a, dropped_b, dropped_c), (0, 0, 0), "[{name}] the captures dropped frames");
            let ok = |p: &&Packet| tcp_payload(p, 6379, port).is_some_and(|d| d == b":1\r\n");
            assert_eq!(a.iter().filter(ok).count(), 0, "[{name}] A released the reply of a request it never committed");
            let first_ok_b = b.iter().find(ok).map(|p| p.t_ns);
            let Some(ok_b_ns) = first_ok_b else {
                panic!("[{name}] B's port shows no reply to the client ({} frames captured there)", b.len());
            };
            let request = |p: &&Packet| {
                tcp_payload(p, port, 6379).is_some_and(|d| d.windows(10).any(|w| w == b"taken-by-a"))
            };
            let sends: Vec<u64> = from_client.iter().filter(request).map(|p| p.t_ns).collect();
            let rel = |t: u64| (t as f64 - kill_ns as f64) / 1e6;
            println!(
                "[{name}] the request went out at {:?} ms from the kill; B's reply at {:.1} ms",
                sends.iter().map(|&t| (rel(t) * 10.0).round() / 10.0).collect::<Vec<_>>(),
                rel(ok_b_ns)
            );
            assert!(!sends.is_empty(), "[{name}] the capture at the client's port misses the request");
            assert!(
                !sends.iter().any(|&t| t >= kill_ns && t <= ok_b_ns),
                "[{name}] the client sent the request again between the kill and B's reply: B may have answered the retransmission, not the replayed input"
            );
            (port, reply, after_kill, retrans, value)
        });
        println!("[{name}] client port {port}: reply {reply:?} {after_kill:?} after the kill, {retrans} retransmissions");
        assert_eq!(
            reply.as_ref().map_err(|e| e.to_string()),
            Ok(&Reply::Integer(1)),
            "[{name}] the request A had taken in got no reply from B"
        );
        assert_eq!(value.map_err(|e| e.to_string()), Ok(Reply::bulk("1")), "[{name}] the replayed INCR is not in the store once");

        let (st, took_over) = site.wait_status(Duration::from_secs(20), |s| s.role_b == "primary");
        assert!(took_over, "[{name}] B's status does not say it took over: {st}");
        let replayed = st.detail("B").and_then(|d| d["takeover_ingress_replayed"].as_u64());
        assert!(replayed.is_some_and(|n| n >= 1), "[{name}] B's status names no replayed input: {:#}", st.json);
    }

    /// SIGKILLs `dead`'s service (the primary), sends a request at once, and checks that it
    /// reached `dead`'s host, that `survivor` answered it, and that the client sent it once. `key`
    /// is a fresh key the request increments.
    fn request_right_after_the_kill(site: &Site, client_ns: &str, dead: &str, survivor: &str, key: &str) {
        let name = site.name.clone();
        let pids = site.host_pids(dead).expect("the primary's pids");
        let dir = TempDir::new("late");
        let ns = Netns::existing(client_ns);
        let (port, reply, retrans, value) = ns.run(|| {
            let mut c = RespClient::try_connect(REPLY_TIMEOUT).expect("connect to the guest");
            assert_eq!(c.try_cmd(&["SET", "warm", "1"]).expect("SET warm"), Reply::Status("OK".into()), "[{name}]");
            let port = c.local_port();
            let to_guest = format!("tcp src port {port} and tcp dst port 6379");
            // What reaches the dying host (captured as it comes in on its business port).
            let cap_dead = Capture::start(&site.netns(&dead.to_ascii_lowercase()), "biz0", &to_guest, dir.path(), "dead-biz");
            let cap_survivor = Capture::start(
                &site.netns("lan"),
                &format!("{}0", survivor.to_ascii_lowercase()),
                &format!("ether src {SITE_GUEST_MAC_TEXT} and tcp src port 6379 and tcp dst port {port}"),
                dir.path(),
                "lan-survivor",
            );
            let cap_client = Capture::start(&site.netns("lan"), "c0", &to_guest, dir.path(), "lan-c");
            // The SIGKILL, then the request: after the dying host's watchdog has seen the death
            // (an idle process dies in about a millisecond), before the survivor takes over (it
            // needs about ten).
            let kill_ns = realtime_ns();
            for &p in &pids {
                // SAFETY: SIGKILL to the primary's ftvm process, recorded in the site's state (not
                // a child of this process, so its pid cannot be reused by one this test starts).
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(SEND_AFTER_KILL);
            c.try_send(&["INCR", key]).expect("send the INCR");
            let sent_ns = realtime_ns();
            site.kill(dead);
            let reply = c.try_read_reply();
            let retrans = c.total_retransmits();
            let value = c.try_cmd(&["GET", key]);
            std::thread::sleep(Duration::from_millis(200));
            let (at_dead, dropped_d) = cap_dead.stop();
            let (from_survivor, dropped_s) = cap_survivor.stop();
            let (from_client, dropped_c) = cap_client.stop();
            assert_eq!((dropped_d, dropped_s, dropped_c), (0, 0, 0), "[{name}] the captures dropped frames");
            // The INCR itself (the GET after it names the same key).
            let request = |p: &&Packet| {
                tcp_payload(p, port, 6379)
                    .is_some_and(|d| d.windows(4).any(|w| w == b"INCR") && d.windows(key.len()).any(|w| w == key.as_bytes()))
            };
            let rel = |t: u64| (t as f64 - kill_ns as f64) / 1e6;
            let sends: Vec<f64> = from_client.iter().filter(request).map(|p| rel(p.t_ns)).collect();
            let reached: Vec<f64> = at_dead.iter().filter(request).map(|p| rel(p.t_ns)).collect();
            let ok = |p: &&Packet| tcp_payload(p, 6379, port).is_some_and(|d| d == b":1\r\n");
            let answered = from_survivor.iter().find(ok).map(|p| rel(p.t_ns));
            println!(
                "[{name}] {dead} killed; request sent {:.2} ms later, on the wire at {sends:?} ms, at {dead}'s port at {reached:?} ms; {survivor}'s reply at {answered:?} ms",
                rel(sent_ns)
            );
            assert_eq!(sends.len(), 1, "[{name}] the client sent the request {} times (a retransmission would hide the forwarding)", sends.len());
            assert_eq!(reached.len(), 1, "[{name}] the request did not go to {dead}'s host ({survivor} may have served already): nothing to forward");
            assert!(answered.is_some(), "[{name}] {survivor}'s port shows no reply to the request ({} frames captured there)", from_survivor.len());
            (port, reply, retrans, value)
        });
        println!("[{name}] client port {port}: reply {reply:?}, {retrans} retransmissions");
        assert_eq!(
            reply.as_ref().map_err(|e| e.to_string()),
            Ok(&Reply::Integer(1)),
            "[{name}] the request sent to the dead {dead} got no reply from {survivor}"
        );
        assert_eq!(value.map_err(|e| e.to_string()), Ok(Reply::bulk("1")), "[{name}] the forwarded INCR is not in the store once");
        let (st, took_over) = site.wait_status(Duration::from_secs(20), |s| s.role(survivor) == "primary");
        assert!(took_over, "[{name}] {survivor}'s status does not say it took over: {st}");
        let delivered = st.detail(survivor).and_then(|d| d["late_input"]["delivered"].as_u64());
        assert!(delivered.is_some_and(|n| n >= 1), "[{name}] {survivor}'s status names no late input delivered: {:#}", st.json);
    }

    /// Both ways: the first primary's watchdog forwards, and so does the watchdog of the host
    /// that took over, once the first is back as its backup.
    #[test]
    fn a_request_sent_to_the_dead_primary_is_forwarded_by_its_watchdog_and_answered_by_the_backup() {
        require_root_and_kvm();
        let site = Site::up("late", &[]).keep_logs();
        let name = site.name.clone();
        let st = site.status();
        assert!(st.is_protected(), "[{name}] not protected after up: {st}");
        let client_ns = no_retransmission_from_the_client(&site);
        request_right_after_the_kill(&site, &client_ns, "A", "B", "sent-to-dead-a");
        site.repair("A");
        request_right_after_the_kill(&site, &client_ns, "B", "A", "sent-to-dead-b");
    }
}
