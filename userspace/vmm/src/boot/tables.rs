//! The guest's page tables, GDT and TSS, written by the VMM before the first instruction.

use ftvm_guest_abi::{BOOT_INFO_GPA, PAGE_TABLES_GPA};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::memory::GuestMemory;

const PAGE: u64 = 0x1000;
/// PML4 at [`PAGE_TABLES_GPA`], then the PDPT.
pub const PDPT_GPA: u64 = PAGE_TABLES_GPA + PAGE;
/// Four page directories (4 GiB of 2 MiB pages) follow the PDPT.
pub const PD_GPA: u64 = PAGE_TABLES_GPA + 2 * PAGE;
/// Page directories written: one per GiB.
pub const PD_COUNT: u64 = 4;
/// The GDT page: just after the page tables, before the boot info.
pub const GDT_GPA: u64 = PD_GPA + PD_COUNT * PAGE;
/// The 64-bit TSS with its I/O permission bitmap: in the VMM-owned low pages after the boot
/// info (it is larger than a page).
pub const TSS_GPA: u64 = BOOT_INFO_GPA + PAGE;
/// Size of the 64-bit TSS proper; the I/O permission bitmap starts right after it.
pub const TSS_BASE_SIZE: u64 = 104;
/// One bit per port, 65536 ports.
pub const IO_BITMAP_SIZE: u64 = 65536 / 8;
/// TSS limit (offset of its last byte): the bitmap is followed by the 0xff byte the CPU expects.
pub const TSS_LIMIT: u64 = TSS_BASE_SIZE + IO_BITMAP_SIZE;

const _: () = assert!(GDT_GPA + PAGE <= BOOT_INFO_GPA);
const _: () = assert!(TSS_GPA + TSS_LIMIT < ftvm_guest_abi::GUEST_LOAD_GPA);

/// Present.
const PTE_P: u64 = 1 << 0;
/// Writable.
const PTE_RW: u64 = 1 << 1;
/// User: the guest runs at CPL 3, so every level must allow user access.
const PTE_US: u64 = 1 << 2;
/// Accessed.
const PTE_A: u64 = 1 << 5;
/// Dirty (leaf entries).
const PTE_D: u64 = 1 << 6;
/// Large page (2 MiB in a PD entry).
const PTE_PS: u64 = 1 << 7;

/// GDT selectors. User data comes before user code, the order SYSRET expects.
pub const SEL_KERNEL_CODE: u16 = 0x08;
/// CPL 0 data.
pub const SEL_KERNEL_DATA: u16 = 0x10;
/// CPL 3 data, RPL 3.
pub const SEL_USER_DATA: u16 = 0x18 | 3;
/// CPL 3 64-bit code, RPL 3.
pub const SEL_USER_CODE: u16 = 0x20 | 3;
/// The TSS (a 16-byte system descriptor, slots 5 and 6).
pub const SEL_TSS: u16 = 0x28;
/// GDT limit: seven 8-byte slots.
pub const GDT_LIMIT: u16 = 7 * 8 - 1;

