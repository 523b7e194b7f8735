//! The fencing gate and the A-Link heartbeat responder (`ftvm-ebpf-host` over the object built by
//! `cargo xtask build-ebpf`), on the real kernel, in real network namespaces. Needs root: the
//! tests fail (never skip) without it.
//!
//! Gate topology (one "host" namespace bridged like a real host, see DESIGN.md, "Network data
//! path"):
//!
//! ```text
//!  guest ns            host ns                                   lan ns
//!  eth0 (GUEST_MAC) ── gst0 ─┐                          
//!                            br0 ── biz0 (gate: tcx egress + XDP) ── lan0 (PEER_MAC)
//! ```
//!
//! Frames are raw Ethernet frames (ethertype 0x88b5, "local experimental") sent and received with
//! AF_PACKET sockets, so the source MAC is whatever the test says and no ARP or IP is involved.
//!
//! Responder topology: namespaces `a` and `b` joined by a veth pair `alink0` (10.77.9.1/30 and
//! .2/30); a responder on `a`'s end only (generic mode on veth: its XDP_TX replies reach `b` as
//! ordinary frames, as on a site, whose backup runs no program on its A-Link end), probes from
//! `b` to `a`. The processes that hold `a`'s responder, or a gate with its watchdog (so that a
//! test can SIGSTOP or SIGKILL them), are `ftvm-ebpf-holder` (tests/bin/ebpf_holder.rs).
//!
//! Every namespace is uniquely named and deleted (with the processes inside) by a Drop guard;
//! every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, MapInfo, PerCpuArray};
use aya::programs::tc::TcAttachType;
use aya::programs::SchedClassifier;
use ftvm_ebpf_common::gate;
use ftvm_ebpf_host::{
    monotonic_ns, DaemonState, FenceGate, GateCounters, HeartbeatResponder, Mac, ProbeFrame, Prober,
    HEARTBEAT_PORT,
};
use ftvm_system_tests::{enter_netns, packet_socket, run_ok, workspace_root, Netns};

const GUEST_MAC: Mac = [0x52, 0x54, 0x00, 0x5e, 0x1a, 0x01];
const OTHER_MAC: Mac = [0x02, 0x00, 0x5e, 0x1a, 0x00, 0x02];
const PEER_MAC: Mac = [0x02, 0x00, 0x5e, 0x1a, 0x00, 0x03];
const BROADCAST: Mac = [0xff; 6];
/// IEEE 802 "local experimental" ethertype: nothing else on the test links uses it.
const ETHERTYPE: u16 = 0x88b5;
const MARKER: &[u8; 4] = b"FTVT";
/// Frames per burst, and the gap between them.
const BURST: u64 = 20;
const GAP: Duration = Duration::from_millis(1);
/// How long a receiver keeps listening after the last frame was sent.
const DRAIN: Duration = Duration::from_millis(150);

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 2);
/// A reply from an XDP responder on a veth takes tens of microseconds; this is generous.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// The gate

#[test]
fn guest_frames_pass_only_while_active_and_other_macs_always_pass() {
    require_root();
    let site = GateSite::create();
    let gate = site.attach_gate(&[(GUEST_MAC, true, monotonic_ns() + 60_000_000_000)]);
    let control = gate.control();

    let before = counters(&gate);
    let got = site.guest_to_lan(GUEST_MAC, BURST);
    assert_eq!(got, BURST, "active gate with a future expiry: every guest frame must reach the LAN");
    let after = counters(&gate);
    // The guest's TAP (here: a veth) is bridged with biz0 inside the host namespace, so its
    // frames leave through biz0's egress, where the gate counted them.
    assert!(
        after.egress_passed >= before.egress_passed + BURST,
        "the gate did not see the guest's frames on biz0 egress: {before:?} → {after:?}"
    );
    assert_eq!(site.guest_to_lan(OTHER_MAC, BURST), BURST, "frames from an unprotected MAC must pass");

    control.deactivate(GUEST_MAC).expect("deactivate");
    let before = counters(&gate);
    assert_eq!(site.guest_to_lan(GUEST_MAC, BURST), 0, "inactive gate: no guest frame may reach the LAN");
    let after = counters(&gate);
    assert!(
        after.egress_dropped_inactive >= before.egress_dropped_inactive + BURST,
        "inactive drops not counted: {before:?} → {after:?}"
    );
    assert_eq!(site.guest_to_lan(OTHER_MAC, BURST), BURST, "frames from an unprotected MAC must pass while a guest is fenced");

    control.set(GUEST_MAC, true, monotonic_ns() + 60_000_000_000).expect("reactivate");
    assert_eq!(site.guest_to_lan(GUEST_MAC, BURST), BURST, "reactivated gate: guest frames must pass again");

    // Detached on drop: even an inactive entry no longer stops anything.
    control.deactivate(GUEST_MAC).expect("deactivate");
    drop(gate);
    assert_eq!(site.guest_to_lan(GUEST_MAC, BURST), BURST, "the gate must be detached when dropped");
}

