//! The virtio-net device: features, config space, activation, and what each queue event does.
//!
//! Transmit runs on the vCPU thread, inside the guest's QueueNotify exit: frames go straight to
//! the backend ([`TxMode::Direct`]) or into the output-commit hold ([`TxMode::Held`]). When the
//! hold is full, transmit stops with the frame left in the avail ring; the hold's release then
//! writes the transmit kick and the device I/O thread resumes transmit. Receive runs on the
//! device I/O thread when the backend is readable; the vCPU thread only kicks that thread when
//! the guest adds buffers to a starved receive queue.
//!
//! Received frames can be seen ([`RxMirror`]: a copy of each frame as it enters the device's
//! state) and supplied ahead of the backend ([`Net::replay_rx`]: frames delivered before anything
//! the backend has). The device knows no more about why: the replication layer uses the two to
//! hand the frames a dead primary had taken, and the backup never saw committed, to the VM that
//! takes over.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::handler::{
    process_tx_to, DirectTx, FrameSink, FrameSource, NetStats, RxPoll, RxState,
};
use super::held::{FrameHold, HeldTx};
use super::tap::Tap;
use crate::devices::virtio::{
    ring_err, ActivateError, Desc, QueueContext, QueueError, VirtioDevice, WarnOnce,
    F_RING_EVENT_IDX, F_VERSION_1, QUEUE_MAX_SIZE,
};

/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;

/// Features offered: virtio 1.x, a MAC in config space, link status, EVENT_IDX. No offloads
/// and no mergeable buffers, so every frame fits one receive buffer with a plain header.
pub const NET_FEATURES: u64 =
    F_VERSION_1 | F_RING_EVENT_IDX | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS;

/// Config space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
const CONFIG_LEN: usize = 12;

/// A frame backend the device can poll: a TAP, or a test double.
pub trait NetBackend: FrameSink + FrameSource + Send + fmt::Debug {
    /// The fd that becomes readable when frames arrive (registered with the I/O thread's epoll).
    fn poll_fd(&self) -> Option<RawFd>;

    /// A second handle for sending frames from another thread (the output hold's releaser).
    fn output(&self) -> io::Result<Box<dyn FrameSink + Send>> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl NetBackend for Tap {
    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    fn output(&self) -> io::Result<Box<dyn FrameSink + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// Sees every frame the device takes in, on the device's I/O thread, at the moment the frame
/// becomes part of the device's state (read from the backend or the replay queue; the frame
/// starts with its 12-byte virtio-net header), or is read ahead in a pause ([`Net::read_ahead`]:
/// then it belongs to whatever comes after the paused state). The receive path waits for it: it
/// must be quick and must not block.
pub trait RxMirror: Send + Sync + fmt::Debug {
    /// One frame, taken in.
    fn frame_taken(&self, frame: &[u8]);

    /// The receive pass that took the frames since the last call is over (called after every
    /// pass, frames or not): a moment to pass them on together rather than one by one. Called
    /// by whoever ran the pass once the guest has been told of the frames and the device's lock
    /// is released ([`Net::rx_mirror`]; the I/O thread), so that passing them on delays neither.
    fn taken_all(&self) {}
}

/// The receive path's input: the replay queue first, then the frames read ahead in a pause, then
/// the backend; each frame shown to the mirror as it is taken, except the frames read ahead,
/// which it saw when they were read.
struct RxInput<'a> {
    replay: &'a mut VecDeque<Vec<u8>>,
    ahead: &'a mut VecDeque<Vec<u8>>,
    backend: &'a mut dyn NetBackend,
    mirror: Option<&'a dyn RxMirror>,
}

/// Copies a queued frame into the receive buffer (frames longer than it are never queued).
fn take_queued(frame: &[u8], buf: &mut [u8]) -> usize {
    let n = frame.len().min(buf.len());
    buf[..n].copy_from_slice(&frame[..n]);
    n
}

impl FrameSource for RxInput<'_> {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.replay.pop_front() {
            Some(frame) => take_queued(&frame, buf),
            None => match self.ahead.pop_front() {
                Some(frame) => return Ok(take_queued(&frame, buf)),
                None => self.backend.recv_frame(buf)?,
            },
        };
        if let (Some(m), Some(frame)) = (self.mirror, buf.get(..n)) {
            if n > 0 {
                m.frame_taken(frame);
            }
        }
        Ok(n)
    }
}

