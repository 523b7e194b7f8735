//! Virtio 1.x devices on the virtio-mmio transport.
//!
//! Each device has three layers, as in rust-vmm's vmm-reference:
//! * `device.rs`: config space, feature bits, activation, what a queue notification does;
//! * `handler.rs`: the pure queue logic (descriptor chains in, used entries out), generic over
//!   nothing but guest memory, so it is unit-tested without KVM;
//! * the event glue: [`mmio::MmioTransport`] turns guest register accesses (vCPU thread) into
//!   [`VirtioDevice`] calls, and `crate::devices::io_thread` does the same for host events (TAP
//!   readable, io_uring completions).
//!
//! The guest takes no interrupts. Where a device would raise a used-buffer interrupt, the
//! transport sets the InterruptStatus bit (so standard drivers stay happy) and, when the guest may
//! be blocked waiting for it, calls [`crate::wake::GuestWake::notify`].

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
#[cfg(test)]
pub(crate) mod test_utils;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::memory::GuestMemory;

pub use mmio::MmioTransport;

/// Feature bit: the device follows virtio 1.x (required; legacy devices are not offered).
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// Feature bit: `used_event`/`avail_event` notification suppression.
pub const F_RING_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// QueueNumMax of every queue. Drivers pick a power of two up to this (virtio-drivers uses 16
/// for block and its const generic for net).
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Split ring layout (virtio 1.2, 2.7.8): the used ring is flags u16, idx u16, then 8-byte
/// elements, then `avail_event` u16.
const USED_RING_HEADER_SIZE: u64 = 4;
const USED_ELEMENT_SIZE: u64 = 8;

/// A device model behind a [`MmioTransport`].
///
/// The transport owns the queues (plain [`Queue`] state, so it can be saved and restored) and
/// lends them to the device for each event, together with guest memory, in a [`QueueContext`].
pub trait VirtioDevice: Send + fmt::Debug {
    /// Virtio device ID (1 = net, 2 = block).
    fn device_type(&self) -> u32;
    /// QueueNumMax of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn device_features(&self) -> u64;
    /// Reads device config space (`offset` from the start of the config space). Bytes past the
    /// end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space. Read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: features are final and the ready queues are valid.
    fn activate(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), ActivateError>;
    /// The driver wrote `queue` to QueueNotify (vCPU thread).
    fn queue_notify(&mut self, queue: u16, ctx: &mut QueueContext<'_>) -> Result<(), QueueError>;
    /// Device reset (status 0): forget the activation. Must not return while the host still
    /// writes guest memory on the device's behalf (in-flight disk reads); `mem` is there to mark
    /// what such writes dirtied.
    fn reset(&mut self, mem: &GuestMemory);
}

/// What a device gets while it handles one event: guest memory, the queues, the negotiated
/// features, and a place to say that it used buffers.
#[derive(Debug)]
pub struct QueueContext<'a> {
    /// Guest memory (writes through it are recorded in the dirty bitmap).
    pub mem: &'a GuestMemory,
    /// The device's queues, indexed like [`VirtioDevice::queue_max_sizes`].
    pub queues: &'a mut [Queue],
    /// Features the driver accepted.
    pub features: u64,
    signal: Signal,
    /// Raised by a pauser waiting for the transport's lock.
    pause_flag: Option<&'a AtomicBool>,
}

/// What the device asked the transport to do once the event is handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signal {
    /// Set the used-buffer bit of InterruptStatus.
    pub used: bool,
    /// Wake a guest that waits in `PORT_WAIT`.
    pub wake: bool,
}

impl<'a> QueueContext<'a> {
    /// A context over `queues` with nothing signalled yet.
    pub fn new(mem: &'a GuestMemory, queues: &'a mut [Queue], features: u64) -> Self {
        Self { mem, queues, features, signal: Signal::default(), pause_flag: None }
    }

    /// Lets the device see a pending pause (see [`Self::pause_requested`]).
    pub(crate) fn with_pause_flag(mut self, flag: &'a AtomicBool) -> Self {
        self.pause_flag = Some(flag);
        self
    }

