//! A whole `ftvm site` driven from outside: brought up with a unique name, its status read as JSON,
//! a host killed, and taken down by a guard on every exit path (its text logs are first copied to
//! `<logs>/<site>/` when the thread is panicking, or always with [`Site::keep_logs`]).
//!
//! The system tests use the panicking calls ([`Site::up`], [`Site::status`], [`Site::kill`]); the
//! failover benchmark, which records a failed repetition instead of panicking, uses the `try_`
//! ones with its own binaries and logs directory ([`SiteEnv`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{ftvm_bin, guest_elf, run_with_timeout, try_run_with_timeout, unique_name};

/// Where failed system tests leave the site's logs.
pub const TEST_LOGS_DIR: &str = "/tmp/ftvm-test-logs";
/// Where the sites keep their state (`/run/ftvm/sites/<name>`).
pub const SITES_DIR: &str = "/run/ftvm/sites";

const UP_TIMEOUT: Duration = Duration::from_secs(300);
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
const KILL_TIMEOUT: Duration = Duration::from_secs(60);
/// `site repair` waits up to 300 s for protection itself; this bounds the command.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(330);
const DOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// Log files larger than this are not copied.
const BIG_LOG: u64 = 64 << 20;

/// Runs `ftvm <args>` (the system tests' binary, stdin closed, bounded; panics if it runs over);
/// returns (success, stdout, stderr).
pub fn ftvm(args: &[&str], timeout: Duration) -> (bool, String, String) {
    let out = run_with_timeout(Command::new(ftvm_bin()).args(args).stdin(Stdio::null()), timeout);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a site runs and where its logs go.
#[derive(Clone, Debug)]
pub struct SiteEnv {
    /// The `ftvm` binary.
    pub ftvm: PathBuf,
    /// The guest ELF.
    pub guest: PathBuf,
    /// Logs are copied to `<logs>/<site>/`.
    pub logs: PathBuf,
}

impl SiteEnv {
    /// The system tests': [`ftvm_bin`], [`guest_elf`] and [`TEST_LOGS_DIR`] (panics if a binary is
    /// missing).
    pub fn tests() -> Self {
        Self { ftvm: ftvm_bin(), guest: guest_elf(), logs: TEST_LOGS_DIR.into() }
    }
}

/// The parts of `ftvm site status --json` the tests look at.
#[derive(Debug, Clone)]
pub struct Status {
    pub json: serde_json::Value,
    pub state: String,
    pub role_a: String,
    pub role_b: String,
}

impl Status {
    fn from_json(json: serde_json::Value) -> Self {
        let role = |host: &str| {
            json["hosts"]
                .as_array()
                .and_then(|hs| hs.iter().find(|h| h["name"] == host))
                .and_then(|h| h["role"].as_str())
                .unwrap_or("<none>")
                .to_string()
        };
        Self {
            state: json["state"].as_str().unwrap_or("<none>").to_string(),
            role_a: role("A"),
            role_b: role("B"),
            json,
        }
    }

    /// Host `name`'s own status report (its status file), if it runs.
    pub fn detail(&self, name: &str) -> Option<&serde_json::Value> {
        self.json["hosts"].as_array()?.iter().find(|h| h["name"] == name)?.get("detail")
    }

    /// The last synchronisation host `name` sent, as it reports it (a primary at its top, a host
    /// that took over under `serving`), if it sent one.
    pub fn last_sync(&self, name: &str) -> Option<&serde_json::Value> {
        let d = self.detail(name)?;
        let sync = if d["last_sync"].is_null() { &d["serving"]["last_sync"] } else { &d["last_sync"] };
        (!sync.is_null()).then_some(sync)
    }

    /// Whether both hosts' write-intent records know their past (a fresh disk's does once its
    /// first synchronisation and the epochs after it are acknowledged; until then a rejoin copies
    /// all of it).
    pub fn disk_records_complete(&self) -> bool {
        ["A", "B"].iter().all(|h| self.detail(h).is_some_and(|d| d["disk_record"]["complete"] == true))
    }

    /// Whether the pair is protected: A primary, B backup.
    pub fn is_protected(&self) -> bool {
        self.state == "protected" && self.role_a == "primary" && self.role_b == "backup"
    }

    /// Host `name`'s role (`A`, `B`).
    pub fn role(&self, name: &str) -> &str {
        match name {
            "A" => &self.role_a,
            _ => &self.role_b,
        }
    }
}

/// `<state> / A <role> / B <role>`.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / A {} / B {}", self.state, self.role_a, self.role_b)
    }
}

