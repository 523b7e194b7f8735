//! The eBPF object (`target/ebpf/ftvm-ebpf`, built by `cargo xtask build-ebpf`) loads with aya,
//! its XDP probe counts real frames on a veth, and bad objects are refused with an error.
//!
//! `probe_counts_pings_on_veth` needs root: it creates two network namespaces joined by a veth pair,
//! attaches `ftvm_probe_count` to the veth end in namespace A, sends ICMP echo requests from
//! namespace B, and reads the per-CPU counters. The namespaces are removed on every exit path.

use std::{
    fs::{self, File},
    io, mem,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::{
    maps::PerCpuArray,
    programs::{Xdp, XdpFlags},
    Ebpf,
};
use ftvm_ebpf_common::probe_count;

/// Echo requests sent per round; the counters must grow by at least this much.
const PINGS: u16 = 5;
/// How long to wait for each echo reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Addresses live only inside the test's own namespaces.
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
const PREFIX_LEN: u8 = 30;
/// Interface names inside the namespaces (unique per namespace, so no clash between test runs).
const IF_A: &str = "ftvm-a";
const IF_B: &str = "ftvm-b";

#[test]
fn probe_counts_pings_on_veth() {
    require_root();
    let object = read_object();
    let netns = NetnsPair::create();

    // aya resolves the interface name and attaches in the calling thread's network namespace, and
    // the program's link lives in namespace A: do all of it from a thread that entered A.
    let ns_a = netns.a.clone();
    let ns_b = netns.b.clone();
    let worker = thread::spawn(move || {
        enter_netns(&ns_a);

        let mut ebpf = Ebpf::load(&object).expect("loading target/ebpf/ftvm-ebpf");
        let program: &mut Xdp = ebpf
            .program_mut(probe_count::PROGRAM)
            .unwrap_or_else(|| panic!("no program {} in the object", probe_count::PROGRAM))
            .try_into()
            .expect("ftvm_probe_count is not an XDP program");
        program
            .load()
            .expect("the verifier refused ftvm_probe_count");
        let (link, mode) = match program.attach(IF_A, XdpFlags::DRV_MODE) {
            Ok(link) => (link, "driver"),
            Err(drv_err) => {
                eprintln!("XDP driver mode on {IF_A} refused ({drv_err}); trying SKB mode");
                let link = program
                    .attach(IF_A, XdpFlags::SKB_MODE)
                    .expect("attaching ftvm_probe_count in SKB mode");
                (link, "skb")
            }
        };
        eprintln!("ftvm_probe_count attached to {IF_A} in {mode} mode");

        let before = read_counters(&ebpf);
        let replies = ping_from(&ns_b, ADDR_A, PINGS);
        let after = read_counters(&ebpf);
        assert_eq!(
            replies, PINGS,
            "echo replies lost: the probe must pass every frame"
        );
        eprintln!("counters before {before:?}, after {after:?}");
        for (index, name) in [
            (probe_count::ALL, "ALL"),
            (probe_count::ICMP_ECHO_REQUEST, "ICMP_ECHO_REQUEST"),
        ] {
            let i = index as usize;
            assert!(
                after[i] >= before[i] + u64::from(PINGS),
                "counter {name} grew by {} (< {PINGS}): before {before:?}, after {after:?}",
                after[i] - before[i],
            );
        }

        // Once detached, frames are no longer counted.
        let program: &mut Xdp = ebpf
            .program_mut(probe_count::PROGRAM)
            .expect("program vanished")
            .try_into()
            .expect("program type changed");
        program.detach(link).expect("detaching ftvm_probe_count");
        let detached = read_counters(&ebpf);
        assert_eq!(
            ping_from(&ns_b, ADDR_A, 2),
            2,
            "echo replies lost after detach"
        );
        assert_eq!(
            read_counters(&ebpf)[probe_count::ALL as usize],
            detached[probe_count::ALL as usize],
            "frames still counted after detach"
        );
    });
    // A panic in the worker fails the test here; `netns` is dropped (namespaces removed) either way.
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn bad_objects_are_refused_with_an_error() {
    let object = read_object();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        (
            "not ELF".into(),
            b"this is not an ELF object at all".to_vec(),
        ),
    ];
    for len in [
        4,
        16,
        64,
        object.len() / 4,
        object.len() / 2,
        object.len() - 1,
    ] {
        cases.push((
            format!("first {len} of {} bytes", object.len()),
            object[..len].to_vec(),
        ));
    }
    let mut garbage = object.clone();
    // Keep the ELF header; scramble everything after it (section headers, code, maps).
    for (i, byte) in garbage.iter_mut().enumerate().skip(64) {
        *byte = (i as u8).wrapping_mul(167).wrapping_add(13);
    }
    cases.push(("ELF header followed by garbage".into(), garbage));

    for (what, bytes) in cases {
        match Ebpf::load(&bytes) {
            Ok(_) => panic!("{what}: loaded without an error"),
            Err(err) => eprintln!("{what}: refused: {err}"),
        }
    }
}

fn object_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/ftvm-ebpf")
}

/// The built object; a missing object is a failure, never a skip.
fn read_object() -> Vec<u8> {
    let path = object_path();
    fs::read(&path).unwrap_or_else(|err| {
        panic!(
            "cannot read {}: {err}; run `cargo xtask build-ebpf` first",
            path.display()
        )
    })
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, XDP); run it as root"
    );
}

