//! virtio-net queue logic, without KVM or a TAP: descriptor chains in, frames out (TX), and
//! frames in, used entries out (RX). Frames carry their 12-byte `virtio_net_hdr_v1` in front,
//! which is exactly what a TAP opened with `IFF_VNET_HDR` and a header size of 12 reads and
//! writes, so neither direction copies or rebuilds headers.

use std::io;
use std::mem::size_of;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use crate::devices::virtio::{
    collect_chain, pop_chain, ring_err, suppress_notifications, Desc, QueueError,
};
use crate::memory::GuestMemory;

/// Size of the header in front of every frame (virtio 1.x always includes `num_buffers`).
pub const VNET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame moved in either direction, header included: a 64 KiB payload behind an
/// Ethernet and a VLAN header. Nothing larger exists without GSO, which is not offered. The same
/// limit bounds the output hold and the A-Link's HeldOutput payloads, so it is defined once, with
/// the wire format.
pub const MAX_FRAME_LEN: usize = ftvm_proto::limits::MAX_GUEST_FRAME;
const _: () = assert!(VNET_HDR_LEN == ftvm_proto::limits::VIRTIO_NET_HDR_LEN);
/// Frames delivered per [`RxState::process`] call before the I/O thread looks at its other
/// events.
pub const RX_BUDGET: usize = 256;

/// Where transmitted frames go: the TAP (directly, or through the output-commit hold when it
/// releases them).
pub trait FrameSink {
    /// Sends one frame that starts with its 12-byte virtio-net header.
    /// [`io::ErrorKind::WouldBlock`] means "no room now": the frame is dropped and counted.
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// Where received frames come from.
pub trait FrameSource {
    /// Reads one frame, header included, into `buf`; returns its length.
    /// [`io::ErrorKind::WouldBlock`] when there is none.
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Frame counters (plain data; a later issue exports them as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames handed to the sink.
    pub tx_frames: u64,
    /// Frames the sink had no room for.
    pub tx_dropped: u64,
    /// Frames the sink failed to send.
    pub tx_errors: u64,
    /// Transmit chains that held no valid frame (too short, too long, writable, outside RAM).
    pub tx_malformed: u64,
    /// Frames written into guest receive buffers.
    pub rx_frames: u64,
    /// Received frames dropped: shorter than a header, or larger than the guest's buffer.
    pub rx_dropped: u64,
    /// Failed reads from the source.
    pub rx_errors: u64,
    /// Times transmit stopped because the output hold was full (the frame stayed in the
    /// guest's avail ring).
    pub tx_stalls: u64,
}

/// What a transmit target did with one frame.
#[derive(Debug)]
pub enum TxVerdict {
    /// Taken (sent, or held for output commit).
    Sent,
    /// No room now and the frame is lost ("no room" of a TAP: counted as dropped).
    Dropped,
    /// The target failed; the frame is lost.
    Failed(io::Error),
    /// No room now, and the target will say when there is: leave the frame in the avail ring.
    Full,
}

/// Where [`process_tx_to`] puts frames.
pub trait TxSink {
    /// Takes one frame that starts with its 12-byte virtio-net header.
    fn transmit(&mut self, frame: &[u8]) -> TxVerdict;
}

/// Frames straight to a [`FrameSink`] (no output commit).
#[derive(Debug)]
pub struct DirectTx<'a, S: ?Sized>(pub &'a mut S);

impl<S: FrameSink + ?Sized> TxSink for DirectTx<'_, S> {
    fn transmit(&mut self, frame: &[u8]) -> TxVerdict {
        match self.0.send_frame(frame) {
            Ok(()) => TxVerdict::Sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => TxVerdict::Dropped,
            Err(e) => TxVerdict::Failed(e),
        }
    }
}

/// Writes released frames to a [`FrameSink`] shared with someone else (tests, a TAP).
impl<T: FrameSink + Send + ?Sized> FrameSink for Arc<Mutex<T>> {
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).send_frame(frame)
    }
}

/// What [`process_tx`] did.
#[derive(Debug, Default)]
pub struct TxOutcome {
    /// The driver wants to hear about the used buffers (needs_notification).
    pub notify: bool,
    /// The first send error other than "no room", for logging.
    pub error: Option<io::Error>,
    /// The sink was full: the next chain is still in the avail ring, and notifications stay
    /// off until the sink says it has room.
    pub stalled: bool,
}

/// Why a transmit chain carried no frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxDrop {
    Malformed,
}

