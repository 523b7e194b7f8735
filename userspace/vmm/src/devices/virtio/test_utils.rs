//! Test helpers: a small guest memory and a driver-side split queue writer, so tests can play
//! the guest driver (descriptor table, avail ring) and read back what the device did (used ring).

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::bus::MmioDevice;
use crate::memory::GuestMemory;

/// 1 MiB of guest memory starting at 0, with a dirty bitmap.
pub(crate) fn test_memory() -> GuestMemory {
    vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

/// [`test_memory`] that lives for the rest of the test process, for rigs that keep a
/// [`TestQueue`] next to the device.
pub(crate) fn leaked_memory() -> &'static GuestMemory {
    Box::leak(Box::new(test_memory()))
}

/// A second guest memory with the same contents (the backup's copy, in restore tests).
pub(crate) fn copy_memory(mem: &GuestMemory) -> &'static GuestMemory {
    let copy = leaked_memory();
    let mut bytes = vec![0u8; 1 << 20];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    copy.write_slice(&bytes, GuestAddress(0)).unwrap();
    clear_dirty(copy);
    copy
}

/// True when any page is marked dirty in the VMM bitmap.
pub(crate) fn any_dirty(mem: &GuestMemory) -> bool {
    (0..1u64 << 20).step_by(4096).any(|a| is_dirty(mem, a))
}

/// Clears the VMM dirty bitmap, as a checkpoint harvest would.
pub(crate) fn clear_dirty(mem: &GuestMemory) {
    for region in mem.iter() {
        // The region's own AtomicBitmap (MmapRegion::bitmap), not the trait's slice view.
        std::ops::Deref::deref(region).bitmap().reset();
    }
}

/// True when the page holding `addr` is marked dirty in the VMM bitmap.
pub(crate) fn is_dirty(mem: &GuestMemory, addr: u64) -> bool {
    use vm_memory::bitmap::Bitmap;
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    let offset = addr - region.start_addr().0;
    region.bitmap().dirty_at(usize::try_from(offset).unwrap())
}

