//! How the lease watchdog learns of the primary's death before the primary's descriptors close.
//!
//! The watchdog's pipe from the primary ends only when the last thread of the dead primary has
//! exited: after the kernel has torn down the primary's memory (guest memory included: about
//! 10 ms for this machine's 256 MiB guest, far more for a large one), and after every thread
//! blocked in the kernel has come back (an exiting process waits for the disk flushes its io_uring
//! workers run: 630 ms once here). The backup waits for the watchdog's word ("daemon dead" in the
//! heartbeat replies, the lease released) all that time.
//!
//! So the watchdog is started by a thread of the primary that does nothing else and lasts as long
//! as the process ([`LastingThread`]), and asks the kernel for a signal when that thread ends
//! (`PR_SET_PDEATHSIG`, [`ask_for_death_signal`]). A SIGKILL ends that thread at once: it holds
//! nothing and waits in a futex. The signal says which process sent it (the ending thread's), and
//! the watchdog ([`on_parent_death`]) checks that it is its parent, so that a signal from anyone
//! else is not taken for the primary's death.

use std::io;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::sync::mpsc;

/// The signal the watchdog gets when its primary dies.
const DEATH_SIGNAL: libc::c_int = libc::SIGUSR2;

fn death_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds a valid signal to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, DEATH_SIGNAL);
        set
    }
}

/// Has the child of `cmd` get [`DEATH_SIGNAL`] when the thread that spawns it ends, blocked from
/// its first instruction (the mask survives `exec`), so that it is taken by
/// [`on_parent_death`] and never kills the child.
pub fn ask_for_death_signal(cmd: &mut Command) {
    let set = death_set();
    // SAFETY: the closure runs in the forked child before exec and only calls pthread_sigmask and
    // prctl, which are async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, DEATH_SIGNAL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// A thread that spawned a child and lasts until told to end: the child's death signal (see
/// [`ask_for_death_signal`]) comes when it ends. Dropped without [`Self::end`], it lasts as long
/// as the process.
#[derive(Debug)]
pub struct LastingThread {
    end: mpsc::Sender<()>,
}

impl LastingThread {
    /// Runs `spawn` on a new thread named `name`, which then lasts; returns the child.
    pub fn spawn(
        name: &str,
        spawn: impl FnOnce() -> io::Result<Child> + Send + 'static,
    ) -> io::Result<(Child, Self)> {
        let (child_tx, child_rx) = mpsc::channel();
        let (end, end_rx) = mpsc::channel::<()>();
        std::thread::Builder::new().name(name.to_string()).spawn(move || {
            let _ = child_tx.send(spawn());
            // Only an explicit end, once the child is gone: a dropped sender must not end this
            // thread, or the child would take it for its parent's death.
            if end_rx.recv().is_err() {
                loop {
                    std::thread::park();
                }
            }
        })?;
        let child = child_rx
            .recv()
            .map_err(|_| io::Error::other("the spawning thread ended without a child"))??;
        Ok((child, Self { end }))
    }

    /// Ends the thread; only once the child has been reaped.
    pub fn end(self) {
        let _ = self.end.send(());
    }
}

/// In the child: calls `on_death` (once, from a thread of its own) when the process that
/// spawned this one dies, as [`DEATH_SIGNAL`] from process `parent` says. Call it before any
/// other thread starts: it blocks the signal in the calling thread, which threads started later
/// inherit ([`ask_for_death_signal`] blocked it already in a child it started).
pub fn on_parent_death(parent: u32, on_death: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let set = death_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new().name("ftvm-parent-death".into()).spawn(move || {
        let set = death_set();
        loop {
            // SAFETY: zeroed is a valid siginfo_t to be written into.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is initialised and `info` a valid out pointer; the signal is blocked
            // in every thread, so this thread is its only taker.
            let signal = unsafe { libc::sigwaitinfo(&set, &mut info) };
            if signal != DEATH_SIGNAL {
                continue;
            }
            // SAFETY: for a signal sent by a process (or the kernel on its behalf), si_pid is
            // the sender's process id.
            let sender = unsafe { info.si_pid() };
            if u32::try_from(sender) == Ok(parent) {
                on_death();
                return;
            }
            tracing::warn!(sender, "a death signal not from the primary: ignored");
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether [`DEATH_SIGNAL`] is pending for process `pid` (it is blocked there, so it stays).
    fn death_signal_pending(pid: u32) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let pending = status
            .lines()
            .find_map(|l| l.strip_prefix("ShdPnd:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        pending & (1 << (DEATH_SIGNAL - 1)) != 0
    }

    fn sleeper() -> io::Result<Child> {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        ask_for_death_signal(&mut cmd);
        cmd.spawn()
    }

    #[test]
    fn the_child_gets_the_signal_when_its_lasting_thread_ends_and_not_before() {
        let (mut child, parent) = LastingThread::spawn("test-parent", sleeper).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!death_signal_pending(child.id()), "signalled while the thread lasts");
        parent.end();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !death_signal_pending(child.id()) {
            assert!(Instant::now() < deadline, "no death signal after the thread ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_lasting_thread_dropped_without_end_lasts() {
        let (mut child, parent) = LastingThread::spawn("test-parent", sleeper).unwrap();
        drop(parent);
        std::thread::sleep(Duration::from_millis(100));
        assert!(!death_signal_pending(child.id()), "a dropped handle ended the thread");
        let _ = child.kill();
        let _ = child.wait();
    }
}