/// Sends every frame the driver made available on the transmit queue, then returns the buffers
/// (used length 0: the device writes nothing into them). Notifications are off while it works
/// and re-checked when they are turned back on, so a frame added meanwhile is not missed.
pub fn process_tx(
    queue: &mut Queue,
    qidx: u16,
    mem: &GuestMemory,
    sink: &mut dyn FrameSink,
    buf: &mut Vec<u8>,
    descs: &mut Vec<Desc>,
    stats: &mut NetStats,
) -> Result<TxOutcome, QueueError> {
    process_tx_to(queue, qidx, mem, &mut DirectTx(sink), buf, descs, stats)
}

/// [`process_tx`] into any [`TxSink`]. When the sink is [`TxVerdict::Full`], the chain goes
/// back to the avail ring (nothing is dropped) and processing stops with notifications still
/// off: the sink's owner retries when it has room ([`TxOutcome::stalled`]).
pub fn process_tx_to(
    queue: &mut Queue,
    qidx: u16,
    mem: &GuestMemory,
    sink: &mut dyn TxSink,
    buf: &mut Vec<u8>,
    descs: &mut Vec<Desc>,
    stats: &mut NetStats,
) -> Result<TxOutcome, QueueError> {
    let mut out = TxOutcome::default();
    if !queue.ready() {
        return Ok(out);
    }
    let mut used = 0u32;
    'outer: loop {
        queue.disable_notification(mem).map_err(ring_err(qidx))?;
        while let Some(chain) = pop_chain(queue, mem).map_err(ring_err(qidx))? {
            let head = chain.head_index();
            if collect_chain(chain, descs).is_none() {
                return Err(QueueError::MalformedChain {
                    queue: qidx,
                    head,
                    reason: "the chain does not end (a loop or a bad next index)",
                });
            }
            match read_tx_frame(descs, mem, buf) {
                Ok(len) => match sink.transmit(&buf[..len]) {
                    TxVerdict::Sent => stats.tx_frames += 1,
                    TxVerdict::Dropped => stats.tx_dropped += 1,
                    TxVerdict::Failed(e) => {
                        stats.tx_errors += 1;
                        out.error.get_or_insert(e);
                    }
                    TxVerdict::Full => {
                        // Un-pop the chain: the driver still owns nothing new, and the device
                        // takes it again on the retry.
                        queue.go_to_previous_position();
                        stats.tx_stalls += 1;
                        out.stalled = true;
                        break 'outer;
                    }
                },
                Err(TxDrop::Malformed) => stats.tx_malformed += 1,
            }
            queue.add_used(mem, head, 0).map_err(ring_err(qidx))?;
            used += 1;
        }
        if !queue.enable_notification(mem).map_err(ring_err(qidx))? {
            break;
        }
    }
    out.notify = used > 0 && queue.needs_notification(mem).map_err(ring_err(qidx))?;
    Ok(out)
}

/// Copies a transmit chain's bytes into `buf`; returns the frame length.
fn read_tx_frame(descs: &[Desc], mem: &GuestMemory, buf: &mut Vec<u8>) -> Result<usize, TxDrop> {
    if descs.iter().any(|d| d.writable) {
        return Err(TxDrop::Malformed);
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    let total = usize::try_from(total).map_err(|_| TxDrop::Malformed)?;
    if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&total) {
        return Err(TxDrop::Malformed);
    }
    buf.resize(total, 0);
    let mut at = 0;
    for d in descs.iter().filter(|d| d.len > 0) {
        let len = d.len as usize;
        mem.read_slice(&mut buf[at..at + len], d.addr).map_err(|_| TxDrop::Malformed)?;
        at += len;
    }
    // No offload feature is offered, so the only header the driver may send is all zeros
    // (num_buffers aside, which transmit ignores); never forward a request for checksum or
    // segmentation work the device did not agree to.
    buf[..NUM_BUFFERS_OFFSET].fill(0);
    Ok(total)
}

/// What happened to one received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxDelivery {
    /// Written into a guest buffer and added to the used ring.
    Delivered,
    /// The driver has no receive buffer available.
    NoBuffer,
    /// The next buffer is too small for this frame; it stays available for the next one.
    TooSmall,
}