#[test]
fn guest_frames_stop_at_lease_expiry_with_no_userspace_action() {
    require_root();
    let site = GateSite::create();
    let gate = site.attach_gate(&[(GUEST_MAC, false, 0)]);
    let before = counters(&gate);

    // One write: active, expiring in 300 ms. Then keep sending across the expiry; nothing touches
    // the gate's map meanwhile.
    let lease = Duration::from_millis(300);
    let send_for = lease + Duration::from_millis(500);
    let expiry_ns = monotonic_ns() + lease.as_nanos() as u64;
    gate.control().set(GUEST_MAC, true, expiry_ns).expect("activate");
    let received = site.guest_to_lan_for(GUEST_MAC, send_for, Duration::from_millis(2));
    let after = counters(&gate);

    assert!(!received.is_empty(), "no guest frame arrived before the expiry");
    let sent_before_expiry = received.iter().filter(|r| r.sent_ns + 50_000_000 < expiry_ns).count();
    assert!(sent_before_expiry > 50, "too few frames arrived before the expiry: {sent_before_expiry}");
    // A frame passes the gate after it was sent, so a frame sent at or after the expiry cannot
    // have passed a correct gate.
    let late_sends: Vec<_> = received.iter().filter(|r| r.sent_ns >= expiry_ns).collect();
    assert!(late_sends.is_empty(), "{} frames sent after the lease expiry reached the LAN, first {:?}", late_sends.len(), late_sends[0]);
    let last_arrival = received.iter().map(|r| r.received_ns).max().unwrap_or(0);
    let bound = Duration::from_millis(20);
    assert!(
        last_arrival < expiry_ns + bound.as_nanos() as u64,
        "guest frames still arrived {:?} after the expiry (bound {bound:?})",
        Duration::from_nanos(last_arrival.saturating_sub(expiry_ns))
    );
    assert!(
        after.egress_dropped_expired > before.egress_dropped_expired + 50,
        "expired drops not counted: {before:?} → {after:?}"
    );
    eprintln!(
        "lease expiry: {} frames arrived, last {:?} before the expiry; counters {after:?}",
        received.len(),
        Duration::from_nanos(expiry_ns.saturating_sub(last_arrival))
    );
}

#[test]
fn frames_to_the_guest_are_dropped_while_inactive() {
    require_root();
    let site = GateSite::create();
    let gate = site.attach_gate(&[(GUEST_MAC, false, 0)]);
    let control = gate.control();

    let before = counters(&gate);
    assert_eq!(site.lan_to_guest(GUEST_MAC, BURST), 0, "inactive gate: frames to the guest must not come in");
    let after = counters(&gate);
    assert!(after.ingress_dropped >= before.ingress_dropped + BURST, "ingress drops not counted: {before:?} → {after:?}");
    assert_eq!(site.lan_to_guest(BROADCAST, BURST), BURST, "broadcast frames must pass the ingress gate");
    assert_eq!(site.lan_to_guest(OTHER_MAC, BURST), BURST, "frames to other MACs must pass the ingress gate");

    control.set(GUEST_MAC, true, monotonic_ns() + 60_000_000_000).expect("activate");
    assert_eq!(site.lan_to_guest(GUEST_MAC, BURST), BURST, "active gate: frames to the guest must come in");

    // Active but expired counts as inactive.
    control.set(GUEST_MAC, true, monotonic_ns().saturating_sub(1)).expect("expire");
    assert_eq!(site.lan_to_guest(GUEST_MAC, BURST), 0, "expired gate: frames to the guest must not come in");
}