/// Reads every probe counter, summed over CPUs.
fn read_counters(ebpf: &Ebpf) -> Vec<u64> {
    let map = ebpf
        .map(probe_count::MAP)
        .unwrap_or_else(|| panic!("no map {} in the object", probe_count::MAP));
    let counters =
        PerCpuArray::<_, u64>::try_from(map).expect("PROBE_COUNTERS is not a PerCpuArray<u64>");
    (0..probe_count::LEN)
        .map(|index| {
            counters
                .get(&index, 0)
                .expect("reading a probe counter")
                .iter()
                .sum()
        })
        .collect()
}

/// Two network namespaces, `ftvm-ebpf-<pid>-a` and `-b`, joined by a veth pair
/// (`ftvm-a` = 10.213.0.1/30 in A, `ftvm-b` = 10.213.0.2/30 in B). Dropping it deletes both
/// namespaces, which also deletes the veth pair.
#[derive(Debug)]
struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    fn create() -> NetnsPair {
        let pid = std::process::id();
        // The guard exists before the first namespace does, so a failure half-way still cleans up.
        let pair = NetnsPair {
            a: format!("ftvm-ebpf-{pid}-a"),
            b: format!("ftvm-ebpf-{pid}-b"),
        };
        let (a, b) = (pair.a.as_str(), pair.b.as_str());
        let prefix = PREFIX_LEN.to_string();
        let addr_a = format!("{ADDR_A}/{prefix}");
        let addr_b = format!("{ADDR_B}/{prefix}");
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        ip(&[
            "-n", a, "link", "add", IF_A, "type", "veth", "peer", "name", IF_B, "netns", b,
        ]);
        ip(&["-n", a, "addr", "add", &addr_a, "dev", IF_A]);
        ip(&["-n", b, "addr", "add", &addr_b, "dev", IF_B]);
        ip(&["-n", a, "link", "set", IF_A, "up"]);
        ip(&["-n", b, "link", "set", IF_B, "up"]);
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            if !Path::new("/run/netns").join(ns).exists() {
                continue;
            }
            match Command::new("ip").args(["netns", "del", ns]).status() {
                Ok(status) if status.success() => {}
                Ok(status) => eprintln!("cleanup: `ip netns del {ns}` failed ({status})"),
                Err(err) => eprintln!("cleanup: running `ip netns del {ns}`: {err}"),
            }
        }
    }
}

/// Runs `ip <args>` and panics (with its stderr) if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "running `ip {}`: {err} (is iproute2 installed?)",
                args.join(" ")
            )
        });
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Moves the calling thread into the named network namespace (other threads stay where they are).
fn enter_netns(name: &str) {
    let path = Path::new("/run/netns").join(name);
    let ns = File::open(&path).unwrap_or_else(|err| panic!("opening {}: {err}", path.display()));
    // SAFETY: `ns` is an open namespace file descriptor; CLONE_NEWNET only changes this thread's
    // network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns into {name}: {}", io::Error::last_os_error());
}

/// Sends `count` ICMP echo requests to `dst` from namespace `ns`, one after the other, each waiting
/// up to [`REPLY_TIMEOUT`] for its reply; returns how many replies came back. Bounded: at most
/// `count` × [`REPLY_TIMEOUT`].
fn ping_from(ns: &str, dst: Ipv4Addr, count: u16) -> u16 {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(ns);
                let socket = IcmpSocket::open();
                // Tell our replies apart from anything else a raw ICMP socket sees.
                let ident = (std::process::id() as u16) ^ 0x5a5a;
                (1..=count)
                    .filter(|&seq| socket.echo(dst, ident, seq))
                    .count() as u16
            })
            .join()
            .expect("ping thread panicked")
    })
}

/// A raw IPv4 ICMP socket (root only; needs no `ping` binary and no ping_group_range).
#[derive(Debug)]
struct IcmpSocket(OwnedFd);

impl IcmpSocket {
    fn open() -> IcmpSocket {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        assert!(fd >= 0, "raw ICMP socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let socket = IcmpSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: `timeout` is a valid timeval and its size is passed along.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        socket
    }

    /// Sends one echo request and waits for the matching reply; true if it came back in time.
    fn echo(&self, dst: Ipv4Addr, ident: u16, seq: u16) -> bool {
        let mut request = [0u8; 8 + 32];
        request[0] = 8; // echo request, code 0
        request[4..6].copy_from_slice(&ident.to_be_bytes());
        request[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, byte) in request[8..].iter_mut().enumerate() {
            *byte = i as u8;
        }
        let checksum = internet_checksum(&request);
        request[2..4].copy_from_slice(&checksum.to_be_bytes());

        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `request` and `addr` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            request.len() as isize,
            "sendto {dst}: {}",
            io::Error::last_os_error()
        );

        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::Interrupted => continue,
                    _ => panic!("recv on raw ICMP socket: {err}"),
                }
            }
            // A raw socket delivers the IPv4 header too.
            let packet = &buf[..n as usize];
            let Some(ihl) = packet.first().map(|b| usize::from(b & 0x0f) * 4) else {
                continue;
            };
            let Some(icmp) = packet.get(ihl..) else {
                continue;
            };
            if icmp.len() >= 8
                && icmp[0] == 0 // echo reply
                && icmp[4..6] == ident.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                return true;
            }
        }
        false
    }
}

/// RFC 1071 checksum.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| {
            u32::from(u16::from_be_bytes([
                pair[0],
                pair.get(1).copied().unwrap_or(0),
            ]))
        })
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
