//! Helpers for the whole-system tests: uniquely named network namespaces, a VM process guard, and
//! clients that run inside a namespace.
//!
//! These tests need root and /dev/kvm. They fail (never skip) when those are missing, with a message
//! that says what to do. Every resource they create is named uniquely and removed by a Drop guard.
//!
//! [`site`] drives a whole `ftvm site` (the site-level tests and the failover benchmark); [`rng`]
//! is their reproducible randomness.

pub mod capture;
pub mod chaos;
pub mod load;
pub mod rng;
pub mod site;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Guest address inside each test's own namespace (namespaces are isolated, so tests can share it).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The guest's MAC in a site (`ftvm site up`'s default), as it appears in captures.
pub const SITE_GUEST_MAC: [u8; 6] = [0x02, 0x46, 0x54, 0x00, 0x00, 0x02];
/// The same, as tcpdump's filters write it.
pub const SITE_GUEST_MAC_TEXT: &str = "02:46:54:00:00:02";
/// Host side of the TAP inside the test namespace.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The guest's key-value port.
pub const KV_PORT: u16 = 6379;
/// How long a VM may take to boot and start serving.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name no other test (in this or another process) uses: `<prefix><pid>x<n>`.
pub fn unique_name(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// Panics (the test fails, it does not skip) unless we are root with /dev/kvm.
pub fn require_root_and_kvm() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "system tests need root (namespaces, TAP, KVM): run the README's test command");
    assert!(Path::new("/dev/kvm").exists(), "system tests need /dev/kvm");
}

/// The `ftvm` binary: `$FTVM_BIN` if set (benchmarks use a release build), otherwise the one built
/// next to this test binary (target/<profile>/ftvm).
pub fn ftvm_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FTVM_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/ftvm
    let bin = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps").join("ftvm");
    assert!(bin.exists(), "{} missing: build it first (`cargo build -p ftvm`, done by `cargo xtask test`)", bin.display());
    bin
}

/// The reference guest built by `cargo xtask build-guest`.
pub fn guest_elf() -> PathBuf {
    let elf = workspace_root().join("target/guest/ftvm-guest");
    assert!(elf.exists(), "{} missing: run `cargo xtask build-guest` first", elf.display());
    elf
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(&format!("ftvm-{tag}-")));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A network namespace that exists for the guard's lifetime. Dropping it kills every process
/// still inside and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Entered with [`Netns::existing`]: someone else owns it, Drop leaves it alone.
    borrowed: bool,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique_name(&format!("ftvm{tag}"));
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name, borrowed: false };
        run_ok(&mut ns.exec(&["ip", "link", "set", "lo", "up"]));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace.
    pub fn exec(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it creates live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&self.name);
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }
}