#[test]
fn the_gate_goes_first_on_its_port() {
    require_root();
    let site = GateSite::create();
    // Another classifier already on biz0's egress (the gate's own program, loaded separately).
    let mut other = aya::Ebpf::load(&std::fs::read(object_path()).expect("reading the object")).expect("loading the object");
    let program: &mut SchedClassifier =
        other.program_mut(gate::EGRESS_PROGRAM).expect("the egress program").try_into().expect("a classifier");
    program.load().expect("loading the classifier");
    site.host.run(|| program.attach("biz0", TcAttachType::Egress).expect("attaching the other classifier"));
    let _gate = site.attach_gate(&[]);

    let ids: Vec<u32> = site.host.run(|| {
        let (_, programs) = SchedClassifier::query_tcx("biz0", TcAttachType::Egress).expect("querying biz0's tcx egress");
        programs.iter().map(|p| p.id()).collect()
    });
    // Program ids grow with each load: the gate's, loaded last, is the larger.
    assert!(ids.len() == 2 && ids[0] > ids[1], "the gate is not first on biz0's egress: {ids:?}");
}

/// The primary's death must not detach its gate (the detach holds the rtnl lock for milliseconds,
/// just when the backup takes over and opens its TAP): its watchdog holds the gate's links,
/// closes the gate, and the gate goes only with the watchdog.
#[test]
fn a_watchdog_keeps_the_dead_holders_gate_attached_and_closed() {
    require_root();
    let site = GateSite::create();
    let mut holder = Holder::start("gate-with-watchdog", &site.host, "biz0", &[fmt_mac(GUEST_MAC)]);
    let watchdog = holder.watchdog_pid();
    holder.wait_line("ready");
    assert_eq!(site.guest_to_lan(GUEST_MAC, BURST), BURST, "the holder's gate is active: every guest frame must pass");
    let before = site.attached_gate_counters().expect("no gate on biz0");
    assert!(before.egress_passed >= BURST, "the holder's gate did not count the guest's frames: {before:?}");

    // The holder dies; its watchdog (which holds duplicates of the links and the map) notices the
    // end of its stdin pipe and closes the gate.
    holder.signal(libc::SIGKILL);
    assert_eq!(holder.wait_line("gate-closed "), "gate-closed 1", "the watchdog must close the one entry");
    assert_eq!(site.guest_to_lan(GUEST_MAC, BURST), 0, "the dead holder's gate is closed: no guest frame may leave");
    assert_eq!(site.lan_to_guest(GUEST_MAC, BURST), 0, "the dead holder's gate is closed: no frame to the guest may come in");
    assert_eq!(site.guest_to_lan(OTHER_MAC, BURST), BURST, "frames from an unprotected MAC must still pass");
    let after = site
        .attached_gate_counters()
        .expect("the gate was detached when its holder died: the watchdog must keep it attached");
    assert!(
        after.egress_dropped_inactive >= before.egress_dropped_inactive + BURST && after.ingress_dropped >= before.ingress_dropped + BURST,
        "the attached gate did not drop the guest's frames both ways: {before:?} → {after:?}"
    );

    // Once the last holder of the links is gone, so is the gate.
    kill_and_wait(watchdog);
    let deadline = Instant::now() + Duration::from_secs(5);
    while site.attached_gate_counters().is_some() {
        assert!(Instant::now() < deadline, "the gate is still attached after every holder of its links died");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(site.guest_to_lan(GUEST_MAC, BURST), BURST, "the gate is gone: guest frames must pass again");
}

// ---------------------------------------------------------------------------------------------
// The heartbeat responder

#[test]
fn responder_answers_with_the_published_state_even_while_its_holder_is_stopped() {
    require_root();
    let pair = ALinkPair::create();
    let mut holder = Holder::spawn("responder", &pair.a, 7, 1234, 555_000);
    holder.wait_line("ready");
    let mut prober = pair.prober();

    let reply = prober.probe(PROBE_TIMEOUT).expect("probe").expect("no reply from the responder");
    assert_eq!((reply.generation, reply.committed_epoch, reply.daemon_progress_ns), (7, 1234, 555_000));
    assert_eq!(reply.daemon_state, DaemonState::Running);
    assert!(reply.replied_ns >= 555_000, "replied_ns is the responder's clock: {reply:?}");

    holder.signal(libc::SIGSTOP);
    holder.wait_state('T');
    for i in 0..5 {
        let reply = prober
            .probe(PROBE_TIMEOUT)
            .expect("probe")
            .unwrap_or_else(|| panic!("no reply while the holder is stopped (probe {i})"));
        assert_eq!((reply.generation, reply.committed_epoch, reply.daemon_progress_ns), (7, 1234, 555_000));
    }
    holder.signal(libc::SIGCONT);
    assert!(prober.probe(PROBE_TIMEOUT).expect("probe").is_some(), "no reply after SIGCONT");
}

#[test]
fn a_watchdog_reports_the_dead_daemon_and_keeps_the_responder_answering() {
    require_root();
    let pair = ALinkPair::create();
    let mut holder = Holder::spawn("responder-with-watchdog", &pair.a, 9, 42, 1_000);
    let watchdog = holder.watchdog_pid();
    holder.wait_line("ready");
    let mut prober = pair.prober();

    let reply = prober.probe(PROBE_TIMEOUT).expect("probe").expect("no reply");
    assert_eq!(reply.daemon_state, DaemonState::Running);

    // The daemon dies; its watchdog (which holds duplicates of the link and the maps) notices
    // the end of its stdin pipe and says so in the replies.
    holder.signal(libc::SIGKILL);
    holder.wait_line("dead-written");
    let reply = prober.probe(PROBE_TIMEOUT).expect("probe").expect("no reply after the daemon died: the watchdog must keep the responder attached");
    assert_eq!(reply.daemon_state, DaemonState::Dead);
    assert_eq!((reply.generation, reply.committed_epoch), (9, 42), "the last published values stay");

    // Once the last holder of the link is gone, nobody answers.
    kill_and_wait(watchdog);
    let mut gone = false;
    for _ in 0..20 {
        if prober.probe(Duration::from_millis(50)).expect("probe").is_none() {
            gone = true;
            break;
        }
    }
    assert!(gone, "the responder still answers after every holder of its link died");
}

#[test]
fn only_probes_are_answered_everything_else_passes() {
    require_root();
    let pair = ALinkPair::create();
    let a_responder = pair.a.run(|| HeartbeatResponder::attach(&object_path(), "alink0").expect("attach in a"));
    a_responder.control().publish(3, 4, 5).expect("publish");
    let listener = pair.a.run(|| {
        let s = UdpSocket::bind(SocketAddrV4::new(A_IP, HEARTBEAT_PORT)).expect("bind 7709 in a");
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        s
    });
    let sender = pair.b.run(|| UdpSocket::bind(SocketAddrV4::new(B_IP, 0)).expect("bind in b"));
    let to = SocketAddrV4::new(A_IP, HEARTBEAT_PORT);

    let probe = ProbeFrame::probe(1, 2).to_bytes();
    let mut wrong_magic = probe;
    wrong_magic[0] ^= 0xff;
    let mut wrong_version = probe;
    wrong_version[4] = 99;
    let mut a_reply = probe;
    a_reply[6] = 2;
    let mut too_long = probe.to_vec();
    too_long.push(0);
    // Bigger than the MTU: sent as IP fragments, which the responder must pass untouched.
    let mut fragmented = probe.to_vec();
    fragmented.resize(3000, 0x5a);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("short datagram", b"hello".to_vec()),
        ("wrong magic", wrong_magic.to_vec()),
        ("wrong version", wrong_version.to_vec()),
        ("a reply, not a probe", a_reply.to_vec()),
        ("probe plus one byte", too_long),
        ("fragmented datagram", fragmented),
    ];
    for (what, payload) in &cases {
        sender.send_to(payload, to).expect("send");
        let mut buf = vec![0u8; 4096];
        let n = listener
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: did not reach the UDP socket on port 7709 ({e}): the responder must pass it"));
        assert_eq!(&buf[..n], &payload[..], "{what}: arrived changed");
    }

    // A real probe is answered in the kernel and does not reach the socket.
    let mut prober = pair.prober();
    let reply = prober.probe(PROBE_TIMEOUT).expect("probe").expect("no reply");
    assert_eq!((reply.generation, reply.committed_epoch, reply.daemon_progress_ns), (3, 4, 5));
    listener.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut buf = [0u8; 256];
    assert!(listener.recv(&mut buf).is_err(), "a probe reached the socket: it must be answered by XDP");
    let peer = a_responder.control().last_peer_probe().expect("peer map").expect("no probe recorded");
    assert_eq!(peer.seq, reply.seq, "the responder must record the peer's last probe");

    // Other traffic on the A-Link (TCP here) is untouched.
    let tcp = pair.a.run(|| TcpListener::bind(SocketAddrV4::new(A_IP, 7710)).expect("listen in a"));
    let mut client = pair.b.run(|| TcpStream::connect_timeout(&SocketAddrV4::new(A_IP, 7710).into(), Duration::from_secs(2)).expect("connect"));
    client.write_all(b"checkpoint").expect("write");
    let (mut conn, _) = tcp.accept().expect("accept");
    conn.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let mut got = [0u8; 10];
    conn.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"checkpoint");
}

