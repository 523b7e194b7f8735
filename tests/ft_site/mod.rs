//! A whole `ftvm site` for a system test: brought up with a unique name, its status read as JSON,
//! its namespaces entered, and taken down by a guard on every exit path (its text logs are first
//! copied to `/tmp/ftvm-test-logs/<site>/` when the test fails, or always with
//! [`Site::keep_logs`]).
//!
//! Shared by `site.rs`, `failover.rs`, `output_commit.rs` and `disk_failover.rs` (`#[path]`
//! module: each test binary compiles its own copy, so not every helper is used by each). It is not
//! in the crate's lib (`common/`) because it needs serde_json, a dev-dependency.
#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ftvm_system_tests::{ftvm_bin, guest_elf, run_with_timeout, unique_name};

/// Where failed tests leave the site's logs.
pub const LOGS_DIR: &str = "/tmp/ftvm-test-logs";

/// Runs `ftvm <args>` (bounded); returns (success, stdout, stderr).
pub fn ftvm(args: &[&str], timeout: Duration) -> (bool, String, String) {
    let out = run_with_timeout(Command::new(ftvm_bin()).args(args), timeout);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    /// Host `name`'s own status report (its status file), if it runs.
    pub fn detail(&self, name: &str) -> Option<&serde_json::Value> {
        self.json["hosts"].as_array()?.iter().find(|h| h["name"] == name)?.get("detail")
    }

    /// Whether the pair is protected: A primary, B backup.
    pub fn is_protected(&self) -> bool {
        self.state == "protected" && self.role_a == "primary" && self.role_b == "backup"
    }
}

/// `<state> / A <role> / B <role>`.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / A {} / B {}", self.state, self.role_a, self.role_b)
    }
}

/// An `ftvm site` owned by a test.
#[derive(Debug)]
pub struct Site {
    pub name: String,
    /// When `ftvm site up` returned.
    pub up_returned: Instant,
    /// Save the logs on drop even when the test has not (yet) failed.
    keep_logs: bool,
}

impl Site {
    /// `ftvm site up --name <unique> --guest <reference guest> <extra>`; panics (after the guard
    /// took ownership, so the site is removed) if it fails.
    pub fn up(tag: &str, extra: &[&str]) -> Self {
        let name = unique_name(tag);
        assert!(name.len() <= 16, "site name {name} too long");
        let guest = guest_elf().display().to_string();
        let mut args = vec!["site".to_string(), "up".into(), "--name".into(), name.clone()];
        args.extend(["--guest".to_string(), guest]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let started = Instant::now();
        let out = run_with_timeout(Command::new(ftvm_bin()).args(&args), Duration::from_secs(300));
        let up_returned = Instant::now();
        // From here on the guard owns the site, even if `up` failed half way.
        let site = Self { name, up_returned, keep_logs: false };
        assert!(
            out.status.success(),
            "ftvm {} failed ({})\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("[{}] site up in {:.1} s", site.name, (up_returned - started).as_secs_f64());
        site
    }

    /// Saves the logs on drop whether or not the test panicked (for tests that judge after the
    /// site is gone).
    pub fn keep_logs(mut self) -> Self {
        self.keep_logs = true;
        self
    }

    /// `/run/ftvm/sites/<name>`.
    pub fn dir(&self) -> PathBuf {
        Path::new("/run/ftvm/sites").join(&self.name)
    }

    /// The site's namespace `<name>-<part>` (`a`, `b`, `client`, `lan`).
    pub fn netns(&self, part: &str) -> String {
        format!("{}-{part}", self.name)
    }

    pub fn status(&self) -> Status {
        let (ok, out, err) =
            ftvm(&["site", "status", "--name", &self.name, "--json"], Duration::from_secs(30));
        assert!(ok, "ftvm site status --name {} failed:\n{out}\n{err}", self.name);
        let json: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("site status is not JSON ({e}):\n{out}"));
        let role = |host: &str| {
            json["hosts"]
                .as_array()
                .and_then(|hs| hs.iter().find(|h| h["name"] == host))
                .and_then(|h| h["role"].as_str())
                .unwrap_or("<none>")
                .to_string()
        };
        Status {
            state: json["state"].as_str().unwrap_or("<none>").to_string(),
            role_a: role("A"),
            role_b: role("B"),
            json,
        }
    }

    /// Polls status until `want` holds or `timeout` passes; returns the last status and whether
    /// `want` held.
    pub fn wait_status(&self, timeout: Duration, want: impl Fn(&Status) -> bool) -> (Status, bool) {
        let start = Instant::now();
        loop {
            let st = self.status();
            if want(&st) {
                return (st, true);
            }
            if start.elapsed() > timeout {
                return (st, false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ftvm site kill --name <site> <host>`; returns when it started and ended (the SIGKILL lands
    /// in between).
    pub fn kill(&self, host: &str) -> (Instant, Instant) {
        let start = Instant::now();
        let (ok, out, err) =
            ftvm(&["site", "kill", "--name", &self.name, host], Duration::from_secs(60));
        let end = Instant::now();
        assert!(ok, "ftvm site kill --name {} {host} failed:\n{out}\n{err}", self.name);
        (start, end)
    }

    /// Copies the site's text files (not the disk images) out of /run before `down` removes them.
    fn save_logs(&self) -> PathBuf {
        let to = Path::new(LOGS_DIR).join(&self.name);
        let _ = std::fs::create_dir_all(&to);
        if let Ok(entries) = std::fs::read_dir(self.dir()) {
            for e in entries.flatten() {
                let p = e.path();
                let big = e.metadata().map(|m| m.len() > 64 << 20).unwrap_or(true);
                if p.is_file() && p.extension().is_none_or(|x| x != "img") && !big {
                    let _ = std::fs::copy(&p, to.join(e.file_name()));
                }
            }
        }
        to
    }
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
        let _ = run_with_timeout(
            Command::new(ftvm_bin()).args(["site", "down", "--name", &self.name]),
            Duration::from_secs(120),
        );
    }
}

/// Moves the calling thread into the named network namespace (sockets it opens live there; threads
/// it spawns start there).
pub fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns with a valid namespace fd; it changes only the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}
