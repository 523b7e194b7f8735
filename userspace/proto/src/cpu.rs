//! Whether a backup can resume this guest: the CPU features, XSAVE state and MSRs the guest's
//! state needs, against what the backup's KVM offers. Pure data and comparison, no KVM: the VMM
//! fills [`GuestCpuNeeds`] and [`HostCpuCaps`] in, the A-Link carries the latter from the backup
//! to the primary (minor 3 and later), and the primary refuses a backup that could not take over.
//!
//! ```text
//! HostCpu payload (24 + 16w + 4m bytes)
//!   0  4 flags (0)
//!   4  4 XSAVE area bytes (CPUID.0DH.0:ECX, all supported components)
//!   8  8 XCR0 bits supported (CPUID.0DH.0 EDX:EAX)
//!  16  2 feature word count w (at most MAX_CPU_WORDS)
//!  18  2 MSR count m (at most MAX_HOST_MSRS)
//!  20  4 reserved (0)
//!  24 16w words, ascending by (leaf, subleaf, register), no repeats:
//!       u32 leaf, u32 subleaf, u8 register (0 EAX, 1 EBX, 2 ECX, 3 EDX), 3 reserved (0), u32 bits
//!   … 4m MSR indices KVM can save and restore, ascending, no repeats
//! ```
//! A word the backup does not send offers no bits.

use std::fmt;

use crate::le::{u16_at, u32_at};
use crate::limits::{MAX_CPU_WORDS, MAX_HOST_MSRS};

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuidReg {
    /// EAX.
    Eax = 0,
    /// EBX.
    Ebx = 1,
    /// ECX.
    Ecx = 2,
    /// EDX.
    Edx = 3,
}

impl CpuidReg {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Eax,
            1 => Self::Ebx,
            2 => Self::Ecx,
            3 => Self::Edx,
            _ => return None,
        })
    }

    /// Parses `eax`, `ebx`, `ecx` or `edx` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "eax" => Self::Eax,
            "ebx" => Self::Ebx,
            "ecx" => Self::Ecx,
            "edx" => Self::Edx,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Eax => "EAX",
            Self::Ebx => "EBX",
            Self::Ecx => "ECX",
            Self::Edx => "EDX",
        }
    }
}

/// One 32-bit CPUID output: leaf, subleaf, register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpuidWord {
    /// EAX input.
    pub leaf: u32,
    /// ECX input (0 for leaves without subleaves).
    pub subleaf: u32,
    /// Output register.
    pub reg: CpuidReg,
}

impl CpuidWord {
    /// The word `leaf`.`subleaf`:`reg`.
    pub const fn new(leaf: u32, subleaf: u32, reg: CpuidReg) -> Self {
        Self { leaf, subleaf, reg }
    }
}

impl fmt::Display for CpuidWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CPUID.{:02X}H", self.leaf)?;
        if self.subleaf != 0 {
            write!(f, ".{}", self.subleaf)?;
        }
        write!(f, ":{}", self.reg.name())
    }
}

/// The CPUID feature words compared, each with the bits that are not features to compare: bits
/// that follow the guest's own control registers (OSXSAVE, OSPKE), and the initial APIC ID or
/// topology fields that share a register with features.
pub const FEATURE_WORDS: [(CpuidWord, u32); 10] = [
    (CpuidWord::new(1, 0, CpuidReg::Ecx), 1 << 27),
    (CpuidWord::new(1, 0, CpuidReg::Edx), 0),
    (CpuidWord::new(7, 0, CpuidReg::Ebx), 0),
    (CpuidWord::new(7, 0, CpuidReg::Ecx), 1 << 4),
    (CpuidWord::new(7, 0, CpuidReg::Edx), 0),
    (CpuidWord::new(7, 1, CpuidReg::Eax), 0),
    (CpuidWord::new(0xd, 1, CpuidReg::Eax), 0),
    (CpuidWord::new(0x8000_0001, 0, CpuidReg::Ecx), 0),
    (CpuidWord::new(0x8000_0001, 0, CpuidReg::Edx), 0),
    (CpuidWord::new(0x8000_0008, 0, CpuidReg::Ebx), 0),
];