/// Most frames read ahead in one pause ([`Net::read_ahead`]); beyond them, frames wait in the
/// backend until the resume.
pub const READ_AHEAD_FRAMES: usize = 256;

/// Where transmitted frames go.
#[derive(Clone, Debug, Default)]
pub enum TxMode {
    /// Straight to the backend (unprotected VMs; the backup after failover).
    #[default]
    Direct,
    /// Into a hold the replication layer owns and releases (per epoch, on acknowledgement).
    Held(Arc<dyn FrameHold>),
}

/// Why the transmit mode could not be set.
#[derive(Debug, thiserror::Error)]
pub enum TxModeError {
    /// The backend cannot give the hold a handle to send on.
    #[error("cannot give the output hold a handle on the network backend")]
    Output(#[source] io::Error),
    /// The VM has no network device.
    #[error("the VM has no network device")]
    NoNetDevice,
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    config: [u8; CONFIG_LEN],
    backend: Box<dyn NetBackend>,
    /// Wakes the I/O thread: the receive queue got buffers, or the device was activated.
    kick: Arc<EventFd>,
    rx: RxState,
    tx_mode: TxMode,
    /// Wakes the I/O thread to retry transmit (written by the output hold when it frees space).
    tx_kick: Option<Arc<EventFd>>,
    /// Transmit stopped on a full hold; a chain waits in the avail ring.
    tx_stalled: bool,
    tx_buf: Vec<u8>,
    descs: Vec<Desc>,
    stats: NetStats,
    warned: WarnOnce,
    /// Sees each received frame (see [`RxMirror`]).
    rx_mirror: Option<Arc<dyn RxMirror>>,
    /// Frames to deliver before anything the backend has (see [`Net::replay_rx`]).
    rx_replay: VecDeque<Vec<u8>>,
    /// Frames read from the backend in a pause (see [`Net::read_ahead`]), delivered after the
    /// replay queue and before the backend. Not part of the device's state.
    rx_ahead: VecDeque<Vec<u8>>,
    /// Reading ahead is allowed (from [`Net::open_read_ahead`] to [`Net::close_read_ahead`]).
    ahead_open: bool,
}

impl Net {
    /// A device with MAC `mac` over `backend`; `kick` is the I/O thread's receive kick.
    pub fn new(mac: [u8; 6], backend: Box<dyn NetBackend>, kick: Arc<EventFd>) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Self {
            config,
            backend,
            kick,
            rx: RxState::new(),
            tx_mode: TxMode::Direct,
            tx_kick: None,
            tx_stalled: false,
            tx_buf: Vec::with_capacity(super::handler::MAX_FRAME_LEN),
            descs: Vec::with_capacity(usize::from(QUEUE_MAX_SIZE)),
            stats: NetStats::default(),
            warned: WarnOnce::default(),
            rx_mirror: None,
            rx_replay: VecDeque::new(),
            rx_ahead: VecDeque::new(),
            ahead_open: false,
        }
    }

    /// Sets (or removes) the observer of received frames.
    pub fn set_rx_mirror(&mut self, mirror: Option<Arc<dyn RxMirror>>) {
        self.rx_mirror = mirror;
    }

    /// Queues `frames` (each starting with its virtio-net header) to be received before anything
    /// the backend has, in order, and wakes the I/O thread. Frames that no receive path could
    /// have read (shorter than the header, longer than the largest frame) are left out; returns
    /// how many were queued.
    pub fn replay_rx(&mut self, frames: Vec<Vec<u8>>) -> usize {
        let before = self.rx_replay.len();
        let valid = |f: &Vec<u8>| (super::handler::VNET_HDR_LEN..=super::handler::MAX_FRAME_LEN).contains(&f.len());
        self.rx_replay.extend(frames.into_iter().filter(valid));
        let queued = self.rx_replay.len() - before;
        if queued > 0 {
            self.kick_io_thread();
        }
        queued
    }

    /// The observer of received frames, to end a receive pass with ([`RxMirror::taken_all`])
    /// after [`Self::process_rx`].
    pub fn rx_mirror(&self) -> Option<Arc<dyn RxMirror>> {
        self.rx_mirror.clone()
    }

