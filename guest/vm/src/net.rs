//! virtio-net driver and its smoltcp `Device`.
//!
//! Every RX and TX buffer is one descriptor (12-byte `virtio_net_hdr` + frame, 2 KiB), with
//! descriptor `i` permanently pointing at buffer `i`. Received frames are handed to smoltcp in
//! place and the buffer goes back to the device after smoltcp consumed it; frames to send are
//! built in place. Notifications are batched: [`Net::kick`] once per main-loop iteration.

use alloc::vec::Vec;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::{dma_alloc, Mmio, Vq, DESC_WRITE, F_EVENT_IDX, F_VERSION_1};

const VIRTIO_ID_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const HDR: usize = 12;
const BUF: usize = 2048;
const QUEUE_MAX: u16 = 256;
/// Largest Ethernet frame without the FCS (1500-byte MTU).
pub const MAX_FRAME: usize = 1514;

struct RxRing {
    vq: Vq,
    bufs: *mut u8,
    frames: u64,
}

struct TxRing {
    vq: Vq,
    bufs: *mut u8,
    free: Vec<u16>,
    frames: u64,
    /// For a frame that cannot be queued (never expected): built and dropped.
    scratch: Vec<u8>,
}

/// The network device.
pub struct Net {
    rx: RxRing,
    tx: TxRing,
    /// The MAC address from the device's config space.
    pub config_mac: [u8; 6],
    activity: bool,
    seen: (u64, u64),
    /// (port, listening sockets): TCP SYNs to the port beyond that many are dropped on arrival
    /// (no socket could take them: the client retries in a second, as with a full accept
    /// backlog, instead of getting a reset).
    pub syn_budget: Option<(u16, usize)>,
    /// SYNs dropped that way.
    pub syns_dropped: u64,
}

/// True if `frame` is an Ethernet/IPv4/TCP segment to `port` with SYN set and ACK clear.
fn is_syn_to(frame: &[u8], port: u16) -> bool {
    if frame.len() < 14 + 20 + 20 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 4 || ip[9] != 6 {
        return false;
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let Some(tcp) = ip.get(ihl..ihl + 20) else {
        return false;
    };
    let dst = u16::from_be_bytes([tcp[2], tcp[3]]);
    let flags = tcp[13];
    dst == port && flags & 0x02 != 0 && flags & 0x10 == 0
}

impl RxRing {
    fn repost(&mut self, id: u16) {
        self.vq.push(id);
    }
}

impl TxRing {
    fn reclaim(&mut self) -> bool {
        let mut any = false;
        while let Some((id, _)) = self.vq.pop_used() {
            if (id as usize) < self.vq.size() as usize {
                self.free.push(id as u16);
            }
            any = true;
        }
        any
    }
}

impl Net {
    /// Initialises the device at `base`: features, queues, all RX buffers posted.
    pub fn new(base: u64) -> Result<Self, &'static str> {
        let mmio = Mmio::probe(base, VIRTIO_ID_NET)?;
        let features = mmio.negotiate(F_VERSION_1 | F_MAC | F_EVENT_IDX)?;
        let event_idx = features & F_EVENT_IDX != 0;
        let mut config_mac = [0u8; 6];
        if features & F_MAC != 0 {
            mmio.config_bytes(0, &mut config_mac);
        }
        let mut rxq = mmio.queue(0, QUEUE_MAX, event_idx)?;
        let mut txq = mmio.queue(1, QUEUE_MAX, event_idx)?;
        let rx_bufs = dma_alloc(rxq.size() as usize * BUF)?;
        let tx_bufs = dma_alloc(txq.size() as usize * BUF)?;
        for i in 0..rxq.size() {
            rxq.set_desc(
                i,
                rx_bufs as u64 + i as u64 * BUF as u64,
                BUF as u32,
                DESC_WRITE,
                0,
            );
            rxq.push(i);
        }
        for i in 0..txq.size() {
            txq.set_desc(i, tx_bufs as u64 + i as u64 * BUF as u64, 0, 0, 0);
        }
        let free = (0..txq.size()).rev().collect();
        mmio.driver_ok();
        let mut net = Self {
            rx: RxRing {
                vq: rxq,
                bufs: rx_bufs,
                frames: 0,
            },
            tx: TxRing {
                vq: txq,
                bufs: tx_bufs,
                free,
                frames: 0,
                scratch: Vec::new(),
            },
            config_mac,
            activity: false,
            seen: (0, 0),
            syn_budget: None,
            syns_dropped: 0,
        };
        net.kick();
        Ok(net)
    }

    /// Sends pending notifications (new RX buffers, new TX frames).
    pub fn kick(&mut self) {
        self.rx.vq.kick();
        self.tx.vq.kick();
    }

    /// Takes back sent buffers. True if any came back.
    pub fn reclaim(&mut self) -> bool {
        let any = self.tx.reclaim();
        self.activity |= any;
        any
    }

    /// True (once) if frames were received or sent since the last call.
    pub fn take_activity(&mut self) -> bool {
        let now = (self.rx.frames, self.tx.frames);
        let moved = now != self.seen;
        self.seen = now;
        core::mem::take(&mut self.activity) || moved
    }

    /// Re-arms used-buffer events before sleeping; true if something is already there.
    pub fn arm(&mut self) -> bool {
        let rx = self.rx.vq.arm();
        let tx = self.tx.vq.arm();
        rx || tx
    }

    /// Frames received, frames sent, notifications sent, SYNs dropped.
    pub fn stats(&self) -> [u64; 4] {
        [
            self.rx.frames,
            self.tx.frames,
            self.rx.vq.notifies + self.tx.vq.notifies,
            self.syns_dropped,
        ]
    }
}

