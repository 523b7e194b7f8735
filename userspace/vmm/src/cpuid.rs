//! What the guest sees through CPUID, and the TSC frequency it is told.
//!
//! The guest gets what KVM supports on this host (`KVM_GET_SUPPORTED_CPUID`), with its APIC ID
//! filled in and the hypervisor timing leaf 0x4000_0010 (VMware's, also read by Linux) added, so
//! that a guest that does not read [`ftvm_guest_abi::BootInfo::tsc_khz`] can still find the TSC
//! frequency.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

/// The hypervisor vendor leaf; its EAX is the highest hypervisor leaf.
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
/// The timing leaf: EAX = TSC frequency in kHz, EBX = APIC bus frequency in kHz.
pub const LEAF_TIMING: u32 = 0x4000_0010;
/// KVM's emulated APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// Why [`configure_cpuid`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot read the CPUID leaves KVM supports")]
    GetSupported(#[source] std::io::Error),
    /// The CPUID table is full.
    #[error("no room for CPUID leaf {0:#x}")]
    TableFull(u32),
    /// `KVM_SET_CPUID2` failed.
    #[error("cannot set the vCPU's CPUID")]
    Set(#[source] std::io::Error),
}

/// What the VMM learned about the CPU while setting CPUID, for the register set-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// EFER.NXE may be set (CPUID 0x8000_0001 EDX bit 20).
    pub nx: bool,
    /// XSAVE is available (CPUID 1 ECX bit 26).
    pub xsave: bool,
    /// AVX is available (CPUID 1 ECX bit 28).
    pub avx: bool,
    /// XCR0 bits the host and KVM support (CPUID 0xD.0 EDX:EAX).
    pub xcr0_supported: u64,
}

/// The CPUID table KVM supports on this host.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| CpuidError::GetSupported(e.into()))
}

/// Sets vCPU `id`'s CPUID from `supported` and returns the features the boot code uses.
pub fn configure_cpuid(
    vcpu: &VcpuFd,
    supported: &CpuId,
    id: u32,
    tsc_khz: u32,
) -> Result<CpuFeatures, CpuidError> {
    let cpuid = build_cpuid(supported, id, tsc_khz)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| CpuidError::Set(e.into()))?;
    Ok(features(&cpuid))
}

/// The CPUID table for vCPU `id`: `supported` plus the APIC ID and the timing leaf.
pub fn build_cpuid(supported: &CpuId, id: u32, tsc_khz: u32) -> Result<CpuId, CpuidError> {
    let mut cpuid = supported.clone();
    let mut has_timing = false;
    let mut has_base = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID in EBX[31:24].
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
            }
            0xb | 0x1f => {
                // x2APIC ID of this logical processor.
                e.edx = id;
            }
            LEAF_HYPERVISOR_BASE => {
                has_base = true;
                e.eax = e.eax.max(LEAF_TIMING);
            }
            LEAF_TIMING => {
                has_timing = true;
                e.eax = tsc_khz;
                e.ebx = APIC_BUS_KHZ;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    if !has_base {
        // "KVMKVMKVM\0\0\0" like KVM's own leaf, so guests recognise the hypervisor.
        let sig = *b"KVMKVMKVM\0\0\0";
        let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_HYPERVISOR_BASE,
                eax: LEAF_TIMING,
                ebx: word(0),
                ecx: word(4),
                edx: word(8),
                ..Default::default()
            })
            .map_err(|_| CpuidError::TableFull(LEAF_HYPERVISOR_BASE))?;
    }
    if !has_timing {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_TIMING,
                eax: tsc_khz,
                ebx: APIC_BUS_KHZ,
                ..Default::default()
            })
            .map_err(|_| CpuidError::TableFull(LEAF_TIMING))?;
    }
    Ok(cpuid)
}

fn leaf(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// Reads the features the register set-up depends on out of a CPUID table.
pub fn features(cpuid: &CpuId) -> CpuFeatures {
    let ecx1 = leaf(cpuid, 1, 0).map_or(0, |e| e.ecx);
    let nx = leaf(cpuid, 0x8000_0001, 0).is_some_and(|e| e.edx & (1 << 20) != 0);
    let xcr0_supported =
        leaf(cpuid, 0xd, 0).map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
    CpuFeatures {
        nx,
        xsave: ecx1 & (1 << 26) != 0,
        avx: ecx1 & (1 << 28) != 0,
        xcr0_supported,
    }
}

/// The TSC frequency in kHz: `KVM_GET_TSC_KHZ`, or, where KVM cannot tell, measured against the
/// host's monotonic clock (the guest's TSC runs at the host's rate when KVM does not scale it).
pub fn tsc_khz(vcpu: &VcpuFd) -> u32 {
    match vcpu.get_tsc_khz() {
        Ok(khz) if khz > 0 => khz,
        other => {
            let khz = measure_tsc_khz();
            tracing::warn!(
                ?other,
                khz,
                "KVM_GET_TSC_KHZ gave no frequency; measured the TSC"
            );
            khz
        }
    }
}

/// Counts TSC ticks over about 20 ms of the monotonic clock.
pub fn measure_tsc_khz() -> u32 {
    let t0 = Instant::now();
    let c0 = rdtsc();
    std::thread::sleep(Duration::from_millis(20));
    let c1 = rdtsc();
    let nanos = t0.elapsed().as_nanos().max(1);
    let khz = u128::from(c1.wrapping_sub(c0)) * 1_000_000 / nanos;
    u32::try_from(khz).unwrap_or(u32::MAX)
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it, and Linux leaves CR4.TSD clear
    // for user space.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_timing_leaf_and_apic_id() {
        let kvm = Kvm::new().unwrap();
        let supported = supported_cpuid(&kvm).unwrap();
        let cpuid = build_cpuid(&supported, 3, 2_500_000).unwrap();
        let t = leaf(&cpuid, LEAF_TIMING, 0).unwrap();
        assert_eq!(t.eax, 2_500_000);
        assert!(leaf(&cpuid, LEAF_HYPERVISOR_BASE, 0).unwrap().eax >= LEAF_TIMING);
        assert_eq!(leaf(&cpuid, 1, 0).unwrap().ebx >> 24, 3);
    }

    #[test]
    fn measured_tsc_is_plausible() {
        let khz = measure_tsc_khz();
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