/// The feature bits of `value` as read from `word`: `value` without the word's ignored bits, or
/// `None` when `word` is not compared.
pub fn feature_bits(word: CpuidWord, value: u32) -> Option<u32> {
    FEATURE_WORDS.iter().find(|(w, _)| *w == word).map(|(_, ignored)| value & !ignored)
}

/// What the guest's saved state needs from the host that restores it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestCpuNeeds {
    /// The feature bits the guest's CPUID shows (only [`FEATURE_WORDS`], ignored bits cleared).
    pub words: Vec<(CpuidWord, u32)>,
    /// The XCR0 bits the guest may enable (its CPUID.0DH.0 EDX:EAX).
    pub xcr0: u64,
    /// The XSAVE area the guest's CPUID announces for all its components (CPUID.0DH.0:ECX).
    pub xsave_bytes: u32,
    /// The MSRs the VMM saves for this guest and must restore.
    pub msrs: Vec<u32>,
}

/// What a host's KVM offers a restored guest, computed without a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostCpuCaps {
    /// Feature words KVM supports (`KVM_GET_SUPPORTED_CPUID`), ascending, no repeats.
    pub words: Vec<(CpuidWord, u32)>,
    /// XCR0 bits supported.
    pub xcr0: u64,
    /// XSAVE area size for every supported component.
    pub xsave_bytes: u32,
    /// MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`), ascending, no repeats.
    pub msrs: Vec<u32>,
}

/// Why a backup cannot resume this guest: the first thing it lacks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Incompatibility {
    /// A CPUID feature bit the guest sees is not offered.
    #[error("{word} bit {bit}{} is not offered by the backup's KVM", bit_name(*word, *bit).map(|n| format!(" ({n})")).unwrap_or_default())]
    CpuidBit {
        /// The word.
        word: CpuidWord,
        /// The bit.
        bit: u8,
    },
    /// XSAVE components (XCR0 bits) the guest may enable are not supported.
    #[error("XCR0 bits {missing:#x} are not supported by the backup's KVM")]
    Xcr0 {
        /// The bits missing.
        missing: u64,
    },
    /// The guest's XSAVE area does not fit the backup's.
    #[error("XSAVE area of {guest} bytes exceeds the backup's {backup}")]
    XsaveSize {
        /// The guest's.
        guest: u32,
        /// The backup's.
        backup: u32,
    },
    /// An MSR the VMM restores is not in the backup's KVM list.
    #[error("MSR {0:#x} cannot be restored on the backup")]
    Msr(u32),
}

