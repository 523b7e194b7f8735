//! `ftvm-ebpf-holder`: the processes that the eBPF system tests (`tests/ebpf_gate.rs`) need
//! outside the test process, so that a test can stop (SIGSTOP) or kill them.
//!
//! - `responder <netns> <ifname> <object> <generation> <epoch> <progress_ns>`: attaches the
//!   heartbeat responder to `ifname` in `netns`, publishes the values with daemon state Running,
//!   prints `ready`, and holds the responder until stdin ends.
//! - `responder-with-watchdog <same arguments>`: as `responder`, and also starts a watchdog (this
//!   binary, `watchdog --responder-fds <spec>`) that inherits the responder and whose stdin is a
//!   pipe from this process; prints `watchdog <pid>` then `ready`.
//! - `watchdog --responder-fds <spec>`: takes the inherited responder, prints `watching`, and
//!   when its stdin ends (its parent died) writes daemon state Dead, prints `dead-written`, and
//!   keeps the responder attached until killed (at most 60 s).
//!
//! Everything it prints goes to stdout, one line per event; errors end it with a message on stderr.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ftvm_ebpf_host::{DaemonState, HeartbeatResponder, InheritedResponder};

/// The longest a watchdog holds the responder after its parent died.
const WATCHDOG_HOLD: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftvm-ebpf-holder: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(mode @ ("responder" | "responder-with-watchdog")) => {
            let [netns, ifname, object, generation, epoch, progress] = &args[1..] else {
                bail!("usage: {mode} <netns> <ifname> <object> <generation> <epoch> <progress_ns>");
            };
            // Single-threaded so far: the whole process (and the watchdog it starts) lives in
            // the namespace.
            ftvm_system_tests::try_enter_netns(netns)?;
            let responder = HeartbeatResponder::attach(Path::new(object), ifname)?;
            let control = responder.control();
            control.publish(generation.parse()?, epoch.parse()?, progress.parse()?)?;
            control.set_daemon_state(DaemonState::Running)?;
            // Kept until this process ends: its stdin is the watchdog's "parent alive" signal.
            let _watchdog = if mode == "responder-with-watchdog" {
                let exe = std::env::current_exe().context("current_exe")?;
                let mut cmd = Command::new(exe);
                cmd.arg("watchdog").stdin(Stdio::piped());
                let child = responder.handoff()?.spawn(&mut cmd, "--responder-fds").context("starting the watchdog")?;
                say(&format!("watchdog {}", child.id()))?;
                Some(child)
            } else {
                None
            };
            say("ready")?;
            // Hold until the test closes our stdin (or kills us).
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            Ok(())
        }
        Some("watchdog") => {
            let [flag, spec] = &args[1..] else { bail!("usage: watchdog --responder-fds <spec>") };
            if flag != "--responder-fds" {
                bail!("unknown option {flag}");
            }
            // SAFETY: this process was started by `ResponderHandoff::spawn` with this spec, and
            // nothing else in it touches those descriptors; called once.
            let inherited = unsafe { InheritedResponder::from_inherited(spec) }?;
            say("watching")?;
            for line in std::io::stdin().lock().lines() {
                if line.is_err() {
                    break;
                }
            }
            inherited.control().set_daemon_state(DaemonState::Dead)?;
            say("dead-written")?;
            std::thread::sleep(WATCHDOG_HOLD);
            Ok(())
        }
        _ => bail!("usage: ftvm-ebpf-holder responder|responder-with-watchdog|watchdog ..."),
    }
}
