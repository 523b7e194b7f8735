//! The virtio-mmio transport, "version 2" (virtio 1.x) register layout.
//!
//! Every value the guest writes is checked. A mistake that leaves the device unable to work (a
//! bad queue size, rings outside RAM, a notification before DRIVER_OK, a broken descriptor chain)
//! is logged once per kind and sets DEVICE_NEEDS_RESET; the device then ignores its queues until
//! the driver resets it. Harmless mistakes (a register written at the wrong time) are logged once
//! and ignored. Nothing the guest writes can make the VMM panic.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{
    QueueContext, QueueError, Signal, VirtioDevice, WarnOnce, F_RING_EVENT_IDX, F_VERSION_1,
};
use crate::devices::bus::MmioDevice;
use crate::memory::GuestMemory;
use crate::wake::GuestWake;

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The virtio 1.x register layout.
pub const MMIO_VERSION: u32 = 2;
/// VendorID register: "FTVM".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FTVM");

/// The transport's registers and queues: plain data, so a later checkpoint can save and restore
/// it as is.
#[derive(Debug, PartialEq, Eq)]
pub struct TransportState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features written by the driver (final once FEATURES_OK is set).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// DRIVER_OK was accepted and the device activated.
    pub activated: bool,
    /// The device's queues (addresses, size, ready, next_avail/next_used, event_idx).
    pub queues: Vec<Queue>,
}

/// A virtio device on the MMIO bus.
///
/// # Pausing
/// Every piece of device work that touches guest memory or the queues runs with the transport's
/// lock held: MMIO exits (vCPU thread) and [`Self::process`] (I/O thread). [`Self::pause`] takes
/// effect under that same lock, so once it returns nothing runs until [`Self::resume`]:
/// `process` returns `None` and a QueueNotify is remembered (in `pending_notify`, which is
/// saved with the state) and handled at `resume`. The `pausing` flag is set before the lock is
/// taken, so a long receive loop that holds the lock stops after the frame it is on instead of
/// finishing its budget.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemory,
    wake: Arc<GuestWake>,
    state: TransportState,
    paused: bool,
    /// A host event was turned away while paused ([`Self::process`] called).
    missed: bool,
    /// Bit `q`: queue `q` was notified while paused.
    pending_notify: u32,
    pausing: Arc<AtomicBool>,
    warned: WarnOnce,
}