/// Names of the feature bits an error is most likely to name.
fn bit_name(word: CpuidWord, bit: u8) -> Option<&'static str> {
    use CpuidReg::*;
    Some(match (word.leaf, word.subleaf, word.reg, bit) {
        (1, 0, Ecx, 0) => "sse3",
        (1, 0, Ecx, 9) => "ssse3",
        (1, 0, Ecx, 12) => "fma",
        (1, 0, Ecx, 19) => "sse4.1",
        (1, 0, Ecx, 20) => "sse4.2",
        (1, 0, Ecx, 21) => "x2apic",
        (1, 0, Ecx, 23) => "popcnt",
        (1, 0, Ecx, 24) => "tsc-deadline",
        (1, 0, Ecx, 25) => "aes",
        (1, 0, Ecx, 26) => "xsave",
        (1, 0, Ecx, 28) => "avx",
        (1, 0, Ecx, 30) => "rdrand",
        (1, 0, Edx, 0) => "fpu",
        (1, 0, Edx, 4) => "tsc",
        (1, 0, Edx, 5) => "msr",
        (1, 0, Edx, 6) => "pae",
        (1, 0, Edx, 9) => "apic",
        (1, 0, Edx, 11) => "sep",
        (1, 0, Edx, 15) => "cmov",
        (1, 0, Edx, 16) => "pat",
        (1, 0, Edx, 23) => "mmx",
        (1, 0, Edx, 24) => "fxsr",
        (1, 0, Edx, 25) => "sse",
        (1, 0, Edx, 26) => "sse2",
        (7, 0, Ebx, 3) => "bmi1",
        (7, 0, Ebx, 5) => "avx2",
        (7, 0, Ebx, 8) => "bmi2",
        (7, 0, Ebx, 16) => "avx512f",
        (7, 0, Ebx, 18) => "rdseed",
        (7, 0, Ebx, 19) => "adx",
        (7, 0, Ebx, 29) => "sha",
        (7, 0, Ecx, 22) => "rdpid",
        (0xd, 1, Eax, 0) => "xsaveopt",
        (0xd, 1, Eax, 1) => "xsavec",
        (0xd, 1, Eax, 3) => "xsaves",
        (0x8000_0001, 0, Ecx, 0) => "lahf_lm",
        (0x8000_0001, 0, Ecx, 5) => "abm",
        (0x8000_0001, 0, Edx, 11) => "syscall",
        (0x8000_0001, 0, Edx, 20) => "nx",
        (0x8000_0001, 0, Edx, 26) => "pdpe1gb",
        (0x8000_0001, 0, Edx, 27) => "rdtscp",
        (0x8000_0001, 0, Edx, 29) => "lm",
        _ => return None,
    })
}

/// Whether a host offering `host` can restore a guest needing `guest`: the host must offer at
/// least every feature bit, XCR0 bit and MSR the guest needs (more is fine), and an XSAVE area at
/// least as large. The first thing missing is the error.
pub fn check_restorable(guest: &GuestCpuNeeds, host: &HostCpuCaps) -> Result<(), Incompatibility> {
    for &(word, bits) in &guest.words {
        let ignored = FEATURE_WORDS.iter().find(|(w, _)| *w == word).map_or(0, |(_, i)| *i);
        let offered = host.words.iter().find(|(w, _)| *w == word).map_or(0, |(_, v)| *v);
        let missing = bits & !ignored & !offered;
        if missing != 0 {
            return Err(Incompatibility::CpuidBit { word, bit: missing.trailing_zeros() as u8 });
        }
    }
    let missing = guest.xcr0 & !host.xcr0;
    if missing != 0 {
        return Err(Incompatibility::Xcr0 { missing });
    }
    if guest.xsave_bytes > host.xsave_bytes {
        return Err(Incompatibility::XsaveSize { guest: guest.xsave_bytes, backup: host.xsave_bytes });
    }
    if let Some(&m) = guest.msrs.iter().find(|m| host.msrs.binary_search(m).is_err()) {
        return Err(Incompatibility::Msr(m));
    }
    Ok(())
}

/// Why a HostCpu payload was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostCpuDecodeError {
    /// Shorter than its header, or not the length its counts give.
    #[error("HostCpu payload is {got} bytes, expected {expected}")]
    Length {
        /// Bytes the counts call for.
        expected: usize,
        /// Bytes there are.
        got: usize,
    },
    /// Flags this version does not know.
    #[error("Unknown flags {0:#x}")]
    UnknownFlags(u32),
    /// A reserved field is not zero.
    #[error("Reserved field is not zero")]
    Reserved,
    /// More words or MSRs than the limits allow.
    #[error("{words} feature words and {msrs} MSRs exceed the limits")]
    TooMany {
        /// Feature words.
        words: usize,
        /// MSRs.
        msrs: usize,
    },
    /// A register number other than 0..=3.
    #[error("Unknown CPUID register {0}")]
    BadRegister(u8),
    /// Words or MSRs not ascending, or repeated.
    #[error("Feature words or MSRs are not ascending and unique")]
    Order,
}