    /// True when someone waits to pause the device: a loop that may run long (receive) should
    /// stop at the next item boundary, leaving the rest for after the resume.
    pub fn pause_requested(&self) -> bool {
        self.pause_flag.is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// [`Self::pause_requested`] as a closure that does not borrow the context (so the device
    /// can hold it while it borrows the queues).
    pub fn pause_probe(&self) -> impl Fn() -> bool + 'a {
        let flag = self.pause_flag;
        move || flag.is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// The device added used buffers the driver asked to hear about. `wake`: the guest may be
    /// waiting for them (asynchronous completions); completions made while the guest is stopped
    /// in its own QueueNotify exit do not need a wake-up, it sees them when it resumes.
    pub fn signal_used(&mut self, wake: bool) {
        self.signal.used = true;
        self.signal.wake |= wake;
    }

    /// What was signalled so far.
    pub fn signal(&self) -> Signal {
        self.signal
    }

    /// True when the driver accepted `feature` (a mask).
    pub fn has_feature(&self, feature: u64) -> bool {
        self.features & feature == feature
    }
}

/// Why a device refused DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs is not enabled.
    #[error("queue {0} is not enabled")]
    QueueNotReady(usize),
    /// A queue's rings could not be written.
    #[error("queue {queue} cannot be set up")]
    Ring {
        /// Queue index.
        queue: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
}

/// Why a device stopped processing a queue. The transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The rings themselves are unusable (an avail index that jumps past the queue size, a used
    /// ring that cannot be written).
    #[error("virtqueue {queue} is broken")]
    Ring {
        /// Queue index.
        queue: u16,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// A descriptor chain that cannot be completed meaningfully (a loop, no writable status
    /// byte, descriptors outside guest memory where the device must write).
    #[error("malformed descriptor chain {head} on queue {queue}: {reason}")]
    MalformedChain {
        /// Queue index.
        queue: u16,
        /// Head descriptor index.
        head: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The driver reused a descriptor head that the device still owns.
    #[error("descriptor {head} on queue {queue} was made available twice")]
    HeadInUse {
        /// Queue index.
        queue: u16,
        /// Head descriptor index.
        head: u16,
    },
}

impl QueueError {
    /// A stable label for "warn once" bookkeeping.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ring { .. } => "ring",
            Self::MalformedChain { .. } => "malformed-chain",
            Self::HeadInUse { .. } => "head-in-use",
        }
    }
}

/// Adds queue context to a virtio-queue error.
pub(crate) fn ring_err(queue: u16) -> impl FnOnce(virtio_queue::Error) -> QueueError {
    move |source| QueueError::Ring { queue, source }
}

/// Takes the next available chain, reporting ring errors (which `pop_descriptor_chain` would
/// only log). `Ok(None)`: nothing available, or the queue is not enabled.
pub(crate) fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, virtio_queue::Error> {
    if !queue.ready() {
        return Ok(None);
    }
    Ok(queue.iter(mem)?.next())
}

/// One descriptor of a chain, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// Collects a chain's descriptors. `None` when the chain is cut short: a loop or a chain longer
/// than the queue (virtio-queue stops after queue-size descriptors), a `next` index past the
/// table, or a descriptor that cannot be read. Indirect tables are followed by virtio-queue.
pub(crate) fn collect_chain(
    chain: DescriptorChain<&GuestMemory>,
    out: &mut Vec<Desc>,
) -> Option<()> {
    out.clear();
    let mut complete = false;
    for d in chain {
        out.push(Desc { addr: d.addr(), len: d.len(), writable: d.is_write_only() });
        // The iterator ends silently on every error; only a last descriptor without NEXT says
        // the chain really ended.
        complete = !d.has_next();
    }
    complete.then_some(())
}

