//! What the guest's port and MMIO exits do: console, wait, exit, status, devices.

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_guest_abi::{
    GuestStatus, PORT_CONSOLE, PORT_CONSOLE_WRITE, PORT_EXIT, PORT_STATUS, PORT_WAIT, WAIT_FOREVER,
};
use vm_memory::{Bytes, GuestAddress};

use super::kick::Kick;
use crate::devices::bus::{lock, MmioBus};
use crate::memory::GuestMemory;
use crate::wake::{GuestWake, WaitOutcome};

/// Most bytes one [`PORT_CONSOLE_WRITE`] may print.
pub const CONSOLE_WRITE_MAX: u64 = 4096;
/// A line longer than this is written out without waiting for its newline.
const CONSOLE_LINE_MAX: usize = 4096;

/// The guest console: bytes from the console ports, written to the sink a line at a time.
pub struct Console {
    inner: Mutex<ConsoleInner>,
}

struct ConsoleInner {
    sink: Box<dyn Write + Send>,
    line: Vec<u8>,
    failed: bool,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Self {
            inner: Mutex::new(ConsoleInner {
                sink,
                line: Vec::new(),
                failed: false,
            }),
        }
    }

    /// Appends guest output; complete lines go to the sink and are flushed.
    pub fn write(&self, bytes: &[u8]) {
        let mut c = lock(&self.inner);
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            c.line.extend_from_slice(&rest[..=nl]);
            c.emit();
            rest = &rest[nl + 1..];
        }
        c.line.extend_from_slice(rest);
        if c.line.len() >= CONSOLE_LINE_MAX {
            c.emit();
        }
    }

    /// Writes out a partial last line (at exit).
    pub fn flush(&self) {
        let mut c = lock(&self.inner);
        if !c.line.is_empty() {
            c.emit();
        }
    }
}

impl ConsoleInner {
    fn emit(&mut self) {
        let result = self
            .sink
            .write_all(&self.line)
            .and_then(|()| self.sink.flush());
        if let Err(e) = result {
            // Guest output must never stop the guest; say so once.
            if !self.failed {
                tracing::warn!(error = %e, "cannot write guest console output; dropping it");
                self.failed = true;
            }
        }
        self.line.clear();
    }
}

/// The last [`GuestStatus`] the guest reported (0 = none yet).
#[derive(Debug, Default)]
pub struct StatusCell(AtomicU32);

impl StatusCell {
    /// The last milestone reported.
    pub fn get(&self) -> Option<GuestStatus> {
        GuestStatus::from_u32(self.0.load(Ordering::Acquire))
    }

    fn set(&self, s: GuestStatus) {
        self.0.store(s as u32, Ordering::Release);
    }
}

/// What every vCPU of a machine shares.
#[derive(Clone, Debug)]
pub struct VcpuContext {
    /// Guest memory.
    pub mem: GuestMemory,
    /// MMIO devices.
    pub bus: Arc<MmioBus>,
    /// Device wake-ups for the wait port.
    pub wake: Arc<GuestWake>,
    /// The guest console.
    pub console: Arc<Console>,
    /// The guest's boot milestones.
    pub status: Arc<StatusCell>,
    /// What vCPU state KVM lets this VM save and restore.
    pub state: Arc<super::StateConfig>,
    /// Drains a full dirty ring (VMs built with the KVM dirty ring only).
    pub dirty_ring: Option<Arc<dyn super::DirtyRingFullHandler>>,
}

/// What the run loop should do after an I/O exit.
#[derive(Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Re-enter the guest.
    Continue,
    /// The guest wrote [`PORT_EXIT`].
    Exit(u32),
    /// Waiting for a device event failed.
    WaitFailed(std::io::ErrorKind, String),
}

