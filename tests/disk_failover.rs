//! Epoch-aligned disk replication across a failover: the disk writes of an epoch the backup never
//! committed do not survive the failover; those of committed epochs do.
//!
//! 1. `ftvm site up --ack-timeout-ms 10000` (host A must not give up on B and go simplex, which
//!    would release its held output, during the test). Client connection C1 writes
//!    `SET <key> committed-<nonce>` and gets `+OK`: output commit released the reply only after B
//!    acknowledged the epoch, so that write's log record is in a committed epoch, on B's disk.
//! 2. The A-Link is cut on A's side (`alink0` down in `<site>-a`): from now on nothing of A's
//!    reaches B.
//! 3. A second connection C2 (opened, and its handshake committed, before the cut) sends
//!    `SET <key> uncommitted-<nonce>`. A's guest executes it and appends its log record (the AOF,
//!    see `guest/kv/src/aof.rs`) to A's disk — the test waits until A's disk file holds that
//!    record — and replies, but the reply stays held: its epoch is never acknowledged.
//! 4. C2 is reset (SO_LINGER 0), so that the client's TCP never retransmits the `SET` to B once B
//!    serves (which would be a new, legitimate write on B), and host A is killed.
//! 5. B, which lost A's heartbeats at the cut, has taken over: status says failed over. B's disk
//!    holds the committed record and not the uncommitted one, and `GET <key>` over C1 — the same
//!    connection, kept across the failover — answers `committed-<nonce>`.
//!
//! The record is searched as the log writes it (`len key`, `len value`, see `aof.rs`), so finding
//! it on A's disk proves the guest logged the write there; the check on B would fail if the
//! write reached B's disk by any path (an epoch applied before its commit, a journal that keeps
//! uncommitted writes at takeover, a disk copied from A), and the check of the committed record
//! would fail if committed epochs' writes did not reach B's disk.
//!
//! Needs root and /dev/kvm (fails, never skips).

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ftvm_system_tests::site::{Site, Status};
use ftvm_system_tests::{require_root_and_kvm, Netns, Reply, RespClient, GUEST_IP, KV_PORT};

/// How long A's guest may take to log the uncommitted write.
const WRITE_SEEN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long B may take before status says it took over.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// The log starts at byte 512 and this test writes a few records: they are in the first MiB.
const LOG_REGION: usize = 1 << 20;