/// Prints the XDP heartbeat round trip (no assertion on the figures: they depend on the machine).
#[test]
fn heartbeat_round_trip_time_is_printed() {
    require_root();
    let pair = ALinkPair::create();
    let a_responder = pair.a.run(|| HeartbeatResponder::attach(&object_path(), "alink0").expect("attach in a"));
    // Driver mode on a veth would turn off its peer's segmentation offload (the A-Link's epochs
    // then go out in MSS-sized pieces): on veth the responder runs in generic mode.
    assert_eq!(a_responder.mode(), ftvm_ebpf_host::XdpMode::Generic, "a veth end got a driver-mode program");
    let mut prober = pair.prober();
    for _ in 0..50 {
        let _ = prober.probe(PROBE_TIMEOUT).expect("probe");
    }
    let probes = 1000;
    let mut rtts: Vec<Duration> = Vec::with_capacity(probes);
    let mut lost = 0;
    for _ in 0..probes {
        match prober.probe(PROBE_TIMEOUT).expect("probe") {
            Some(reply) => rtts.push(reply.rtt),
            None => lost += 1,
        }
    }
    assert!(rtts.len() > probes / 2, "most probes went unanswered ({lost} of {probes})");
    rtts.sort();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    eprintln!(
        "XDP heartbeat RTT over {} probes ({:?} mode): p50 {:?}, p99 {:?}, min {:?}, max {:?}, lost {lost}",
        rtts.len(),
        a_responder.mode(),
        pct(50),
        pct(99),
        rtts[0],
        rtts[rtts.len() - 1]
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (network namespaces, XDP, tcx); run it as root");
}

/// The built object; missing is a failure, never a skip.
fn object_path() -> PathBuf {
    let path = workspace_root().join("target/ebpf/ftvm-ebpf");
    assert!(path.exists(), "{} missing: run `cargo xtask build-ebpf` first", path.display());
    path
}

fn counters(gate: &FenceGate) -> GateCounters {
    gate.control().counters().expect("reading the gate counters")
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

/// A host namespace bridged like a real host, a guest namespace and a LAN namespace (see the
/// module documentation). Dropping it deletes all three (the veths and the bridge go with them).
struct GateSite {
    host: Netns,
    guest: Netns,
    lan: Netns,
}

impl GateSite {
    fn create() -> Self {
        let site = GateSite { host: Netns::new("gh"), guest: Netns::new("gg"), lan: Netns::new("gl") };
        let (h, g, l) = (site.host.name(), site.guest.name(), site.lan.name());
        // No IPv6 autoconfiguration chatter from the guest MAC: the counters stay readable.
        for ns in [h, g, l] {
            run_ok(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]));
        }
        ip(&["-n", h, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", h, "link", "add", "gst0", "type", "veth", "peer", "name", "eth0", "netns", g]);
        ip(&["-n", h, "link", "add", "biz0", "type", "veth", "peer", "name", "lan0", "netns", l]);
        ip(&["-n", h, "link", "set", "gst0", "master", "br0"]);
        ip(&["-n", h, "link", "set", "biz0", "master", "br0"]);
        ip(&["-n", g, "link", "set", "eth0", "address", &fmt_mac(GUEST_MAC)]);
        ip(&["-n", l, "link", "set", "lan0", "address", &fmt_mac(PEER_MAC)]);
        for (ns, dev) in [(h, "br0"), (h, "gst0"), (h, "biz0"), (g, "eth0"), (l, "lan0")] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        site
    }

    fn attach_gate(&self, initial: &[(Mac, bool, u64)]) -> FenceGate {
        let object = object_path();
        self.host.run(|| FenceGate::attach_with(&object, "biz0", initial).expect("attaching the gate to biz0"))
    }

    /// The counters of the gate attached to biz0, whoever attached it (this process has no
    /// handle on a gate that another process attached): found through the tcx egress program,
    /// the only one on biz0, and the counter map it uses. `None` when no program is attached.
    fn attached_gate_counters(&self) -> Option<GateCounters> {
        self.host.run(|| {
            let (_, programs) = SchedClassifier::query_tcx("biz0", TcAttachType::Egress).expect("querying biz0's tcx egress");
            let map_ids = programs.first()?.map_ids().expect("the program's maps").expect("map ids (Linux ≥ 4.15)");
            let id = map_ids
                .into_iter()
                .find(|&id| MapInfo::from_id(id).is_ok_and(|m| m.name_as_str() == Some(gate::COUNTERS)))
                .expect("the gate program uses no counter map");
            let data = MapData::from_id(id).expect("opening the counter map");
            let counters: PerCpuArray<MapData, u64> = Map::PerCpuArray(data).try_into().expect("the counter map's type");
            let read = |index: u32| counters.get(&index, 0).expect("a counter").iter().sum::<u64>();
            Some(GateCounters {
                egress_passed: read(gate::EGRESS_PASSED),
                egress_dropped_inactive: read(gate::EGRESS_DROPPED_INACTIVE),
                egress_dropped_expired: read(gate::EGRESS_DROPPED_EXPIRED),
                ingress_dropped: read(gate::INGRESS_DROPPED),
            })
        })
    }

    /// Frames from `src` (sent on the guest's eth0) to the LAN peer: how many arrived.
    fn guest_to_lan(&self, src: Mac, count: u64) -> u64 {
        let rx = Collector::start(self.lan.name(), "lan0", src, PEER_MAC);
        send_burst(self.guest.name(), "eth0", src, PEER_MAC, count);
        rx.finish().len() as u64
    }

    /// Frames from the LAN peer to `dst` (received on the guest's eth0): how many arrived.
    fn lan_to_guest(&self, dst: Mac, count: u64) -> u64 {
        let rx = Collector::start(self.guest.name(), "eth0", PEER_MAC, dst);
        send_burst(self.lan.name(), "lan0", PEER_MAC, dst, count);
        rx.finish().len() as u64
    }

    /// Sends frames from `src` to the LAN peer every `gap` for `duration`; returns what arrived.
    fn guest_to_lan_for(&self, src: Mac, duration: Duration, gap: Duration) -> Vec<Received> {
        let rx = Collector::start(self.lan.name(), "lan0", src, PEER_MAC);
        let ns = self.guest.name().to_string();
        thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&ns);
                let sock = RawSock::open("eth0");
                let end = Instant::now() + duration;
                let mut seq = 0;
                while Instant::now() < end {
                    sock.send(&frame(PEER_MAC, src, seq, monotonic_ns()));
                    seq += 1;
                    thread::sleep(gap);
                }
            })
            .join()
            .expect("sender panicked");
        });
        rx.finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Received {
    seq: u64,
    sent_ns: u64,
    received_ns: u64,
}

