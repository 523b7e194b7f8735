//! The Linux x86-64 boot protocol (64-bit entry): bzImage, zero page, command line, e820 map.
//!
//! Production hosts (bare-metal KVM) can boot a Linux guest this way; the development machines
//! cannot run one (their KVM emulates ring 0), so this loader is tested by loading a real Debian
//! bzImage into guest memory and checking what it wrote, not by running it.
//!
//! Layout (all below the kernel at 1 MiB): page tables at [`PAGE_TABLES_GPA`] (supervisor-only
//! identity map of 4 GiB), GDT at [`LINUX_GDT_GPA`], zero page at [`ZERO_PAGE_GPA`], boot stack
//! below [`BOOT_STACK_TOP`], command line at [`CMDLINE_GPA`].

use std::io::{Read, Seek, SeekFrom};

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, LOADED_HIGH, XLF_KERNEL_64,
};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::tables::{descriptor, write_identity_map};
use crate::memory::GuestMemory;
use ftvm_guest_abi::PAGE_TABLES_GPA;

/// The GDT for the kernel's entry.
pub const LINUX_GDT_GPA: u64 = 0x500;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// Initial stack pointer (the kernel sets up its own stack almost at once).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// Start of the EBDA: conventional memory in the e820 map ends here.
pub const EBDA_GPA: u64 = 0x9_fc00;
/// Where high memory, and the kernel, start.
pub const HIMEM_GPA: u64 = 0x10_0000;
/// Offset of the 64-bit entry point from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced `XLF_KERNEL_64` reporting and the 64-bit entry we rely on.
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// `__BOOT_CS` and `__BOOT_DS` of the 64-bit boot protocol.
pub const BOOT_CS: u16 = 0x10;
/// Data selector for DS, ES, SS.
pub const BOOT_DS: u16 = 0x18;
/// A TSS descriptor: VMX refuses to enter with an unusable TR.
pub const BOOT_TSS: u16 = 0x20;

/// Offset of the setup header in a bzImage (and in the zero page).
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// Boot loader type "undefined" (0xff): we have no assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const E820_RAM: u32 = 1;

/// Why a Linux kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LinuxLoadError {
    /// Reading the image failed.
    #[error("cannot read the kernel image")]
    Read(#[source] std::io::Error),
    /// No "HdrS" at 0x202 (or no 0xAA55 boot flag): not a bzImage.
    #[error("not a bzImage (no boot protocol header)")]
    BadMagic,
    /// Boot protocol older than 2.12.
    #[error("kernel boot protocol {}.{:02} is older than 2.12", .0 >> 8, .0 & 0xff)]
    ProtocolTooOld(u16),
    /// The kernel has no 64-bit entry point.
    #[error("kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")]
    Not64Bit,
    /// The kernel does not load at 1 MiB.
    #[error("kernel is not a bzImage loaded high (LOADED_HIGH clear)")]
    NotLoadedHigh,
    /// The command line is invalid or longer than the kernel accepts.
    #[error("kernel command line is too long or invalid ({len} bytes, limit {max})")]
    Cmdline {
        /// Length given.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: u32,
    },
    /// linux-loader refused the image or could not copy it.
    #[error("cannot load the kernel into guest memory")]
    Load(#[source] linux_loader::loader::Error),
    /// The kernel does not fit in guest memory.
    #[error("kernel ends at {end:#x}, beyond guest memory ({mem_size:#x})")]
    TooLarge {
        /// End of the loaded kernel.
        end: u64,
        /// Guest RAM size.
        mem_size: u64,
    },
    /// Writing the zero page, command line or tables failed.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// What [`load_linux`] did: where to start the vCPU.
#[derive(Clone, Copy, Debug)]
pub struct LinuxBoot {
    /// Where the protected-mode kernel was put.
    pub kernel_load: u64,
    /// One past its last byte.
    pub kernel_end: u64,
    /// The 64-bit entry point (`kernel_load + 0x200`).
    pub entry: u64,
    /// The zero page, passed in RSI.
    pub zero_page: u64,
    /// The setup header as read from the image.
    pub header: setup_header,
}

/// Reads the setup header of a bzImage.
pub fn read_setup_header<R: Read + Seek>(image: &mut R) -> Result<setup_header, LinuxLoadError> {
    let mut hdr = setup_header::default();
    image
        .seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(LinuxLoadError::Read)?;
    image.read_exact(hdr.as_mut_slice()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            LinuxLoadError::BadMagic
        } else {
            LinuxLoadError::Read(e)
        }
    })?;
    Ok(hdr)
}