const HEAD_LEN: usize = 24;
const WORD_LEN: usize = 16;

impl HostCpuCaps {
    /// Largest payload.
    pub const MAX_LEN: usize = HEAD_LEN + WORD_LEN * MAX_CPU_WORDS + 4 * MAX_HOST_MSRS;

    /// Sorts and de-duplicates, and keeps within the limits (the first words and MSRs, in order):
    /// what `encode` expects.
    pub fn normalize(&mut self) {
        self.words.sort_by_key(|(w, _)| *w);
        self.words.dedup_by_key(|(w, _)| *w);
        self.words.truncate(MAX_CPU_WORDS);
        self.msrs.sort_unstable();
        self.msrs.dedup();
        self.msrs.truncate(MAX_HOST_MSRS);
    }

    /// The payload bytes. Expects a [`normalize`](Self::normalize)d value (what it holds beyond
    /// the limits is left out).
    pub fn encode(&self) -> Vec<u8> {
        let words = &self.words[..self.words.len().min(MAX_CPU_WORDS)];
        let msrs = &self.msrs[..self.msrs.len().min(MAX_HOST_MSRS)];
        let mut b = Vec::with_capacity(HEAD_LEN + WORD_LEN * words.len() + 4 * msrs.len());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.xsave_bytes.to_le_bytes());
        b.extend_from_slice(&self.xcr0.to_le_bytes());
        b.extend_from_slice(&(words.len() as u16).to_le_bytes());
        b.extend_from_slice(&(msrs.len() as u16).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (w, v) in words {
            b.extend_from_slice(&w.leaf.to_le_bytes());
            b.extend_from_slice(&w.subleaf.to_le_bytes());
            b.extend_from_slice(&[w.reg as u8, 0, 0, 0]);
            b.extend_from_slice(&v.to_le_bytes());
        }
        for m in msrs {
            b.extend_from_slice(&m.to_le_bytes());
        }
        b
    }

    /// Decodes and checks a payload (canonical form only).
    pub fn decode(p: &[u8]) -> Result<Self, HostCpuDecodeError> {
        let u32_at = |o: usize| u32_at(p, o);
        if p.len() < HEAD_LEN {
            return Err(HostCpuDecodeError::Length { expected: HEAD_LEN, got: p.len() });
        }
        let flags = u32_at(0);
        if flags != 0 {
            return Err(HostCpuDecodeError::UnknownFlags(flags));
        }
        if u32_at(20) != 0 {
            return Err(HostCpuDecodeError::Reserved);
        }
        let xsave_bytes = u32_at(4);
        let xcr0 = u64::from(u32_at(8)) | (u64::from(u32_at(12)) << 32);
        let nw = usize::from(u16_at(p, 16));
        let nm = usize::from(u16_at(p, 18));
        if nw > MAX_CPU_WORDS || nm > MAX_HOST_MSRS {
            return Err(HostCpuDecodeError::TooMany { words: nw, msrs: nm });
        }
        let expected = HEAD_LEN + WORD_LEN * nw + 4 * nm;
        if p.len() != expected {
            return Err(HostCpuDecodeError::Length { expected, got: p.len() });
        }
        let mut words = Vec::with_capacity(nw);
        for i in 0..nw {
            let o = HEAD_LEN + WORD_LEN * i;
            let reg = CpuidReg::from_u8(p[o + 8]).ok_or(HostCpuDecodeError::BadRegister(p[o + 8]))?;
            if p[o + 9..o + 12] != [0, 0, 0] {
                return Err(HostCpuDecodeError::Reserved);
            }
            let word = CpuidWord::new(u32_at(o), u32_at(o + 4), reg);
            if words.last().is_some_and(|(last, _)| *last >= word) {
                return Err(HostCpuDecodeError::Order);
            }
            words.push((word, u32_at(o + 12)));
        }
        let mut msrs = Vec::with_capacity(nm);
        for i in 0..nm {
            let m = u32_at(HEAD_LEN + WORD_LEN * nw + 4 * i);
            if msrs.last().is_some_and(|&last| last >= m) {
                return Err(HostCpuDecodeError::Order);
            }
            msrs.push(m);
        }
        Ok(Self { words, xcr0, xsave_bytes, msrs })
    }