/// Sends `count` test frames `src → dst` on `ifname` in namespace `ns`, one every [`GAP`].
fn send_burst(ns: &str, ifname: &str, src: Mac, dst: Mac, count: u64) {
    let ns = ns.to_string();
    thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&ns);
            let sock = RawSock::open(ifname);
            for seq in 0..count {
                sock.send(&frame(dst, src, seq, monotonic_ns()));
                thread::sleep(GAP);
            }
        })
        .join()
        .expect("sender panicked");
    });
}

/// A thread that collects test frames `src → dst` arriving on an interface until finished.
struct Collector {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<Received>>>,
}

impl Collector {
    /// Returns once the receiving socket is open.
    fn start(ns: &str, ifname: &str, src: Mac, dst: Mac) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (ns, ifname, flag) = (ns.to_string(), ifname.to_string(), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            enter_netns(&ns);
            let sock = RawSock::open(&ifname);
            let _ = ready_tx.send(());
            let mut got = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(buf) = sock.recv_incoming() {
                    if let Some((d, s, seq, sent_ns)) = parse_frame(&buf) {
                        if d == dst && s == src {
                            got.push(Received { seq, sent_ns, received_ns: monotonic_ns() });
                        }
                    }
                }
            }
            got
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("receiver did not start");
        Collector { stop, thread: Some(thread) }
    }

    /// Waits [`DRAIN`] for frames still on their way, then stops and returns what arrived (each
    /// frame once).
    fn finish(mut self) -> Vec<Received> {
        thread::sleep(DRAIN);
        self.stop.store(true, Ordering::Relaxed);
        let mut got = self.thread.take().expect("running").join().expect("receiver panicked");
        got.sort_by_key(|r| r.seq);
        got.dedup_by_key(|r| r.seq);
        got
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fmt_mac(mac: Mac) -> String {
    ftvm_ebpf_host::format_mac(&mac)
}

/// A test frame: Ethernet header, [`MARKER`], seq, send time (CLOCK_MONOTONIC ns), padding to the
/// Ethernet minimum.
fn frame(dst: Mac, src: Mac, seq: u64, sent_ns: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(MARKER);
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&sent_ns.to_le_bytes());
    f.resize(60, 0);
    f
}

