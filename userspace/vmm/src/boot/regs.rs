//! The vCPU's registers at the guest's first instruction: 64-bit mode, CPL 3.
//!
//! Ring 0 is emulated (slowly, and not completely) on the development machines' nested KVM, so
//! the guest never runs there: the vCPU starts directly in long mode at CPL 3, with IOPL 3 for
//! port I/O (plus a permit-all I/O bitmap in the TSS, see [`super::tables`]). There is no IDT: any exception becomes a triple fault, which KVM reports as a
//! shutdown exit.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_xcrs};
use kvm_ioctls::VcpuFd;

use super::tables::{
    GDT_GPA, GDT_LIMIT, SEL_TSS, SEL_USER_CODE, SEL_USER_DATA, TSS_GPA, TSS_LIMIT,
};
use crate::cpuid::CpuFeatures;
use ftvm_guest_abi::{BOOT_INFO_GPA, PAGE_TABLES_GPA};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
/// Reserved bit 1 of RFLAGS is always set.
const RFLAGS_FIXED: u64 = 1 << 1;
/// IOPL 3: `in`/`out` allowed at CPL 3.
const RFLAGS_IOPL3: u64 = 3 << 12;
/// XCR0: x87, SSE, AVX state.
pub const XCR0_X87: u64 = 1 << 0;
/// XCR0 SSE bit.
pub const XCR0_SSE: u64 = 1 << 1;
/// XCR0 AVX bit.
pub const XCR0_AVX: u64 = 1 << 2;

/// Why the initial registers could not be set.
#[derive(Debug, thiserror::Error)]
pub enum VcpuBootError {
    /// A register ioctl failed.
    #[error("cannot {0} for the guest's first instruction")]
    Ioctl(&'static str, #[source] std::io::Error),
}

/// Where the guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    /// RIP: the ELF entry.
    pub rip: u64,
    /// RSP: the top of the stack.
    pub rsp: u64,
}

/// The register values the CPL 3 boot needs, without touching KVM (also used by tests).
pub fn boot_sregs(
    mut sregs: kvm_bindings::kvm_sregs,
    features: &CpuFeatures,
    xsave: bool,
) -> kvm_bindings::kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_USER_CODE,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 3,
        db: 0, // must be 0 with L = 1
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: SEL_USER_DATA,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    let tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT as u32,
        selector: SEL_TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tr;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = GDT_LIMIT;
    // No IDT: an exception in the guest escalates to a triple fault (a shutdown exit).
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PAGE_TABLES_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | if xsave { CR4_OSXSAVE } else { 0 };
    sregs.efer = EFER_LME | EFER_LMA | if features.nx { EFER_NXE } else { 0 };
    sregs
}

/// XCR0 to set when XSAVE is enabled: x87 and SSE, plus AVX where supported.
pub fn boot_xcr0(features: &CpuFeatures) -> u64 {
    let mut xcr0 = XCR0_X87 | XCR0_SSE;
    if features.avx && features.xcr0_supported & XCR0_AVX != 0 {
        xcr0 |= XCR0_AVX;
    }
    xcr0
}

/// Sets the registers for the guest's first instruction: 64-bit mode at CPL 3, paging on with
/// the VMM's page tables, SSE on, `rdi` = the boot info, and XSAVE (with AVX in XCR0) when
/// the CPU offers it.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    features: &CpuFeatures,
    entry: EntryPoint,
) -> Result<(), VcpuBootError> {
    let io = |what| move |e: vmm_sys_util::errno::Error| VcpuBootError::Ioctl(what, e.into());
    let xsave = features.xsave;
    let sregs = vcpu.get_sregs().map_err(io("read the special registers"))?;
    vcpu.set_sregs(&boot_sregs(sregs, features, xsave))
        .map_err(io("set the special registers"))?;
    if xsave {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = boot_xcr0(features);
        vcpu.set_xcrs(&xcrs).map_err(io("set XCR0"))?;
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,    // x87 default control word: all exceptions masked
        mxcsr: 0x1f80, // SSE default: all exceptions masked, round to nearest
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(io("set the FPU state"))?;
    let regs = kvm_regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rdi: BOOT_INFO_GPA,
        rflags: RFLAGS_FIXED | RFLAGS_IOPL3,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(io("set the general registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpl3_long_mode() {
        let f = CpuFeatures {
            nx: true,
            ..Default::default()
        };
        let s = boot_sregs(Default::default(), &f, false);
        assert_eq!(s.cs.selector & 3, 3);
        assert_eq!((s.cs.dpl, s.cs.l, s.cs.db), (3, 1, 0));
        assert_eq!((s.ss.dpl, s.ss.selector & 3), (3, 3));
        assert_eq!(s.cr0 & (1 << 2), 0, "CR0.EM must be clear for SSE");
        assert_eq!(s.efer, EFER_LME | EFER_LMA | EFER_NXE);
        assert_eq!(s.cr3, PAGE_TABLES_GPA);
        assert_eq!(s.idt.limit, 0);
        assert_eq!(s.tr.type_, 0xb);
    }
}