    /// Clears bit `bit` of `word` (a test knob: a backup that pretends to lack a feature).
    pub fn mask_bit(&mut self, word: CpuidWord, bit: u8) {
        if let Some((_, v)) = self.words.iter_mut().find(|(w, _)| *w == word) {
            *v &= !(1u32.checked_shl(u32::from(bit)).unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W1C: CpuidWord = CpuidWord::new(1, 0, CpuidReg::Ecx);
    const W1D: CpuidWord = CpuidWord::new(1, 0, CpuidReg::Edx);
    const W7B: CpuidWord = CpuidWord::new(7, 0, CpuidReg::Ebx);

    fn host() -> HostCpuCaps {
        let mut h = HostCpuCaps {
            words: vec![(W1C, 0x1fff_ffff), (W1D, 0xffff_ffff), (W7B, 0x0000_00ff)],
            xcr0: 0x7,
            xsave_bytes: 832,
            msrs: vec![0x10, 0x174, 0xc000_0080, 0xc000_0103],
        };
        h.normalize();
        h
    }

    fn guest() -> GuestCpuNeeds {
        GuestCpuNeeds {
            words: vec![(W1C, 1 << 26 | 1 << 28), (W1D, 1 << 26), (W7B, 1 << 5)],
            xcr0: 0x7,
            xsave_bytes: 832,
            msrs: vec![0x10, 0xc000_0103],
        }
    }

    #[test]
    fn a_host_offering_as_much_or_more_can_restore() {
        assert_eq!(check_restorable(&guest(), &host()), Ok(()));
        let mut more = host();
        more.words.push((CpuidWord::new(0x8000_0001, 0, CpuidReg::Edx), u32::MAX));
        more.normalize();
        more.xcr0 = 0xe7;
        more.xsave_bytes = 2696;
        more.msrs.push(0x1234);
        more.normalize();
        assert_eq!(check_restorable(&guest(), &more), Ok(()));
        assert_eq!(check_restorable(&GuestCpuNeeds::default(), &HostCpuCaps::default()), Ok(()));
    }

    #[test]
    fn each_kind_of_missing_thing_is_named() {
        let mut h = host();
        h.mask_bit(W7B, 5);
        let e = check_restorable(&guest(), &h).unwrap_err();
        assert_eq!(e, Incompatibility::CpuidBit { word: W7B, bit: 5 });
        assert_eq!(e.to_string(), "CPUID.07H:EBX bit 5 (avx2) is not offered by the backup's KVM");

        let mut h = host();
        h.mask_bit(W1D, 26);
        assert_eq!(
            check_restorable(&guest(), &h).unwrap_err().to_string(),
            "CPUID.01H:EDX bit 26 (sse2) is not offered by the backup's KVM"
        );

        // A word the host does not send offers nothing.
        let mut g = guest();
        g.words.push((CpuidWord::new(0xd, 1, CpuidReg::Eax), 1 << 3));
        assert_eq!(
            check_restorable(&g, &host()).unwrap_err().to_string(),
            "CPUID.0DH.1:EAX bit 3 (xsaves) is not offered by the backup's KVM"
        );

        let mut g = guest();
        g.xcr0 = 0xe7;
        assert_eq!(check_restorable(&g, &host()), Err(Incompatibility::Xcr0 { missing: 0xe0 }));

        let mut g = guest();
        g.xsave_bytes = 2696;
        let e = check_restorable(&g, &host()).unwrap_err();
        assert_eq!(e.to_string(), "XSAVE area of 2696 bytes exceeds the backup's 832");

        let mut g = guest();
        g.msrs.push(0xc000_0102);
        let e = check_restorable(&g, &host()).unwrap_err();
        assert_eq!(e.to_string(), "MSR 0xc0000102 cannot be restored on the backup");
    }

    #[test]
    fn ignored_bits_do_not_count() {
        // OSXSAVE follows the guest's CR4: a guest that set it needs nothing more.
        let mut g = guest();
        g.words[0].1 |= 1 << 27;
        let mut h = host();
        h.mask_bit(W1C, 27);
        assert_eq!(check_restorable(&g, &h), Ok(()));
        assert_eq!(feature_bits(W1C, u32::MAX), Some(!(1 << 27)));
        assert_eq!(feature_bits(CpuidWord::new(2, 0, CpuidReg::Eax), 1), None);
    }

    #[test]
    fn round_trips() {
        for caps in [HostCpuCaps::default(), host()] {
            let b = caps.encode();
            assert_eq!(HostCpuCaps::decode(&b), Ok(caps));
        }
        let mut full = HostCpuCaps {
            words: (0..MAX_CPU_WORDS as u32 + 5).map(|i| (CpuidWord::new(i, 0, CpuidReg::Edx), i)).collect(),
            xcr0: u64::MAX,
            xsave_bytes: u32::MAX,
            msrs: (0..MAX_HOST_MSRS as u32 + 5).rev().collect(),
        };
        full.normalize();
        let b = full.encode();
        assert_eq!(b.len(), HostCpuCaps::MAX_LEN);
        assert_eq!(HostCpuCaps::decode(&b), Ok(full));
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let good = host().encode();
        // Truncated, and too long, anywhere.
        for n in 0..good.len() {
            assert!(HostCpuCaps::decode(&good[..n]).is_err(), "{n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(HostCpuCaps::decode(&long), Err(HostCpuDecodeError::Length { .. })));
        // Flags, reserved fields.
        let mut b = good.clone();
        b[0] = 1;
        assert_eq!(HostCpuCaps::decode(&b), Err(HostCpuDecodeError::UnknownFlags(1)));
        let mut b = good.clone();
        b[21] = 1;
        assert_eq!(HostCpuCaps::decode(&b), Err(HostCpuDecodeError::Reserved));
        let mut b = good.clone();
        b[24 + 9] = 1;
        assert_eq!(HostCpuCaps::decode(&b), Err(HostCpuDecodeError::Reserved));
        let mut b = good.clone();
        b[24 + 8] = 4;
        assert_eq!(HostCpuCaps::decode(&b), Err(HostCpuDecodeError::BadRegister(4)));
        // Oversized counts, checked before the length.
        let mut b = good.clone();
        b[16..18].copy_from_slice(&(MAX_CPU_WORDS as u16 + 1).to_le_bytes());
        assert!(matches!(HostCpuCaps::decode(&b), Err(HostCpuDecodeError::TooMany { .. })));
        let mut b = good.clone();
        b[18..20].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(HostCpuCaps::decode(&b), Err(HostCpuDecodeError::TooMany { .. })));
        // Order: words swapped, MSRs repeated.
        let mut h = host();
        h.words.swap(0, 1);
        assert_eq!(HostCpuCaps::decode(&h.encode()), Err(HostCpuDecodeError::Order));
        let mut h = host();
        h.msrs.push(*h.msrs.last().unwrap());
        assert_eq!(HostCpuCaps::decode(&h.encode()), Err(HostCpuDecodeError::Order));
        // Every single bit flip either decodes canonically or is refused, never a panic.
        for i in 0..good.len() * 8 {
            let mut b = good.clone();
            b[i / 8] ^= 1 << (i % 8);
            if let Ok(v) = HostCpuCaps::decode(&b) {
                assert_eq!(v.encode(), b);
            }
        }
    }
}