/// The driver's side of one split virtqueue. Layout from `base`: descriptor table, avail ring
/// right after it, used ring on the second page after `base` (so tests can tell the pages apart).
/// A clone is the same driver-side position (for a restored device on the same memory).
#[derive(Clone)]
pub(crate) struct TestQueue<'a> {
    mem: &'a GuestMemory,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> TestQueue<'a> {
    pub(crate) fn new(mem: &'a GuestMemory, base: u64, size: u16) -> Self {
        assert!(size <= 256);
        let desc = base;
        let avail = base + 16 * u64::from(size);
        let used = base + 0x2000;
        // Zero the rings, as a driver allocating them would.
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        Self { mem, size, desc, avail, used, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    /// The same driver position over another memory (a copy made by [`copy_memory`]).
    pub(crate) fn on<'b>(&self, mem: &'b GuestMemory) -> TestQueue<'b> {
        TestQueue {
            mem,
            size: self.size,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
            next_desc: self.next_desc,
            avail_idx: self.avail_idx,
            used_seen: self.used_seen,
        }
    }

    /// A device-side queue configured for this layout, enabled.
    pub(crate) fn queue(&self) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` as is.
    pub(crate) fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Makes chain `head` available and bumps the avail index.
    pub(crate) fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(self.avail_idx.to_le(), GuestAddress(self.avail + 2), Ordering::Release)
            .unwrap();
    }

    /// Writes a chain of `(addr, len, writable)` descriptors into fresh table slots and publishes
    /// it. Returns the head index.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.set_desc(index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// The device's used index.
    pub(crate) fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.load(GuestAddress(self.used + 2), Ordering::Acquire).unwrap())
    }

    /// The next used element `(id, len)` the driver has not seen yet.
    pub(crate) fn next_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let at = self.used + 4 + 8 * slot;
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }

    /// The used ring's flags (bit 0 = VRING_USED_F_NO_NOTIFY).
    pub(crate) fn used_flags(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used)).unwrap())
    }

    /// The device's `avail_event` (EVENT_IDX).
    pub(crate) fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
    }

    /// Sets the driver's `used_event` (EVENT_IDX).
    pub(crate) fn set_used_event(&self, value: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(value.to_le(), GuestAddress(at)).unwrap();
    }

    /// Programs this queue into a virtio-mmio transport as queue `index`, and enables it.
    pub(crate) fn program(&self, dev: &mut dyn MmioDevice, index: u32) {
        use virtio_bindings::virtio_mmio::*;
        w32(dev, VIRTIO_MMIO_QUEUE_SEL, index);
        assert!(r32(dev, VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(self.size));
        self.program_unchecked(dev, index);
    }

    /// [`Self::program`] without checking the queue exists (for fuzzing).
    pub(crate) fn program_unchecked(&self, dev: &mut dyn MmioDevice, index: u32) {
        use virtio_bindings::virtio_mmio::*;
        w32(dev, VIRTIO_MMIO_QUEUE_SEL, index);
        w32(dev, VIRTIO_MMIO_QUEUE_NUM, u32::from(self.size));
        w32(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, self.desc as u32);
        w32(dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, (self.desc >> 32) as u32);
        w32(dev, VIRTIO_MMIO_QUEUE_AVAIL_LOW, self.avail as u32);
        w32(dev, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (self.avail >> 32) as u32);
        w32(dev, VIRTIO_MMIO_QUEUE_USED_LOW, self.used as u32);
        w32(dev, VIRTIO_MMIO_QUEUE_USED_HIGH, (self.used >> 32) as u32);
        w32(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    }
}

/// A 32-bit register read.
pub(crate) fn r32(dev: &mut dyn MmioDevice, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

/// A 32-bit register write.
pub(crate) fn w32(dev: &mut dyn MmioDevice, offset: u32, value: u32) {
    dev.write(u64::from(offset), &value.to_le_bytes());
}

/// The driver side of virtio initialisation, as virtio-drivers' `begin_init` does it: reset,
/// ACKNOWLEDGE|DRIVER in one write, read features, write `accept & offered`, FEATURES_OK.
/// Returns the negotiated features; panics if the device refused FEATURES_OK.
pub(crate) fn negotiate(dev: &mut dyn MmioDevice, accept: u64) -> u64 {
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_mmio::*;
    w32(dev, VIRTIO_MMIO_STATUS, 0);
    w32(dev, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    w32(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let mut offered = u64::from(r32(dev, VIRTIO_MMIO_DEVICE_FEATURES));
    w32(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= u64::from(r32(dev, VIRTIO_MMIO_DEVICE_FEATURES)) << 32;
    let features = offered & accept;
    w32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w32(dev, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    w32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(dev, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    w32(dev, VIRTIO_MMIO_STATUS, status);
    assert_eq!(r32(dev, VIRTIO_MMIO_STATUS), status, "device refused the features");
    features
}

/// Sets DRIVER_OK after [`negotiate`] and the queue set-up.
pub(crate) fn driver_ok(dev: &mut dyn MmioDevice) {
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_mmio::*;
    let status = r32(dev, VIRTIO_MMIO_STATUS);
    w32(dev, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
}

/// Polls `fd` for readability for up to `ms` milliseconds.
pub(crate) fn wait_readable(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: `pfd` is one valid pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1
}

/// A device under test for [`suspendable_tests!`]: something that runs, pauses, saves and is
/// rebuilt from its state (crosvm's `suspendable_tests!` idea, on our `Persist`).
pub(crate) trait SuspendableRig: Sized {
    /// Everything the rig saves (transport and device).
    type State: Clone + PartialEq + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned;

    /// An activated device with its queues set up.
    fn new_running() -> Self;
    /// Pauses the device.
    fn pause(&mut self);
    /// Resumes the device.
    fn resume(&mut self);
    /// Saves its state.
    fn save(&self) -> Self::State;
    /// A new device restored from `state`, on the same guest memory and driver.
    fn restore_from(&self, state: &Self::State) -> Self;
    /// Driver work that changes the device's state: a notification that consumes a descriptor.
    fn mutate(&mut self);
}

/// The checks every saveable device gets: pause is idempotent, save→restore→save gives the
/// same state (also through serde), a queue notification changes the state, and a restored
/// device keeps working.
macro_rules! suspendable_tests {
    ($name:ident, $rig:ty) => {
        mod $name {
            // The caller's module has the rig and `SuspendableRig` in scope.
            use super::*;

            type State = <$rig as $crate::devices::virtio::test_utils::SuspendableRig>::State;

            #[test]
            fn pause_is_idempotent() {
                let mut rig = <$rig>::new_running();
                rig.mutate();
                rig.pause();
                let first = rig.save();
                rig.pause();
                assert_eq!(rig.save(), first);
                rig.resume();
                rig.resume();
                assert_eq!(rig.save(), first, "resume alone changes nothing");
                rig.mutate();
                assert_ne!(rig.save(), first, "the device works after pause/resume");
            }

            #[test]
            fn save_restore_round_trips() {
                let mut rig = <$rig>::new_running();
                rig.mutate();
                rig.pause();
                let state = rig.save();
                let restored = rig.restore_from(&state);
                assert_eq!(restored.save(), state);
                let json = serde_json::to_string(&state).unwrap();
                let back: State = serde_json::from_str(&json).unwrap();
                assert_eq!(back, state);
                assert_eq!(rig.restore_from(&back).save(), state);
            }

            #[test]
            fn mutation_changes_state() {
                let mut rig = <$rig>::new_running();
                let before = rig.save();
                rig.mutate();
                assert_ne!(rig.save(), before);
            }

            #[test]
            fn restored_device_keeps_working() {
                let mut rig = <$rig>::new_running();
                rig.mutate();
                rig.pause();
                let state = rig.save();
                let mut restored = rig.restore_from(&state);
                restored.mutate();
                assert_ne!(restored.save(), state);
            }
        }
    };
}
pub(crate) use suspendable_tests;

/// A network backend made of two frame queues shared with the test: frames pushed on `to_guest`
/// are received by the device, frames the device sends land in `from_guest`. Its output (for the
/// TX hold) is a clone of itself.
#[derive(Debug, Default, Clone)]
pub(crate) struct LoopBackend {
    pub(crate) to_guest: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Vec<u8>>>>,
    pub(crate) from_guest: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl crate::devices::virtio::net::handler::FrameSink for LoopBackend {
    fn send_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.from_guest.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

impl crate::devices::virtio::net::handler::FrameSource for LoopBackend {
    fn recv_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let f = self.to_guest.lock().unwrap().pop_front().ok_or(std::io::ErrorKind::WouldBlock)?;
        buf[..f.len()].copy_from_slice(&f);
        Ok(f.len())
    }
}

impl crate::devices::virtio::net::NetBackend for LoopBackend {
    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    fn output(&self) -> std::io::Result<Box<dyn crate::devices::virtio::net::handler::FrameSink + Send>> {
        Ok(Box::new(self.clone()))
    }
}