/// Moves the calling thread into the named network namespace (sockets it opens live there; threads
/// it spawns start there).
pub fn try_enter_netns(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: setns with a valid namespace fd; it changes only the calling thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`try_enter_netns`], panicking if it fails.
pub fn enter_netns(name: &str) {
    try_enter_netns(name).unwrap_or_else(|e| panic!("{e:#}"));
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.borrowed {
            return;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Runs a command to completion with its output captured (bounded by `timeout`), killing it if it
/// overruns; the error then holds what it printed.
pub fn try_run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    // Drain both pipes on threads so a chatty command cannot block on a full pipe.
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + timeout;
    let (status, overran) = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {cmd:?}"))? {
            break (status, false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break (child.wait().with_context(|| format!("waiting for {cmd:?}"))?, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() };
    if overran {
        bail!(
            "command {cmd:?} ran over {timeout:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// [`try_run_with_timeout`], panicking if the command cannot run or overruns.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    try_run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({})\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How to start a VM in a test.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub disk: PathBuf,
    pub memory: &'static str,
    pub extra_args: Vec<String>,
}

impl VmOptions {
    pub fn new(disk: PathBuf) -> Self {
        Self { disk, memory: "256M", extra_args: Vec::new() }
    }
}

/// An `ftvm run` process inside a namespace. Dropping it SIGKILLs the process if still running.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    console_log: PathBuf,
    stderr_log: PathBuf,
}

impl Vm {
    /// Starts the reference guest in `ns` and waits until it serves.
    pub fn start(ns: &Netns, dir: &Path, opts: &VmOptions) -> Self {
        let mut vm = Self::spawn(ns, dir, opts);
        vm.wait_for_console("ftvm-guest: serving on", BOOT_TIMEOUT);
        vm
    }

    /// Starts `ftvm run` without waiting for anything.
    pub fn spawn(ns: &Netns, dir: &Path, opts: &VmOptions) -> Self {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let console_log = dir.join(format!("console-{n}.log"));
        let stderr_log = dir.join(format!("ftvm-{n}.stderr"));
        let mut cmd = Command::new(ftvm_bin());
        cmd.args(["run", "--netns", ns.name(), "--tap", "ftvmtap0"])
            .arg("--guest")
            .arg(guest_elf())
            .arg("--disk")
            .arg(&opts.disk)
            .args(["--memory", opts.memory])
            .args(["--ip", &format!("{GUEST_IP}/24"), "--host-ip", &format!("{HOST_IP}/24")])
            .arg("--console-log")
            .arg(&console_log)
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_log).expect("stderr log"));
        let child = cmd.spawn().expect("spawn ftvm");
        Self { child: Some(child), console_log, stderr_log }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console_log).unwrap_or_default()
    }

    /// The `ftvm run` process's pid, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Waits until the console shows `needle`; panics with the logs if the VM exits or time runs out.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return;
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().expect("try_wait").is_some(),
                None => true,
            };
            if exited || Instant::now() > deadline {
                panic!(
                    "VM did not print {needle:?} ({})\n--- console ---\n{}\n--- stderr ---\n{}",
                    if exited { "it exited" } else { "timed out" },
                    self.console(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("VM already stopped");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("VM did not stop within 20 s of SIGTERM\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal RESP2 client over one TCP connection (use it inside [`Netns::run`]).
#[derive(Debug)]
pub struct RespClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn bulk(s: &str) -> Self {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }
}

impl RespClient {
    pub fn connect() -> Self {
        let addr = SocketAddrV4::new(GUEST_IP, KV_PORT);
        let stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10)).expect("connect to guest");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.set_nodelay(true).unwrap();
        Self { stream, buf: Vec::new() }
    }

    /// Sends raw bytes (for malformed-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends one command as a RESP array of bulk strings and reads its reply.
    pub fn cmd(&mut self, args: &[&str]) -> Reply {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.send_raw(&out);
        self.read_reply()
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk).expect("read reply");
        assert!(n > 0, "connection closed by the guest");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    fn line(&mut self) -> String {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.buf.drain(..pos + 2);
                return line;
            }
            self.fill();
        }
    }

    /// Reads one reply.
    pub fn read_reply(&mut self) -> Reply {
        let line = self.line();
        let (kind, rest) = line.split_at(1);
        match kind {
            "+" => Reply::Status(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Integer(rest.parse().expect("integer reply")),
            "$" => {
                let len: i64 = rest.parse().expect("bulk length");
                if len < 0 {
                    return Reply::Bulk(None);
                }
                let len = len as usize;
                while self.buf.len() < len + 2 {
                    self.fill();
                }
                let data = self.buf[..len].to_vec();
                self.buf.drain(..len + 2);
                Reply::Bulk(Some(data))
            }
            "*" => {
                let n: i64 = rest.parse().expect("array length");
                if n < 0 {
                    return Reply::Array(None);
                }
                Reply::Array(Some((0..n).map(|_| self.read_reply()).collect()))
            }
            _ => panic!("not a RESP reply: {line:?}"),
        }
    }
}

/// The fields of an `INFO` reply (`name:value` lines; sections and blank lines left out).
pub fn parse_info(info: &[u8]) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(info)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The guest's `INFO`, asked from inside `ns`; panics if the guest does not answer.
pub fn guest_info(ns: &Netns) -> std::collections::HashMap<String, String> {
    ns.run(|| {
        let Reply::Bulk(Some(info)) = RespClient::connect().cmd(&["INFO"]) else { panic!("INFO is not a bulk string") };
        parse_info(&info)
    })
}

