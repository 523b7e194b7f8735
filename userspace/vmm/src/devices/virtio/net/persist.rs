//! Saved state of the virtio-net device.
//!
//! Besides the MAC, the state is what the receive and transmit sides remember between events:
//!
//! * receive starvation (`rx_starved`, `rx_notifications_on`): whether the device waits for the
//!   driver to add buffers, with driver notifications on for that;
//! * the frame held back for want of a receive buffer (`rx_pending`). The device already took it
//!   from the TAP, so nothing else would deliver it. It is kept rather than dropped: it costs
//!   nothing unless the receive queue is starved (then one frame, at most 64 KiB), and a frame
//!   the backup delivers exactly once is better than a loss the guest's TCP has to recover
//!   from. (Frames still queued in the primary's TAP at a failover are lost either way, like
//!   frames on the wire.);
//! * transmit backpressure (`tx_stalled`): a chain waits in the avail ring for room in the
//!   output hold. After a restore the device manager retries transmit once its I/O thread
//!   runs, whatever the new hold's state.
//!
//! The transmit mode and the output hold are not device state: they belong to the replication
//! layer, which sets them on the restored device (the backup's hold starts empty).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Net, NetBackend};
use crate::devices::persist::Persist;

/// The virtio-net device model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The guest's MAC address (config space).
    pub mac: [u8; 6],
    /// The receive queue ran out of buffers and the device waits for the driver's notification.
    pub rx_starved: bool,
    /// Driver notifications are on for the receive queue.
    pub rx_notifications_on: bool,
    /// The frame (virtio-net header included) read from the backend that found no buffer yet.
    pub rx_pending: Option<Vec<u8>>,
    /// Transmit stopped on a full output hold; a chain waits in the avail ring.
    pub tx_stalled: bool,
}

/// What a network device needs besides its state.
#[derive(Debug)]
pub struct NetArgs {
    /// The host side (the backup's TAP).
    pub backend: Box<dyn NetBackend>,
    /// The I/O thread's receive kick.
    pub kick: Arc<EventFd>,
}