impl<D: fmt::Debug> fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device)
            .field("state", &self.state)
            .field("paused", &self.paused)
            .field("pending_notify", &self.pending_notify)
            .finish()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; its queues start disabled.
    pub fn new(device: D, mem: GuestMemory, wake: Arc<GuestWake>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            // Queue::new only refuses sizes that are 0, above 32768 or not a power of two; the
            // devices in this crate use QUEUE_MAX_SIZE. Fall back to it rather than panic.
            .map(|&max| Queue::new(max).or_else(|_| Queue::new(super::QUEUE_MAX_SIZE)))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        let state = TransportState {
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
            queues,
        };
        Self::with_state(device, mem, wake, state, 0)
    }

    /// A transport with registers and queues as given (restore).
    pub(crate) fn with_state(
        device: D,
        mem: GuestMemory,
        wake: Arc<GuestWake>,
        state: TransportState,
        pending_notify: u32,
    ) -> Self {
        Self {
            device,
            mem,
            wake,
            state,
            paused: false,
            missed: false,
            pending_notify,
            pausing: Arc::new(AtomicBool::new(false)),
            warned: WarnOnce::default(),
        }
    }

    /// Queues notified while paused (bit per queue), handled at [`Self::resume`].
    pub fn pending_notify(&self) -> u32 {
        self.pending_notify
    }

    /// The flag [`Self::pause`] raises; a pauser sets it *before* taking the transport's lock so
    /// that the current lock holder cuts its loop short (see [`QueueContext::pause_requested`]).
    pub fn pause_flag(&self) -> Arc<AtomicBool> {
        self.pausing.clone()
    }

    /// Stops all device work on guest memory and queues until [`Self::resume`]. Idempotent.
    pub fn pause(&mut self) {
        self.pausing.store(true, Ordering::SeqCst);
        self.paused = true;
    }

    /// Lets the device work again, and handles the notifications that came while paused (the
    /// guest may be idle waiting for their completions, so they wake it). Returns true when a
    /// host event was turned away meanwhile: the caller must make the I/O thread look again.
    /// Idempotent.
    pub fn resume(&mut self) -> bool {
        self.paused = false;
        self.pausing.store(false, Ordering::SeqCst);
        self.replay_pending_notify();
        std::mem::take(&mut self.missed)
    }

    /// True between [`Self::pause`] and [`Self::resume`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Handles notifications remembered while paused (or restored with the state).
    pub fn replay_pending_notify(&mut self) {
        if self.paused {
            return;
        }
        let pending = std::mem::take(&mut self.pending_notify);
        for queue in (0..32u16).filter(|q| pending & (1 << q) != 0) {
            // Not inside the guest's own exit any more: the guest may be waiting.
            self.notify_queue(queue, true);
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably (for host-side set-up, not for queue work: use [`Self::process`]).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The transport registers and queues.
    pub fn state(&self) -> &TransportState {
        &self.state
    }

    /// True when the device is activated and neither it nor the driver gave up.
    pub fn is_running(&self) -> bool {
        self.state.activated
            && self.state.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    /// Runs `f` on the device with its queues, for host-side events (I/O thread). Returns `None`
    /// without calling `f` unless the device is running. A [`QueueError`] sets
    /// DEVICE_NEEDS_RESET and also gives `None`.
    pub fn process<R>(
        &mut self,
        f: impl FnOnce(&mut D, &mut QueueContext<'_>) -> Result<R, QueueError>,
    ) -> Option<R> {
        if self.paused {
            self.missed = true;
            return None;
        }
        if !self.is_running() {
            return None;
        }
        let mut ctx =
            QueueContext::new(&self.mem, &mut self.state.queues, self.state.driver_features)
                .with_pause_flag(&self.pausing);
        let result = f(&mut self.device, &mut ctx);
        let signal = ctx.signal();
        self.apply(signal);
        match result {
            Ok(r) => Some(r),
            Err(e) => {
                self.queue_failed(&e);
                None
            }
        }
    }

    fn apply(&mut self, signal: Signal) {
        if signal.used {
            self.state.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        }
        if signal.wake {
            self.wake.notify();
        }
    }

    fn queue_failed(&mut self, e: &QueueError) {
        if self.warned.first(e.label()) {
            tracing::warn!(device = self.device.device_type(), "virtio: {}", error_chain(e));
        }
        self.set_needs_reset();
    }

    /// Logs a guest mistake once per kind.
    fn guest_error(&mut self, label: &'static str, msg: fmt::Arguments<'_>) {
        if self.warned.first(label) {
            tracing::warn!(device = self.device.device_type(), "virtio: {msg}");
        }
    }

    /// Logs a guest mistake once per kind and stops the device until the driver resets it.
    fn fatal_guest_error(&mut self, label: &'static str, msg: fmt::Arguments<'_>) {
        self.guest_error(label, msg);
        self.set_needs_reset();
    }

    fn set_needs_reset(&mut self) {
        if self.state.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        self.state.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        // The spec asks for a configuration change notification; a guest blocked in PORT_WAIT
        // for a completion that will now never come must wake up to see it.
        self.state.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        self.wake.notify();
    }

    fn reset(&mut self) {
        self.device.reset(&self.mem);
        for q in &mut self.state.queues {
            q.reset();
        }
        let s = &mut self.state;
        s.device_features_sel = 0;
        s.driver_features_sel = 0;
        s.driver_features = 0;
        s.queue_sel = 0;
        s.status = 0;
        s.interrupt_status = 0;
        s.activated = false;
        self.pending_notify = 0;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.state.queue_sel).ok()?;
        self.state.queues.get_mut(sel)
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = self.device.device_features();
                match self.state.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size())),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.selected_queue().map_or(0, |q| q.desc_table() as u32)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.selected_queue().map_or(0, |q| (q.desc_table() >> 32) as u32)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.selected_queue().map_or(0, |q| q.avail_ring() as u32)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.selected_queue().map_or(0, |q| (q.avail_ring() >> 32) as u32)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.selected_queue().map_or(0, |q| (q.used_ring() >> 32) as u32)
            }
            VIRTIO_MMIO_INTERRUPT_STATUS => self.state.interrupt_status,
            VIRTIO_MMIO_STATUS => self.state.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.state.config_generation,
            // No shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.state.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue_num(value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_address(offset, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.queue_notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.state.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_GUEST_PAGE_SIZE | VIRTIO_MMIO_QUEUE_ALIGN | VIRTIO_MMIO_QUEUE_PFN => self
                .guest_error(
                    "legacy-register",
                    format_args!(
                    "legacy (version 1) register {offset:#x} written; only virtio 1.x is offered"
                ),
                ),
            // Shared memory selection and queue reset (VIRTIO_F_RING_RESET, not offered).
            VIRTIO_MMIO_SHM_SEL | 0xc0 => {}
            _ => self.guest_error(
                "unknown-register",
                format_args!("write to unknown register {offset:#x}"),
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let s = self.state.status;
        if s & VIRTIO_CONFIG_S_DRIVER == 0 || s & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            self.guest_error(
                "features-late",
                format_args!("driver features written outside feature negotiation"),
            );
            return;
        }
        let f = &mut self.state.driver_features;
        match self.state.driver_features_sel {
            0 => *f = (*f & !0xffff_ffff) | u64::from(value),
            1 => *f = (*f & 0xffff_ffff) | (u64::from(value) << 32),
            // Feature words past 64 bits: nothing is offered there.
            _ if value != 0 => self
                .guest_error("features-high", format_args!("driver accepted features past bit 63")),
            _ => {}
        }
    }

    /// True (and logged) when queue configuration may not change now.
    fn queue_config_locked(&mut self, value: u32) -> bool {
        let ready = self.selected_queue().is_some_and(|q| q.ready());
        // Zeroing a disabled queue after DRIVER_OK is how drivers tear down before a reset
        // (virtio-drivers' queue_unset): ignored, but not worth a warning.
        if self.state.activated && !ready && value == 0 {
            return true;
        }
        if self.state.activated || ready {
            self.guest_error(
                "queue-config-live",
                format_args!("queue configuration written while the queue is live"),
            );
            return true;
        }
        false
    }

    fn write_queue_num(&mut self, value: u32) {
        if self.queue_config_locked(value) {
            return;
        }
        let sel = self.state.queue_sel;
        let Some(q) = self.selected_queue() else {
            return self.guest_error(
                "queue-sel",
                format_args!("QueueNum written for missing queue {sel}"),
            );
        };
        // Drivers tearing a queue down write 0; the queue stays disabled until a valid size.
        if value == 0 {
            return;
        }
        let max = q.max_size();
        let ok = u16::try_from(value).ok().is_some_and(|size| q.try_set_size(size).is_ok());
        if !ok {
            self.fatal_guest_error(
                "queue-size",
                format_args!("bad size {value} for queue {sel} (a power of two up to {max})"),
            );
        }
    }

    fn write_queue_address(&mut self, offset: u32, value: u32) {
        if self.queue_config_locked(value) {
            return;
        }
        let sel = self.state.queue_sel;
        let Some(q) = self.selected_queue() else {
            return self.guest_error(
                "queue-sel",
                format_args!("queue address written for missing queue {sel}"),
            );
        };
        let merge = |old: u64| match offset {
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_USED_LOW => (old & !0xffff_ffff) | u64::from(value),
            _ => (old & 0xffff_ffff) | (u64::from(value) << 32),
        };
        let result = match offset {
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                q.try_set_desc_table_address(GuestAddress(merge(q.desc_table())))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                q.try_set_avail_ring_address(GuestAddress(merge(q.avail_ring())))
            }
            _ => q.try_set_used_ring_address(GuestAddress(merge(q.used_ring()))),
        };
        if let Err(e) = result {
            self.fatal_guest_error("queue-align", format_args!("queue {sel}: {e}"));
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let sel = self.state.queue_sel;
        let mem = self.mem.clone();
        let Some(q) = self.selected_queue() else {
            return self.guest_error(
                "queue-sel",
                format_args!("QueueReady written for missing queue {sel}"),
            );
        };
        if value == 0 {
            // Drivers disable queues before freeing them (virtio-drivers does on drop); the
            // device must stop touching the rings, which it does as it skips unready queues.
            q.set_ready(false);
            return;
        }
        if q.ready() {
            return;
        }
        q.set_ready(true);
        // Checks the three rings lie in guest RAM for the chosen size.
        if !q.is_valid(&mem) {
            q.set_ready(false);
            self.fatal_guest_error(
                "queue-invalid",
                format_args!("queue {sel} rings are outside guest memory or its size is invalid"),
            );
        }
    }

    fn queue_notify(&mut self, value: u32) {
        if !self.state.activated {
            return self.fatal_guest_error(
                "notify-early",
                format_args!("queue notified before DRIVER_OK"),
            );
        }
        if !self.is_running() {
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        let queue = match u16::try_from(value) {
            Ok(q) if usize::from(q) < self.state.queues.len() => q,
            _ => {
                return self.fatal_guest_error(
                    "notify-queue",
                    format_args!("notification for missing queue {value}"),
                )
            }
        };
        if self.paused {
            // The vCPUs should be paused before the devices; if one was not, remember the
            // notification (devices have at most a handful of queues, all below 32) and act
            // on it at resume rather than touch the queues now.
            if self.warned.first("notify-paused") {
                tracing::debug!(
                    device = self.device.device_type(),
                    "virtio: queue {queue} notified while the devices are paused; deferred"
                );
            }
            if queue < 32 {
                self.pending_notify |= 1 << queue;
            }
            return;
        }
        self.notify_queue(queue, false);
    }

    /// Runs the device's handler for a notification of `queue` (a valid index). `wake`: the
    /// guest is not stopped in this notification's exit, so completions must wake it.
    fn notify_queue(&mut self, queue: u16, wake: bool) {
        if !self.is_running() || usize::from(queue) >= self.state.queues.len() {
            return;
        }
        let mut ctx =
            QueueContext::new(&self.mem, &mut self.state.queues, self.state.driver_features);
        let result = self.device.queue_notify(queue, &mut ctx);
        let mut signal = ctx.signal();
        signal.wake |= wake && signal.used;
        self.apply(signal);
        if let Err(e) = result {
            self.queue_failed(&e);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.state.status;
        // NEEDS_RESET belongs to the device: keep it whether or not the driver echoes it.
        let new = value | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        if new & old != old {
            return self.guest_error(
                "status-clear",
                format_args!("driver cleared status bits ({old:#x} -> {value:#x})"),
            );
        }
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            // The driver gave up: the device stops using the queues (is_running is false).
            self.state.status = new;
            return;
        }
        let added = new & !old;
        let mut new = new;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable(new) {
            // Leaving FEATURES_OK clear is how a device refuses the features.
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                self.guest_error(
                    "driver-ok-early",
                    format_args!("DRIVER_OK set before FEATURES_OK"),
                );
                new &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else {
                self.state.status = new;
                self.activate();
                return;
            }
        }
        self.state.status = new;
    }

    fn features_acceptable(&mut self, status: u32) -> bool {
        let offered = self.device.device_features();
        let accepted = self.state.driver_features;
        if status & VIRTIO_CONFIG_S_DRIVER == 0 {
            self.guest_error("features-no-driver", format_args!("FEATURES_OK set without DRIVER"));
            return false;
        }
        if accepted & !offered != 0 {
            self.guest_error(
                "features-unoffered",
                format_args!(
                    "driver accepted features {:#x} that were not offered",
                    accepted & !offered
                ),
            );
            return false;
        }
        if accepted & F_VERSION_1 == 0 {
            self.guest_error(
                "features-legacy",
                format_args!(
                    "driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
                ),
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let event_idx = self.state.driver_features & F_RING_EVENT_IDX != 0;
        for (i, q) in self.state.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&self.mem) {
                self.state.activated = false;
                return self.fatal_guest_error(
                    "queue-invalid",
                    format_args!("queue {i} is invalid at DRIVER_OK"),
                );
            }
        }
        let mut ctx =
            QueueContext::new(&self.mem, &mut self.state.queues, self.state.driver_features);
        let result = self.device.activate(&mut ctx);
        let signal = ctx.signal();
        match result {
            Ok(()) => {
                self.state.activated = true;
                self.apply(signal);
            }
            Err(e) => self.fatal_guest_error("activate", format_args!("cannot activate: {e}")),
        }
    }
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            return self.device.read_config(offset - config, data);
        }
        // Registers are 32 bits wide and aligned (virtio 1.2, 4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return self.guest_error(
                "register-width",
                format_args!("{}-byte read at register {offset:#x}", data.len()),
            );
        }
        let value = self.read_register(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            return self.device.write_config(offset - config, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.guest_error(
                "register-width",
                format_args!("{}-byte write at register {offset:#x}", data.len()),
            );
        };
        if !offset.is_multiple_of(4) {
            return self.guest_error(
                "register-width",
                format_args!("unaligned write at register {offset:#x}"),
            );
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

/// "outer: inner: innermost", for one-line logs.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::*;
    use super::*;
    use std::sync::Mutex;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;

    /// A device with two queues that records what the transport asked of it, and on a notify
    /// uses every available chain of that queue.
    #[derive(Debug, Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        refuse_activate: bool,
        config: [u8; 8],
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 16]
        }
        fn device_features(&self) -> u64 {
            F_VERSION_1 | F_RING_EVENT_IDX | 1 << 5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push(format!("config {offset} {data:?}"));
        }
        fn activate(
            &mut self,
            ctx: &mut QueueContext<'_>,
        ) -> Result<(), super::super::ActivateError> {
            self.log.lock().unwrap().push(format!("activate {:#x}", ctx.features));
            if self.refuse_activate {
                return Err(super::super::ActivateError::QueueNotReady(0));
            }
            Ok(())
        }
        fn queue_notify(
            &mut self,
            queue: u16,
            ctx: &mut QueueContext<'_>,
        ) -> Result<(), QueueError> {
            self.log.lock().unwrap().push(format!("notify {queue}"));
            let q = &mut ctx.queues[usize::from(queue)];
            while let Some(chain) =
                super::super::pop_chain(q, ctx.mem).map_err(super::super::ring_err(queue))?
            {
                q.add_used(ctx.mem, chain.head_index(), 7)
                    .map_err(super::super::ring_err(queue))?;
            }
            ctx.signal_used(true);
            Ok(())
        }
        fn reset(&mut self, _mem: &GuestMemory) {
            self.log.lock().unwrap().push("reset".into());
        }
    }

    fn transport(dev: Recorder) -> (MmioTransport<Recorder>, GuestMemory, Arc<GuestWake>) {
        let mem = test_memory();
        let wake = Arc::new(GuestWake::new().unwrap());
        (MmioTransport::new(dev, mem.clone(), wake.clone()), mem, wake)
    }

    fn pending_wake(wake: &GuestWake) -> bool {
        use std::os::fd::AsRawFd;
        wait_readable(wake.as_raw_fd(), 0)
    }

    #[test]
    fn identifies_itself_as_virtio_mmio_v2() {
        let (mut t, _, _) = transport(Recorder::default());
        assert_eq!(r32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "a missing queue has no size");
    }

    #[test]
    fn full_handshake_activates_and_notify_uses_buffers() {
        let (mut t, mem, wake) = transport(Recorder::default());
        let log = t.device().log.clone();
        let features = negotiate(&mut t, u64::MAX);
        assert_eq!(features, F_VERSION_1 | F_RING_EVENT_IDX | 1 << 5);
        let q0 = TestQueue::new(&mem, 0x1_0000, 64);
        let mut q1 = TestQueue::new(&mem, 0x2_0000, 16);
        q0.program(&mut t, 0);
        q1.program(&mut t, 1);
        driver_ok(&mut t);
        assert!(t.is_running());
        assert!(t.state().queues.iter().all(|q| q.event_idx_enabled()));

        q1.add_chain(&[(0x8_0000, 100, true)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(q1.next_used(), Some((0, 7)));
        assert_eq!(r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert!(pending_wake(&wake));
        w32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // negotiate() starts with a reset (status 0), as virtio-drivers does.
        let entries = log.lock().unwrap().clone();
        assert_eq!(
            entries,
            ["reset".to_string(), format!("activate {features:#x}"), "notify 1".into()]
        );

        // Status 0 resets everything.
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert!(!t.is_running());
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn refuses_features_it_did_not_offer_and_legacy_drivers() {
        let (mut t, _, _) = transport(Recorder::default());
        let base = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w32(&mut t, VIRTIO_MMIO_STATUS, base);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3); // not offered
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
        w32(&mut t, VIRTIO_MMIO_STATUS, base | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), base, "FEATURES_OK must stay clear");

        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        w32(&mut t, VIRTIO_MMIO_STATUS, base);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5); // no VERSION_1
        w32(&mut t, VIRTIO_MMIO_STATUS, base | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), base);

        // DRIVER_OK without FEATURES_OK is refused too.
        w32(&mut t, VIRTIO_MMIO_STATUS, base | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), base);
        assert!(!t.is_running());
    }

    #[test]
    fn features_are_frozen_after_features_ok() {
        let (mut t, _, _) = transport(Recorder::default());
        let features = negotiate(&mut t, F_VERSION_1);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        assert_eq!(t.state().driver_features, features);
    }

    fn needs_reset(t: &mut MmioTransport<Recorder>) -> bool {
        r32(t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    #[test]
    fn bad_queue_sizes_set_needs_reset() {
        for bad in [3u32, 512, 100_000] {
            let (mut t, _, wake) = transport(Recorder::default());
            negotiate(&mut t, u64::MAX);
            w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
            w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, bad);
            assert!(needs_reset(&mut t), "size {bad}");
            assert_eq!(
                r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
                VIRTIO_MMIO_INT_CONFIG
            );
            assert!(pending_wake(&wake));
            // A reset clears it.
            w32(&mut t, VIRTIO_MMIO_STATUS, 0);
            assert!(!needs_reset(&mut t));
        }
        // 0 (queue teardown) is not an error.
        let (mut t, _, _) = transport(Recorder::default());
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 0);
        assert!(!needs_reset(&mut t));
    }

    #[test]
    fn rings_outside_ram_set_needs_reset() {
        let (mut t, mem, _) = transport(Recorder::default());
        negotiate(&mut t, u64::MAX);
        let q = TestQueue::new(&mem, 0x1_0000, 16);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc as u32);
        w32(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail as u32);
        // Used ring at 4 GiB: far outside the 1 MiB of RAM.
        w32(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0);
        w32(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 1);
        w32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(needs_reset(&mut t));
    }

    #[test]
    fn misaligned_ring_sets_needs_reset() {
        let (mut t, _, _) = transport(Recorder::default());
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1001);
        assert!(needs_reset(&mut t));
    }

    #[test]
    fn notify_before_driver_ok_sets_needs_reset() {
        let (mut t, _, _) = transport(Recorder::default());
        negotiate(&mut t, u64::MAX);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(needs_reset(&mut t));
        assert!(t.device().log.lock().unwrap().iter().all(|l| !l.starts_with("notify")));
    }

    #[test]
    fn notify_of_a_missing_queue_sets_needs_reset() {
        let (mut t, mem, _) = transport(Recorder::default());
        negotiate(&mut t, u64::MAX);
        TestQueue::new(&mem, 0x1_0000, 16).program(&mut t, 0);
        driver_ok(&mut t);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 9);
        assert!(needs_reset(&mut t));
        // Once NEEDS_RESET is set, notifications are ignored.
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.device().log.lock().unwrap().iter().all(|l| !l.starts_with("notify")));
    }

    #[test]
    fn a_broken_avail_ring_sets_needs_reset() {
        let (mut t, mem, _) = transport(Recorder::default());
        negotiate(&mut t, u64::MAX);
        let q = TestQueue::new(&mem, 0x1_0000, 16);
        q.program(&mut t, 0);
        driver_ok(&mut t);
        // avail idx 1000 with a 16-entry queue: more chains than the queue can hold.
        use vm_memory::Bytes;
        mem.write_obj(1000u16, GuestAddress(q.avail + 2)).unwrap();
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(needs_reset(&mut t));
    }

    #[test]
    fn refused_activation_sets_needs_reset() {
        let (mut t, _, _) = transport(Recorder { refuse_activate: true, ..Default::default() });
        negotiate(&mut t, u64::MAX);
        driver_ok(&mut t);
        assert!(!t.is_running());
        assert!(needs_reset(&mut t));
    }

    #[test]
    fn queue_config_is_locked_while_live_but_can_be_torn_down() {
        let (mut t, mem, _) = transport(Recorder::default());
        negotiate(&mut t, u64::MAX);
        let q = TestQueue::new(&mem, 0x1_0000, 16);
        q.program(&mut t, 0);
        // Changing the size of an enabled queue is ignored.
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_NUM), 16);
        driver_ok(&mut t);
        // virtio-drivers' queue_unset: ready 0, read back 0, then zero size and addresses.
        w32(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 0);
        w32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
        assert!(!needs_reset(&mut t));
        // Notifying a disabled queue does nothing harmful.
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(!needs_reset(&mut t));
    }

    #[test]
    fn bad_widths_and_unknown_registers_are_ignored() {
        let (mut t, _, _) = transport(Recorder::default());
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1u8]);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &1u64.to_le_bytes());
        t.write(0x71, &1u32.to_le_bytes());
        w32(&mut t, 0x0d0, 5);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r32(&mut t, 0x0d0), 0);
    }

    #[test]
    fn clearing_status_bits_is_ignored_and_failed_stops_the_device() {
        let (mut t, mem, _) = transport(Recorder::default());
        negotiate(&mut t, u64::MAX);
        TestQueue::new(&mem, 0x1_0000, 16).program(&mut t, 0);
        driver_ok(&mut t);
        let status = r32(&mut t, VIRTIO_MMIO_STATUS);
        w32(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), status);
        w32(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FAILED);
        assert!(!t.is_running());
        assert!(t.process(|_, _| Ok(())).is_none());
    }

    #[test]
    fn config_space_is_byte_addressable() {
        let (mut t, _, _) =
            transport(Recorder { config: [1, 2, 3, 4, 5, 6, 7, 8], ..Default::default() });
        let mut b = [0u8; 2];
        t.read(0x106, &mut b);
        assert_eq!(b, [7, 8]);
        let mut b = [0u8; 4];
        t.read(0x106, &mut b);
        assert_eq!(b, [7, 8, 0, 0]);
        t.write(0x101, &[9]);
        assert_eq!(t.device().log.lock().unwrap().last().unwrap(), "config 1 [9]");
    }

    #[test]
    fn every_register_survives_random_guest_writes() {
        // A crude fuzz: every register offset, several values and widths, in a loop. It must
        // never panic, whatever state it leaves.
        let (mut t, mem, _) = transport(Recorder::default());
        let q = TestQueue::new(&mem, 0x1_0000, 16);
        let values = [0u32, 1, 2, 3, 0xf, 0x10, 0x100, 0xffff, 0x1_0000, 0x8000_0000, u32::MAX];
        let mut seed = 0x1234_5678u32;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let offset = u64::from(seed % 0x140) & !3;
            let value = values[(seed >> 9) as usize % values.len()];
            match (seed >> 20) % 4 {
                0 => t.write(offset, &value.to_le_bytes()),
                1 => t.write(offset, &value.to_le_bytes()[..(1 << ((seed >> 24) % 4)).min(4)]),
                2 => {
                    let mut b = [0u8; 8];
                    t.read(offset, &mut b[..1 << ((seed >> 24) % 4)]);
                }
                _ => {
                    if seed.is_multiple_of(7) {
                        q.program_unchecked(&mut t, seed % 3);
                    }
                    if seed.is_multiple_of(11) {
                        negotiate_lenient(&mut t);
                    }
                }
            }
        }
    }

    /// `negotiate` without the assertion (the fuzz may leave the device in any state).
    fn negotiate_lenient(t: &mut MmioTransport<Recorder>) {
        w32(t, VIRTIO_MMIO_STATUS, 0);
        w32(t, VIRTIO_MMIO_STATUS, 3);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w32(t, VIRTIO_MMIO_STATUS, 11);
    }
}