fn parse_frame(f: &[u8]) -> Option<(Mac, Mac, u64, u64)> {
    if f.len() < 34 || f[12..14] != ETHERTYPE.to_be_bytes() || &f[14..18] != MARKER {
        return None;
    }
    let mac = |at: usize| -> Mac { f[at..at + 6].try_into().expect("6 bytes") };
    let word = |at: usize| u64::from_le_bytes(f[at..at + 8].try_into().expect("8 bytes"));
    Some((mac(0), mac(6), word(18), word(26)))
}

/// An AF_PACKET socket on one interface of the calling thread's namespace, for [`ETHERTYPE`].
struct RawSock(OwnedFd);

impl RawSock {
    fn open(ifname: &str) -> Self {
        let sock = RawSock(packet_socket(ifname, ETHERTYPE));
        let fd = sock.0.as_raw_fd();
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
        // SAFETY: `timeout` is a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&timeout as *const libc::timeval).cast(), mem::size_of::<libc::timeval>() as u32)
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        sock
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length; the socket is bound to an interface.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "AF_PACKET send: {}", std::io::Error::last_os_error());
    }

    /// One frame that came *in* on the interface, or `None` after the receive timeout.
    fn recv_incoming(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: all-zero sockaddr_ll is valid.
        let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for writes of the sizes passed.
        let n = unsafe {
            libc::recvfrom(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0, (&mut from as *mut libc::sockaddr_ll).cast(), &mut len)
        };
        if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }
}