/// Writes one frame (header included) into the next available receive buffer.
pub fn deliver_frame(
    queue: &mut Queue,
    qidx: u16,
    mem: &GuestMemory,
    frame: &[u8],
    descs: &mut Vec<Desc>,
) -> Result<RxDelivery, QueueError> {
    let Some(chain) = pop_chain(queue, mem).map_err(ring_err(qidx))? else {
        return Ok(RxDelivery::NoBuffer);
    };
    let head = chain.head_index();
    let malformed = |reason| QueueError::MalformedChain { queue: qidx, head, reason };
    if collect_chain(chain, descs).is_none() {
        return Err(malformed("the chain does not end (a loop or a bad next index)"));
    }
    if descs.iter().any(|d| !d.writable) {
        return Err(malformed("a receive buffer holds a device-readable descriptor"));
    }
    if descs.iter().any(|d| d.len > 0 && !mem.check_range(d.addr, d.len as usize)) {
        return Err(malformed("a receive buffer lies outside guest memory"));
    }
    let capacity: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    if capacity < frame.len() as u64 {
        queue.go_to_previous_position();
        return Ok(RxDelivery::TooSmall);
    }
    let mut rest = frame;
    for d in descs.iter() {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len as usize);
        // Through vm-memory, so the pages are marked in the VMM dirty bitmap.
        mem.write_slice(&rest[..n], d.addr)
            .map_err(|_| malformed("a receive buffer lies outside guest memory"))?;
        rest = &rest[n..];
    }
    // frame.len() <= capacity, a sum of u32 lengths in one chain, which virtio-queue caps at
    // u32::MAX in total.
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    queue.add_used(mem, head, len).map_err(ring_err(qidx))?;
    Ok(RxDelivery::Delivered)
}

/// Why [`RxState::process`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxPoll {
    /// The source has no more frames (or failed); wait until it is readable again.
    Drained,
    /// The guest has no receive buffers. One frame waits in the device; stop reading the source
    /// until the driver notifies the receive queue.
    Starved,
    /// The budget ran out with frames left: call again.
    More,
}

/// Receive-side device state.
#[derive(Debug)]
pub struct RxState {
    /// Out of guest buffers, waiting for the driver's notification.
    pub starved: bool,
    /// Driver notifications are enabled on the receive queue (only while starved: the guest
    /// exits to add a receive buffer only when the device waits for one).
    pub notifications_on: bool,
    /// A frame read from the source that did not find a buffer yet (it sits in `buf`).
    pub pending: Option<usize>,
    buf: Vec<u8>,
}

impl Default for RxState {
    fn default() -> Self {
        Self::new()
    }
}

impl RxState {
    /// Fresh state: starved, notifications on (no buffers are known yet).
    pub fn new() -> Self {
        Self { starved: true, notifications_on: true, pending: None, buf: vec![0; MAX_FRAME_LEN] }
    }

    /// Forgets any pending frame and goes back to the starting state.
    pub fn reset(&mut self) {
        self.starved = true;
        self.notifications_on = true;
        self.pending = None;
    }

    /// The frame waiting for a receive buffer, header included.
    pub fn pending_frame(&self) -> Option<&[u8]> {
        self.pending.map(|len| &self.buf[..len])
    }

    /// Makes `frame` the one waiting for a receive buffer (restore). `false` if it is not a
    /// frame the device could have read (shorter than a header, longer than the buffer).
    pub fn set_pending_frame(&mut self, frame: &[u8]) -> bool {
        if !(VNET_HDR_LEN..=self.buf.len()).contains(&frame.len()) {
            return false;
        }
        self.buf[..frame.len()].copy_from_slice(frame);
        self.pending = Some(frame.len());
        true
    }

    /// Moves frames from `source` to the receive queue until the source is empty, the guest
    /// has no buffers, or [`RX_BUDGET`] frames went through. Returns why it stopped and whether
    /// the driver wants to hear about the new used entries.
    pub fn process(
        &mut self,
        queue: &mut Queue,
        qidx: u16,
        mem: &GuestMemory,
        source: &mut dyn FrameSource,
        descs: &mut Vec<Desc>,
        stats: &mut NetStats,
    ) -> Result<(RxPoll, bool), QueueError> {
        self.process_until(queue, qidx, mem, source, descs, stats, &|| false)
    }