/// Turns a queue's notifications off while the device does not need them. Besides the
/// standard `disable_notification` (VRING_USED_F_NO_NOTIFY without EVENT_IDX), with EVENT_IDX it
/// parks `avail_event` at 0xfffe: virtio-drivers 0.13 tests `avail_idx >= avail_event + 1`
/// without wrap-around arithmetic, so the standard "leave avail_event behind" makes it notify on
/// every buffer it adds. 0xfffe is crossed once per 65 536 buffers by both wrap-aware drivers
/// and that one; `enable_notification` moves it back to `next_avail`.
pub(crate) fn suppress_notifications(
    queue: &mut Queue,
    mem: &GuestMemory,
) -> Result<(), virtio_queue::Error> {
    queue.disable_notification(mem)?;
    if queue.event_idx_enabled() {
        let addr = GuestAddress(queue.used_ring())
            .checked_add(USED_RING_HEADER_SIZE + USED_ELEMENT_SIZE * u64::from(queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.store(0xfffeu16.to_le(), addr, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    Ok(())
}

/// Copies `config[offset..]` into `data`, zero past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Remembers which kinds of guest mistakes were already logged, so a looping driver cannot
/// flood the log.
#[derive(Debug, Default)]
pub(crate) struct WarnOnce {
    seen: Vec<&'static str>,
}

impl WarnOnce {
    /// True the first time `label` is seen.
    pub(crate) fn first(&mut self, label: &'static str) -> bool {
        if self.seen.contains(&label) {
            return false;
        }
        self.seen.push(label);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::{test_memory, TestQueue};
    use super::*;

    #[test]
    fn config_reads_are_zero_padded() {
        let cfg = [1u8, 2, 3];
        let mut out = [0xffu8; 4];
        read_config_bytes(&cfg, 1, &mut out);
        assert_eq!(out, [2, 3, 0, 0]);
        read_config_bytes(&cfg, 100, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn collect_chain_detects_loops() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 8);
        let mut q = tq.queue();
        // 0 -> 1 -> 0: a loop.
        tq.set_desc(0, 0x8_0000, 16, virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16, 1);
        tq.set_desc(1, 0x8_1000, 16, virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16, 0);
        tq.publish(0);
        let chain = pop_chain(&mut q, &mem).unwrap().unwrap();
        let mut descs = Vec::new();
        assert!(collect_chain(chain, &mut descs).is_none());
        assert_eq!(descs.len(), 8, "virtio-queue stops a loop after queue-size descriptors");
    }

    #[test]
    fn collect_chain_accepts_a_normal_chain() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 8);
        let mut q = tq.queue();
        tq.add_chain(&[(0x8_0000, 16, false), (0x8_1000, 1, true)]);
        let chain = pop_chain(&mut q, &mem).unwrap().unwrap();
        let mut descs = Vec::new();
        assert!(collect_chain(chain, &mut descs).is_some());
        assert_eq!(
            descs,
            [
                Desc { addr: GuestAddress(0x8_0000), len: 16, writable: false },
                Desc { addr: GuestAddress(0x8_1000), len: 1, writable: true }
            ]
        );
    }

    #[test]
    fn suppression_parks_avail_event_and_enable_restores_it() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 8);
        let mut q = tq.queue();
        q.set_event_idx(true);
        suppress_notifications(&mut q, &mem).unwrap();
        assert_eq!(tq.avail_event(), 0xfffe);
        tq.add_chain(&[(0x8_0000, 16, true)]);
        let _ = pop_chain(&mut q, &mem).unwrap().unwrap();
        // Re-enabling points avail_event at the next entry the device will look at, and
        // reports nothing pending.
        assert!(!q.enable_notification(&mem).unwrap());
        assert_eq!(tq.avail_event(), 1);

        // Without EVENT_IDX the flag in the used ring does the job.
        let mut q = tq.queue();
        suppress_notifications(&mut q, &mem).unwrap();
        assert_eq!(tq.used_flags(), 1);
    }

    #[test]
    fn warn_once_fires_once_per_label() {
        let mut w = WarnOnce::default();
        assert!(w.first("a"));
        assert!(!w.first("a"));
        assert!(w.first("b"));
    }
}
