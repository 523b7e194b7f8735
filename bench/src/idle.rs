//! What an idle VM costs: the CPU time its processes use over a quiet stretch (no client), from
//! `/proc/<pid>/stat` (user and system time of every thread), for the unprotected VM and for each
//! host of the protected pair, measured the same way in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// An idle stretch's CPU use, in percent of one core.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IdleReport {
    pub seconds: f64,
    /// The unprotected VM's `ftvm run` process.
    pub unprotected_pct: Option<f64>,
    /// The protected pair's primary and backup `ftvm` processes.
    pub primary_pct: Option<f64>,
    pub backup_pct: Option<f64>,
    /// The pair's checkpoints per second meanwhile (its status after the stretch).
    pub epochs_per_sec: Option<f64>,
}

/// Clock ticks of user plus system time `pid` has used (its threads included).
fn cpu_ticks(pid: i32) -> Result<u64> {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// Clock ticks of user plus system time in a `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat`.
pub(crate) fn stat_ticks(path: &str) -> Result<u64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may hold spaces: the fields after it follow its last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("no ')' in /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line (utime, stime) are the 12th and 13th after the name.
    let field = |i: usize| -> Result<u64> { fields.get(i).context("short /proc/<pid>/stat")?.parse().context("bad tick count") };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks per second of the times in `/proc/<pid>/stat`.
pub(crate) fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The CPU `pids` use together over `stretch`, in percent of one core.
pub fn cpu_percent(pids: &[i32], stretch: Duration) -> Result<f64> {
    let ticks_per_s = ticks_per_second();
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum::<Result<u64>>()?;
    let t = Instant::now();
    std::thread::sleep(stretch);
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum::<Result<u64>>()?;
    Ok(after.saturating_sub(before) as f64 / ticks_per_s / t.elapsed().as_secs_f64() * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_shows_and_an_idle_process_does_not() {
        let me = std::process::id() as i32;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spin = {
            let stop = stop.clone();
            std::thread::spawn(move || while !stop.load(std::sync::atomic::Ordering::Relaxed) {})
        };
        let busy = cpu_percent(&[me], Duration::from_millis(500)).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spin.join().unwrap();
        assert!(busy > 50.0, "a spinning thread used {busy:.0} % of a core");
        assert!(cpu_ticks(-1).is_err());
    }
}