/// Access byte and flags nibble of a descriptor: `0xF0AA` = flags F, access AA.
pub const fn descriptor(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// The GDT: null, CPL 0 code and data, CPL 3 data and code (64-bit), the TSS (two slots).
pub fn gdt() -> [u64; 7] {
    [
        0,
        descriptor(0xa09b, 0, 0xfffff), // CPL 0 code: P, S, exec/read, accessed; G, L
        descriptor(0xc093, 0, 0xfffff), // CPL 0 data: P, S, read/write, accessed; G, D/B
        descriptor(0xc0f3, 0, 0xfffff), // CPL 3 data: as above with DPL 3
        descriptor(0xa0fb, 0, 0xfffff), // CPL 3 code: as above with DPL 3
        descriptor(0x008b, TSS_GPA, TSS_LIMIT), // busy 64-bit TSS
        TSS_GPA >> 32,                  // upper half of the TSS base
    ]
}

/// Writes page tables at [`PAGE_TABLES_GPA`] that identity-map the first 4 GiB with 2 MiB pages,
/// present, writable and user-accessible at every level.
pub fn write_page_tables(mem: &GuestMemory) -> Result<(), GuestMemoryError> {
    write_identity_map(mem, true)
}

/// Writes the identity map of the first 4 GiB at [`PAGE_TABLES_GPA`]; `user` sets the U bit at
/// every level (the CPL 3 guest needs it; a kernel booted at CPL 0 does not).
///
/// Accessed and Dirty are set in advance at every level: the CPU then never writes the page
/// tables itself, so they do not show up as dirty pages in every checkpoint after the guest
/// touches a new 2 MiB page, and (under the development machines' shadow paging) a first write
/// costs no emulated A/D update.
pub fn write_identity_map(mem: &GuestMemory, user: bool) -> Result<(), GuestMemoryError> {
    let flags = PTE_P | PTE_RW | PTE_A | if user { PTE_US } else { 0 };
    mem.write_obj(PDPT_GPA | flags, GuestAddress(PAGE_TABLES_GPA))?;
    for i in 0..PD_COUNT {
        let pd = PD_GPA + i * PAGE;
        mem.write_obj(pd | flags, GuestAddress(PDPT_GPA + i * 8))?;
        let mut entries = [0u8; PAGE as usize];
        for (j, e) in entries.chunks_exact_mut(8).enumerate() {
            let addr = (i << 30) | ((j as u64) << 21);
            e.copy_from_slice(&(addr | flags | PTE_D | PTE_PS).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

/// Writes the GDT at [`GDT_GPA`] and the TSS at [`TSS_GPA`], whose I/O permission bitmap allows
/// every port.
///
/// RFLAGS.IOPL = 3 alone allows `in`/`out` at CPL 3 on hardware KVM, but the development
/// machines' kvm-pvm clears IOPL when the guest runs and then checks the TSS bitmap (measured:
/// without the bitmap the first `out` raised #GP). With both, port I/O exits to the VMM on either.
pub fn write_gdt_and_tss(mem: &GuestMemory) -> Result<(), GuestMemoryError> {
    for (i, d) in gdt().iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_GPA + i as u64 * 8))?;
    }
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    // The bitmap follows the TSS proper; all zero bits = every port allowed.
    tss[102..104].copy_from_slice(&(TSS_BASE_SIZE as u16).to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_GPA))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::create_guest_memory;

    #[test]
    fn descriptors_match_the_usual_encodings() {
        let g = gdt();
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
        assert_eq!(g[3], 0x00cf_f300_0000_ffff);
        assert_eq!(g[4], 0x00af_fb00_0000_ffff);
        assert_eq!(g[5] & 0xffff, TSS_LIMIT);
        assert_eq!((g[5] >> 40) & 0xff, 0x8b);
        assert_eq!((g[5] >> 16) & 0xff_ffff, TSS_GPA);
    }

    #[test]
    fn tss_bitmap_allows_every_port() {
        let mem = create_guest_memory(16 << 20).unwrap();
        write_gdt_and_tss(&mem).unwrap();
        let base: u16 = mem.read_obj(GuestAddress(TSS_GPA + 102)).unwrap();
        assert_eq!(u64::from(base), TSS_BASE_SIZE);
        let mut bitmap = vec![0xaau8; IO_BITMAP_SIZE as usize + 1];
        mem.read_slice(&mut bitmap, GuestAddress(TSS_GPA + TSS_BASE_SIZE))
            .unwrap();
        assert!(bitmap[..IO_BITMAP_SIZE as usize].iter().all(|&b| b == 0));
        assert_eq!(bitmap[IO_BITMAP_SIZE as usize], 0xff);
    }

    #[test]
    fn page_tables_identity_map_4gib_for_user() {
        let mem = create_guest_memory(16 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PAGE_TABLES_GPA)).unwrap();
        assert_eq!(pml4, PDPT_GPA | 7 | PTE_A);
        // Walk a few addresses, including one in the MMIO window.
        for va in [0u64, 0x20_0000, 0x1234_5678, 0xd000_0000, 0xffff_ffff] {
            let pdpte: u64 = mem
                .read_obj(GuestAddress(PDPT_GPA + (va >> 30) * 8))
                .unwrap();
            assert_eq!(pdpte & 7, 7);
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0xe7, 0xe7, "P, RW, U, A, D, PS");
            assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        }
    }
}