/// A received frame, lent to smoltcp; its buffer goes back to the device when dropped.
pub struct RxTok<'a> {
    rx: &'a mut RxRing,
    id: u16,
    len: usize,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        // SAFETY: buffer `id` belongs to us (the device returned it and it is not reposted
        // before this token is dropped); len <= BUF was checked.
        let frame = unsafe {
            core::slice::from_raw_parts(self.rx.bufs.add(self.id as usize * BUF + HDR), self.len)
        };
        f(frame)
    }
}

impl Drop for RxTok<'_> {
    fn drop(&mut self) {
        self.rx.repost(self.id);
    }
}

/// Permission to send one frame.
pub struct TxTok<'a> {
    tx: &'a mut TxRing,
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let tx = self.tx;
        let id = match tx.free.pop() {
            Some(id) if len <= BUF - HDR => id,
            other => {
                // No buffer (or an impossible length): build the frame and drop it, as a
                // lossy link would.
                if let Some(id) = other {
                    tx.free.push(id);
                }
                tx.scratch.resize(len, 0);
                return f(&mut tx.scratch);
            }
        };
        // SAFETY: buffer `id` is free (not owned by the device); HDR + len <= BUF.
        let buf =
            unsafe { core::slice::from_raw_parts_mut(tx.bufs.add(id as usize * BUF), HDR + len) };
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..]);
        tx.vq.set_desc_len(id, (HDR + len) as u32);
        tx.vq.push(id);
        tx.frames += 1;
        if tx.free.is_empty() {
            // Out of buffers: let the device start on these now.
            tx.vq.kick();
        }
        r
    }
}

impl phy::Device for Net {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        self.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        loop {
            let (id, len) = self.rx.vq.pop_used()?;
            let (id, len) = (id as usize, len as usize);
            if id >= self.rx.vq.size() as usize {
                continue;
            }
            if !(HDR..=BUF).contains(&len) || len - HDR > MAX_FRAME + 4 {
                self.rx.repost(id as u16);
                continue;
            }
            self.rx.frames += 1;
            if let Some((port, budget)) = self.syn_budget.as_mut() {
                // SAFETY: buffer `id` was just returned by the device and is ours until reposted.
                let frame = unsafe {
                    core::slice::from_raw_parts(self.rx.bufs.add(id * BUF + HDR), len - HDR)
                };
                if is_syn_to(frame, *port) {
                    if *budget == 0 {
                        self.syns_dropped += 1;
                        self.rx.repost(id as u16);
                        continue;
                    }
                    *budget -= 1;
                }
            }
            return Some((
                RxTok {
                    rx: &mut self.rx,
                    id: id as u16,
                    len: len - HDR,
                },
                TxTok { tx: &mut self.tx },
            ));
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxTok<'_>> {
        if self.tx.free.is_empty() {
            self.reclaim();
        }
        if self.tx.free.is_empty() {
            return None;
        }
        Some(TxTok { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = None;
        caps
    }
}
