//! Saving and restoring a vCPU's architectural state: what moves a running guest to another VM
//! (the backup, at failover) without it noticing.
//!
//! [`VcpuState`] is plain data (the kernel's own structs, serialized as their bytes). It is read
//! and written only on the vCPU's thread, while Paused ([`super::VcpuEvent::SaveState`],
//! [`super::VcpuEvent::RestoreState`]), because that thread owns the vCPU fd and because only at
//! a pause point are the registers exactly the guest's.
//!
//! What is saved depends on what KVM offers, decided once per VM by [`StateConfig::probe`]:
//! XSAVE (or, without `KVM_CAP_XSAVE`, the legacy FPU/SSE image), XCRs, debug registers, the
//! in-kernel LAPIC, and a chosen list of MSRs (see [`wanted_msrs`]) filtered through
//! `KVM_GET_MSR_INDEX_LIST`.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_sync_regs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// `KVM_CAP_XSAVE2`: its value is the size of `struct kvm_xsave` this host uses.
const KVM_CAP_XSAVE2: u64 = 208;
/// `KVM_CAP_SYNC_REGS`: its value is the register sets `KVM_RUN` can store in `kvm_run`.
const KVM_CAP_SYNC_REGS: u64 = 74;
/// The register sets a pause stores through `kvm_run.kvm_valid_regs` (see [`StateConfig::sync_regs`]).
pub const SYNCED_REGS: u64 = (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS) as u64;
/// The legacy `struct kvm_xsave` region, in 32-bit words.
const XSAVE_LEGACY_WORDS: usize = 1024;

/// Time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// TSC adjust (written by guests that move their TSC).
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
/// SYSENTER code segment.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// SYSENTER stack.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// SYSENTER entry point.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// Miscellaneous enables.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// Page attribute table.
pub const MSR_IA32_CR_PAT: u32 = 0x277;
/// LAPIC TSC-deadline timer.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// SYSCALL segments.
pub const MSR_STAR: u32 = 0xc000_0081;
/// SYSCALL 64-bit entry.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// SYSCALL compatibility-mode entry.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL RFLAGS mask.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// SWAPGS shadow.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// RDTSCP/RDPID value.
pub const MSR_TSC_AUX: u32 = 0xc000_0103;
/// kvmclock (CPUID 0x4000_0001 EAX bit 0): wall clock.
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// kvmclock (bit 0): system time.
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// kvmclock (bit 3): wall clock, new number.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// kvmclock (bit 3): system time, new number.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// KVM async page faults (bit 4).
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// KVM steal time (bit 5).
pub const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
/// KVM paravirtual EOI (bit 6).
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

/// KVM's paravirtual feature leaf.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// MSRs without which a saved vCPU cannot be trusted to resume: a host whose KVM cannot save
/// one of them cannot checkpoint. FS/GS base and EFER are not here: they are in SREGS.
const REQUIRED_MSRS: [u32; 10] = [
    MSR_IA32_TSC,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SYSCALL_MASK,
    MSR_KERNEL_GS_BASE,
    MSR_IA32_CR_PAT,
];

/// The MSRs worth saving for a vCPU with CPUID `cpuid` (with an in-kernel LAPIC when `lapic`),
/// in restore order, before filtering by what KVM can save. TSC_ADJUST comes before TSC, and
/// TSC_DEADLINE last: KVM interprets the deadline against the TSC, so the TSC must already be
/// the guest's when the deadline is written (and the LAPIC, restored before the MSRs, must be
/// in TSC-deadline mode for the write to be kept).
pub fn wanted_msrs(cpuid: &[kvm_cpuid_entry2], lapic: bool) -> Vec<u32> {
    let mut v = vec![MSR_IA32_TSC_ADJUST];
    v.extend_from_slice(&REQUIRED_MSRS);
    v.extend_from_slice(&[MSR_TSC_AUX, MSR_IA32_MISC_ENABLE]);
    let kvm_features = cpuid
        .iter()
        .find(|e| e.function == LEAF_KVM_FEATURES && e.index == 0)
        .map_or(0, |e| e.eax);
    // Only what the guest's CPUID offers: the others are not the guest's state, and KVM may
    // refuse to restore them (this host's refuses MSR_KVM_POLL_CONTROL).
    for (bit, msrs) in [
        (0, &[MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME][..]),
        (3, &[MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_SYSTEM_TIME_NEW][..]),
        (4, &[MSR_KVM_ASYNC_PF_EN][..]),
        (5, &[MSR_KVM_STEAL_TIME][..]),
        (6, &[MSR_KVM_PV_EOI_EN][..]),
    ] {
        if kvm_features & (1 << bit) != 0 {
            v.extend_from_slice(msrs);
        }
    }
    let tsc_deadline = cpuid
        .iter()
        .find(|e| e.function == 1 && e.index == 0)
        .is_some_and(|e| e.ecx & (1 << 24) != 0);
    if lapic && tsc_deadline {
        v.push(MSR_IA32_TSC_DEADLINE);
    }
    v
}

