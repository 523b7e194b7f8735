//! virtio-blk driver: asynchronous read / write / flush requests, polled.
//!
//! Request slot `s` owns descriptors `3s` (header), `3s + 1` (data) and `3s + 2` (status), so a
//! used element's id names its slot directly, and completions may come in any order.

use crate::virtio::{dma_alloc, Mmio, Vq, DESC_NEXT, DESC_WRITE, F_EVENT_IDX, F_VERSION_1};

const VIRTIO_ID_BLOCK: u32 = 2;
const F_FLUSH: u64 = 1 << 9;
const F_RO: u64 = 1 << 5;
const QUEUE_MAX: u16 = 64;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// Status byte value meaning success.
const S_OK: u8 = 0;
/// Initial status byte value (not one the device writes), to detect a missing status.
const S_UNSET: u8 = 0xff;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read sectors into the buffer.
    Read,
    /// Write the buffer to sectors.
    Write,
    /// Make completed writes durable.
    Flush,
}

/// Per-slot header and status, in DMA memory.
#[repr(C)]
struct ReqMem {
    kind: u32,
    reserved: u32,
    sector: u64,
    status: u8,
    _pad: [u8; 15],
}

/// The block device.
pub struct Blk {
    vq: Vq,
    reqs: *mut ReqMem,
    slots: usize,
    busy: u64,
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// The device supports FLUSH.
    pub flush: bool,
    /// The device is read-only.
    pub read_only: bool,
}

impl Blk {
    /// Initialises the device at `base`.
    pub fn new(base: u64) -> Result<Self, &'static str> {
        let mmio = Mmio::probe(base, VIRTIO_ID_BLOCK)?;
        let features = mmio.negotiate(F_VERSION_1 | F_FLUSH | F_RO | F_EVENT_IDX)?;
        let capacity = loop {
            let gen = mmio.config_generation();
            let c = mmio.config_u32(0) as u64 | ((mmio.config_u32(4) as u64) << 32);
            if mmio.config_generation() == gen {
                break c;
            }
        };
        let vq = mmio.queue(0, QUEUE_MAX, features & F_EVENT_IDX != 0)?;
        let slots = (vq.size() as usize / 3).min(64);
        if slots == 0 {
            return Err("block queue too small");
        }
        let reqs = dma_alloc(slots * core::mem::size_of::<ReqMem>())? as *mut ReqMem;
        mmio.driver_ok();
        Ok(Self {
            vq,
            reqs,
            slots,
            busy: 0,
            capacity,
            flush: features & F_FLUSH != 0,
            read_only: features & F_RO != 0,
        })
    }

    /// Starts a request; returns its slot, or `None` if every slot is busy. For `Read`/`Write`,
    /// `len` is a multiple of 512.
    ///
    /// # Safety
    /// `data` (`len` bytes) must stay valid, and untouched by anyone else, until the slot
    /// completes through [`Blk::poll`].
    pub unsafe fn submit(
        &mut self,
        kind: Kind,
        sector: u64,
        data: *mut u8,
        len: usize,
    ) -> Option<usize> {
        let slot = (0..self.slots).find(|s| self.busy & (1 << s) == 0)?;
        self.busy |= 1 << slot;
        // SAFETY: slot < slots: inside the request array; the device does not own this slot.
        let req = unsafe { &mut *self.reqs.add(slot) };
        req.kind = match kind {
            Kind::Read => T_IN,
            Kind::Write => T_OUT,
            Kind::Flush => T_FLUSH,
        };
        req.reserved = 0;
        req.sector = if kind == Kind::Flush { 0 } else { sector };
        req.status = S_UNSET;
        let head = (3 * slot) as u16;
        let req_addr = req as *mut ReqMem as u64;
        let status_addr = core::ptr::addr_of_mut!(req.status) as u64;
        if kind == Kind::Flush {
            self.vq.set_desc(head, req_addr, 16, DESC_NEXT, head + 2);
        } else {
            let flags = if kind == Kind::Read {
                DESC_WRITE | DESC_NEXT
            } else {
                DESC_NEXT
            };
            self.vq.set_desc(head, req_addr, 16, DESC_NEXT, head + 1);
            self.vq
                .set_desc(head + 1, data as u64, len as u32, flags, head + 2);
        }
        self.vq.set_desc(head + 2, status_addr, 1, DESC_WRITE, 0);
        self.vq.push(head);
        Some(slot)
    }

    /// Sends the notification for submitted requests.
    pub fn kick(&mut self) {
        self.vq.kick();
    }

    /// Takes one completion: (slot, success).
    pub fn poll(&mut self) -> Option<(usize, bool)> {
        loop {
            let (id, _) = self.vq.pop_used()?;
            let slot = id as usize / 3;
            if !(id as usize).is_multiple_of(3)
                || slot >= self.slots
                || self.busy & (1 << slot) == 0
            {
                continue;
            }
            self.busy &= !(1 << slot);
            // SAFETY: the device has returned the slot; its status byte is ours to read.
            let status = unsafe {
                core::ptr::read_volatile(core::ptr::addr_of!((*self.reqs.add(slot)).status))
            };
            return Some((slot, status == S_OK));
        }
    }

    /// Re-arms the used-buffer event before sleeping; true if something is already there.
    pub fn arm(&mut self) -> bool {
        self.vq.arm()
    }

    /// True when no request is in flight.
    pub fn idle(&self) -> bool {
        self.busy == 0
    }

    /// Runs one request to completion (boot time only), sleeping in the VMM while it runs.
    pub fn run(&mut self, kind: Kind, sector: u64, buf: &mut [u8]) -> Result<(), &'static str> {
        if !self.idle() {
            return Err("block device busy");
        }
        // SAFETY: `buf` outlives the request: we wait for its completion below.
        let slot = unsafe { self.submit(kind, sector, buf.as_mut_ptr(), buf.len()) }
            .ok_or("no request slot")?;
        self.kick();
        loop {
            if let Some((s, ok)) = self.poll() {
                if s == slot {
                    return if ok {
                        Ok(())
                    } else {
                        Err("block request failed")
                    };
                }
            }
            if !self.arm() {
                crate::rt::wait(10_000);
            }
        }
    }
}
