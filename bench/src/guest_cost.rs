//! What a load costs the guest itself: its vCPU threads' CPU time and its main-loop turns per
//! command it executed, unprotected and FT, measured the same way in the same run.
//!
//! The pause and the link show in the pair's status; this shows what protection does to the
//! guest's own speed. Under this machine's nested KVM every first write to a write-protected
//! page is a fault of about 16 µs that the vCPU pays for, so a dirty-tracking policy that
//! protects the guest's working set again at each checkpoint shows here first (stop 22: 56 µs of
//! vCPU time per GET under 50 clients with FT against 10 unprotected, with as many loop turns).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use ftvm_system_tests::parse_info;

use crate::idle::{stat_ticks, ticks_per_second};
use crate::resp::{Conn, Reply};

/// One load's cost to the guest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GuestCost {
    /// redis-benchmark's pipeline depth.
    pub pipeline: u32,
    /// Commands the guest executed meanwhile (`INFO`'s `total_commands_processed`).
    pub commands: u64,
    /// vCPU threads' user and system time per command (guest time included).
    pub vcpu_us_per_command: f64,
    /// Turns of the guest's main loop per command (`INFO`'s `ftvm_loop_turns`): the same work
    /// in more time is slower execution (faults), more turns is more polling.
    pub loop_turns_per_command: f64,
}

/// The guest's counters and its vCPUs' CPU time at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    vcpu_ticks: u64,
    commands: u64,
    loop_turns: u64,
}

/// Reads `pid`'s vCPU threads' CPU time and the guest's counters (over a connection from `netns`).
pub fn probe(netns: &str, pid: i32) -> Result<Probe> {
    let vcpu_ticks = vcpu_ticks(pid)?;
    let mut conn = Conn::connect_in_netns(netns, Duration::from_secs(5))?;
    let info = match conn.cmd(&["INFO"])? {
        Reply::Bulk(Some(b)) => parse_info(&b),
        other => bail!("INFO answered {other:?}"),
    };
    Ok(Probe {
        vcpu_ticks,
        commands: info_field(&info, "total_commands_processed")?,
        loop_turns: info_field(&info, "ftvm_loop_turns")?,
    })
}

/// The cost between two probes of the same guest. The `INFO` of the second probe counts itself.
pub fn between(before: &Probe, after: &Probe, pipeline: u32) -> GuestCost {
    let ticks_per_s = ticks_per_second();
    let commands = after.commands.saturating_sub(before.commands);
    let per = |x: f64| if commands == 0 { 0.0 } else { x / commands as f64 };
    GuestCost {
        pipeline,
        commands,
        vcpu_us_per_command: per(after.vcpu_ticks.saturating_sub(before.vcpu_ticks) as f64 / ticks_per_s * 1e6),
        loop_turns_per_command: per(after.loop_turns.saturating_sub(before.loop_turns) as f64),
    }
}

/// The process among `pids` that runs vCPU threads (a host's VMM, not its watchdog).
pub fn vmm_pid(pids: &[i32]) -> Option<i32> {
    pids.iter().copied().find(|&p| vcpu_threads(p).is_ok_and(|t| !t.is_empty()))
}

/// The thread ids of `pid`'s vCPU threads (named `vcpuN`).
fn vcpu_threads(pid: i32) -> Result<Vec<String>> {
    let dir = format!("/proc/{pid}/task");
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
        let tid = entry?.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(format!("{dir}/{tid}/comm")).unwrap_or_default();
        if comm.trim_end().strip_prefix("vcpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// Clock ticks of user plus system time `pid`'s vCPU threads have used.
fn vcpu_ticks(pid: i32) -> Result<u64> {
    let tids = vcpu_threads(pid)?;
    if tids.is_empty() {
        bail!("process {pid} has no vCPU thread");
    }
    let mut ticks = 0;
    for tid in tids {
        ticks += stat_ticks(&format!("/proc/{pid}/task/{tid}/stat"))?;
    }
    Ok(ticks)
}

/// The number in field `name` of an `INFO` reply ([`parse_info`]).
fn info_field(info: &HashMap<String, String>, name: &str) -> Result<u64> {
    info.get(name)
        .with_context(|| format!("INFO has no {name}"))?
        .parse()
        .with_context(|| format!("INFO's {name} is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_read_by_whole_name() {
        let info = parse_info(b"# Stats\r\ntotal_commands_processed:12\r\nftvm_loop_turns:3\r\nftvm_loop_turns_x:9\r\n");
        assert_eq!(info_field(&info, "total_commands_processed").unwrap(), 12);
        assert_eq!(info_field(&info, "ftvm_loop_turns").unwrap(), 3);
        assert!(info_field(&info, "ftvm_idle_waits").is_err());
        assert!(info_field(&parse_info(b"ftvm_loop_turns:x\r\n"), "ftvm_loop_turns").is_err());
    }

    #[test]
    fn the_cost_is_per_command() {
        let p = |vcpu_ticks, commands, loop_turns| Probe { vcpu_ticks, commands, loop_turns };
        let hz = ticks_per_second() as u64;
        let c = between(&p(0, 100, 10), &p(hz, 1100, 510), 16);
        assert_eq!((c.pipeline, c.commands), (16, 1000));
        assert!((c.vcpu_us_per_command - 1000.0).abs() < 1e-9, "one second over 1 000 commands");
        assert!((c.loop_turns_per_command - 0.5).abs() < 1e-9);
        assert_eq!(between(&p(5, 7, 7), &p(9, 7, 9), 1).vcpu_us_per_command, 0.0, "no command, no cost");
    }

    #[test]
    fn only_vcpu_threads_count() {
        let me = std::process::id() as i32;
        assert!(vcpu_threads(me).unwrap().is_empty(), "a test process has no vCPU thread");
        assert!(vcpu_ticks(me).is_err());
        assert_eq!(vmm_pid(&[me]), None);
        let named = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(|| std::thread::sleep(Duration::from_millis(300)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vcpu_threads(me).unwrap().len(), 1);
        assert_eq!(vmm_pid(&[-1, me]), Some(me));
        named.join().unwrap();
    }
}