/// How the FPU/SSE/AVX state is saved on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XsaveSupport {
    /// No `KVM_CAP_XSAVE`: only the legacy FPU image (x87 and SSE, no AVX).
    None,
    /// `KVM_GET_XSAVE`, 4 KiB.
    Legacy,
    /// `KVM_GET_XSAVE2` of this many bytes (more than 4 KiB: AMX and friends).
    Xsave2 {
        /// Size of `struct kvm_xsave` on this host.
        bytes: usize,
    },
}

/// What this host's KVM lets us save and restore, decided once per VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateConfig {
    /// FPU route.
    pub xsave: XsaveSupport,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_DEBUGREGS`.
    pub debug_regs: bool,
    /// In-kernel LAPIC (the VM has an irqchip).
    pub lapic: bool,
    /// MSRs to save, in restore order.
    pub msrs: Vec<u32>,
    /// Wanted MSRs KVM cannot save (not in `KVM_GET_MSR_INDEX_LIST`); none of them required.
    pub skipped_msrs: Vec<u32>,
    /// `KVM_CAP_SYNC_REGS` offers the registers, special registers and events: a `KVM_RUN` that
    /// a pause ends can store them in `kvm_run`, which saves three ioctls per checkpoint (each
    /// one loads the vCPU, about 9 µs here; see [`save_state_cached`]).
    pub sync_regs: bool,
}

/// Why [`StateConfig::probe`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StateProbeError {
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("cannot read the list of MSRs KVM can save")]
    MsrIndexList(#[source] std::io::Error),
    /// An MSR the vCPU state needs is not in KVM's list.
    #[error("KVM cannot save MSR {0:#x}, which a checkpoint needs")]
    MissingMsr(u32),
}

impl StateConfig {
    /// What to save for vCPUs of `vm` (created by `kvm`) whose CPUID is `cpuid`; `irqchip`:
    /// whether the VM has an in-kernel irqchip.
    pub fn probe(
        kvm: &Kvm,
        vm: &VmFd,
        cpuid: &CpuId,
        irqchip: bool,
    ) -> Result<Self, StateProbeError> {
        let xsave = if !vm.check_extension(Cap::Xsave) {
            XsaveSupport::None
        } else {
            match usize::try_from(vm.check_extension_raw(KVM_CAP_XSAVE2)) {
                Ok(bytes) if bytes > XSAVE_LEGACY_WORDS * 4 => XsaveSupport::Xsave2 { bytes },
                _ => XsaveSupport::Legacy,
            }
        };
        let index = kvm
            .get_msr_index_list()
            .map_err(|e| StateProbeError::MsrIndexList(e.into()))?;
        let index = index.as_slice();
        let (mut msrs, mut skipped) = (Vec::new(), Vec::new());
        for m in wanted_msrs(cpuid.as_slice(), irqchip) {
            if index.contains(&m) {
                msrs.push(m);
            } else if REQUIRED_MSRS.contains(&m) {
                return Err(StateProbeError::MissingMsr(m));
            } else {
                skipped.push(m);
            }
        }
        assert!(msrs.len() <= KVM_MAX_MSR_ENTRIES, "one KVM_GET_MSRS call");
        Ok(Self {
            xsave,
            xcrs: vm.check_extension(Cap::Xcrs),
            debug_regs: vm.check_extension(Cap::Debugregs),
            lapic: irqchip,
            msrs,
            skipped_msrs: skipped,
            sync_regs: vm.check_extension_raw(KVM_CAP_SYNC_REGS) as u64 & SYNCED_REGS
                == SYNCED_REGS,
        })
    }
}

/// One MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// The legacy FPU image (`struct kvm_fpu`), for hosts without XSAVE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuRegs {
    /// x87 registers (80 bits each, padded to 16 bytes).
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0–15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuRegs {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuRegs> for kvm_fpu {
    fn from(f: &FpuRegs) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The FPU, SSE and (with XSAVE) AVX and later state, whichever way the host could save it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    /// The XSAVE area as `KVM_GET_XSAVE`/`KVM_GET_XSAVE2` returned it, in 32-bit words (1024,
    /// or more with `KVM_CAP_XSAVE2`).
    Xsave(Vec<u32>),
    /// The legacy image: what a host without `KVM_CAP_XSAVE` offers (x87 and SSE only).
    Fpu(Box<FpuRegs>),
}

/// Everything KVM holds about one vCPU, as plain data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest sees (restored first: later ioctls check features against it).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI, ...).
    pub mp_state: kvm_mp_state,
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, APIC base, descriptor tables.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX.
    pub fpu: FpuState,
    /// Extended control registers (XCR0), when the host has `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers, when the host has `KVM_CAP_DEBUGREGS`.
    pub debug_regs: Option<kvm_debugregs>,
    /// The in-kernel LAPIC, when the VM has an irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// The chosen MSRs, in restore order.
    pub msrs: Vec<MsrEntry>,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow, SMM.
    pub vcpu_events: kvm_vcpu_events,
    /// The TSC frequency the guest ran at, when KVM could tell.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// The value of MSR `index`, if saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// Why a vCPU's state could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSaveError {
    /// A `KVM_GET_*` ioctl failed.
    #[error("cannot read the vCPU's {what}")]
    Get {
        /// Which state.
        what: &'static str,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_GET_MSRS` stopped before the end of the list.
    #[error("KVM could not read MSR {index:#x}")]
    MsrNotRead {
        /// The first MSR it did not read.
        index: u32,
    },
    /// The vCPU is running (state is only consistent while Paused).
    #[error("vCPU {0} is running; its state can only be saved while paused")]
    NotPaused(u32),
    /// The vCPU's guest has exited or failed.
    #[error("vCPU {0} has exited")]
    Exited(u32),
    /// The vCPU thread did not answer.
    #[error(transparent)]
    Control(#[from] super::VcpuControlError),
}

/// Why a vCPU's state could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuRestoreError {
    /// A `KVM_SET_*` ioctl failed.
    #[error("cannot set the vCPU's {what}")]
    Set {
        /// Which state.
        what: &'static str,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_SET_MSRS` stopped before the end of the list: KVM refused this MSR.
    #[error("KVM refused to set MSR {index:#x} to {data:#x}")]
    MsrRefused {
        /// The first MSR it did not set.
        index: u32,
        /// The value it was given.
        data: u64,
    },
    /// The state needs something this host does not offer.
    #[error("the saved vCPU state has {0}, which this host's KVM cannot restore")]
    Unsupported(&'static str),
    /// The state's XSAVE area is smaller than the legacy one.
    #[error("the saved XSAVE area has {0} words; at least 1024 expected")]
    ShortXsave(usize),
    /// The CPUID table is too large.
    #[error("the saved CPUID table has too many entries ({0})")]
    Cpuid(usize),
    /// The vCPU is running (state is only written while Paused).
    #[error("vCPU {0} is running; its state can only be restored while paused")]
    NotPaused(u32),
    /// The vCPU's guest has exited or failed.
    #[error("vCPU {0} has exited")]
    Exited(u32),
    /// The vCPU thread did not answer.
    #[error(transparent)]
    Control(#[from] super::VcpuControlError),
}

fn get<T>(
    what: &'static str,
    r: Result<T, vmm_sys_util::errno::Error>,
) -> Result<T, VcpuSaveError> {
    r.map_err(|e| VcpuSaveError::Get {
        what,
        source: e.into(),
    })
}

fn set<T>(
    what: &'static str,
    r: Result<T, vmm_sys_util::errno::Error>,
) -> Result<T, VcpuRestoreError> {
    r.map_err(|e| VcpuRestoreError::Set {
        what,
        source: e.into(),
    })
}

/// What [`save_state_cached`] need not ask KVM again: set by the VMM before the vCPU first runs
/// and never changed by the guest. Every KVM vCPU ioctl costs about 9 µs on the development
/// machines' nested KVM, so each one skipped shortens the checkpoint pause.
#[derive(Clone, Debug, Default)]
pub struct SaveCache {
    cpuid: Option<Vec<kvm_cpuid_entry2>>,
    tsc_khz: Option<Option<u32>>,
}

impl SaveCache {
    /// Forgets everything (after the vCPU's CPUID or TSC frequency was set again).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Reads the state of the (paused) vCPU `fd`.
pub fn save_state(fd: &VcpuFd, cfg: &StateConfig) -> Result<VcpuState, VcpuSaveError> {
    save_state_cached(fd, cfg, &mut SaveCache::default(), None)
}

/// Reads the state of the (paused) vCPU `fd`, taking CPUID and TSC frequency from `cache` once
/// they are in it.
///
/// Ordering (Firecracker's, for the same reasons):
/// * `KVM_GET_MP_STATE` first: it runs `kvm_apic_accept_events()`, which may change vCPU and
///   LAPIC state; everything read after it sees the result.
/// * `KVM_GET_LAPIC` may itself update the LAPIC before returning it.
/// * `KVM_GET_VCPU_EVENTS` last: the other GET ioctls may change pending-event state (SREGS also
///   carries a pending interrupt, which VCPU_EVENTS supersedes on restore).
/// * `KVM_GET_MSRS` reads a pre-filled list; it stops at the first MSR it cannot read and returns
///   how many it read, which is checked.
///
/// `synced`: the registers, special registers and events the `KVM_RUN` that ended at this pause
/// stored in `kvm_run` (`KVM_CAP_SYNC_REGS`), if it did; the same values the three ioctls would
/// read, which debug builds check.
pub fn save_state_cached(
    fd: &VcpuFd,
    cfg: &StateConfig,
    cache: &mut SaveCache,
    synced: Option<&kvm_sync_regs>,
) -> Result<VcpuState, VcpuSaveError> {
    let mp_state = get("MP state", fd.get_mp_state())?;
    let (regs, sregs, vcpu_events) = match synced {
        Some(s) => {
            #[cfg(debug_assertions)]
            check_synced(fd, s);
            (s.regs, s.sregs, s.events)
        }
        None => (
            get("registers", fd.get_regs())?,
            get("special registers", fd.get_sregs())?,
            get("events", fd.get_vcpu_events())?,
        ),
    };
    let fpu = match cfg.xsave {
        XsaveSupport::None => FpuState::Fpu(Box::new(FpuRegs::from(&get("FPU", fd.get_fpu())?))),
        XsaveSupport::Legacy => FpuState::Xsave(get("XSAVE area", fd.get_xsave())?.region.to_vec()),
        XsaveSupport::Xsave2 { bytes } => {
            let extra = (bytes - XSAVE_LEGACY_WORDS * 4).div_ceil(4);
            let mut xsave = Xsave::new(extra).map_err(|_| VcpuSaveError::Get {
                what: "XSAVE area",
                source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
            })?;
            // SAFETY: `xsave` holds the legacy region plus `extra` words, `bytes` in all: the size
            // KVM_CAP_XSAVE2 says KVM_GET_XSAVE2 writes.
            get("XSAVE area", unsafe { fd.get_xsave2(&mut xsave) })?;
            let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
            words.extend_from_slice(xsave.as_slice());
            FpuState::Xsave(words)
        }
    };
    let xcrs = if cfg.xcrs {
        Some(get("XCRs", fd.get_xcrs())?)
    } else {
        None
    };
    let debug_regs = if cfg.debug_regs {
        Some(get("debug registers", fd.get_debug_regs())?)
    } else {
        None
    };
    let lapic = if cfg.lapic {
        Some(get("LAPIC", fd.get_lapic())?)
    } else {
        None
    };
    let entries: Vec<kvm_msr_entry> = cfg
        .msrs
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).expect("checked against KVM_MAX_MSR_ENTRIES");
    let n = get("MSRs", fd.get_msrs(&mut msrs))?;
    if n < entries.len() {
        return Err(VcpuSaveError::MsrNotRead {
            index: entries[n].index,
        });
    }
    let msrs = msrs
        .as_slice()
        .iter()
        .map(|m| MsrEntry {
            index: m.index,
            data: m.data,
        })
        .collect();
    let cpuid = match &cache.cpuid {
        Some(c) => c.clone(),
        None => {
            let c = get("CPUID", fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?
                .as_slice()
                .to_vec();
            cache.cpuid = Some(c.clone());
            c
        }
    };
    let tsc_khz = *cache
        .tsc_khz
        .get_or_insert_with(|| fd.get_tsc_khz().ok().filter(|&k| k > 0));
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// Debug builds: the registers `KVM_RUN` stored are the ones the ioctls read.
#[cfg(debug_assertions)]
fn check_synced(fd: &VcpuFd, s: &kvm_sync_regs) {
    if let (Ok(regs), Ok(sregs), Ok(events)) = (fd.get_regs(), fd.get_sregs(), fd.get_vcpu_events())
    {
        assert_eq!(
            s.regs, regs,
            "registers stored at the exit differ from KVM_GET_REGS"
        );
        assert_eq!(
            s.sregs, sregs,
            "special registers stored at the exit differ from KVM_GET_SREGS"
        );
        assert_eq!(
            s.events, events,
            "events stored at the exit differ from KVM_GET_VCPU_EVENTS"
        );
    }
}

/// Writes `state` into the (paused, never run or paused) vCPU `fd` of a VM whose capabilities
/// are `cfg`.
///
/// Ordering (Firecracker's, for the same reasons):
/// * CPUID first: `KVM_SET_MP_STATE`, `KVM_SET_XSAVE`, `KVM_SET_XCRS` and `KVM_SET_MSRS` check
///   what they are given against the guest's CPUID.
/// * `KVM_SET_REGS` clears pending exceptions, so it comes before `KVM_SET_VCPU_EVENTS`, which
///   restores them; VCPU_EVENTS last.
/// * `KVM_SET_LAPIC` after `KVM_SET_SREGS`, which sets the APIC base the LAPIC lives at.
/// * `KVM_SET_LAPIC` before `KVM_SET_MSRS`: the TSC-deadline MSR is only kept when the LAPIC is
///   in TSC-deadline mode; and within the MSRs, TSC before TSC_DEADLINE (see [`wanted_msrs`]).
/// * `KVM_SET_MSRS` stops at the first MSR it refuses and returns how many it set: anything short
///   of all of them is an error naming the refused MSR (a silently lost MSR would surface as a
///   guest misbehaving after failover).
pub fn restore_state(
    fd: &VcpuFd,
    cfg: &StateConfig,
    state: &VcpuState,
) -> Result<(), VcpuRestoreError> {
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| VcpuRestoreError::Cpuid(state.cpuid.len()))?;
    set("CPUID", fd.set_cpuid2(&cpuid))?;
    set("MP state", fd.set_mp_state(state.mp_state))?;
    set("registers", fd.set_regs(&state.regs))?;
    set("special registers", fd.set_sregs(&state.sregs))?;
    match (&state.fpu, cfg.xsave) {
        (FpuState::Fpu(f), _) => set("FPU", fd.set_fpu(&kvm_fpu::from(&**f)))?,
        (FpuState::Xsave(_), XsaveSupport::None) => {
            return Err(VcpuRestoreError::Unsupported("an XSAVE area"))
        }
        (FpuState::Xsave(words), support) => set_xsave(fd, support, words)?,
    }
    if let Some(xcrs) = &state.xcrs {
        if !cfg.xcrs {
            return Err(VcpuRestoreError::Unsupported("XCRs"));
        }
        set("XCRs", fd.set_xcrs(xcrs))?;
    }
    if let Some(d) = &state.debug_regs {
        if !cfg.debug_regs {
            return Err(VcpuRestoreError::Unsupported("debug registers"));
        }
        set("debug registers", fd.set_debug_regs(d))?;
    }
    if let Some(lapic) = &state.lapic {
        if !cfg.lapic {
            return Err(VcpuRestoreError::Unsupported("an in-kernel LAPIC"));
        }
        set("LAPIC", fd.set_lapic(lapic))?;
    }
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&entries).map_err(|_| VcpuRestoreError::Unsupported("too many MSRs"))?;
    let n = set("MSRs", fd.set_msrs(&msrs))?;
    if n < entries.len() {
        return Err(VcpuRestoreError::MsrRefused {
            index: entries[n].index,
            data: entries[n].data,
        });
    }
    set("events", fd.set_vcpu_events(&state.vcpu_events))?;
    Ok(())
}

fn set_xsave(fd: &VcpuFd, support: XsaveSupport, words: &[u32]) -> Result<(), VcpuRestoreError> {
    if words.len() < XSAVE_LEGACY_WORDS {
        return Err(VcpuRestoreError::ShortXsave(words.len()));
    }
    // KVM reads as many bytes as KVM_CAP_XSAVE2 says on this host, whatever the source had: pad
    // (or, for a larger source, refuse what this host cannot hold).
    let host_words = match support {
        XsaveSupport::Xsave2 { bytes } => bytes.div_ceil(4),
        _ => XSAVE_LEGACY_WORDS,
    };
    if words.len() > host_words && words[host_words..].iter().any(|&w| w != 0) {
        return Err(VcpuRestoreError::Unsupported("a larger XSAVE area"));
    }
    if host_words == XSAVE_LEGACY_WORDS {
        let mut x = kvm_xsave::default();
        x.region.copy_from_slice(&words[..XSAVE_LEGACY_WORDS]);
        // SAFETY: this host's KVM reads exactly the 4 KiB legacy `kvm_xsave` (KVM_CAP_XSAVE2 is
        // absent or not larger), which `x` is.
        return set("XSAVE area", unsafe { fd.set_xsave(&x) });
    }
    let extra = host_words - XSAVE_LEGACY_WORDS;
    let mut x = Xsave::new(extra).map_err(|_| VcpuRestoreError::Unsupported("this XSAVE size"))?;
    // SAFETY: only the fixed `region` is written; the FAM length, which the wrapper's invariant
    // ties to its allocation, is left alone.
    unsafe { x.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(&words[..XSAVE_LEGACY_WORDS]);
    let tail = &words[XSAVE_LEGACY_WORDS..words.len().min(host_words)];
    x.as_mut_slice()[..tail.len()].copy_from_slice(tail);
    // SAFETY: `x` holds `host_words` words, the size KVM_CAP_XSAVE2 reports for this host.
    set("XSAVE area", unsafe { fd.set_xsave2(&x) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, eax: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn msr_list_follows_cpuid_and_restore_order() {
        // No KVM leaf, no TSC-deadline timer: the required MSRs and two optional ones.
        let plain = wanted_msrs(&[leaf(1, 0, 0)], true);
        assert_eq!(plain[0], MSR_IA32_TSC_ADJUST);
        assert_eq!(plain[1], MSR_IA32_TSC);
        assert!(REQUIRED_MSRS.iter().all(|m| plain.contains(m)));
        assert!(!plain.contains(&MSR_KVM_SYSTEM_TIME_NEW));
        assert!(!plain.contains(&MSR_IA32_TSC_DEADLINE));
        // kvmclock (bits 0 and 3) and TSC deadline with a LAPIC: deadline last, after the TSC.
        let cpuid = [leaf(1, 0, 1 << 24), leaf(LEAF_KVM_FEATURES, 0b1001, 0)];
        let full = wanted_msrs(&cpuid, true);
        for m in [
            MSR_KVM_WALL_CLOCK,
            MSR_KVM_SYSTEM_TIME,
            MSR_KVM_WALL_CLOCK_NEW,
            MSR_KVM_SYSTEM_TIME_NEW,
        ] {
            assert!(full.contains(&m), "{m:#x}");
        }
        assert!(!full.contains(&MSR_KVM_ASYNC_PF_EN));
        assert_eq!(*full.last().unwrap(), MSR_IA32_TSC_DEADLINE);
        // Without an in-kernel LAPIC there is no deadline timer to restore.
        assert!(!wanted_msrs(&cpuid, false).contains(&MSR_IA32_TSC_DEADLINE));
    }

    #[test]
    fn fpu_image_converts_both_ways() {
        let f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            xmm: [[7; 16]; 16],
            last_ip: 0x1234,
            ..Default::default()
        };
        let regs = FpuRegs::from(&f);
        assert_eq!(kvm_fpu::from(&regs), f);
    }
}
