//! Saved state of the virtio-mmio transport and its split virtqueues.
//!
//! The queue state is what `virtio_queue::QueueState` holds (sizes, ring addresses, the
//! device's `next_avail`/`next_used` positions, EVENT_IDX), in our own serde struct since the
//! crate's type has no serde support. virtio-queue's `num_added` (used entries added since the
//! last `needs_notification`) is not saved: every device calls `needs_notification` after adding
//! used entries within the same event, so it is 0 whenever the transport's lock is free, which
//! is when a save can run. The ring contents (descriptors, avail and used rings, `avail_event`)
//! live in guest memory and travel with it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::{MmioTransport, TransportState};
use super::VirtioDevice;
use crate::devices::persist::Persist;
use crate::memory::GuestMemory;
use crate::wake::GuestWake;

/// One split virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// QueueNumMax (fixed by the device).
    pub max_size: u16,
    /// QueueNum chosen by the driver.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// The next available-ring index the device will look at.
    pub next_avail: u16,
    /// The next used-ring index the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
}

impl From<&Queue> for VirtqueueState {
    fn from(q: &Queue) -> Self {
        Self {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx_enabled: q.event_idx_enabled(),
        }
    }
}

impl VirtqueueState {
    /// A live queue; `Queue::try_from` checks sizes and ring alignment.
    fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// The virtio-mmio transport: registers, negotiated features, queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Virtio device ID (checked on restore).
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
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
    /// Queues notified while the devices were paused, not handled yet (bit per queue).
    pub pending_notify: u32,
    /// The queues, in device order.
    pub queues: Vec<VirtqueueState>,
}

/// What a transport needs besides its state.
#[derive(Debug)]
pub struct MmioTransportArgs<D> {
    /// The device model, already restored.
    pub device: D,
    /// Guest memory (the backup's copy).
    pub mem: GuestMemory,
    /// Where the device wakes an idle guest.
    pub wake: Arc<GuestWake>,
}