    /// Frames queued by [`Self::replay_rx`] and not received yet.
    pub fn rx_replay_len(&self) -> usize {
        self.rx_replay.len()
    }

    /// The device is paused and its state for a checkpoint is taken, or about to be with the
    /// receive path stopped: from now until [`Self::close_read_ahead`] (the resume),
    /// [`Self::read_ahead`] may take frames from the backend. They are not part of that state;
    /// the mirror sees them as they are read, so that whoever it tells has them before the device
    /// could deliver them. Frames read ahead in an earlier pause and still not delivered (the
    /// guest had no buffers) are shown to the mirror again now: they belong after this state too.
    pub fn open_read_ahead(&mut self) {
        self.ahead_open = true;
        if let Some(m) = self.rx_mirror.as_deref().filter(|_| !self.rx_ahead.is_empty()) {
            for frame in &self.rx_ahead {
                m.frame_taken(frame);
            }
            m.taken_all();
        }
    }

    /// Ends what [`Self::open_read_ahead`] allowed (before the device resumes).
    pub fn close_read_ahead(&mut self) {
        self.ahead_open = false;
    }

    /// I/O thread, the device paused: moves what the backend has into the read-ahead queue (up to
    /// [`READ_AHEAD_FRAMES`]), each frame shown to the mirror, if reading ahead is open. Says
    /// whether to keep watching the backend (false: closed, full, or the backend failed; the
    /// resume looks again). Touches neither guest memory nor the device's state.
    pub fn read_ahead(&mut self) -> bool {
        if !self.ahead_open {
            return false;
        }
        let mut keep = true;
        let mut buf = vec![0u8; super::handler::MAX_FRAME_LEN];
        while self.rx_ahead.len() < READ_AHEAD_FRAMES {
            match self.backend.recv_frame(&mut buf) {
                Ok(n) if n >= super::handler::VNET_HDR_LEN => {
                    let frame = buf[..n.min(buf.len())].to_vec();
                    if let Some(m) = &self.rx_mirror {
                        m.frame_taken(&frame);
                    }
                    self.rx_ahead.push_back(frame);
                }
                // Not a frame: the receive path would drop it too.
                Ok(n) if n > 0 => {}
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The receive path counts backend errors when it meets them again.
                    keep = false;
                    break;
                }
            }
        }
        if let Some(m) = &self.rx_mirror {
            m.taken_all();
        }
        keep && self.rx_ahead.len() < READ_AHEAD_FRAMES
    }

    /// Frames read ahead and not received yet.
    pub fn rx_ahead_len(&self) -> usize {
        self.rx_ahead.len()
    }

    /// Frame counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The backend's readiness fd.
    pub fn backend_fd(&self) -> Option<RawFd> {
        self.backend.poll_fd()
    }

    /// Receive-side state (starved, pending frame).
    pub fn rx_state(&self) -> &RxState {
        &self.rx
    }

    /// Receive-side state, to restore it.
    pub(crate) fn rx_state_mut(&mut self) -> &mut RxState {
        &mut self.rx
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        mac
    }

    /// Where transmitted frames go.
    pub fn tx_mode(&self) -> &TxMode {
        &self.tx_mode
    }

    /// True when transmit waits for room in the output hold.
    pub fn tx_stalled(&self) -> bool {
        self.tx_stalled
    }

    pub(crate) fn set_tx_stalled(&mut self, stalled: bool) {
        self.tx_stalled = stalled;
    }

    /// The eventfd that makes the I/O thread retry transmit ([`Self::retry_tx`]).
    pub fn set_tx_kick(&mut self, kick: Arc<EventFd>) {
        if let TxMode::Held(hold) = &self.tx_mode {
            hold.set_space_waker(Some(kick.clone()));
        }
        self.tx_kick = Some(kick);
    }

    /// Chooses where transmitted frames go. For [`TxMode::Held`] the hold gets its own handle
    /// on the backend to release frames on, and the transmit kick as its space waker. Leaving
    /// the held mode does not touch the hold's frames (release or discard them as needed).
    pub fn set_tx_mode(&mut self, mode: TxMode) -> Result<(), TxModeError> {
        if let TxMode::Held(hold) = &mode {
            hold.attach_output(self.backend.output().map_err(TxModeError::Output)?);
            hold.set_space_waker(self.tx_kick.clone());
        }
        if let TxMode::Held(old) = &self.tx_mode {
            old.set_space_waker(None);
        }
        self.tx_mode = mode;
        if self.tx_stalled {
            // The new target may have room.
            self.kick_tx();
        }
        Ok(())
    }

    fn kick_tx(&self) {
        if let Some(k) = &self.tx_kick {
            // Only fails on counter overflow, and then the thread is awake anyway.
            let _ = k.write(1);
        }
    }

    /// I/O thread: the output hold has room again (or the devices resumed): transmit what the
    /// guest made available meanwhile. Completions wake the guest, which is not in an exit.
    pub fn retry_tx(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), QueueError> {
        self.transmit(ctx, true)
    }

    fn transmit(&mut self, ctx: &mut QueueContext<'_>, wake: bool) -> Result<(), QueueError> {
        let q = &mut ctx.queues[usize::from(TX_QUEUE)];
        let out = match &self.tx_mode {
            TxMode::Direct => process_tx_to(
                q,
                TX_QUEUE,
                ctx.mem,
                &mut DirectTx(self.backend.as_mut()),
                &mut self.tx_buf,
                &mut self.descs,
                &mut self.stats,
            )?,
            TxMode::Held(hold) => process_tx_to(
                q,
                TX_QUEUE,
                ctx.mem,
                &mut HeldTx(hold.as_ref()),
                &mut self.tx_buf,
                &mut self.descs,
                &mut self.stats,
            )?,
        };
        self.tx_stalled = out.stalled;
        if let Some(e) = out.error {
            if self.warned.first("tx-backend") {
                tracing::warn!("virtio-net: cannot send a guest frame (dropped): {e}");
            }
        }
        if out.notify {
            ctx.signal_used(wake);
        }
        Ok(())
    }

    /// I/O thread: the backend is readable, or the driver added receive buffers. Moves frames
    /// into the receive queue and says whether to keep polling the backend.
    pub fn process_rx(&mut self, ctx: &mut QueueContext<'_>) -> Result<RxPoll, QueueError> {
        let stop = ctx.pause_probe();
        let queue = &mut ctx.queues[usize::from(RX_QUEUE)];
        let mut input = RxInput {
            replay: &mut self.rx_replay,
            ahead: &mut self.rx_ahead,
            backend: self.backend.as_mut(),
            mirror: self.rx_mirror.as_deref(),
        };
        let (poll, notify) = self.rx.process_until(queue, RX_QUEUE, ctx.mem, &mut input, &mut self.descs, &mut self.stats, &stop)?;
        if notify {
            // The guest may be idle in PORT_WAIT waiting for exactly this frame.
            ctx.signal_used(true);
        }
        if poll == RxPoll::More && !(self.rx_replay.is_empty() && self.rx_ahead.is_empty()) {
            // Queued frames make the backend fd no more readable: come back for them.
            self.kick_io_thread();
        }
        Ok(poll)
    }

    fn kick_io_thread(&self) {
        // Only fails when the counter would overflow, and then the thread is awake anyway.
        let _ = self.kick.write(1);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE, QUEUE_MAX_SIZE]
    }

    fn device_features(&self) -> u64 {
        NET_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
    }

    fn activate(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), ActivateError> {
        for q in [RX_QUEUE, TX_QUEUE] {
            if !ctx.queues[usize::from(q)].ready() {
                return Err(ActivateError::QueueNotReady(usize::from(q)));
            }
        }
        self.rx.reset();
        // Until the first frame finds a buffer the device wants to hear about every buffer.
        ctx.queues[usize::from(RX_QUEUE)]
            .enable_notification(ctx.mem)
            .map_err(|source| ActivateError::Ring { queue: usize::from(RX_QUEUE), source })?;
        // Let the I/O thread (re)arm the backend: it stops polling while the device is inactive.
        self.kick_io_thread();
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16, ctx: &mut QueueContext<'_>) -> Result<(), QueueError> {
        match queue {
            RX_QUEUE => {
                // Receive buffers matter only when the device is waiting for them.
                if self.rx.starved {
                    self.kick_io_thread();
                }
                Ok(())
            }
            // No wake-up: the guest is stopped in this very exit and sees the used entries
            // when it resumes.
            TX_QUEUE => self.transmit(ctx, false),
            _ => Err(ring_err(queue)(virtio_queue::Error::InvalidDescriptorIndex)),
        }
    }

    fn reset(&mut self, _mem: &crate::memory::GuestMemory) {
        self.rx.reset();
        self.tx_stalled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::super::handler::VNET_HDR_LEN;
    use super::*;
    use crate::devices::bus::MmioDevice;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::MmioTransport;
    use crate::wake::GuestWake;
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    type Loop = crate::devices::virtio::test_utils::LoopBackend;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    fn setup() -> (MmioTransport<Net>, Loop, Arc<EventFd>, Arc<GuestWake>, GuestMemory) {
        let mem = test_memory();
        let wake = Arc::new(GuestWake::new().unwrap());
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let backend = Loop::default();
        let net = Net::new(MAC, Box::new(backend.clone()), kick.clone());
        (MmioTransport::new(net, mem.clone(), wake.clone()), backend, kick, wake, mem)
    }

    use crate::memory::GuestMemory;

    /// What virtio-drivers' VirtIONetRaw::new reads from the config space.
    #[test]
    fn config_space_and_features_match_virtio_drivers() {
        let (mut t, ..) = setup();
        assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_ID), 1);
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            let mut one = [0u8; 1];
            t.read(0x100 + i as u64, &mut one);
            *b = one[0];
        }
        assert_eq!(mac, MAC);
        let mut status = [0u8; 2];
        t.read(0x106, &mut status);
        assert_eq!(u16::from_le_bytes(status), 1, "link up");
        // virtio-drivers' net SUPPORTED_FEATURES: MAC, STATUS, RING_EVENT_IDX, RING_INDIRECT_DESC,
        // VERSION_1 (and more it will not get).
        let drivers = 1 << 5 | 1 << 16 | 1 << 29 | 1 << 28 | 1 << 32 | 1 << 15 | 1 << 0;
        let got = negotiate(&mut t, drivers);
        assert_eq!(got, NET_FEATURES);
    }

    #[test]
    fn tx_and_rx_through_the_transport() {
        let (mut t, backend, kick, wake, mem) = setup();
        negotiate(&mut t, u64::MAX);
        let mut rxq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut txq = TestQueue::new(&mem, 0x4_0000, 16);
        rxq.program(&mut t, 0);
        txq.program(&mut t, 1);
        driver_ok(&mut t);
        assert!(t.is_running());
        assert_eq!(kick.read().unwrap(), 1, "activation kicks the I/O thread");

        // TX: header + frame, sent during the notify exit.
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(b"hello from the guest");
        mem.write_slice(&frame, GuestAddress(0x8_0000)).unwrap();
        txq.add_chain(&[(0x8_0000, frame.len() as u32, false)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(*backend.from_guest.lock().unwrap(), [frame.clone()]);
        assert_eq!(txq.next_used(), Some((0, 0)));
        assert_eq!(t.device().stats().tx_frames, 1);

        // RX with no buffer: the device starves and the frame waits.
        let mut incoming = vec![0u8; VNET_HDR_LEN];
        incoming.extend_from_slice(b"hello from the host");
        backend.to_guest.lock().unwrap().push_back(incoming.clone());
        let poll = t.process(|net, ctx| net.process_rx(ctx)).unwrap();
        assert_eq!(poll, RxPoll::Starved);
        // The guest adds a buffer and notifies: the device kicks the I/O thread.
        rxq.add_chain(&[(0x9_0000, 2048, true)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(kick.read().unwrap(), 1);
        drain_wake(&wake);
        let poll = t.process(|net, ctx| net.process_rx(ctx)).unwrap();
        assert_eq!(poll, RxPoll::Drained);
        let (id, len) = rxq.next_used().unwrap();
        assert_eq!((id, len as usize), (0, incoming.len()));
        let mut got = vec![0u8; incoming.len()];
        mem.read_slice(&mut got, GuestAddress(0x9_0000)).unwrap();
        incoming[10] = 1; // num_buffers
        assert_eq!(got, incoming);
        assert!(
            wait_readable(std::os::fd::AsRawFd::as_raw_fd(&*wake), 0),
            "an RX frame wakes the guest"
        );
        assert_eq!(
            r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
            VIRTIO_MMIO_INT_VRING
        );

        // Not starved any more: a receive notification does not kick.
        rxq.add_chain(&[(0xa_0000, 2048, true)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(kick.read().is_err());
    }

    /// Consumes a pending wake-up, if any.
    fn drain_wake(wake: &GuestWake) {
        let never = EventFd::new(EFD_NONBLOCK).unwrap();
        let _ = wake.wait(Some(std::time::Duration::ZERO), std::os::fd::AsRawFd::as_raw_fd(&never));
    }

    /// The frames seen, and the passes ended.
    #[derive(Debug, Default)]
    struct Seen(std::sync::Mutex<Vec<Vec<u8>>>, std::sync::atomic::AtomicUsize);

    impl RxMirror for Seen {
        fn frame_taken(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }

        fn taken_all(&self) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn frame(text: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(text);
        f
    }

    /// Activates the device with its two queues and a [`Seen`] mirror; the receive queue.
    fn activate_with_mirror<'m>(t: &mut MmioTransport<Net>, mem: &'m GuestMemory) -> (TestQueue<'m>, Arc<Seen>) {
        negotiate(t, u64::MAX);
        let rxq = TestQueue::new(mem, 0x1_0000, 16);
        let txq = TestQueue::new(mem, 0x4_0000, 16);
        rxq.program(t, 0);
        txq.program(t, 1);
        driver_ok(t);
        let seen = Arc::new(Seen::default());
        t.device_mut().set_rx_mirror(Some(seen.clone() as Arc<dyn RxMirror>));
        (rxq, seen)
    }

    /// Replayed frames reach the guest before the backend's, in order; impossible ones are left
    /// out; the mirror sees every frame taken in, replayed or not, once, as it was taken.
    #[test]
    fn replayed_frames_come_first_and_the_mirror_sees_each_frame_once() {
        let (mut t, backend, kick, _wake, mem) = setup();
        let (mut rxq, seen) = activate_with_mirror(&mut t, &mem);
        assert_eq!(kick.read().unwrap(), 1, "activation kicks the I/O thread");

        backend.to_guest.lock().unwrap().push_back(frame(b"from the backend"));
        let replay = vec![frame(b"replayed one"), vec![0u8; 3], frame(b"replayed two")];
        assert_eq!(t.device_mut().replay_rx(replay), 2, "the 3-byte frame is no frame");
        assert_eq!(kick.read().unwrap(), 1, "a replay wakes the I/O thread");
        for i in 0..3u64 {
            rxq.add_chain(&[(0x9_0000 + i * 0x1000, 2048, true)]);
        }
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let poll = t.process(|net, ctx| net.process_rx(ctx)).unwrap();
        assert_eq!(poll, RxPoll::Drained);
        let want = [frame(b"replayed one"), frame(b"replayed two"), frame(b"from the backend")];
        for (i, w) in want.iter().enumerate() {
            let (id, len) = rxq.next_used().unwrap();
            assert_eq!((id as usize, len as usize), (i, w.len()));
            let mut got = vec![0u8; w.len()];
            mem.read_slice(&mut got, GuestAddress(0x9_0000 + i as u64 * 0x1000)).unwrap();
            assert_eq!(got[VNET_HDR_LEN..], w[VNET_HDR_LEN..], "frame {i}");
        }
        assert_eq!(*seen.0.lock().unwrap(), want.to_vec());
        assert_eq!(seen.1.load(std::sync::atomic::Ordering::SeqCst), 0, "the caller ends the pass, after the lock");
        assert_eq!(t.device().rx_replay_len(), 0);
        assert_eq!(t.device().stats().rx_frames, 3);

        // Without the mirror, frames are still received, unseen.
        t.device_mut().set_rx_mirror(None);
        backend.to_guest.lock().unwrap().push_back(frame(b"unseen"));
        rxq.add_chain(&[(0xc_0000, 2048, true)]);
        let _ = t.process(|net, ctx| net.process_rx(ctx)).unwrap();
        assert_eq!(seen.0.lock().unwrap().len(), 3);
        assert_eq!(t.device().stats().rx_frames, 4);
    }

    /// In a pause, frames are read ahead only once reading ahead is open: into a queue outside
    /// the device's state (nothing reaches the guest's ring while paused), each shown to the
    /// mirror as it is read. After the resume they reach the guest first, in order, and the mirror
    /// does not see them again; one still undelivered at the next pause is shown again when that
    /// pause opens reading ahead.
    #[test]
    fn frames_read_ahead_in_a_pause_are_mirrored_at_once_and_delivered_after_it() {
        let (mut t, backend, _kick, _wake, mem) = setup();
        let (mut rxq, seen) = activate_with_mirror(&mut t, &mem);
        let names = |v: &[Vec<u8>]| v.iter().map(|f| String::from_utf8_lossy(&f[VNET_HDR_LEN..]).into_owned()).collect::<Vec<_>>();

        t.pause();
        backend.to_guest.lock().unwrap().extend([frame(b"one"), frame(b"two")]);
        assert!(!t.device_mut().read_ahead(), "not open: nothing read, stop watching");
        assert!(seen.0.lock().unwrap().is_empty());
        t.device_mut().open_read_ahead();
        assert!(t.device_mut().read_ahead(), "open, drained, room left: keep watching");
        assert_eq!(names(&seen.0.lock().unwrap()), ["one", "two"], "mirrored as read");
        assert_eq!(t.device().rx_ahead_len(), 2);
        assert!(t.process(|net, ctx| net.process_rx(ctx)).is_none(), "paused");
        t.device_mut().close_read_ahead();
        assert!(!t.device_mut().read_ahead(), "closed again");
        assert!(t.resume(), "the receive event turned away while paused asks for a look");

        backend.to_guest.lock().unwrap().push_back(frame(b"three"));
        for i in 0..3u64 {
            rxq.add_chain(&[(0x9_0000 + i * 0x1000, 2048, true)]);
        }
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.process(|net, ctx| net.process_rx(ctx)).unwrap(), RxPoll::Drained);
        for (i, want) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
            let (id, len) = rxq.next_used().unwrap();
            assert_eq!((id as usize, len as usize), (i, VNET_HDR_LEN + want.len()));
            let mut got = vec![0u8; want.len()];
            mem.read_slice(&mut got, GuestAddress(0x9_0000 + i as u64 * 0x1000 + VNET_HDR_LEN as u64)).unwrap();
            assert_eq!(&got[..], *want, "frame {i}");
        }
        assert_eq!(names(&seen.0.lock().unwrap()), ["one", "two", "three"], "each frame mirrored once");

        // The guest has no buffer left: of two frames read ahead, the device holds one for the
        // next buffer (its state) and the other stays queued; the next pause shows it again.
        t.pause();
        t.device_mut().open_read_ahead();
        backend.to_guest.lock().unwrap().extend([frame(b"four"), frame(b"five")]);
        assert!(t.device_mut().read_ahead());
        t.device_mut().close_read_ahead();
        t.resume();
        let _ = t.process(|net, ctx| net.process_rx(ctx)).unwrap();
        assert_eq!(t.device().rx_ahead_len(), 1);
        t.pause();
        t.device_mut().open_read_ahead();
        assert_eq!(names(&seen.0.lock().unwrap()), ["one", "two", "three", "four", "five", "five"]);

        // Bounded: beyond READ_AHEAD_FRAMES the frames wait in the backend.
        backend.to_guest.lock().unwrap().extend((0..READ_AHEAD_FRAMES + 5).map(|_| frame(b"x")));
        assert!(!t.device_mut().read_ahead(), "full: stop watching until the resume");
        assert_eq!(t.device().rx_ahead_len(), READ_AHEAD_FRAMES);
        assert_eq!(backend.to_guest.lock().unwrap().len(), 6);
    }

    #[test]
    fn activation_needs_both_queues() {
        let (mut t, _, _, _, mem) = setup();
        negotiate(&mut t, u64::MAX);
        TestQueue::new(&mem, 0x1_0000, 16).program(&mut t, 0);
        driver_ok(&mut t);
        assert!(!t.is_running());
        assert_ne!(r32(&mut t, VIRTIO_MMIO_STATUS) & 64, 0, "DEVICE_NEEDS_RESET");
    }
}
