//! Getting a vCPU thread's attention: `immediate_exit`, a real-time signal, and an eventfd.
//!
//! A vCPU thread can be in one of three places when another thread wants it to pause or stop:
//! * about to enter `KVM_RUN`: `kvm_run.immediate_exit = 1` makes the next `KVM_RUN` return
//!   `EINTR` at once (after completing a pending I/O or MMIO exit, so the vCPU state is
//!   consistent);
//! * inside `KVM_RUN`: a signal with a do-nothing handler makes KVM return to user space (and the
//!   flag above makes it return `EINTR` rather than re-enter);
//! * blocked in the guest's wait port ([`crate::wake::GuestWake::wait`]): the interrupt eventfd
//!   wakes it, and it returns to the guest, whose `out` completes in the next `KVM_RUN` before
//!   that `KVM_RUN` returns `EINTR`.
//!
//! The requester writes the flag first, then signals, then writes the eventfd; the vCPU thread
//! clears the flag and drains the eventfd *before* reading its event channel. So any event sent
//! after that read finds the flag set again, and no request is lost.
//!
//! Before the flag, a kick also sets `kvm_run.kvm_valid_regs` (where KVM offers it): the
//! `KVM_RUN` the kick ends then stores the registers, special registers and events in `kvm_run`
//! as it returns, and the pause that follows reads them from there instead of with three ioctls.
//! The vCPU thread clears them with the flag, so the runs between pauses store nothing.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The kick signal is `SIGRTMIN + KICK_SIGNAL_OFFSET`.
pub const KICK_SIGNAL_OFFSET: libc::c_int = 0;

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the do-nothing handler for the kick signal (once per process). Without a handler the
/// signal's default action would end the process; with one, it only interrupts `KVM_RUN`.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
                .map_err(|e| e.errno())
        })
        .map_err(std::io::Error::from_raw_os_error)
}

/// Which thread to signal, and whether the `kvm_run` mapping still exists.
#[derive(Debug)]
struct Target {
    /// False once the vCPU (and its `kvm_run` mapping) is being dropped.
    alive: bool,
    /// The vCPU thread, once started.
    thread: Option<libc::pthread_t>,
}

/// Shared between a vCPU thread and everyone who may ask it to pause or stop.
#[derive(Debug)]
pub struct Kick {
    target: Mutex<Target>,
    /// `&kvm_run.immediate_exit` of the vCPU.
    immediate_exit: *mut u8,
    /// `&kvm_run.kvm_valid_regs` of the vCPU, if KVM stores registers there.
    valid_regs: Option<*mut u64>,
    interrupt: EventFd,
}

// SAFETY: `immediate_exit` points into the vCPU's `kvm_run` mapping; it is only dereferenced
// (as an atomic) while `target.alive` is true, checked under the `target` lock, and the vCPU
// clears `alive` under that lock before its mapping is unmapped (`Kick::retire`). The kernel only
// reads the byte. Everything else in `Kick` is Send and Sync.
unsafe impl Send for Kick {}
// SAFETY: as above; all mutation goes through the mutex, the atomic byte or the eventfd.
unsafe impl Sync for Kick {}

impl Kick {
    /// A kick for the vCPU whose `kvm_run.immediate_exit` is at `immediate_exit`, and whose
    /// `kvm_run.kvm_valid_regs` is at `valid_regs` if KVM can store registers there.
    ///
    /// # Safety
    ///
    /// `immediate_exit` and `valid_regs` must stay valid until [`Kick::retire`] is called, and
    /// must only be accessed atomically (through this `Kick`) by user space while they are.
    /// `valid_regs` must be 8-byte aligned (it is, in `struct kvm_run`).
    pub unsafe fn new(
        immediate_exit: *mut u8,
        valid_regs: Option<*mut u64>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            target: Mutex::new(Target {
                alive: true,
                thread: None,
            }),
            immediate_exit,
            valid_regs,
            interrupt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn flag(&self) -> &AtomicU8 {
        // SAFETY: callers hold the guarantee of `new` (the vCPU thread while it owns the vCPU fd,
        // other threads under the `target` lock with `alive` true). A u8 is always aligned.
        unsafe { AtomicU8::from_ptr(self.immediate_exit) }
    }

    fn valid_regs(&self) -> Option<&AtomicU64> {
        // SAFETY: as for `flag`; `new` requires the pointer aligned.
        self.valid_regs.map(|p| unsafe { AtomicU64::from_ptr(p) })
    }

    /// Records the vCPU thread so that [`Kick::kick`] can signal it.
    pub fn set_thread(&self, thread: libc::pthread_t) {
        crate::devices::bus::lock(&self.target).thread = Some(thread);
    }

    /// Makes the vCPU thread look at its event channel soon: sets `immediate_exit`, signals the
    /// thread out of `KVM_RUN`, wakes it from the wait port.
    pub fn kick(&self) {
        {
            let target = crate::devices::bus::lock(&self.target);
            if !target.alive {
                return;
            }
            // Before the flag: the run that the flag or the signal ends must see them.
            if let Some(v) = self.valid_regs() {
                v.fetch_or(super::state::SYNCED_REGS, Ordering::SeqCst);
            }
            self.flag().store(1, Ordering::SeqCst);
            // The flag must be visible before the signal lands (Firecracker does the same).
            fence(Ordering::SeqCst);
            if let Some(thread) = target.thread {
                // SAFETY: `thread` is a thread we started; while `alive` is true under this lock
                // it has not finished (the vCPU retires this kick before its thread returns).
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
        }
        // Cannot fail but by overflowing a 64-bit counter.
        let _ = self.interrupt.write(1);
    }

    /// On the vCPU thread: whether a kick is pending (the next `KVM_RUN` will return at once).
    pub fn pending(&self) -> bool {
        self.flag().load(Ordering::SeqCst) != 0
    }

    /// On the vCPU thread, at a pause point: forget the kicks seen so far. Must come before the
    /// event channel is read. (What the run that ended here stored in `kvm_run` stays there.)
    pub fn clear(&self) {
        if let Some(v) = self.valid_regs() {
            v.fetch_and(!super::state::SYNCED_REGS, Ordering::SeqCst);
        }
        self.flag().store(0, Ordering::SeqCst);
        self.drain_interrupt();
        fence(Ordering::SeqCst);
    }

    /// Empties the interrupt eventfd (a stale wake-up for a request already handled).
    pub fn drain_interrupt(&self) {
        // WouldBlock means it was already empty.
        let _ = self.interrupt.read();
    }

    /// The fd [`crate::wake::GuestWake::wait`] watches for pause and stop requests.
    pub fn interrupt_fd(&self) -> RawFd {
        self.interrupt.as_raw_fd()
    }

    /// On the vCPU thread, before the vCPU fd is dropped: no more kicks touch `kvm_run`.
    pub fn retire(&self) {
        let mut target = crate::devices::bus::lock(&self.target);
        target.alive = false;
        target.thread = None;
    }
}
