//! Boot: the CPL 3 reference guest (ELF, page tables, GDT, boot info, first registers) and the
//! Linux 64-bit boot protocol ([`linux`]).
//!
//! The layout is the contract in [`ftvm_guest_abi`]; this module is its VMM side.

pub mod elf;
pub mod linux;
pub mod regs;
pub mod tables;

use std::net::Ipv4Addr;
use std::path::Path;

use ftvm_guest_abi::{BootInfo, BOOT_INFO_GPA};
use vm_memory::{Bytes, GuestAddress};

pub use elf::{GuestLoadError, LoadedImage};
pub use regs::{configure_vcpu, EntryPoint, VcpuBootError};

use crate::memory::GuestMemory;

/// What the operator tells the guest through [`BootInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootParams {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Prefix length of `ipv4`.
    pub ipv4_prefix_len: u8,
    /// Default gateway, if any.
    pub ipv4_gateway: Option<Ipv4Addr>,
    /// TCP port of the key-value server.
    pub kv_port: u16,
    /// Benchmark load: pages to dirty per millisecond while idle (0 = off).
    pub dirty_pages_per_ms: u32,
    /// Benchmark load: size of the region the load cycles through, in 4 KiB pages.
    pub dirty_region_pages: u32,
}

impl Default for BootParams {
    fn default() -> Self {
        Self {
            mac: [0x02, 0x46, 0x54, 0, 0, 2],
            ipv4: Ipv4Addr::UNSPECIFIED,
            ipv4_prefix_len: 0,
            ipv4_gateway: None,
            kv_port: 6379,
            dirty_pages_per_ms: 0,
            dirty_region_pages: 0,
        }
    }
}

/// Why the boot tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootSetupError {
    /// The guest image did not load.
    #[error(transparent)]
    Load(#[from] GuestLoadError),
    /// Writing page tables, GDT or boot info into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// The base addresses of the virtio-mmio devices the guest should drive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceAddrs {
    /// virtio-net, if any.
    pub net: Option<u64>,
    /// virtio-blk, if any.
    pub block: Option<u64>,
}

/// Loads the guest ELF into fresh memory and writes the page tables, GDT and TSS.
/// The boot info comes later ([`write_boot_info`]): it needs the TSC frequency and the device
/// addresses.
pub fn load_guest(
    mem: &GuestMemory,
    mem_size: u64,
    elf: &Path,
) -> Result<LoadedImage, BootSetupError> {
    let image = elf::load_elf_file(mem, mem_size, elf)?;
    write_tables(mem)?;
    Ok(image)
}

/// Writes the page tables, GDT and TSS.
pub fn write_tables(mem: &GuestMemory) -> Result<(), BootSetupError> {
    tables::write_page_tables(mem).map_err(|e| BootSetupError::Write("page tables", e))?;
    tables::write_gdt_and_tss(mem).map_err(|e| BootSetupError::Write("GDT", e))?;
    Ok(())
}

/// The boot info for a guest `image` in `mem_size` bytes of RAM.
pub fn boot_info(
    params: &BootParams,
    mem_size: u64,
    image: &LoadedImage,
    vcpus: u32,
    tsc_khz: u32,
    devices: DeviceAddrs,
) -> BootInfo {
    let mut bi = BootInfo::empty();
    bi.vcpus = vcpus;
    bi.mem_size = mem_size;
    bi.heap_start = image.heap_start;
    bi.heap_end = elf::heap_end(mem_size);
    bi.stack_top = mem_size;
    bi.tsc_khz = u64::from(tsc_khz);
    bi.virtio_net_base = devices.net.unwrap_or(0);
    bi.virtio_blk_base = devices.block.unwrap_or(0);
    bi.mac = params.mac;
    bi.ipv4_prefix_len = params.ipv4_prefix_len;
    bi.ipv4 = params.ipv4.octets();
    bi.ipv4_gateway = params.ipv4_gateway.map_or([0; 4], |g| g.octets());
    bi.kv_port = params.kv_port;
    bi.dirty_pages_per_ms = params.dirty_pages_per_ms;
    bi.dirty_region_pages = params.dirty_region_pages;
    bi
}

/// Writes `info` at [`BOOT_INFO_GPA`].
pub fn write_boot_info(mem: &GuestMemory, info: &BootInfo) -> Result<(), BootSetupError> {
    mem.write_slice(info.as_bytes(), GuestAddress(BOOT_INFO_GPA))
        .map_err(|e| BootSetupError::Write("boot info", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_guest_abi::{GUEST_LOAD_GPA, STACK_SIZE};

    #[test]
    fn boot_info_follows_the_contract() {
        let image = LoadedImage {
            entry: GUEST_LOAD_GPA,
            start: GUEST_LOAD_GPA,
            end: GUEST_LOAD_GPA + 0x1234,
            heap_start: GUEST_LOAD_GPA + (2 << 20),
        };
        let params = BootParams {
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            ipv4_prefix_len: 24,
            ipv4_gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        };
        let bi = boot_info(
            &params,
            64 << 20,
            &image,
            1,
            2_000_000,
            DeviceAddrs {
                net: Some(0xd000_0000),
                block: None,
            },
        );
        assert!(bi.is_valid());
        assert_eq!(bi.stack_top, 64 << 20);
        assert_eq!(bi.heap_end, (64 << 20) - STACK_SIZE);
        assert_eq!(bi.heap_start, 4 << 20);
        assert_eq!(bi.ipv4, [10, 0, 0, 2]);
        assert_eq!(bi.ipv4_gateway, [10, 0, 0, 1]);
        assert_eq!(bi.virtio_net_base, 0xd000_0000);
        assert_eq!(bi.virtio_blk_base, 0);
        assert_eq!(bi.tsc_khz, 2_000_000);
    }
}