/// Namespaces `a` and `b` joined by a veth pair `alink0` (A_IP and B_IP).
struct ALinkPair {
    a: Netns,
    b: Netns,
}

impl ALinkPair {
    fn create() -> Self {
        let pair = ALinkPair { a: Netns::new("ha"), b: Netns::new("hb") };
        let (a, b) = (pair.a.name(), pair.b.name());
        ip(&["-n", a, "link", "add", "alink0", "type", "veth", "peer", "name", "alink0", "netns", b]);
        ip(&["-n", a, "addr", "add", &format!("{A_IP}/30"), "dev", "alink0"]);
        ip(&["-n", b, "addr", "add", &format!("{B_IP}/30"), "dev", "alink0"]);
        ip(&["-n", a, "link", "set", "alink0", "up"]);
        ip(&["-n", b, "link", "set", "alink0", "up"]);
        pair
    }

    /// A prober in `b` aimed at `a`'s responder. `b`'s end runs no XDP program, as on a site's
    /// backup: `a`'s program runs in generic mode on the veth, so its replies arrive as ordinary
    /// frames.
    fn prober(&self) -> Prober {
        self.b.run(|| Prober::bind(SocketAddrV4::new(B_IP, 0), A_IP).expect("prober in b"))
    }
}

/// An `ftvm-ebpf-holder` process (and the processes it started); killed on drop.
struct Holder {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    extra_pids: Vec<i32>,
}

