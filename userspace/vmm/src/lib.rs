//! ftvm-vmm: the machine. KVM VM and vCPUs, guest memory with a VMM-side dirty bitmap, boot of the
//! CPL 3 reference guest, and virtio-mmio devices.
//!
//! Module owners: `memory` (guest memory and the VMM dirty bitmap), `wake` (idle-guest wake-ups),
//! `devices` (the MMIO bus and every device model); `vm`, `vcpu`, `boot`, `cpuid` and `machine`
//! (the KVM VM, the vCPU state machine, guest loading and the assembly of the whole machine);
//! `dirty` (dirty-page trackers) and `state` (the machine state and its versioned container),
//! which the checkpoint engine uses through [`machine::CheckpointSource`].

pub mod boot;
pub mod compat;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod machine;
pub mod memory;
pub mod state;
pub mod uffd;
pub mod vcpu;
pub mod vm;
pub mod wake;