/// Checks that the header describes a kernel we can boot through the 64-bit entry.
pub fn check_setup_header(hdr: &setup_header) -> Result<(), LinuxLoadError> {
    let (magic, flag, version) = (hdr.header, hdr.boot_flag, hdr.version);
    if magic != HDR_MAGIC || flag != BOOT_FLAG {
        return Err(LinuxLoadError::BadMagic);
    }
    if version < MIN_BOOT_PROTOCOL {
        return Err(LinuxLoadError::ProtocolTooOld(version));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxLoadError::Not64Bit);
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(LinuxLoadError::NotLoadedHigh);
    }
    Ok(())
}

/// Loads a bzImage at 1 MiB, copies `cmdline`, and writes the zero page with an e820 map of
/// `mem` (which must be fresh and at least 16 MiB).
pub fn load_linux<R: Read + Seek + vm_memory::ReadVolatile>(
    mem: &GuestMemory,
    mem_size: u64,
    image: &mut R,
    cmdline: &str,
) -> Result<LinuxBoot, LinuxLoadError> {
    let hdr = read_setup_header(image)?;
    check_setup_header(&hdr)?;
    let max = hdr.cmdline_size;
    let cmdline_err = || LinuxLoadError::Cmdline {
        len: cmdline.len(),
        max,
    };
    // The limit excludes the terminating NUL.
    if cmdline.len() >= max as usize {
        return Err(cmdline_err());
    }
    let cl = Cmdline::try_from(cmdline, max as usize).map_err(|_| cmdline_err())?;

    let loaded = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_GPA)))
        .map_err(LinuxLoadError::Load)?;
    if loaded.kernel_end > mem_size {
        return Err(LinuxLoadError::TooLarge {
            end: loaded.kernel_end,
            mem_size,
        });
    }
    load_cmdline(mem, GuestAddress(CMDLINE_GPA), &cl).map_err(|e| match e {
        linux_loader::loader::Error::CommandLineOverflow => cmdline_err(),
        other => LinuxLoadError::Load(other),
    })?;

    let mut params = boot_params {
        // The header as loaded (linux-loader set code32_start to the load address).
        hdr: loaded.setup_header.unwrap_or(hdr),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = (BOOT_STACK_TOP - 0x200) as u16;
    let e820 = [
        boot_e820_entry {
            addr: 0,
            size: EBDA_GPA,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: HIMEM_GPA,
            size: mem_size - HIMEM_GPA,
            r#type: E820_RAM,
        },
    ];
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_GPA))
        .map_err(|e| LinuxLoadError::Write("zero page", e))?;

    write_identity_map(mem, false).map_err(|e| LinuxLoadError::Write("page tables", e))?;
    for (i, d) in linux_gdt().iter().enumerate() {
        mem.write_obj(*d, GuestAddress(LINUX_GDT_GPA + i as u64 * 8))
            .map_err(|e| LinuxLoadError::Write("GDT", e))?;
    }

    let kernel_load = loaded.kernel_load.0;
    Ok(LinuxBoot {
        kernel_load,
        kernel_end: loaded.kernel_end,
        entry: kernel_load + ENTRY_64_OFFSET,
        zero_page: ZERO_PAGE_GPA,
        header: hdr,
    })
}

/// GDT for the 64-bit boot protocol: `__BOOT_CS` at 0x10, `__BOOT_DS` at 0x18, a TSS at 0x20.
pub fn linux_gdt() -> [u64; 5] {
    [
        0,
        0,
        descriptor(0xa09b, 0, 0xfffff),
        descriptor(0xc093, 0, 0xfffff),
        descriptor(0x808b, 0, 0xfffff),
    ]
}