/// Why a transport state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    /// The state belongs to another kind of device.
    #[error("the saved transport is for virtio device {saved}, not {device}")]
    DeviceType {
        /// Device ID in the state.
        saved: u32,
        /// Device ID of the device given.
        device: u32,
    },
    /// The number of queues differs from the device's.
    #[error("the saved transport has {saved} queues, the device has {device}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// A queue's QueueNumMax differs from the device's.
    #[error("queue {queue} was saved with QueueNumMax {saved}, the device offers {device}")]
    QueueMaxSize {
        /// Queue index.
        queue: usize,
        /// In the state.
        saved: u16,
        /// The device's.
        device: u16,
    },
    /// A queue's size or ring addresses are invalid.
    #[error("queue {queue} state is invalid")]
    Queue {
        /// Queue index.
        queue: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// An enabled queue's rings do not lie in the given guest memory.
    #[error("queue {queue} rings lie outside guest memory")]
    RingsOutsideMemory {
        /// Queue index.
        queue: usize,
    },
    /// The state claims features the device does not offer.
    #[error("the saved driver features {features:#x} include some the device does not offer")]
    Features {
        /// The features not offered.
        features: u64,
    },
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs<D>;
    type Error = TransportRestoreError;

    fn save(&self) -> MmioTransportState {
        let s = self.state();
        MmioTransportState {
            device_type: self.device().device_type(),
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            driver_features: s.driver_features,
            queue_sel: s.queue_sel,
            status: s.status,
            interrupt_status: s.interrupt_status,
            config_generation: s.config_generation,
            activated: s.activated,
            pending_notify: self.pending_notify(),
            queues: s.queues.iter().map(VirtqueueState::from).collect(),
        }
    }

    /// Writes nothing into guest memory: the rings are as the guest left them in the saved
    /// memory, and the device is not re-activated (its own state says where it was).
    fn restore(
        args: MmioTransportArgs<D>,
        state: &MmioTransportState,
    ) -> Result<Self, TransportRestoreError> {
        let MmioTransportArgs { device, mem, wake } = args;
        if state.device_type != device.device_type() {
            return Err(TransportRestoreError::DeviceType {
                saved: state.device_type,
                device: device.device_type(),
            });
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(TransportRestoreError::QueueCount {
                saved: state.queues.len(),
                device: max_sizes.len(),
            });
        }
        let unoffered = state.driver_features & !device.device_features();
        if unoffered != 0 {
            return Err(TransportRestoreError::Features { features: unoffered });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (qs, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if qs.max_size != max {
                return Err(TransportRestoreError::QueueMaxSize {
                    queue: i,
                    saved: qs.max_size,
                    device: max,
                });
            }
            let q = qs
                .to_queue()
                .map_err(|source| TransportRestoreError::Queue { queue: i, source })?;
            if q.ready() && !q.is_valid(&mem) {
                return Err(TransportRestoreError::RingsOutsideMemory { queue: i });
            }
            queues.push(q);
        }
        let transport_state = TransportState {
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            status: state.status,
            interrupt_status: state.interrupt_status,
            config_generation: state.config_generation,
            activated: state.activated,
            queues,
        };
        Ok(MmioTransport::with_state(device, mem, wake, transport_state, state.pending_notify))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::{
        pop_chain, ring_err, ActivateError, QueueContext, QueueError, F_RING_EVENT_IDX, F_VERSION_1,
    };
    use virtio_bindings::virtio_mmio::*;

    /// A stateless two-queue device that uses every chain it is notified of.
    #[derive(Debug, Default)]
    pub(crate) struct Echo;

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 16]
        }
        fn device_features(&self) -> u64 {
            F_VERSION_1 | F_RING_EVENT_IDX
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, _ctx: &mut QueueContext<'_>) -> Result<(), ActivateError> {
            Ok(())
        }
        fn queue_notify(
            &mut self,
            queue: u16,
            ctx: &mut QueueContext<'_>,
        ) -> Result<(), QueueError> {
            let q = &mut ctx.queues[usize::from(queue)];
            while let Some(chain) = pop_chain(q, ctx.mem).map_err(ring_err(queue))? {
                q.add_used(ctx.mem, chain.head_index(), 1).map_err(ring_err(queue))?;
            }
            if q.needs_notification(ctx.mem).map_err(ring_err(queue))? {
                ctx.signal_used(false);
            }
            Ok(())
        }
        fn reset(&mut self, _mem: &GuestMemory) {}
    }

    /// The transport alone (its device has no state of its own).
    pub(crate) struct TransportRig {
        t: MmioTransport<Echo>,
        mem: &'static GuestMemory,
        q: TestQueue<'static>,
    }

    impl SuspendableRig for TransportRig {
        type State = MmioTransportState;

        fn new_running() -> Self {
            let mem = leaked_memory();
            let wake = Arc::new(GuestWake::new().unwrap());
            let mut t = MmioTransport::new(Echo, mem.clone(), wake);
            negotiate(&mut t, u64::MAX);
            let q = TestQueue::new(mem, 0x1_0000, 16);
            q.program(&mut t, 1);
            driver_ok(&mut t);
            assert!(t.is_running());
            Self { t, mem, q }
        }
        fn pause(&mut self) {
            self.t.pause();
        }
        fn resume(&mut self) {
            self.t.resume();
        }
        fn save(&self) -> MmioTransportState {
            Persist::save(&self.t)
        }
        fn restore_from(&self, state: &MmioTransportState) -> Self {
            let args = MmioTransportArgs {
                device: Echo,
                mem: self.mem.clone(),
                wake: Arc::new(GuestWake::new().unwrap()),
            };
            let t = MmioTransport::restore(args, state).unwrap();
            Self { t, mem: self.mem, q: self.q.clone() }
        }
        fn mutate(&mut self) {
            self.q.add_chain(&[(0x8_0000, 64, true)]);
            w32(&mut self.t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        }
    }

    suspendable_tests!(transport_suspendable, TransportRig);

    #[test]
    fn a_notify_while_paused_is_deferred_saved_and_replayed() {
        let mut rig = TransportRig::new_running();
        rig.pause();
        rig.q.add_chain(&[(0x8_0000, 64, true)]);
        w32(&mut rig.t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(rig.q.next_used(), None, "nothing happens while paused");
        let state = rig.save();
        assert_eq!(state.pending_notify, 1 << 1, "the notification travels with the state");
        let restored = rig.restore_from(&state);
        assert_eq!(restored.t.pending_notify(), 1 << 1);
        drop(restored);
        rig.resume();
        assert_eq!(rig.q.next_used(), Some((0, 1)), "handled at resume");
        assert_eq!(rig.t.pending_notify(), 0);
        assert_eq!(rig.save().queues[1].next_avail, 1);
    }

    #[test]
    fn restore_refuses_mismatched_states() {
        let rig = TransportRig::new_running();
        let good = rig.save();
        let restore = |s: &MmioTransportState| {
            let args = MmioTransportArgs {
                device: Echo,
                mem: rig.mem.clone(),
                wake: Arc::new(GuestWake::new().unwrap()),
            };
            MmioTransport::restore(args, s).err().map(|e| e.to_string())
        };
        assert_eq!(restore(&good), None);
        let mut s = good.clone();
        s.device_type = 1;
        assert!(restore(&s).unwrap().contains("virtio device 1"));
        let mut s = good.clone();
        s.queues.pop();
        assert!(restore(&s).unwrap().contains("1 queues"));
        let mut s = good.clone();
        s.queues[1].size = 3;
        assert!(restore(&s).unwrap().contains("queue 1 state is invalid"));
        let mut s = good.clone();
        s.queues[1].used_ring = 0x4000_0000;
        assert!(restore(&s).unwrap().contains("outside guest memory"));
        let mut s = good.clone();
        s.queues[1].max_size = 32;
        assert!(restore(&s).unwrap().contains("QueueNumMax"));
        let mut s = good;
        s.driver_features |= 1 << 40;
        assert!(restore(&s).unwrap().contains("does not offer"));
    }

    #[test]
    fn restore_writes_nothing_into_guest_memory() {
        let rig = TransportRig::new_running();
        let state = rig.save();
        clear_dirty(rig.mem);
        let _restored = rig.restore_from(&state);
        assert!(!any_dirty(rig.mem));
    }
}