/// Per-vCPU exit handling state (which warnings were already given).
#[derive(Debug)]
pub struct IoHandler {
    ctx: VcpuContext,
    kick: Arc<Kick>,
    warned_ports: HashSet<u16>,
    warned_mmio: bool,
    warned_console: bool,
    /// A wait a pause or stop request cut short, with its deadline (`None`: none): the vCPU goes
    /// on waiting after the resume instead of returning to the guest (see [`Self::resume_wait`]).
    cut_wait: Option<Option<Instant>>,
}

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl IoHandler {
    /// Exit handling for a vCPU kicked through `kick`.
    pub fn new(ctx: VcpuContext, kick: Arc<Kick>) -> Self {
        Self {
            ctx,
            kick,
            warned_ports: HashSet::new(),
            warned_mmio: false,
            warned_console: false,
            cut_wait: None,
        }
    }

    /// The shared context.
    pub fn ctx(&self) -> &VcpuContext {
        &self.ctx
    }

    /// `in` from any port: all ones (nothing is there).
    pub fn io_in(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        self.warn_port(port, "in");
    }

    /// `out` to `port`.
    pub fn io_out(&mut self, port: u16, data: &[u8]) -> IoAction {
        match port {
            PORT_CONSOLE => {
                if let Some(&b) = data.first() {
                    self.ctx.console.write(&[b]);
                }
            }
            PORT_CONSOLE_WRITE => self.console_write(u64::from(le_value(data))),
            PORT_WAIT => return self.wait(le_value(data)),
            PORT_EXIT => return IoAction::Exit(le_value(data)),
            PORT_STATUS => match GuestStatus::from_u32(le_value(data)) {
                Some(s) => {
                    if self.ctx.status.get() != Some(s) {
                        tracing::info!(status = ?s, "guest status");
                    }
                    self.ctx.status.set(s);
                }
                None => tracing::warn!(value = le_value(data), "guest wrote an unknown status"),
            },
            other => self.warn_port(other, "out"),
        }
        IoAction::Continue
    }

    fn warn_port(&mut self, port: u16, dir: &str) {
        if self.warned_ports.insert(port) {
            tracing::warn!(
                port = format_args!("{port:#x}"),
                dir,
                "guest port I/O to an unknown port ignored (warned once per port)"
            );
        }
    }

    fn console_write(&mut self, block: u64) {
        let mut raw = [0u8; 16];
        let result = self
            .ctx
            .mem
            .read_slice(&mut raw, GuestAddress(block))
            .and_then(|()| {
                let addr = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
                let len = u64::from_le_bytes(raw[8..].try_into().expect("8 bytes"));
                let mut buf = vec![0u8; len.min(CONSOLE_WRITE_MAX) as usize];
                self.ctx
                    .mem
                    .read_slice(&mut buf, GuestAddress(addr))
                    .map(|()| buf)
            });
        match result {
            Ok(buf) => self.ctx.console.write(&buf),
            Err(e) => {
                if !self.warned_console {
                    tracing::warn!(block = format_args!("{block:#x}"), error = %e, "guest console write from a bad address ignored (warned once)");
                    self.warned_console = true;
                }
            }
        }
    }

    /// [`PORT_WAIT`]: block until a device event, the timeout, or a pause/stop request. A
    /// request ends the wait early: the pending `immediate_exit` makes the next `KVM_RUN` complete
    /// the `out` and stop at a pause point, where the vCPU's state is read (the guest past its
    /// `out`, as if the wait had ended: a VM restored from that state goes on from there). The wait
    /// itself is remembered and goes on after the resume ([`Self::resume_wait`]): a pause, which
    /// every checkpoint is, must not wake an idle guest, or each checkpoint would make the guest
    /// run its idle loop, dirty pages, and so call for the next checkpoint.
    fn wait(&mut self, timeout_us: u32) -> IoAction {
        let deadline = (timeout_us != WAIT_FOREVER)
            .then(|| Instant::now() + Duration::from_micros(u64::from(timeout_us)));
        self.wait_until(deadline)
    }

    /// After a resume, before the guest runs: goes on with the wait a request cut short, if any,
    /// until its device event or deadline (or the next request, which cuts it again).
    pub fn resume_wait(&mut self) -> IoAction {
        match self.cut_wait.take() {
            Some(deadline) => self.wait_until(deadline),
            None => IoAction::Continue,
        }
    }

    fn wait_until(&mut self, deadline: Option<Instant>) -> IoAction {
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.ctx.wake.wait(remaining, self.kick.interrupt_fd()) {
                Ok(WaitOutcome::Event | WaitOutcome::TimedOut) => return IoAction::Continue,
                Ok(WaitOutcome::Interrupted) => {
                    if self.kick.pending() {
                        self.cut_wait = Some(deadline);
                        return IoAction::Continue;
                    }
                    // A wake-up for a request already handled: keep waiting.
                    self.kick.drain_interrupt();
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return IoAction::Continue;
                    }
                }
                Err(e) => return IoAction::WaitFailed(e.kind(), e.to_string()),
            }
        }
    }

    /// A guest load from MMIO space. No device there: zeros.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if !self.ctx.bus.read(addr, data) {
            data.fill(0);
            self.warn_mmio(addr, "read");
        }
    }

    /// A guest store to MMIO space. No device there: dropped.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if !self.ctx.bus.write(addr, data) {
            self.warn_mmio(addr, "write");
        }
    }

    fn warn_mmio(&mut self, addr: u64, dir: &str) {
        if !self.warned_mmio {
            tracing::warn!(
                addr = format_args!("{addr:#x}"),
                dir,
                "guest MMIO access to no device (reads give zeros; warned once)"
            );
            self.warned_mmio = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_writes_whole_lines() {
        let sink = Sink::default();
        let c = Console::new(Box::new(sink.clone()));
        for b in b"hel" {
            c.write(&[*b]);
        }
        assert!(sink.0.lock().unwrap().is_empty());
        c.write(b"lo\nwor");
        c.write(b"ld\nx");
        c.flush();
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![b"hello\n".to_vec(), b"world\n".to_vec(), b"x".to_vec()]
        );
    }
}
