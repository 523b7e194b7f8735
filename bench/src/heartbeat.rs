//! The A-Link heartbeat's round trip: the XDP responder (answered by the peer's kernel, whatever
//! its daemon is doing) against a userspace responder on the same veth pair, probed the same way.
//!
//! The userspace responder is the smallest daemon-answered heartbeat there is (one UDP socket on
//! its own thread, no other work): a lower bound for any heartbeat a busy daemon would answer.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use ftvm_ebpf_host::{monotonic_ns, HeartbeatResponder, ProbeFrame, Prober, HEARTBEAT_PORT};
use ftvm_system_tests::{run_ok, Netns};

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 19, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 19, 2);
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Probes sent before measuring (ARP, caches).
const WARM_UP: usize = 50;

/// Round-trip figures of one responder.
#[derive(Clone, Debug, Serialize)]
pub struct RoundTrip {
    pub answered: usize,
    pub lost: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Both responders, probed from the other end of the same veth pair.
#[derive(Clone, Debug, Serialize)]
pub struct HeartbeatReport {
    pub probes: usize,
    /// The XDP attach mode the kernel gave (driver or generic).
    pub xdp_mode: String,
    pub xdp: RoundTrip,
    pub userspace: RoundTrip,
}

impl HeartbeatReport {
    /// Lines for the bench's table.
    pub fn table(&self) -> String {
        let line = |name: &str, r: &RoundTrip| {
            format!(
                "{name:<26} {:>9.1} {:>9.1} {:>9.1} {:>6}\n",
                r.p50_us, r.p99_us, r.max_us, r.lost
            )
        };
        format!(
            "\n{:<26} {:>9} {:>9} {:>9} {:>6}\n{}{}",
            format!("heartbeat RTT ({} probes)", self.probes),
            "p50 µs",
            "p99 µs",
            "max µs",
            "lost",
            line(&format!("XDP responder ({})", self.xdp_mode), &self.xdp),
            line("userspace UDP responder", &self.userspace)
        )
    }
}

/// Measures `probes` round trips through each responder. Needs root and the eBPF object.
pub fn run(object: &Path, probes: usize) -> Result<HeartbeatReport> {
    if !object.exists() {
        bail!("{} missing: run `cargo xtask build-ebpf` first", object.display());
    }
    let (a, b) = (Netns::new("hba"), Netns::new("hbb"));
    ip(&["-n", a.name(), "link", "add", "alink0", "type", "veth", "peer", "name", "alink0", "netns", b.name()]);
    for (ns, addr) in [(&a, A_IP), (&b, B_IP)] {
        ip(&["-n", ns.name(), "addr", "add", &format!("{addr}/30"), "dev", "alink0"]);
        ip(&["-n", ns.name(), "link", "set", "alink0", "up"]);
    }
    // No program on the prober's end, as on a site's backup (generic-mode replies arrive as
    // ordinary frames).
    let mut prober = b.run(|| Prober::bind(SocketAddrV4::new(B_IP, 0), A_IP)).context("binding the prober in b")?;

    let a_responder = a.run(|| HeartbeatResponder::attach(object, "alink0")).context("attaching a's responder")?;
    let xdp_mode = format!("{:?}", a_responder.mode());
    let xdp = measure(&mut prober, probes)?;
    drop(a_responder);

    let stop = Arc::new(AtomicBool::new(false));
    let socket = a
        .run(|| UdpSocket::bind(SocketAddrV4::new(A_IP, HEARTBEAT_PORT)))
        .context("binding the userspace responder in a")?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let responder = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || answer_probes(&socket, &stop))
    };
    let userspace = measure(&mut prober, probes);
    stop.store(true, Ordering::SeqCst);
    let _ = responder.join();
    Ok(HeartbeatReport { probes, xdp_mode, xdp, userspace: userspace? })
}

/// What the XDP responder does, in userspace: the probe comes back as a reply with the answer time.
fn answer_probes(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 128];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
        let Some(mut frame) = ProbeFrame::from_bytes(&buf[..n]) else { continue };
        frame.kind = ftvm_ebpf_host::HEARTBEAT_REPLY_KIND;
        frame.replied_ns = monotonic_ns();
        let _ = socket.send_to(&frame.to_bytes(), from);
    }
}

fn measure(prober: &mut Prober, probes: usize) -> Result<RoundTrip> {
    for _ in 0..WARM_UP {
        prober.probe(PROBE_TIMEOUT)?;
    }
    let mut rtts = Vec::with_capacity(probes);
    let mut lost = 0;
    for _ in 0..probes {
        match prober.probe(PROBE_TIMEOUT)? {
            Some(reply) => rtts.push(reply.rtt.as_secs_f64() * 1e6),
            None => lost += 1,
        }
    }
    if rtts.is_empty() {
        bail!("no probe of {probes} was answered");
    }
    rtts.sort_by(f64::total_cmp);
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    Ok(RoundTrip { answered: rtts.len(), lost, p50_us: pct(50), p99_us: pct(99), max_us: rtts[rtts.len() - 1] })
}

/// `ip <args>`; panics with its output if it fails.
fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}
