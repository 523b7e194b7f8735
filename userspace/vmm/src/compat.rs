//! What a restored guest needs from the host's CPU and KVM, and what this host offers: the two
//! sides of [`ftvm_proto::cpu::check_restorable`], read from KVM without a VM.
//!
//! The guest's needs are predicted from what [`crate::machine::Machine::create`] will give it:
//! the CPUID [`cpuid::build_cpuid`] makes of `KVM_GET_SUPPORTED_CPUID`, and the MSRs
//! [`wanted_msrs`] picks for that CPUID among those `KVM_GET_MSR_INDEX_LIST` names (the list
//! [`crate::vcpu::StateConfig::probe`] saves; with a LAPIC, since the VM has one wherever the
//! kernel allows it).

use ftvm_proto::cpu::{feature_bits, CpuidReg, GuestCpuNeeds, HostCpuCaps, FEATURE_WORDS};
use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::Kvm;

use crate::cpuid::{self, CpuidError};
use crate::vcpu::state::wanted_msrs;

/// Why the CPU compatibility data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CpuCompatError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm")]
    Open(#[source] std::io::Error),
    /// The supported CPUID could not be read or built.
    #[error("cannot read the CPUID KVM supports")]
    Cpuid(#[from] CpuidError),
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("cannot read the list of MSRs KVM can save")]
    MsrIndexList(#[source] std::io::Error),
}

fn word_value(cpuid: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: CpuidReg) -> Option<u32> {
    let e = cpuid.iter().find(|e| e.function == leaf && e.index == subleaf)?;
    Some(match reg {
        CpuidReg::Eax => e.eax,
        CpuidReg::Ebx => e.ebx,
        CpuidReg::Ecx => e.ecx,
        CpuidReg::Edx => e.edx,
    })
}

/// XCR0 bits and XSAVE size (all components) from CPUID leaf 0xD.
fn xsave_leaf(cpuid: &[kvm_cpuid_entry2]) -> (u64, u32) {
    let xcr0 = word_value(cpuid, 0xd, 0, CpuidReg::Eax).map_or(0, u64::from)
        | (word_value(cpuid, 0xd, 0, CpuidReg::Edx).map_or(0, u64::from) << 32);
    (xcr0, word_value(cpuid, 0xd, 0, CpuidReg::Ecx).unwrap_or(0))
}

/// What a guest with CPUID `cpuid` whose VMM saves `msrs` needs (pure).
pub fn needs_of(cpuid: &[kvm_cpuid_entry2], msrs: &[u32]) -> GuestCpuNeeds {
    let words = FEATURE_WORDS
        .iter()
        .filter_map(|(w, _)| {
            let v = word_value(cpuid, w.leaf, w.subleaf, w.reg)?;
            Some((*w, feature_bits(*w, v)?)).filter(|(_, bits)| *bits != 0)
        })
        .collect();
    let (xcr0, xsave_bytes) = xsave_leaf(cpuid);
    GuestCpuNeeds { words, xcr0, xsave_bytes, msrs: msrs.to_vec() }
}

/// What this host's KVM offers, from its supported CPUID (`cpuid`) and MSR list (pure).
pub fn caps_of(cpuid: &[kvm_cpuid_entry2], msr_index: &[u32]) -> HostCpuCaps {
    let words = FEATURE_WORDS
        .iter()
        .filter_map(|(w, _)| Some((*w, word_value(cpuid, w.leaf, w.subleaf, w.reg)?)))
        .collect();
    let (xcr0, xsave_bytes) = xsave_leaf(cpuid);
    let mut caps = HostCpuCaps { words, xcr0, xsave_bytes, msrs: msr_index.to_vec() };
    caps.normalize();
    caps
}

/// This host's capabilities, as a backup announces them.
pub fn host_cpu_caps() -> Result<HostCpuCaps, CpuCompatError> {
    let kvm = Kvm::new().map_err(|e| CpuCompatError::Open(e.into()))?;
    let supported = cpuid::supported_cpuid(&kvm)?;
    let index = kvm.get_msr_index_list().map_err(|e| CpuCompatError::MsrIndexList(e.into()))?;
    Ok(caps_of(supported.as_slice(), index.as_slice()))
}

/// What a guest this host's VMM creates will need from the host that restores it.
pub fn guest_cpu_needs() -> Result<GuestCpuNeeds, CpuCompatError> {
    let kvm = Kvm::new().map_err(|e| CpuCompatError::Open(e.into()))?;
    let supported = cpuid::supported_cpuid(&kvm)?;
    let table = cpuid::build_cpuid(&supported, 0, 0)?;
    let index = kvm.get_msr_index_list().map_err(|e| CpuCompatError::MsrIndexList(e.into()))?;
    let msrs: Vec<u32> =
        wanted_msrs(table.as_slice(), true).into_iter().filter(|m| index.as_slice().contains(m)).collect();
    Ok(needs_of(table.as_slice(), &msrs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_proto::cpu::{check_restorable, CpuidWord, Incompatibility};

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    #[test]
    fn needs_and_caps_read_the_compared_words() {
        let cpuid = [
            entry(1, 0, 0, 0x0300_0000, (1 << 26) | (1 << 27), 1 << 26),
            entry(7, 0, 0, 1 << 5, 0, 0),
            entry(0xd, 0, 0x7, 832, 2696, 0),
        ];
        let needs = needs_of(&cpuid, &[0x10]);
        let w1c = CpuidWord::new(1, 0, CpuidReg::Ecx);
        // OSXSAVE is not a need.
        assert!(needs.words.contains(&(w1c, 1 << 26)));
        assert_eq!((needs.xcr0, needs.xsave_bytes), (0x7, 2696));
        let caps = caps_of(&cpuid, &[0x10, 0x3b]);
        assert_eq!(check_restorable(&needs, &caps), Ok(()));
        let mut masked = caps.clone();
        masked.mask_bit(CpuidWord::new(1, 0, CpuidReg::Edx), 26);
        assert!(matches!(check_restorable(&needs, &masked), Err(Incompatibility::CpuidBit { bit: 26, .. })));
    }

    #[test]
    fn this_host_can_restore_its_own_guests() {
        let needs = guest_cpu_needs().unwrap();
        let caps = host_cpu_caps().unwrap();
        assert_eq!(check_restorable(&needs, &caps), Ok(()));
        // The guest here has SSE2 (the test knob's default bit).
        assert!(needs.words.iter().any(|(w, v)| *w == CpuidWord::new(1, 0, CpuidReg::Edx) && v & (1 << 26) != 0));
        assert!(caps.encode().len() <= HostCpuCaps::MAX_LEN);
        println!("{needs:x?}\n{caps:x?}");
    }
}
