//! Ctrl-C and SIGTERM become a clean stop.
//!
//! SIGINT and SIGTERM are blocked in every thread (the mask is inherited, so this must run before
//! any thread is started), and one thread takes them with `sigwait`. No async-signal-safety
//! concerns: the stop runs in ordinary thread context.

use anyhow::{Context, Result};

/// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread it starts later).
pub fn block_stop_signals() -> Result<()> {
    let set = stop_set();
    // SAFETY: `set` is a valid, initialised sigset; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc)).context("cannot block SIGINT/SIGTERM");
    }
    Ok(())
}

/// Starts a thread that calls `on_stop` once for the first SIGINT or SIGTERM (a second one
/// is handled the same way: a stop is idempotent).
pub fn on_stop_signal(on_stop: impl Fn(i32) + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let set = stop_set();
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is initialised and `signal` is a valid out pointer; the signals are
            // blocked in every thread, so sigwait is the only consumer.
            let rc = unsafe { libc::sigwait(&set, &mut signal) };
            if rc == 0 {
                on_stop(signal);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset with valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}
