//! Ctrl-C and SIGTERM become a clean stop; SIGUSR1 asks the host running the VM for a planned
//! switchover (`ftvm site switchover`, or `systemctl kill -s USR1 --kill-whom=main ftvm-host`).
//!
//! The three are blocked in every thread (the mask is inherited, so this must run before any
//! thread is started), and the signal threads take them with `sigwait`. No async-signal-safety
//! concerns: the handlers run in ordinary thread context.

use std::sync::Mutex;

use anyhow::{Context, Result};

/// A registered handler, by the id its guard removes it with.
type Handlers<F> = Mutex<Vec<(u64, Box<F>)>>;

/// What SIGINT and SIGTERM call, with the signal.
static ON_STOP: Handlers<dyn Fn(i32) + Send> = Mutex::new(Vec::new());
/// What SIGUSR1 calls.
static ON_SWITCHOVER: Handlers<dyn Fn() + Send> = Mutex::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Keeps a handler registered; dropping it removes the handler (and whatever it holds: a host's
/// service runs one VM after another, and a stopped VM's devices must go with it).
#[must_use = "the handler is removed when the guard is dropped"]
#[derive(Debug)]
pub struct HandlerGuard {
    id: u64,
    switchover: bool,
}

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        if self.switchover {
            ON_SWITCHOVER.lock().unwrap_or_else(|e| e.into_inner()).retain(|(id, _)| *id != self.id);
        } else {
            ON_STOP.lock().unwrap_or_else(|e| e.into_inner()).retain(|(id, _)| *id != self.id);
        }
    }
}
/// The one signal thread, started with the first handler (a host's service runs one VM after
/// another in one process: each adds its handlers, and every handler is called).
static THREAD: std::sync::OnceLock<std::io::Result<()>> = std::sync::OnceLock::new();

/// Calls `f` at every SIGUSR1 while the guard lives (the signal thread starts with
/// [`on_stop_signal`]).
pub fn on_switchover_signal(f: impl Fn() + Send + 'static) -> HandlerGuard {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ON_SWITCHOVER.lock().unwrap_or_else(|e| e.into_inner()).push((id, Box::new(f)));
    HandlerGuard { id, switchover: true }
}

/// Blocks SIGINT, SIGTERM and SIGUSR1 in the calling thread (and so in every thread it starts
/// later).
pub fn block_stop_signals() -> Result<()> {
    let set = stop_set();
    // SAFETY: `set` is a valid, initialised sigset; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc)).context("cannot block SIGINT/SIGTERM/SIGUSR1");
    }
    Ok(())
}

/// Calls `on_stop` at every SIGINT or SIGTERM while the guard lives (a stop is idempotent),
/// starting the signal thread if it does not run yet; the thread calls the switchover handlers at
/// SIGUSR1.
pub fn on_stop_signal(on_stop: impl Fn(i32) + Send + 'static) -> Result<HandlerGuard> {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ON_STOP.lock().unwrap_or_else(|e| e.into_inner()).push((id, Box::new(on_stop)));
    let guard = HandlerGuard { id, switchover: false };
    let started = THREAD.get_or_init(|| {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(|| loop {
                let set = stop_set();
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` is initialised and `signal` is a valid out pointer; the signals
                // are blocked in every thread, so sigwait is the only consumer.
                let rc = unsafe { libc::sigwait(&set, &mut signal) };
                if rc != 0 {
                    continue;
                }
                if signal == libc::SIGUSR1 {
                    tracing::info!("SIGUSR1: switchover asked for");
                    ON_SWITCHOVER.lock().unwrap_or_else(|e| e.into_inner()).iter().for_each(|(_, f)| f());
                } else {
                    ON_STOP.lock().unwrap_or_else(|e| e.into_inner()).iter().for_each(|(_, f)| f(signal));
                }
            })
            .map(drop)
    });
    match started {
        Ok(()) => Ok(guard),
        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())).context("cannot start the signal thread"),
    }
}

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset with valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        set
    }
}
