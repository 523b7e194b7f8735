//! The MMIO bus: which device answers a guest physical address.

use std::sync::{Arc, Mutex};

/// A device reachable through MMIO exits. `offset` is relative to the device's base.
pub trait MmioDevice: Send {
    /// Guest load of `data.len()` bytes (1, 2, 4 or 8).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest store of `data.len()` bytes (1, 2, 4 or 8).
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// One device's window on the bus.
struct Slot {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// Address ranges mapped to devices. Built once at VM creation, then only read.
#[derive(Default)]
pub struct MmioBus {
    slots: Vec<Slot>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.slots.iter().map(|s| (s.base, s.len)).collect();
        f.debug_struct("MmioBus").field("ranges", &ranges).finish()
    }
}

/// A device window that overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("MMIO range {base:#x}+{len:#x} overlaps a device already on the bus")]
pub struct BusOverlapError {
    /// Base of the refused range.
    pub base: u64,
    /// Length of the refused range.
    pub len: u64,
}

impl MmioBus {
    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), BusOverlapError> {
        let end = base.checked_add(len).ok_or(BusOverlapError { base, len })?;
        if len == 0 || self.slots.iter().any(|s| base < s.base + s.len && s.base < end) {
            return Err(BusOverlapError { base, len });
        }
        self.slots.push(Slot { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Slot, u64)> {
        self.slots.iter().find_map(|s| {
            let offset = addr.checked_sub(s.base)?;
            (offset + size as u64 <= s.len).then_some((s, offset))
        })
    }

    /// Dispatches a guest load. Returns false when no device covers the access (the caller
    /// decides what an access to nothing means; the data is left untouched).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                lock(&slot.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest store. Returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                lock(&slot.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on after a panic in another holder: device models keep their state
/// consistent between register accesses, so a poisoned lock holds nothing half-written.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u32);
    impl MmioDevice for Reg {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.0.to_le_bytes()[..data.len()]);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            let mut b = [0u8; 4];
            b[..data.len()].copy_from_slice(data);
            self.0 = u32::from_le_bytes(b);
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlap() {
        let mut bus = MmioBus::default();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Reg(7)))).unwrap();
        assert!(bus.insert(0x10f0, 0x100, Arc::new(Mutex::new(Reg(0)))).is_err());
        let mut out = [0u8; 4];
        assert!(bus.read(0x1004, &mut out));
        assert_eq!(u32::from_le_bytes(out), 7);
        assert!(bus.write(0x1000, &9u32.to_le_bytes()));
        assert!(bus.read(0x1000, &mut out));
        assert_eq!(u32::from_le_bytes(out), 9);
        assert!(!bus.read(0x2000, &mut out));
        // An access that runs off the end of the window is not the device's.
        assert!(!bus.read(0x10fe, &mut out));
    }
}