/// Runs `redis-cli -h <guest> <args>` inside the namespace and returns its stdout (trimmed).
pub fn redis_cli(ns: &Netns, args: &[&str]) -> String {
    let ip = GUEST_IP.to_string();
    let mut argv = vec!["redis-cli", "-h", ip.as_str(), "-p", "6379"];
    argv.extend_from_slice(args);
    run_ok(&mut ns.exec(&argv)).trim_end().to_string()
}

// ---------------------------------------------------------------------------------------------
// Helpers for the site-level tests (failover): an existing named namespace, and a RESP client
// whose errors (reset, timeout, closed) are values rather than panics.

impl Netns {
    /// Enters a namespace someone else created and owns (an `ftvm site`'s `<site>-client`, say).
    /// Dropping the handle leaves the namespace and its processes alone.
    pub fn existing(name: &str) -> Self {
        assert!(Path::new("/run/netns").join(name).exists(), "network namespace {name} does not exist");
        Self { name: name.to_string(), borrowed: true }
    }
}

impl RespClient {
    /// Connects to the guest (from the calling thread's namespace) with a per-request read
    /// timeout; errors are returned, not panicked on.
    pub fn try_connect(read_timeout: Duration) -> std::io::Result<Self> {
        let addr = SocketAddrV4::new(GUEST_IP, KV_PORT);
        let stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10))?;
        stream.set_read_timeout(Some(read_timeout))?;
        stream.set_write_timeout(Some(read_timeout))?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, buf: Vec::new() })
    }

    /// The client's TCP port.
    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map_or(0, |a| a.port())
    }

    /// Segments this connection has retransmitted so far (`TCP_INFO`'s `tcpi_total_retrans`).
    pub fn total_retransmits(&self) -> u32 {
        // SAFETY: tcp_info is plain integers (all-zero is a valid value); getsockopt writes at
        // most `len` bytes into it and the fd is this client's open socket.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_total_retrans
    }

    /// Sends one command without reading its reply (pipelining); see [`RespClient::try_read_reply`].
    pub fn try_send(&mut self, args: &[&str]) -> std::io::Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&out)
    }

    /// Sends one command and reads its reply; a reset, a timeout or a close is an `Err`.
    pub fn try_cmd(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        self.try_send(args)?;
        self.try_read_reply()
    }

    fn try_fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16384];
        // A read with a timeout set is not restarted after a signal (or a stop and continue) of
        // this process: EINTR says nothing about the connection, so it is read again.
        let n = loop {
            match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed by the guest"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn try_line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.buf.drain(..pos + 2);
                return Ok(line);
            }
            self.try_fill()?;
        }
    }

    /// Reads one reply; I/O errors (reset, timeout, close) and protocol garbage are `Err`.
    pub fn try_read_reply(&mut self) -> std::io::Result<Reply> {
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let line = self.try_line()?;
        if line.is_empty() {
            return Err(bad("empty RESP line".into()));
        }
        let (kind, rest) = line.split_at(1);
        let int = |s: &str| s.parse::<i64>().map_err(|_| bad(format!("bad integer in {line:?}")));
        match kind {
            "+" => Ok(Reply::Status(rest.to_string())),
            "-" => Ok(Reply::Error(rest.to_string())),
            ":" => Ok(Reply::Integer(int(rest)?)),
            "$" => {
                let len = int(rest)?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let len = len as usize;
                while self.buf.len() < len + 2 {
                    self.try_fill()?;
                }
                let data = self.buf[..len].to_vec();
                self.buf.drain(..len + 2);
                Ok(Reply::Bulk(Some(data)))
            }
            "*" => {
                let n = int(rest)?;
                if n < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.try_read_reply()?);
                }
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(bad(format!("not a RESP reply: {line:?}"))),
        }
    }
}

/// An AF_PACKET socket for `ethertype`, bound to interface `ifname` of the calling thread's
/// namespace (test frames sent and seen below IP). Panics if it cannot be opened or bound.
pub fn packet_socket(ifname: &str, ethertype: u16) -> OwnedFd {
    let proto = ethertype.to_be();
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("interface name");
    // SAFETY: `name` is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "no interface {ifname}");
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
    };
    assert_eq!(rc, 0, "bind AF_PACKET to {ifname}: {}", std::io::Error::last_os_error());
    fd
}
