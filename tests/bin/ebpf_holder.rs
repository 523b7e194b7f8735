//! `ftvm-ebpf-holder`: the processes that the eBPF system tests (`tests/ebpf_gate.rs`) need
//! outside the test process, so that a test can stop (SIGSTOP) or kill them.
//!
//! - `responder <netns> <ifname> <object> <generation> <epoch> <progress_ns>`: attaches the
//!   heartbeat responder to `ifname` in `netns`, publishes the values with daemon state Running,
//!   prints `ready`, and holds the responder until stdin ends.
//! - `responder-with-watchdog <same arguments>`: as `responder`, and also starts a watchdog (this
//!   binary, `watchdog --responder-fds <spec>`) that inherits the responder and whose stdin is a
//!   pipe from this process; prints `watchdog <pid>` then `ready`.
//! - `gate-with-watchdog <netns> <ifname> <object> <mac>`: attaches the fencing gate to `ifname`
//!   in `netns` with `mac` active until far in the future, starts a watchdog (`watchdog
//!   --gate-fds <spec>`) that inherits the gate, as above; prints `watchdog <pid>` then `ready`,
//!   and holds the gate until stdin ends.
//! - `watchdog [--responder-fds <spec>] [--gate-fds <spec>]`: takes what it inherited, prints
//!   `watching`, and when its stdin ends (its parent died) closes the gate (prints
//!   `gate-closed <entries>`) and writes daemon state Dead into the responder (prints
//!   `dead-written`), as `ftvm lease-watchdog` does; keeps both attached until killed (at most
//!   60 s).
//!
//! Everything it prints goes to stdout, one line per event; errors end it with a message on stderr.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ftvm_ebpf_host::{
    monotonic_ns, parse_mac, spawn_inheriting, DaemonState, FenceGate, Handoff, HeartbeatResponder, InheritedGate,
    InheritedResponder,
};

/// The longest a watchdog holds what it inherited after its parent died.
const WATCHDOG_HOLD: Duration = Duration::from_secs(60);
/// How long the gate of `gate-with-watchdog` lets the guest's frames out: longer than any test.
const FAR_EXPIRY: Duration = Duration::from_secs(3600);

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
                Some(start_watchdog("--responder-fds", &responder.handoff()?)?)
            } else {
                None
            };
            say("ready")?;
            hold_until_stdin_ends();
            Ok(())
        }
        Some("gate-with-watchdog") => {
            let [netns, ifname, object, mac] = &args[1..] else {
                bail!("usage: gate-with-watchdog <netns> <ifname> <object> <mac>");
            };
            let mac = parse_mac(mac).with_context(|| format!("bad MAC {mac:?}"))?;
            // Single-threaded so far: the whole process (and the watchdog) lives in the namespace.
            ftvm_system_tests::try_enter_netns(netns)?;
            let expiry = monotonic_ns().saturating_add(FAR_EXPIRY.as_nanos() as u64);
            let gate = FenceGate::attach_with(Path::new(object), ifname, &[(mac, true, expiry)])?;
            let _watchdog = start_watchdog("--gate-fds", &gate.handoff()?)?;
            say("ready")?;
            hold_until_stdin_ends();
            Ok(())
        }
        Some("watchdog") => {
            let (mut responder, mut gate) = (None, None);
            for pair in args[1..].chunks(2) {
                match pair {
                    // SAFETY: this process was started by `spawn_inheriting` with this spec for a
                    // responder, and nothing else in it touches those descriptors; taken once
                    // (a repeated flag is refused).
                    [flag, spec] if flag == "--responder-fds" && responder.is_none() => {
                        responder = Some(unsafe { InheritedResponder::from_inherited(spec) }?);
                    }
                    // SAFETY: as above, for a gate.
                    [flag, spec] if flag == "--gate-fds" && gate.is_none() => {
                        gate = Some(unsafe { InheritedGate::from_inherited(spec) }?);
                    }
                    _ => bail!("usage: watchdog [--responder-fds <spec>] [--gate-fds <spec>], each once"),
                }
            }
            say("watching")?;
            for line in std::io::stdin().lock().lines() {
                if line.is_err() {
                    break;
                }
            }
            if let Some(gate) = &mut gate {
                let entries = gate.close()?;
                say(&format!("gate-closed {entries}"))?;
            }
            if let Some(responder) = &responder {
                responder.control().set_daemon_state(DaemonState::Dead)?;
                say("dead-written")?;
            }
            std::thread::sleep(WATCHDOG_HOLD);
            Ok(())
        }
        _ => bail!("usage: ftvm-ebpf-holder responder|responder-with-watchdog|gate-with-watchdog|watchdog ..."),
    }
}

/// Starts this binary as `watchdog flag <spec>`, inheriting `handoff`, with its stdin a pipe from
/// this process (kept open while the returned child is); prints `watchdog <pid>`.
fn start_watchdog(flag: &str, handoff: &dyn Handoff) -> Result<std::process::Child> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut cmd = Command::new(exe);
    cmd.arg("watchdog").stdin(Stdio::piped());
    let child = spawn_inheriting(&mut cmd, &[(flag, handoff)]).context("starting the watchdog")?;
    say(&format!("watchdog {}", child.id()))?;
    Ok(child)
}

/// Returns when the test closes this process's stdin (or never: the test kills it).
fn hold_until_stdin_ends() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
