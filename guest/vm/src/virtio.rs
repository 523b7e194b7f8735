//! virtio 1.x over MMIO ("version 2" registers) and split virtqueues, polled (no interrupts).
//!
//! Memory is identity mapped, so a pointer is the address the device uses. Each register access
//! is a VM exit (about 20 µs here), so the hot path touches only `QueueNotify`, and only when the
//! device asked for a notification (`VIRTIO_F_EVENT_IDX`, with wrap-around-safe index maths), at
//! most once per queue per main-loop iteration.

use alloc::alloc::{alloc_zeroed, Layout};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

/// Descriptor flag: continues in `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;

/// Allocates zeroed, page-aligned memory that lives for the rest of the program (DMA memory:
/// identity mapped, so its address is also the device's).
pub fn dma_alloc(size: usize) -> Result<*mut u8, &'static str> {
    let layout = Layout::from_size_align(size.max(1), 4096).map_err(|_| "bad DMA layout")?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        return Err("out of memory for DMA buffers");
    }
    Ok(p)
}

/// A virtio-mmio device's register window.
#[derive(Debug)]
pub struct Mmio {
    base: usize,
}

impl Mmio {
    fn read(&self, off: usize) -> u32 {
        // SAFETY: `base` is the device window the VMM named in BootInfo (identity mapped MMIO);
        // `off` is a register inside it; aligned 32-bit access as the spec requires.
        unsafe { read_volatile((self.base + off) as *const u32) }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.base + off) as *mut u32, v) }
    }

    /// Checks the magic, the version (2) and the device type.
    pub fn probe(base: u64, device_id: u32) -> Result<Self, &'static str> {
        let m = Self {
            base: base as usize,
        };
        if m.read(MAGIC) != 0x7472_6976 {
            return Err("no virtio-mmio magic at the device base");
        }
        if m.read(VERSION) != 2 {
            return Err("virtio-mmio version is not 2 (virtio 1.x)");
        }
        if m.read(DEVICE_ID) != device_id {
            return Err("unexpected virtio device type");
        }
        Ok(m)
    }

    /// Resets the device and negotiates `wanted` (which must be offered to include VERSION_1).
    /// Returns the accepted features.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, &'static str> {
        self.write(STATUS, 0);
        while self.read(STATUS) != 0 {
            core::hint::spin_loop();
        }
        self.write(STATUS, S_ACKNOWLEDGE);
        self.write(STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let lo = self.read(DEVICE_FEATURES) as u64;
        self.write(DEVICE_FEATURES_SEL, 1);
        let hi = self.read(DEVICE_FEATURES) as u64;
        let offered = lo | (hi << 32);
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let accepted = offered & wanted;
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, accepted as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (accepted >> 32) as u32);
        self.write(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.read(STATUS) & S_FEATURES_OK == 0 {
            self.fail();
            return Err("device refused our features");
        }
        Ok(accepted)
    }

    /// Sets up queue `idx` with at most `max` entries (a power of two no larger than the
    /// device's maximum).
    pub fn queue(&self, idx: u16, max: u16, event_idx: bool) -> Result<Vq, &'static str> {
        self.write(QUEUE_SEL, idx as u32);
        if self.read(QUEUE_READY) != 0 {
            return Err("queue already in use");
        }
        let dev_max = self.read(QUEUE_NUM_MAX);
        if dev_max == 0 {
            return Err("queue not available");
        }
        let mut size = (dev_max.min(max as u32)) as u16;
        // Split virtqueues use power-of-two sizes.
        size = 1 << (15 - size.leading_zeros());
        let vq = Vq::new(size, idx, self.base + QUEUE_NOTIFY, event_idx)?;
        self.write(QUEUE_NUM, size as u32);
        let (d, a, u) = (vq.desc as u64, vq.avail as u64, vq.used as u64);
        self.write(QUEUE_DESC_LOW, d as u32);
        self.write(QUEUE_DESC_HIGH, (d >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, a as u32);
        self.write(QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, u as u32);
        self.write(QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        self.write(QUEUE_READY, 1);
        Ok(vq)
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) {
        self.write(
            STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    fn fail(&self) {
        self.write(STATUS, self.read(STATUS) | S_FAILED);
    }

    /// Reads `out.len()` bytes of device config at `off`, consistently (retried across a
    /// config-generation change). Byte accesses, which every device model supports.
    pub fn config_bytes(&self, off: usize, out: &mut [u8]) {
        loop {
            let gen = self.read(CONFIG_GENERATION);
            for (i, b) in out.iter_mut().enumerate() {
                // SAFETY: as in `read`, a byte-wide config access.
                *b = unsafe { read_volatile((self.base + CONFIG + off + i) as *const u8) };
            }
            if self.read(CONFIG_GENERATION) == gen {
                return;
            }
        }
    }

    /// Reads a little-endian u32 of device config at `off` (4-byte aligned).
    pub fn config_u32(&self, off: usize) -> u32 {
        self.read(CONFIG + off)
    }

    /// Reads the config generation counter.
    pub fn config_generation(&self) -> u32 {
        self.read(CONFIG_GENERATION)
    }
}

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// `vring_need_event`: has `new` moved past `event` since `old` (all mod 2^16)?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A split virtqueue. Descriptor chains are laid out by the device drivers (fixed per buffer);
/// this type handles the rings and notifications.
#[derive(Debug)]
pub struct Vq {
    size: u16,
    idx: u16,
    desc: *mut Desc,
    /// avail ring: flags u16, idx u16, ring[size] u16, used_event u16.
    avail: *mut u16,
    /// used ring: flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16.
    used: *mut u8,
    notify: usize,
    event_idx: bool,
    avail_idx: u16,
    last_used: u16,
    /// `avail_idx` when we last decided whether to notify.
    kicked: u16,
    /// Notifications sent (VM exits), for statistics.
    pub notifies: u64,
}

impl Vq {
    fn new(size: u16, idx: u16, notify: usize, event_idx: bool) -> Result<Self, &'static str> {
        let n = size as usize;
        let desc_bytes = 16 * n;
        let avail_bytes = 6 + 2 * n;
        let used_off = (desc_bytes + avail_bytes).div_ceil(4096) * 4096;
        let used_bytes = 6 + 8 * n;
        let mem = dma_alloc(used_off + used_bytes)?;
        Ok(Self {
            size,
            idx,
            desc: mem as *mut Desc,
            // SAFETY: offsets inside the allocation just made.
            avail: unsafe { mem.add(desc_bytes) } as *mut u16,
            // SAFETY: as above.
            used: unsafe { mem.add(used_off) },
            notify,
            event_idx,
            avail_idx: 0,
            last_used: 0,
            kicked: 0,
            notifies: 0,
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size);
        // SAFETY: i < size: inside the descriptor table, which only the driver writes.
        unsafe {
            write_volatile(
                self.desc.add(i as usize),
                Desc {
                    addr,
                    len,
                    flags,
                    next,
                },
            )
        }
    }

    /// Sets only the length of descriptor `i`.
    pub fn set_desc_len(&mut self, i: u16, len: u32) {
        assert!(i < self.size);
        // SAFETY: as in `set_desc`.
        unsafe {
            write_volatile(
                core::ptr::addr_of_mut!((*self.desc.add(i as usize)).len),
                len,
            )
        }
    }

    /// Makes the chain starting at `head` available to the device (no notification yet).
    pub fn push(&mut self, head: u16) {
        let slot = (self.avail_idx % self.size) as usize;
        // SAFETY: slot < size: inside the avail ring.
        unsafe { write_volatile(self.avail.add(2 + slot), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptor and ring entry must be visible before the index (a compiler barrier on
        // x86, whose stores are not reordered with each other).
        fence(Ordering::Release);
        // SAFETY: the avail idx field.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
    }

    /// Notifies the device of new available buffers, if it wants to be told.
    pub fn kick(&mut self) {
        if self.avail_idx == self.kicked {
            return;
        }
        // The avail idx store must be visible before we read the device's avail_event (a
        // store-load ordering: mfence).
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            // SAFETY: avail_event follows the used ring's `size` elements.
            let event =
                unsafe { read_volatile(self.used.add(4 + 8 * self.size as usize) as *const u16) };
            need_event(event, self.avail_idx, self.kicked)
        } else {
            // SAFETY: the used ring's flags; bit 0 = VIRTQ_USED_F_NO_NOTIFY.
            unsafe { read_volatile(self.used as *const u16) & 1 == 0 }
        };
        self.kicked = self.avail_idx;
        if notify {
            self.notifies += 1;
            // SAFETY: the QueueNotify register of this device.
            unsafe { write_volatile(self.notify as *mut u32, self.idx as u32) };
        }
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring's idx field, written by the device.
        unsafe { read_volatile(self.used.add(2) as *const u16) }
    }

    /// True if the device has returned buffers we have not taken yet.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next used element: (head descriptor id, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        // Read the element only after seeing the index (a compiler barrier on x86).
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: slot < size: inside the used ring.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot);
            (
                read_volatile(e as *const u32),
                read_volatile(e.add(4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Asks the device to signal the next used buffer (used_event = what we have consumed);
    /// returns true if buffers are already waiting (then do not sleep).
    pub fn arm(&mut self) -> bool {
        if self.event_idx {
            // SAFETY: used_event follows the avail ring's `size` elements.
            unsafe { write_volatile(self.avail.add(2 + self.size as usize), self.last_used) };
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn need_event_wraps() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 5, 0));
        assert!(need_event(65535, 3, 65530));
        assert!(need_event(65534, 0, 65534));
        assert!(!need_event(10, 3, 65530));
    }
}