impl Holder {
    /// A responder holder on `alink0` in `ns`, publishing the values given.
    fn spawn(mode: &str, ns: &Netns, generation: u64, epoch: u64, progress_ns: u64) -> Self {
        Self::start(mode, ns, "alink0", &[generation.to_string(), epoch.to_string(), progress_ns.to_string()])
    }

    /// `ftvm-ebpf-holder <mode> <ns> <ifname> <object> <rest...>`.
    fn start(mode: &str, ns: &Netns, ifname: &str, rest: &[String]) -> Self {
        let object = object_path();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm-ebpf-holder"))
            .arg(mode)
            .arg(ns.name())
            .arg(ifname)
            .arg(&object)
            .args(rest)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting ftvm-ebpf-holder");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Holder { child, stdin, lines, extra_pids: Vec::new() }
    }

    /// The next line starting with `prefix` (others are skipped), within 10 s.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("ftvm-ebpf-holder did not print {prefix:?} ({e}); exit: {:?}", self.child.try_wait()),
            }
        }
    }

    /// The pid of the watchdog the holder started (its `watchdog <pid>` line); killed with the
    /// holder on drop.
    fn watchdog_pid(&mut self) -> i32 {
        let line = self.wait_line("watchdog ");
        let pid = line.trim_start_matches("watchdog ").parse().unwrap_or_else(|e| panic!("{line:?}: {e}"));
        self.extra_pids.push(pid);
        pid
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig}): {}", std::io::Error::last_os_error());
    }

    /// Waits (bounded) until the process is in `state` (a /proc/<pid>/stat state letter).
    fn wait_state(&self, state: char) {
        let path = format!("/proc/{}/stat", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(&path).unwrap_or_default();
            // The state follows the command name in parentheses.
            if stat.rsplit(')').next().and_then(|rest| rest.trim_start().chars().next()) == Some(state) {
                return;
            }
            assert!(Instant::now() < deadline, "holder never reached state {state}: {stat}");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        for &pid in &self.extra_pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILLs process `pid` (one this test started) and waits (bounded) until it is gone: its
/// descriptors are closed then.
fn kill_and_wait(pid: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid, Duration::from_secs(5));
}

/// Waits (bounded) until process `pid` is gone or a zombie.
fn wait_gone(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat) if stat.rsplit(')').next().and_then(|r| r.trim_start().chars().next()) == Some('Z') => return,
            Ok(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    panic!("process {pid} still alive after {timeout:?}");
}