    /// [`Self::process`] that also stops (with [`RxPoll::More`]) as soon as `stop` says so,
    /// between two frames: a pause must not wait for a whole budget of frames.
    #[allow(clippy::too_many_arguments)]
    pub fn process_until(
        &mut self,
        queue: &mut Queue,
        qidx: u16,
        mem: &GuestMemory,
        source: &mut dyn FrameSource,
        descs: &mut Vec<Desc>,
        stats: &mut NetStats,
        stop: &dyn Fn() -> bool,
    ) -> Result<(RxPoll, bool), QueueError> {
        if !queue.ready() {
            return Ok((RxPoll::Starved, false));
        }
        if self.notifications_on {
            // Woken by the driver's notification (or at activation) with nothing to deliver
            // yet: if buffers are there now, the device is no longer waiting for any, so the
            // driver need not exit for the next ones.
            let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(ring_err(qidx))?;
            if avail.0 != queue.next_avail() {
                self.starved = false;
                suppress_notifications(queue, mem).map_err(ring_err(qidx))?;
                self.notifications_on = false;
            }
        }
        let mut delivered = 0usize;
        let poll = loop {
            if delivered >= RX_BUDGET || stop() {
                break RxPoll::More;
            }
            let len = match self.pending.take() {
                Some(len) => len,
                None => match source.recv_frame(&mut self.buf) {
                    Ok(0) => break RxPoll::Drained,
                    Ok(n) => n.min(self.buf.len()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxPoll::Drained,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        stats.rx_errors += 1;
                        break RxPoll::Drained;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                stats.rx_dropped += 1;
                continue;
            }
            // One buffer per frame (no VIRTIO_NET_F_MRG_RXBUF): virtio 1.x wants num_buffers = 1.
            // The TAP leaves these two bytes untouched, so they must be set here.
            self.buf[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            match deliver_frame(queue, qidx, mem, &self.buf[..len], descs)? {
                RxDelivery::Delivered => {
                    delivered += 1;
                    stats.rx_frames += 1;
                    self.starved = false;
                    if self.notifications_on {
                        suppress_notifications(queue, mem).map_err(ring_err(qidx))?;
                        self.notifications_on = false;
                    }
                }
                RxDelivery::TooSmall => stats.rx_dropped += 1,
                RxDelivery::NoBuffer => {
                    self.pending = Some(len);
                    self.notifications_on = true;
                    // Ask for a notification, then look again: the driver may have added a
                    // buffer between the pop above and the flag becoming visible.
                    if queue.enable_notification(mem).map_err(ring_err(qidx))? {
                        continue;
                    }
                    self.starved = true;
                    break RxPoll::Starved;
                }
            }
        };
        let notify = delivered > 0 && queue.needs_notification(mem).map_err(ring_err(qidx))?;
        Ok((poll, notify))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use std::collections::VecDeque;

    #[derive(Default)]
    struct Sink {
        frames: Vec<Vec<u8>>,
        full: bool,
    }

    impl FrameSink for Sink {
        fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
            if self.full {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.frames.push(frame.to_vec());
            Ok(())
        }
    }

    #[derive(Default)]
    struct Source(VecDeque<Vec<u8>>);

    impl FrameSource for Source {
        fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let f = self.0.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    struct Tx {
        buf: Vec<u8>,
        descs: Vec<Desc>,
        stats: NetStats,
    }

    impl Tx {
        fn new() -> Self {
            Self { buf: Vec::new(), descs: Vec::new(), stats: NetStats::default() }
        }
        fn run(
            &mut self,
            q: &mut Queue,
            mem: &GuestMemory,
            sink: &mut Sink,
        ) -> Result<TxOutcome, QueueError> {
            process_tx(q, 1, mem, sink, &mut self.buf, &mut self.descs, &mut self.stats)
        }
    }

    #[test]
    fn tx_sends_header_and_frame_split_or_joined() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        // Split: header in one descriptor, the Ethernet frame in another (virtio-drivers).
        let payload: Vec<u8> = (0..60u8).collect();
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[0] = 1; // NEEDS_CSUM, which was never negotiated: must not reach the sink
        mem.write_slice(&hdr, vm_memory::GuestAddress(0x8_0000)).unwrap();
        mem.write_slice(&payload, vm_memory::GuestAddress(0x8_1000)).unwrap();
        tq.add_chain(&[(0x8_0000, 12, false), (0x8_1000, 60, false)]);
        // Joined: one descriptor with both.
        mem.write_slice(&frame(b"joined"), vm_memory::GuestAddress(0x9_0000)).unwrap();
        tq.add_chain(&[(0x9_0000, 18, false)]);

        let mut sink = Sink::default();
        let mut tx = Tx::new();
        let out = tx.run(&mut q, &mem, &mut sink).unwrap();
        assert!(out.notify && out.error.is_none());
        assert_eq!(sink.frames, [frame(&payload), frame(b"joined")]);
        assert_eq!(tq.next_used(), Some((0, 0)));
        assert_eq!(tq.next_used(), Some((2, 0)));
        assert_eq!(tx.stats.tx_frames, 2);
    }

    #[test]
    fn tx_drops_when_the_sink_is_full_and_still_returns_buffers() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        tq.add_chain(&[(0x8_0000, 64, false)]);
        let mut sink = Sink { full: true, ..Default::default() };
        let mut tx = Tx::new();
        tx.run(&mut q, &mem, &mut sink).unwrap();
        assert_eq!(tx.stats.tx_dropped, 1);
        assert_eq!(tq.next_used(), Some((0, 0)));
    }

    #[test]
    fn tx_malformed_chains_are_dropped_or_refused() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        tq.add_chain(&[(0x8_0000, 4, false)]); // shorter than a header
        tq.add_chain(&[(0x8_0000, 12, false), (0x8_1000, 64, true)]); // writable descriptor
        tq.add_chain(&[(0xfff_0000, 64, false)]); // outside guest memory
        tq.add_chain(&[(0x8_0000, 0, false), (0x8_0000, 0, false)]); // zero-length
        tq.add_chain(&[(0x8_0000, 70_000, false)]); // longer than any frame
        let mut sink = Sink::default();
        let mut tx = Tx::new();
        tx.run(&mut q, &mem, &mut sink).unwrap();
        assert!(sink.frames.is_empty());
        assert_eq!(tx.stats.tx_malformed, 5);
        assert_eq!(tq.used_idx(), 5, "every chain goes back to the driver");

        // A loop: the device cannot know where the chain ends and asks for a reset.
        tq.set_desc(10, 0x8_0000, 64, virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16, 11);
        tq.set_desc(11, 0x8_0000, 64, virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16, 10);
        tq.publish(10);
        let err = tx.run(&mut q, &mem, &mut sink).unwrap_err();
        assert!(matches!(err, QueueError::MalformedChain { head: 10, .. }), "{err}");
    }

    #[test]
    fn tx_respects_used_event_and_reenables_notifications() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        q.set_event_idx(true);
        tq.set_used_event(5);
        tq.add_chain(&[(0x8_0000, 20, false)]);
        let mut sink = Sink::default();
        let mut tx = Tx::new();
        let out = tx.run(&mut q, &mem, &mut sink).unwrap();
        assert!(!out.notify, "used_event 5 not reached");
        // Notifications are back on: avail_event points at the next chain.
        assert_eq!(tq.avail_event(), 1);
    }

    #[test]
    fn rx_writes_header_and_frame_and_sets_num_buffers() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        tq.add_chain(&[(0x8_0000, 1526, true)]);
        let mut source = Source::default();
        let mut sent = frame(&[0xab; 100]);
        sent[NUM_BUFFERS_OFFSET] = 0x55; // garbage the TAP leaves there
        source.0.push_back(sent);
        let mut rx = RxState::new();
        let mut stats = NetStats::default();
        let (poll, notify) =
            rx.process(&mut q, 0, &mem, &mut source, &mut Vec::new(), &mut stats).unwrap();
        assert_eq!(poll, RxPoll::Drained);
        assert!(notify);
        assert_eq!(tq.next_used(), Some((0, 112)));
        let mut got = vec![0u8; 112];
        mem.read_slice(&mut got, vm_memory::GuestAddress(0x8_0000)).unwrap();
        let mut expected = frame(&[0xab; 100]);
        expected[NUM_BUFFERS_OFFSET] = 1;
        assert_eq!(got, expected);
        assert_eq!(stats.rx_frames, 1);
        assert!(!rx.starved && !rx.notifications_on);
    }