/// The special registers at the 64-bit entry: long mode, CPL 0, paging with the identity map.
pub fn linux_sregs(mut sregs: kvm_bindings::kvm_sregs) -> kvm_bindings::kvm_sregs {
    let seg = |selector: u16, type_: u8, l: u8, db: u8, s: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = seg(BOOT_DS, 0x3, 0, 1, 1);
    sregs.cs = seg(BOOT_CS, 0xb, 1, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0xf_ffff,
        g: 0,
        ..seg(BOOT_TSS, 0xb, 0, 0, 0)
    };
    sregs.gdt.base = LINUX_GDT_GPA;
    sregs.gdt.limit = (linux_gdt().len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 31); // PE, ET, NE, PG
    sregs.cr3 = PAGE_TABLES_GPA;
    sregs.cr4 = 1 << 5; // PAE
    sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
    sregs
}

/// Why [`configure_linux_vcpu`] failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set the vCPU registers for the Linux 64-bit entry")]
pub struct LinuxVcpuError(#[source] pub std::io::Error);

impl From<vmm_sys_util::errno::Error> for LinuxVcpuError {
    fn from(e: vmm_sys_util::errno::Error) -> Self {
        Self(e.into())
    }
}

/// Sets a vCPU's registers for the 64-bit entry of `boot`: RIP = entry, RSI = zero page.
pub fn configure_linux_vcpu(vcpu: &VcpuFd, boot: &LinuxBoot) -> Result<(), LinuxVcpuError> {
    let sregs = vcpu.get_sregs()?;
    vcpu.set_sregs(&linux_sregs(sregs))?;
    let regs = kvm_regs {
        rip: boot.entry,
        rsi: boot.zero_page,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::create_guest_memory;
    use std::io::Cursor;
    use std::path::PathBuf;

    const MEM: u64 = 256 << 20;

    /// The Debian bzImage fetched by `cargo xtask fetch-test-kernel` (or `FTVM_TEST_BZIMAGE`).
    fn test_kernel() -> PathBuf {
        let path = std::env::var_os("FTVM_TEST_BZIMAGE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fixtures/vmlinuz")
            });
        assert!(
            path.is_file(),
            "test kernel {} is missing: run `cargo xtask fetch-test-kernel` first \
             (or set FTVM_TEST_BZIMAGE to a bzImage)",
            path.display()
        );
        path
    }

    #[test]
    fn loads_a_real_debian_bzimage() {
        let path = test_kernel();
        let bytes = std::fs::read(&path).unwrap();
        let mem = create_guest_memory(MEM).unwrap();
        let cmdline = "console=ttyS0 reboot=k panic=1 ftvm.test=1";
        let mut file = std::fs::File::open(&path).unwrap();
        let boot = load_linux(&mem, MEM, &mut file, cmdline).unwrap();

        let hdr = boot.header;
        let (version, xlf) = (hdr.version, hdr.xloadflags);
        assert!(version >= 0x020c, "boot protocol {version:#x}");
        assert_ne!(xlf & XLF_KERNEL_64, 0);
        assert_eq!({ hdr.code32_start }, HIMEM_GPA as u32);

        // The protected-mode kernel follows the setup sectors in the file and lands at 1 MiB.
        let setup_sects = if hdr.setup_sects == 0 {
            4
        } else {
            u64::from(hdr.setup_sects)
        };
        let setup_size = (setup_sects + 1) * 512;
        assert_eq!(boot.kernel_load, HIMEM_GPA);
        assert_eq!(boot.entry, HIMEM_GPA + 0x200);
        assert_eq!(boot.kernel_end, HIMEM_GPA + bytes.len() as u64 - setup_size);
        let mut head = vec![0u8; 4096];
        mem.read_slice(&mut head, GuestAddress(HIMEM_GPA)).unwrap();
        assert_eq!(
            head[..],
            bytes[setup_size as usize..setup_size as usize + 4096]
        );
        let mut tail = vec![0u8; 64];
        mem.read_slice(&mut tail, GuestAddress(boot.kernel_end - 64))
            .unwrap();
        assert_eq!(tail[..], bytes[bytes.len() - 64..]);

        // Zero page.
        let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_GPA)).unwrap();
        assert_eq!({ zp.hdr.header }, HDR_MAGIC);
        assert_eq!({ zp.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!(zp.hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE_GPA as u32);
        assert_eq!({ zp.hdr.cmdline_size }, cmdline.len() as u32);
        assert_eq!({ zp.hdr.code32_start }, HIMEM_GPA as u32);
        assert_eq!({ zp.hdr.version }, version);
        assert_eq!(zp.e820_entries, 2);
        let ram = zp.e820_table[1];
        assert_eq!(
            ({ ram.addr }, { ram.size }, { ram.r#type }),
            (HIMEM_GPA, MEM - HIMEM_GPA, 1)
        );

        // Command line, NUL-terminated.
        let mut cl = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_GPA)).unwrap();
        assert_eq!(&cl[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(cl[cmdline.len()], 0);

        // Entry registers, accepted by KVM (not run: ring 0 cannot run here).
        let vm = crate::vm::Vm::new(MEM).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        configure_linux_vcpu(&vcpu, &boot).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert_eq!((regs.rip, regs.rsi), (HIMEM_GPA + 0x200, ZERO_PAGE_GPA));
        let s = vcpu.get_sregs().unwrap();
        assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl), (BOOT_CS, 1, 0));
        assert_eq!(s.ss.selector, BOOT_DS);
        assert_eq!(s.efer & (1 << 10), 1 << 10);
    }

    fn synthetic(version: u16, xloadflags: u16, magic: u32) -> Vec<u8> {
        let mut hdr = setup_header {
            setup_sects: 4,
            boot_flag: BOOT_FLAG,
            header: magic,
            version,
            loadflags: LOADED_HIGH,
            code32_start: HIMEM_GPA as u32,
            cmdline_size: 2048,
            xloadflags,
            ..Default::default()
        };
        hdr.syssize = 1;
        let mut image = vec![0u8; 5 * 512 + 4096];
        image[SETUP_HEADER_OFFSET as usize..][..std::mem::size_of::<setup_header>()]
            .copy_from_slice(hdr.as_slice());
        image
    }

    #[test]
    fn refuses_bad_headers() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let load = |img: Vec<u8>| load_linux(&mem, 32 << 20, &mut Cursor::new(img), "x");

        // A well-formed synthetic header loads (proves the failures below are the checked field).
        let ok = load(synthetic(0x020f, XLF_KERNEL_64, HDR_MAGIC)).unwrap();
        assert_eq!(ok.entry, HIMEM_GPA + 0x200);

        assert!(matches!(
            load(synthetic(0x020f, XLF_KERNEL_64, 0x1234_5678)),
            Err(LinuxLoadError::BadMagic)
        ));
        let old = load(synthetic(0x020b, XLF_KERNEL_64, HDR_MAGIC)).unwrap_err();
        assert!(matches!(old, LinuxLoadError::ProtocolTooOld(0x020b)));
        assert_eq!(
            old.to_string(),
            "kernel boot protocol 2.11 is older than 2.12"
        );
        assert!(matches!(
            load(synthetic(0x020f, 0, HDR_MAGIC)),
            Err(LinuxLoadError::Not64Bit)
        ));
        assert!(matches!(
            load(vec![0u8; 100]),
            Err(LinuxLoadError::BadMagic)
        ));
        let long = "a".repeat(4096);
        let img = synthetic(0x020f, XLF_KERNEL_64, HDR_MAGIC);
        assert!(matches!(
            load_linux(&mem, 32 << 20, &mut Cursor::new(img), &long),
            Err(LinuxLoadError::Cmdline {
                len: 4096,
                max: 2048
            })
        ));
    }
}