/// The bytes of the guest's log record of `SET key value` after the `SET` argument: each
/// argument as a little-endian u32 length and its bytes (`guest/kv/src/aof.rs`).
fn log_record(key: &str, value: &str) -> Vec<u8> {
    let mut r = Vec::new();
    for arg in [key, value] {
        r.extend_from_slice(&(arg.len() as u32).to_le_bytes());
        r.extend_from_slice(arg.as_bytes());
    }
    r
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether the first `limit` bytes of the disk file `path` hold `needle`.
fn disk_holds(path: &Path, needle: &[u8], limit: usize) -> bool {
    let mut data = Vec::new();
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.take(limit as u64)
        .read_to_end(&mut data)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    contains(&data, needle)
}

/// A raw connection to the guest: the `SET` whose reply never comes is written by hand, and the
/// connection is reset, not closed.
struct RawConn(TcpStream);

impl RawConn {
    fn connect() -> Self {
        let addr = SocketAddrV4::new(GUEST_IP, KV_PORT);
        let s =
            TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10)).expect("connect C2");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Self(s)
    }

    fn send(&mut self, args: &[&str]) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        self.0.write_all(&out).expect("send on C2");
    }

    /// Reads one line (enough for `+PONG`).
    fn read_line(&mut self) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            let n = self.0.read(&mut b).expect("read on C2");
            assert!(n > 0, "C2 closed by the guest");
            line.push(b[0]);
        }
        String::from_utf8_lossy(&line).trim_end().to_string()
    }

    /// Closes with an RST: SO_LINGER with a zero timeout drops the unsent and unacknowledged
    /// data (the `SET`) instead of retransmitting it.
    fn reset(self) {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt on our own open socket with a valid, correctly sized `linger`.
        let rc = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
        drop(self);
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn uncommitted_disk_writes_do_not_survive_failover_and_committed_ones_do() {
    require_root_and_kvm();
    let site = Site::up("dk", &["--ack-timeout-ms", "10000"]);
    let st = site.status();
    assert!(st.is_protected(), "after site up: want protected / A primary / B backup; got {st}");
    let nonce = format!(
        "{:x}",
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
            ^ u64::from(std::process::id())
    );
    let key = format!("dk-{nonce}");
    let committed = format!("committed-{nonce}");
    let uncommitted = format!("uncommitted-{nonce}");
    let committed_record = log_record(&key, &committed);
    let uncommitted_record = log_record(&key, &uncommitted);
    let (disk_a, disk_b) = (site.dir().join("disk-a.img"), site.dir().join("disk-b.img"));

    // Step 1: a committed write; C2 proves its connection is up (and committed) with a PING.
    let client_ns = Netns::existing(&site.netns("client"));
    let (mut c1, mut c2) = client_ns.run(|| {
        let c1 = RespClient::try_connect(Duration::from_secs(10)).expect("connect C1");
        (c1, RawConn::connect())
    });
    assert_eq!(
        c1.try_cmd(&["SET", &key, &committed]).expect("SET on C1"),
        Reply::Status("OK".into())
    );
    c2.send(&["PING"]);
    assert_eq!(c2.read_line(), "+PONG");
    assert!(
        disk_holds(&disk_b, &committed_record, LOG_REGION),
        "the acknowledged write is not on B's disk"
    );

    // Step 2: cut the A-Link on A's side.
    let cut = Instant::now();
    ip(&["-n", &site.netns("a"), "link", "set", "alink0", "down"]);

    // Step 3: the write B will never see; wait until A's guest has logged it on A's disk.
    c2.send(&["SET", &key, &uncommitted]);
    let sent = Instant::now();
    loop {
        if disk_holds(&disk_a, &uncommitted_record, LOG_REGION) {
            break;
        }
        assert!(
            sent.elapsed() < WRITE_SEEN_TIMEOUT,
            "A's guest did not log the uncommitted write on A's disk within {WRITE_SEEN_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let logged = sent.elapsed();

    // Step 4: the client forgets the SET (no retransmission can reach B later), A dies.
    // The client's first retransmission would come after its minimum RTO (200 ms) and go to A
    // (B announces the guest only after its 250 ms dead timeout and the restore), so a reset
    // within that time leaves no copy of the SET in flight.
    c2.reset();
    let reset_after_cut = cut.elapsed();
    site.kill("A");
    println!(
        "[{}] uncommitted write logged on A's disk {:.1} ms after it was sent; C2 reset {:.1} ms after the cut",
        site.name,
        logged.as_secs_f64() * 1e3,
        reset_after_cut.as_secs_f64() * 1e3
    );

    // Step 5: B took over, from the last committed epoch.
    let (st, ok) = site.wait_status(TAKEOVER_TIMEOUT, |s| {
        s.state == "failed over" && s.role_b == "primary" && s.role_a == "killed"
    });
    assert!(
        ok,
        "after the cut and the kill of A: want failed over, B primary, A killed; got {} / {} / {}\n{:#}",
        st.state,
        st.role_a,
        st.role_b,
        st.json
    );
    println!(
        "[{}] B took over; its status: {}",
        site.name,
        st.detail("B").map_or("-".to_string(), |d| d.to_string())
    );
    let get = c1.try_cmd(&["GET", &key]).expect("GET on C1 after the failover");
    assert_eq!(
        get,
        Reply::bulk(&committed),
        "B serves the committed value over the same connection"
    );
    // The whole disks, now that B's guest has served a read after the takeover.
    let b_all = std::fs::read(&disk_b).expect("read B's disk");
    let a_all = std::fs::read(&disk_a).expect("read A's disk");
    assert!(contains(&a_all, &uncommitted_record), "A's disk lost the uncommitted record it had");
    assert!(
        !contains(&b_all, &uncommitted_record) && !contains(&b_all, uncommitted.as_bytes()),
        "the write of an epoch B never committed is on B's disk after the failover"
    );
    assert!(
        contains(&b_all, &committed_record),
        "the committed write is not on B's disk after the failover"
    );
}

/// A guest disk write that cannot be recorded for the backup (its backlog is full) never leaves a
/// pair that says "protected" with a backup lacking the write: host A goes on alone (the quorum
/// grants it a new term, which the backup's copy can no longer match) and its status says why;
/// then A finds its backup again and copies it everything (memory and the whole disk), so that
/// when A dies B resumes the VM with every write, the big one included.
///
/// `--disk-backlog-kib 256` and a 600 KiB value: the value's log record alone is larger than the
/// backlog, so it cannot be recorded however fast the backup acknowledges (and the guest's own
/// writes while it starts stay far below it).
#[test]
fn a_full_disk_backlog_unprotects_the_pair_instead_of_losing_a_write() {
    require_root_and_kvm();
    let site = Site::up("bk", &["--disk-backlog-kib", "256"]);
    let st = site.status();
    assert!(st.is_protected(), "after site up: want protected / A primary / B backup; got {st}");
    let nonce = format!("{:x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    let big: String = (0..600 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let client_ns = Netns::existing(&site.netns("client"));
    let mut c = client_ns.run(|| RespClient::try_connect(Duration::from_secs(10)).expect("connect"));
    let ok = Reply::Status("OK".into());
    assert_eq!(c.try_cmd(&["SET", &format!("small-{nonce}"), "before"]).expect("SET small"), ok);
    assert_eq!(c.try_cmd(&["SET", &format!("big-{nonce}"), &big]).expect("SET big"), ok);

    // Protection ended for the backlog (the status keeps why, even once a backup joined again).
    let why = |s: &Status| s.detail("A").and_then(|a| a["last_unprotected"].as_str()).unwrap_or_default().to_string();
    let (st, ended) = site.wait_status(Duration::from_secs(10), |s| why(s).contains("backlog") && s.role_a == "primary");
    assert!(ended, "a write the backup cannot get must end protection, for that reason; status: {st}\n{:#}", st.json);
    assert_ne!(st.role_b, "primary", "B must not serve: {st}");
    // A serves alone, every write intact, and takes new ones.
    assert_eq!(c.try_cmd(&["SET", &format!("after-{nonce}"), "after"]).expect("SET after"), ok);
    assert_eq!(c.try_cmd(&["GET", &format!("big-{nonce}")]).expect("GET big"), Reply::Bulk(Some(big.clone().into_bytes())));
    assert_eq!(
        c.try_cmd(&["GET", &format!("small-{nonce}")]).expect("GET small"),
        Reply::Bulk(Some(b"before".to_vec()))
    );

    // A finds its backup again and copies it everything: protected again.
    let (st, again) = site.wait_status(Duration::from_secs(60), Status::is_protected);
    assert!(again, "A did not protect the VM again: {st}");
    assert_eq!(st.detail("A").map(|a| a["disk_replication_lost"].clone()), Some(serde_json::Value::Bool(false)), "{st}");

    // A dies: B resumes the VM with every acknowledged write, the big one included.
    site.kill("A");
    let (st, took_over) = site.wait_status(Duration::from_secs(30), |s| s.role_b == "primary" && s.state == "failed over");
    assert!(took_over, "B did not take over: {st}");
    let mut c = client_ns.run(|| RespClient::try_connect(Duration::from_secs(10)).expect("connect to B"));
    assert_eq!(c.try_cmd(&["GET", &format!("big-{nonce}")]).expect("GET big on B"), Reply::Bulk(Some(big.clone().into_bytes())));
    assert_eq!(c.try_cmd(&["GET", &format!("after-{nonce}")]).expect("GET after on B"), Reply::Bulk(Some(b"after".to_vec())));
    println!("[{}] after A's death: {st}", site.name);
}
