//! ftvm-vmm: the machine. KVM VM and vCPUs, guest memory with a VMM-side dirty bitmap, boot of the
//! CPL 3 reference guest, and virtio-mmio devices.
//!
//! Module owners: `memory` (guest memory and the VMM dirty bitmap), `wake` (idle-guest wake-ups),
//! `devices` (the MMIO bus and every device model).

pub mod devices;
pub mod memory;
pub mod wake;