/// Why a network state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum NetRestoreError {
    /// The held-back frame cannot be a frame the device read.
    #[error("the saved pending receive frame has an impossible length ({len} bytes)")]
    PendingFrame {
        /// Its length.
        len: usize,
    },
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetRestoreError;

    fn save(&self) -> NetState {
        let rx = self.rx_state();
        NetState {
            mac: self.mac(),
            rx_starved: rx.starved,
            rx_notifications_on: rx.notifications_on,
            rx_pending: rx.pending_frame().map(<[u8]>::to_vec),
            tx_stalled: self.tx_stalled(),
        }
    }

    fn restore(args: NetArgs, state: &NetState) -> Result<Self, NetRestoreError> {
        let mut net = Net::new(state.mac, args.backend, args.kick);
        let rx = net.rx_state_mut();
        rx.starved = state.rx_starved;
        rx.notifications_on = state.rx_notifications_on;
        if let Some(frame) = &state.rx_pending {
            if !rx.set_pending_frame(frame) {
                return Err(NetRestoreError::PendingFrame { len: frame.len() });
            }
        }
        net.set_tx_stalled(state.tx_stalled);
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::super::handler::{RxPoll, VNET_HDR_LEN};
    use super::super::held::testing::TestHold;
    use super::super::TxMode;
    use super::*;
    use crate::devices::persist::VirtioDeviceState;
    use crate::devices::virtio::persist::MmioTransportArgs;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::MmioTransport;
    use crate::memory::GuestMemory;
    use crate::wake::GuestWake;
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    type Loop = crate::devices::virtio::test_utils::LoopBackend;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
    const TX_BUF: u64 = 0x8_0000;

    struct NetRig {
        t: MmioTransport<Net>,
        /// Frames the driver queued so far (each gets its own 64 KiB buffer slot).
        queued: u64,
        mem: &'static GuestMemory,
        rxq: TestQueue<'static>,
        txq: TestQueue<'static>,
        backend: Loop,
        kick: Arc<EventFd>,
        tx_kick: Arc<EventFd>,
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    impl NetRig {
        fn transmit(&mut self, payload: &[u8]) {
            let f = frame(payload);
            let at = TX_BUF + (self.queued % 8) * 0x1_0000;
            self.queued += 1;
            self.mem.write_slice(&f, GuestAddress(at)).unwrap();
            self.txq.add_chain(&[(at, f.len() as u32, false)]);
            w32(&mut self.t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        }

        /// Restores `state` into `mem` (the same memory or a copy) with a fresh backend.
        fn restore_into(
            &self,
            mem: &'static GuestMemory,
            state: &VirtioDeviceState<NetState>,
        ) -> NetRig {
            let backend = Loop::default();
            let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let tx_kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let mut net = Net::restore(
                NetArgs { backend: Box::new(backend.clone()), kick: kick.clone() },
                &state.device,
            )
            .unwrap();
            net.set_tx_kick(tx_kick.clone());
            let args = MmioTransportArgs {
                device: net,
                mem: mem.clone(),
                wake: Arc::new(GuestWake::new().unwrap()),
            };
            let t = MmioTransport::restore(args, &state.transport).unwrap();
            NetRig {
                t,
                queued: self.queued,
                mem,
                rxq: self.rxq.on(mem),
                txq: self.txq.on(mem),
                backend,
                kick,
                tx_kick,
            }
        }
    }

    impl SuspendableRig for NetRig {
        type State = VirtioDeviceState<NetState>;

        fn new_running() -> Self {
            let mem = leaked_memory();
            let backend = Loop::default();
            let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let tx_kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let mut net = Net::new(MAC, Box::new(backend.clone()), kick.clone());
            net.set_tx_kick(tx_kick.clone());
            let mut t = MmioTransport::new(net, mem.clone(), Arc::new(GuestWake::new().unwrap()));
            negotiate(&mut t, u64::MAX);
            let rxq = TestQueue::new(mem, 0x1_0000, 16);
            let txq = TestQueue::new(mem, 0x4_0000, 16);
            rxq.program(&mut t, 0);
            txq.program(&mut t, 1);
            driver_ok(&mut t);
            assert!(t.is_running());
            Self { t, queued: 0, mem, rxq, txq, backend, kick, tx_kick }
        }
        fn pause(&mut self) {
            self.t.pause();
        }
        fn resume(&mut self) {
            self.t.resume();
        }
        fn save(&self) -> Self::State {
            VirtioDeviceState { transport: self.t.save(), device: self.t.device().save() }
        }
        fn restore_from(&self, state: &Self::State) -> Self {
            self.restore_into(self.mem, state)
        }
        fn mutate(&mut self) {
            self.transmit(b"a frame");
        }
    }

    suspendable_tests!(net_suspendable, NetRig);

    #[test]
    fn a_starved_receive_with_a_pending_frame_is_delivered_once_after_restore() {
        let mut rig = NetRig::new_running();
        let incoming = frame(b"arrived while the guest had no buffer");
        rig.backend.to_guest.lock().unwrap().push_back(incoming.clone());
        assert_eq!(rig.t.process(|n, ctx| n.process_rx(ctx)), Some(RxPoll::Starved));
        rig.pause();
        let state = rig.save();
        // The device already set num_buffers in the held frame.
        let mut expected = incoming.clone();
        expected[10] = 1;
        assert_eq!(state.device.rx_pending.as_deref(), Some(&expected[..]));
        assert!(state.device.rx_starved);

        // The backup: a copy of memory, a new backend with nothing queued.
        let copy = copy_memory(rig.mem);
        let mut b = rig.restore_into(copy, &state);
        assert_eq!(b.save(), state);
        b.rxq.add_chain(&[(0x9_0000, 2048, true)]);
        w32(&mut b.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(b.kick.read().unwrap(), 1, "a starved device kicks the I/O thread");
        assert_eq!(b.t.process(|n, ctx| n.process_rx(ctx)), Some(RxPoll::Drained));
        let (id, len) = b.rxq.next_used().unwrap();
        assert_eq!((id, len as usize), (0, incoming.len()));
        let mut got = vec![0u8; incoming.len()];
        copy.read_slice(&mut got, GuestAddress(0x9_0000)).unwrap();
        assert_eq!(got, expected);
        assert_eq!(b.t.process(|n, ctx| n.process_rx(ctx)), Some(RxPoll::Drained));
        assert_eq!(b.rxq.next_used(), None, "delivered exactly once");
        assert_eq!(rig.rxq.used_idx(), 0, "the primary's memory is untouched");
    }

    #[test]
    fn held_transmit_waits_for_release_and_stalls_instead_of_dropping() {
        let mut rig = NetRig::new_running();
        let hold = TestHold::new(super::super::handler::MAX_FRAME_LEN);
        rig.t.device_mut().set_tx_mode(TxMode::Held(hold.clone())).unwrap();
        // Two frames of 30 000 bytes fill the hold; the third waits in the avail ring.
        let big = vec![0xabu8; 30_000];
        for i in 0..3u8 {
            let mut p = big.clone();
            p[0] = i;
            rig.transmit(&p);
        }
        assert_eq!(rig.txq.next_used(), Some((0, 0)));
        assert_eq!(rig.txq.next_used(), Some((1, 0)));
        assert_eq!(rig.txq.next_used(), None, "the third frame is not taken");
        assert!(rig.t.device().tx_stalled());
        assert_eq!(rig.t.device().stats().tx_dropped, 0);
        assert!(rig.backend.from_guest.lock().unwrap().is_empty(), "nothing leaves unreleased");

        assert_eq!(hold.release(), 2);
        assert_eq!(rig.backend.from_guest.lock().unwrap().len(), 2);
        // The release woke the I/O thread's transmit retry.
        assert_eq!(rig.tx_kick.read().unwrap(), 1);
        rig.t.process(|n, ctx| n.retry_tx(ctx)).unwrap();
        assert_eq!(rig.txq.next_used(), Some((2, 0)));
        assert!(!rig.t.device().tx_stalled());
        assert_eq!(hold.release(), 1);
        let out = rig.backend.from_guest.lock().unwrap();
        assert_eq!(out.iter().map(|f| f[VNET_HDR_LEN]).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn a_stalled_transmit_is_sent_once_by_the_restored_device() {
        let mut rig = NetRig::new_running();
        let hold = TestHold::new(super::super::handler::MAX_FRAME_LEN);
        rig.t.device_mut().set_tx_mode(TxMode::Held(hold.clone())).unwrap();
        for i in 0..3u8 {
            rig.transmit(&[i; 30_000]);
        }
        assert!(rig.t.device().tx_stalled());
        assert_eq!(rig.txq.next_used(), Some((0, 0)));
        assert_eq!(rig.txq.next_used(), Some((1, 0)));
        rig.pause();
        let state = rig.save();
        assert!(state.device.tx_stalled);

        // The backup restores into its copy of memory, Direct mode (its hold would start empty).
        let copy = copy_memory(rig.mem);
        let mut b = rig.restore_into(copy, &state);
        assert!(b.t.device().tx_stalled());
        b.t.process(|n, ctx| n.retry_tx(ctx)).unwrap();
        let sent = b.backend.from_guest.lock().unwrap().clone();
        assert_eq!(sent.len(), 1, "only the frame the primary had not taken");
        assert_eq!(sent[0], frame(&[2; 30_000]));
        assert_eq!(b.txq.next_used(), Some((2, 0)));
        assert_eq!(b.txq.next_used(), None);
        b.t.process(|n, ctx| n.retry_tx(ctx)).unwrap();
        assert_eq!(b.backend.from_guest.lock().unwrap().len(), 1, "exactly once");
        // The primary's held frames never reached any backend.
        assert!(rig.backend.from_guest.lock().unwrap().is_empty());
        assert_eq!(hold.held(), 2);
    }

    #[test]
    fn an_impossible_pending_frame_is_refused() {
        let state = NetState { rx_pending: Some(vec![0; 3]), ..Default::default() };
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let err =
            Net::restore(NetArgs { backend: Box::new(Loop::default()), kick }, &state).unwrap_err();
        assert!(err.to_string().contains("3 bytes"));
    }

    #[test]
    fn a_pause_cuts_a_receive_burst_short() {
        let mut rig = NetRig::new_running();
        for i in 0..8 {
            rig.rxq.add_chain(&[(0x8_0000 + i * 0x1000, 2048, true)]);
        }
        for i in 0..8u8 {
            rig.backend.to_guest.lock().unwrap().push_back(frame(&[i; 64]));
        }
        // A pauser raised the flag and waits for the lock that this receive holds.
        let flag = rig.t.pause_flag();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(rig.t.process(|n, ctx| n.process_rx(ctx)), Some(RxPoll::More));
        assert_eq!(rig.rxq.used_idx(), 0, "stopped before the first frame");
        assert_eq!(rig.backend.to_guest.lock().unwrap().len(), 8, "frames stay in the backend");
        rig.pause();
        assert_eq!(rig.t.process(|n, ctx| n.process_rx(ctx)), None);
        rig.resume();
        assert_eq!(rig.t.process(|n, ctx| n.process_rx(ctx)), Some(RxPoll::Drained));
        assert_eq!(rig.rxq.used_idx(), 8);
    }
}