    #[test]
    fn rx_spreads_a_frame_over_several_descriptors() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        tq.add_chain(&[(0x8_0000, 12, true), (0x8_1000, 50, true), (0x8_2000, 50, true)]);
        let f = frame(&(0..80u8).collect::<Vec<_>>());
        let mut descs = Vec::new();
        assert_eq!(deliver_frame(&mut q, 0, &mem, &f, &mut descs).unwrap(), RxDelivery::Delivered);
        let mut got = vec![0u8; 92];
        mem.read_slice(&mut got[..12], vm_memory::GuestAddress(0x8_0000)).unwrap();
        mem.read_slice(&mut got[12..62], vm_memory::GuestAddress(0x8_1000)).unwrap();
        mem.read_slice(&mut got[62..], vm_memory::GuestAddress(0x8_2000)).unwrap();
        assert_eq!(got, f);
        assert_eq!(tq.next_used(), Some((0, 92)));
    }

    #[test]
    fn rx_starves_keeps_the_frame_and_resumes_when_buffers_come() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        q.set_event_idx(true);
        let mut source = Source::default();
        source.0.push_back(frame(b"first"));
        source.0.push_back(frame(b"second"));
        let mut rx = RxState::new();
        let mut stats = NetStats::default();
        let mut descs = Vec::new();
        let (poll, notify) =
            rx.process(&mut q, 0, &mem, &mut source, &mut descs, &mut stats).unwrap();
        assert_eq!((poll, notify), (RxPoll::Starved, false));
        assert!(rx.starved && rx.pending.is_some());
        assert_eq!(tq.avail_event(), 0, "the driver is asked to notify its next buffer");

        tq.add_chain(&[(0x8_0000, 2048, true)]);
        let (poll, _) = rx.process(&mut q, 0, &mem, &mut source, &mut descs, &mut stats).unwrap();
        assert_eq!(poll, RxPoll::Starved, "one buffer, two frames");
        assert_eq!(tq.next_used(), Some((0, 17)));
        tq.add_chain(&[(0x8_1000, 2048, true)]);
        // While buffers are plenty, avail_event is parked so the driver does not exit.
        tq.add_chain(&[(0x8_2000, 2048, true)]);
        let (poll, _) = rx.process(&mut q, 0, &mem, &mut source, &mut descs, &mut stats).unwrap();
        assert_eq!(poll, RxPoll::Drained);
        assert_eq!(tq.next_used(), Some((1, 18)));
        assert!(!rx.starved && !rx.notifications_on);
        assert_eq!(tq.avail_event(), 0xfffe);
        assert_eq!(stats.rx_frames, 2);
    }

    #[test]
    fn rx_buffers_without_frames_end_starvation_and_notifications() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        q.set_event_idx(true);
        let mut rx = RxState::new();
        let mut stats = NetStats::default();
        let mut source = Source::default();
        // The driver adds its buffers and notifies; no frame has arrived yet.
        for i in 0..4 {
            tq.add_chain(&[(0x8_0000 + i * 0x1000, 2048, true)]);
        }
        let (poll, notify) =
            rx.process(&mut q, 0, &mem, &mut source, &mut Vec::new(), &mut stats).unwrap();
        assert_eq!((poll, notify), (RxPoll::Drained, false));
        assert!(!rx.starved && !rx.notifications_on);
        assert_eq!(tq.avail_event(), 0xfffe, "refilling buffers does not make the guest exit");
    }

    #[test]
    fn rx_too_small_buffer_drops_the_frame_and_keeps_the_buffer() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        tq.add_chain(&[(0x8_0000, 64, true)]);
        let mut source = Source::default();
        source.0.push_back(frame(&[1; 100]));
        source.0.push_back(frame(&[2; 10]));
        source.0.push_back(vec![0; 3]); // shorter than a header
        let mut rx = RxState::new();
        let mut stats = NetStats::default();
        rx.process(&mut q, 0, &mem, &mut source, &mut Vec::new(), &mut stats).unwrap();
        assert_eq!(tq.next_used(), Some((0, 22)));
        assert_eq!(stats.rx_dropped, 2);
        assert_eq!(stats.rx_frames, 1);
    }

    #[test]
    fn rx_malformed_buffers_are_refused() {
        let cases: [&[(u64, u32, bool)]; 2] = [
            &[(0x8_0000, 64, false)],     // device-readable
            &[(0x1000_0000, 4096, true)], // outside guest memory
        ];
        for chain in cases {
            let mem = test_memory();
            let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
            let mut q = tq.queue();
            tq.add_chain(chain);
            let r = deliver_frame(&mut q, 0, &mem, &frame(b"x"), &mut Vec::new());
            assert!(matches!(r, Err(QueueError::MalformedChain { .. })), "{chain:?}");
        }
    }

    #[test]
    fn rx_marks_the_written_pages_dirty() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        tq.add_chain(&[(0x8_0000, 2048, true)]);
        clear_dirty(&mem);
        assert!(!is_dirty(&mem, 0x8_0000));
        let mut descs = Vec::new();
        deliver_frame(&mut q, 0, &mem, &frame(b"dirty"), &mut descs).unwrap();
        assert!(is_dirty(&mem, 0x8_0000), "the receive buffer");
        assert!(is_dirty(&mem, tq.used), "the used ring");
        assert!(!is_dirty(&mem, 0x9_0000), "an untouched page");
    }
}