/// An `ftvm site` owned by a test or a benchmark; dropping it runs `ftvm site down`.
#[derive(Debug)]
pub struct Site {
    pub name: String,
    /// When `ftvm site up` returned (when the guard was made, before that).
    pub up_returned: Instant,
    env: SiteEnv,
    /// Save the logs on drop even when the thread is not panicking.
    keep_logs: bool,
}

impl Site {
    /// A guard for a site named `<tag><pid>x<n>` that is not up yet ([`Site::try_up`] brings it
    /// up); from here on it is taken down on drop, whatever happens.
    pub fn try_new(env: SiteEnv, tag: &str) -> Result<Self> {
        let name = unique_name(tag);
        if name.len() > 16 {
            bail!("site name {name} too long");
        }
        Ok(Self { name, up_returned: Instant::now(), env, keep_logs: false })
    }

    /// The system tests' `ftvm site up --name <unique> --guest <reference guest> <extra>`; panics
    /// (after the guard took ownership, so the site is removed and its logs saved) if it fails.
    pub fn up(tag: &str, extra: &[&str]) -> Self {
        let mut site = Self::try_new(SiteEnv::tests(), tag).unwrap_or_else(|e| panic!("{e:#}"));
        let started = Instant::now();
        if let Err(e) = site.try_up(extra) {
            panic!("{e:#}");
        }
        println!("[{}] site up in {:.1} s", site.name, (site.up_returned - started).as_secs_f64());
        site
    }

    /// `ftvm site up --name <name> --guest <guest> <extra>`; sets [`Site::up_returned`].
    pub fn try_up(&mut self, extra: &[&str]) -> Result<()> {
        let guest = self.env.guest.display().to_string();
        let mut args = vec!["site", "up", "--name", &self.name, "--guest", &guest];
        args.extend_from_slice(extra);
        let out = self.ftvm(&args, UP_TIMEOUT);
        let up_returned = Instant::now();
        let done = out.and_then(|out| checked(&args, out));
        self.up_returned = up_returned;
        done.map(drop)
    }

    /// Saves the logs on drop whether or not the thread panicked (for tests that judge after the
    /// site is gone).
    pub fn keep_logs(mut self) -> Self {
        self.keep_logs = true;
        self
    }

    /// `/run/ftvm/sites/<name>`.
    pub fn dir(&self) -> PathBuf {
        Path::new(SITES_DIR).join(&self.name)
    }

    /// The site's namespace `<name>-<part>` (`a`, `b`, `client`, `lan`).
    pub fn netns(&self, part: &str) -> String {
        format!("{}-{part}", self.name)
    }

    /// `ftvm site status --json`; panics if it fails.
    pub fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_status(&self) -> Result<Status> {
        let args = ["site", "status", "--name", &self.name, "--json"];
        let out = checked(&args, self.ftvm(&args, STATUS_TIMEOUT)?)?;
        let json = serde_json::from_str(&out).with_context(|| format!("site status is not JSON:\n{out}"))?;
        Ok(Status::from_json(json))
    }

