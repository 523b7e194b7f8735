//! Wake-ups for a guest that waits (port [`ftvm_guest_abi::PORT_WAIT`]).
//!
//! Devices call [`GuestWake::notify`] each time they put something in a used ring. The vCPU thread
//! blocks in [`GuestWake::wait`] while the guest is idle. The eventfd counter remembers a notify
//! that comes while the guest is running, so the next wait returns at once and no wake-up is lost.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why [`GuestWake::wait`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// A device event is pending for the guest.
    Event,
    /// The interrupt fd (a pause or stop request) became readable; it is left unconsumed.
    Interrupted,
    /// The timeout passed with no event.
    TimedOut,
}

/// The eventfd devices signal and an idle guest waits on.
#[derive(Debug)]
pub struct GuestWake {
    event: EventFd,
}

impl GuestWake {
    /// Creates a wake-up channel with nothing pending.
    pub fn new() -> io::Result<Self> {
        Ok(Self { event: EventFd::new(EFD_NONBLOCK)? })
    }

    /// Tells a waiting (or the next waiting) guest that a device has news for it.
    pub fn notify(&self) {
        // A full counter (2^64 - 2 pending notifies) still wakes the waiter, so the error
        // (EAGAIN) carries no information worth reporting.
        let _ = self.event.write(1);
    }

    /// Blocks until a device event, until `interrupt` becomes readable, or until `timeout`
    /// (`None` = no limit). Consumes the pending device event, if any.
    pub fn wait(&self, timeout: Option<Duration>, interrupt: RawFd) -> io::Result<WaitOutcome> {
        let mut fds = [
            libc::pollfd { fd: self.event.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: interrupt, events: libc::POLLIN, revents: 0 },
        ];
        let timeout_ms: libc::c_int = match timeout {
            None => -1,
            // Round up so that a 300 µs timeout does not become a busy 0 ms poll.
            Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
        };
        loop {
            // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if fds[1].revents != 0 {
                return Ok(WaitOutcome::Interrupted);
            }
            if fds[0].revents != 0 {
                // Reading resets the counter; WouldBlock means another reader took it first.
                let _ = self.event.read();
                return Ok(WaitOutcome::Event);
            }
            return Ok(WaitOutcome::TimedOut);
        }
    }
}

impl AsRawFd for GuestWake {
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_before_wait_is_not_lost() {
        let wake = GuestWake::new().unwrap();
        let never = EventFd::new(EFD_NONBLOCK).unwrap();
        wake.notify();
        let got = wake.wait(Some(Duration::from_secs(5)), never.as_raw_fd()).unwrap();
        assert_eq!(got, WaitOutcome::Event);
        // Consumed: the next wait times out.
        let got = wake.wait(Some(Duration::from_millis(1)), never.as_raw_fd()).unwrap();
        assert_eq!(got, WaitOutcome::TimedOut);
    }

    #[test]
    fn interrupt_ends_wait() {
        let wake = GuestWake::new().unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        stop.write(1).unwrap();
        let got = wake.wait(None, stop.as_raw_fd()).unwrap();
        assert_eq!(got, WaitOutcome::Interrupted);
    }
}
