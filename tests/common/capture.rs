//! Packet captures for the system tests: tcpdump in a namespace, its pcap file read back with
//! kernel timestamps (nanoseconds, real-time clock), and the guest frames picked out of it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tcpdump running in a namespace, writing a pcap file with nanosecond timestamps. Killed on
/// drop if still running.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    stderr: PathBuf,
    what: String,
}

impl Capture {
    /// Captures frames coming *in* on `iface` in `netns` that match `filter`; returns once
    /// tcpdump listens.
    pub fn start(netns: &str, iface: &str, filter: &str, dir: &Path, tag: &str) -> Self {
        let file = dir.join(format!("{tag}.pcap"));
        let stderr = dir.join(format!("{tag}.tcpdump.log"));
        let what = format!("tcpdump -i {iface} in {netns}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "tcpdump", "-i", iface, "-Q", "in", "-nn", "-s", "0"])
            // A big kernel buffer and immediate delivery: no frame dropped under the load.
            .args(["-B", "32768", "--immediate-mode", "-U", "--time-stamp-precision=nano"])
            .arg("-w")
            .arg(&file);
        if !filter.is_empty() {
            cmd.arg(filter);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("tcpdump log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what} (install tcpdump): {e}"));
        let mut cap = Self { child: Some(child), file, stderr, what };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if cap.log().contains("listening on") {
                return cap;
            }
            let exited = cap.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some());
            assert!(
                !exited && Instant::now() < deadline,
                "{} did not start:\n{}",
                cap.what,
                cap.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Stops tcpdump (SIGINT: it writes out what it has) and returns the packets and how many
    /// the kernel dropped.
    pub fn stop(mut self) -> (Vec<Packet>, u64) {
        let mut child = self.child.take().expect("capture running");
        // SAFETY: kill on our own child's pid (`ip netns exec` execs tcpdump in place).
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not stop within 10 s of SIGINT", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = self.log();
        let dropped = log
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{}: no drop count in its log:\n{log}", self.what));
        (read_pcap(&self.file), dropped)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One captured frame: kernel timestamp (real-time clock, ns) and bytes from the Ethernet header.
pub struct Packet {
    pub t_ns: u64,
    pub data: Vec<u8>,
}

/// Reads a little-endian pcap file (microsecond or nanosecond timestamps). A record cut short at
/// the end (tcpdump stopped mid-write) is ignored.
pub fn read_pcap(path: &Path) -> Vec<Packet> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(b.len() >= 24, "{}: not a pcap file ({} bytes)", path.display(), b.len());
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let frac_ns = match u32_at(0) {
        0xa1b2_c3d4 => 1000,
        0xa1b2_3c4d => 1,
        m => panic!("{}: unknown pcap magic {m:#x}", path.display()),
    };
    assert_eq!(u32_at(20), 1, "{}: link type is not Ethernet", path.display());
    let mut packets = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let (sec, frac, incl, orig) =
            (u32_at(off), u32_at(off + 4), u32_at(off + 8) as usize, u32_at(off + 12) as usize);
        if off + 16 + incl > b.len() {
            break;
        }
        assert_eq!(incl, orig, "{}: a frame was cut by the snapshot length", path.display());
        packets.push(Packet {
            t_ns: u64::from(sec) * 1_000_000_000 + u64::from(frac) * frac_ns,
            data: b[off + 16..off + 16 + incl].to_vec(),
        });
        off += 16 + incl;
    }
    packets
}


impl Packet {
    /// The source MAC of the Ethernet frame.
    pub fn src_mac(&self) -> Option<[u8; 6]> {
        self.data.get(6..12)?.try_into().ok()
    }
}