    /// Polls status until `want` holds or `timeout` passes; returns the last status and whether
    /// `want` held. Panics if status fails.
    pub fn wait_status(&self, timeout: Duration, want: impl Fn(&Status) -> bool) -> (Status, bool) {
        self.try_wait_status(timeout, want).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// As [`Site::wait_status`], with an error instead of a panic when status fails.
    pub fn try_wait_status(&self, timeout: Duration, want: impl Fn(&Status) -> bool) -> Result<(Status, bool)> {
        let start = Instant::now();
        loop {
            let st = self.try_status()?;
            if want(&st) {
                return Ok((st, true));
            }
            if start.elapsed() > timeout {
                return Ok((st, false));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ftvm site kill --name <site> <host>`; returns when it started and ended (the SIGKILL lands
    /// in between). Panics if it fails.
    pub fn kill(&self, host: &str) -> (Instant, Instant) {
        self.try_kill(host).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_kill(&self, host: &str) -> Result<(Instant, Instant)> {
        let args = ["site", "kill", "--name", &self.name, host];
        let start = Instant::now();
        let out = self.ftvm(&args, KILL_TIMEOUT);
        let end = Instant::now();
        checked(&args, out?)?;
        Ok((start, end))
    }

    /// Host `host`'s disk replaced by a blank one (a new drive): its image and its term are
    /// removed, and its service, repaired, finds neither. Call it while the host is killed.
    pub fn try_blank_disk(&self, host: &str) -> Result<()> {
        let disk = self.dir().join(format!("disk-{}.img", host.to_ascii_lowercase()));
        std::fs::remove_file(&disk).with_context(|| format!("cannot remove {}", disk.display()))?;
        let _ = std::fs::remove_file(disk.with_extension("img.term"));
        Ok(())
    }

    /// `ftvm site repair --name <site> <host>`: returns once the pair is protected again, with
    /// how long that took. Panics if it fails.
    pub fn repair(&self, host: &str) -> Duration {
        let args = ["site", "repair", "--name", &self.name, host];
        let start = Instant::now();
        let out = self.ftvm(&args, REPAIR_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"));
        checked(&args, out).unwrap_or_else(|e| panic!("{e:#}"));
        start.elapsed()
    }

    /// `ftvm <args>` with this site's binary, bounded by `timeout`: its stdout, or an error with
    /// both outputs.
    pub fn try_run(&self, args: &[&str], timeout: Duration) -> Result<String> {
        checked(args, self.ftvm(args, timeout)?)
    }

    /// `ftvm site repair --no-wait --name <site> <host>`: returns once the host's service runs.
    /// Panics if it fails.
    pub fn start_service(&self, host: &str) {
        let args = ["site", "repair", "--no-wait", "--name", &self.name, host];
        let out = self.ftvm(&args, KILL_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"));
        checked(&args, out).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The pids of host `host` (`A`, `B`) in the site's state file (`site.json`).
    pub fn host_pids(&self, host: &str) -> Result<Vec<i32>> {
        let path = self.dir().join("site.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("bad JSON in {}", path.display()))?;
        let h = v["hosts"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["name"] == host))
            .with_context(|| format!("no host {host} in {}", path.display()))?;
        let pids: Vec<i32> = h["pids"]
            .as_array()
            .map(|p| p.iter().filter_map(|x| x.as_i64()).filter_map(|x| i32::try_from(x).ok()).collect())
            .unwrap_or_default();
        if pids.is_empty() || pids.iter().any(|&p| p <= 0) {
            bail!("host {host} has no valid pids in {}: {:?}", path.display(), h["pids"]);
        }
        Ok(pids)
    }

    /// A duplicate of the write end of host `host`'s pipe to its lease watchdog (the watchdog's
    /// stdin), taken out of the host process: while it is held, that pipe does not end when the
    /// host dies, so the watchdog must learn of the death otherwise.
    pub fn hold_watchdog_pipe(&self, host: &str) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd as _;
        let pid = self.host_pids(host)?[0];
        let watchdog = std::fs::read_dir("/proc")?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                // The parent's pid is the second field after the command's closing parenthesis.
                let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
                let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                ppid == Some(pid) && String::from_utf8_lossy(&cmdline).contains("lease-watchdog")
            })
            .with_context(|| format!("host {host} (pid {pid}) has no lease watchdog"))?;
        let pipe = std::fs::read_link(format!("/proc/{watchdog}/fd/0"))?;
        let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))?
            .flatten()
            .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == pipe))
            .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .with_context(|| format!("host {host} holds no end of {}", pipe.display()))?;
        // SAFETY: pidfd_open takes a pid and flags and touches no memory of this process.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            bail!("pidfd_open({pid}): {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags; no memory.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0) };
        if dup < 0 {
            bail!("pidfd_getfd({pid}, {fd}): {}", std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(dup as i32) })
    }

    /// Copies the site's text files (not the disk images) out of /run to `<logs>/<site>/` before
    /// `down` removes them; returns that directory.
    pub fn save_logs(&self) -> PathBuf {
        let to = self.env.logs.join(&self.name);
        let _ = std::fs::create_dir_all(&to);
        if let Ok(entries) = std::fs::read_dir(self.dir()) {
            for e in entries.flatten() {
                let p = e.path();
                let small = e.metadata().is_ok_and(|m| m.len() <= BIG_LOG);
                if p.is_file() && p.extension().is_none_or(|x| x != "img") && small {
                    let _ = std::fs::copy(&p, to.join(e.file_name()));
                }
            }
        }
        to
    }

    /// Runs this site's `ftvm <args>` (stdin closed, bounded).
    fn ftvm(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        try_run_with_timeout(Command::new(&self.env.ftvm).args(args).stdin(Stdio::null()), timeout)
    }
}

/// The stdout of `ftvm <args>` if it succeeded; else an error with both outputs.
fn checked(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "ftvm {} failed ({})\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for Site {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.save_logs();
            println!("[{}] test failed: site logs saved in {}", self.name, logs.display());
        } else if self.keep_logs {
            let logs = self.save_logs();
            println!("[{}] logs saved in {}", self.name, logs.display());
        }
        let args = ["site", "down", "--name", &self.name];
        if let Err(e) = self.ftvm(&args, DOWN_TIMEOUT).and_then(|out| checked(&args, out)) {
            eprintln!("[{}] {e:#}", self.name);
        }
    }
}
