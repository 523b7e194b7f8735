//! The machine's state as one value ([`MachineState`]) and its versioned binary container.
//!
//! Container layout (little endian), Firecracker's design with our own constants:
//!
//! ```text
//! offset  size  field
//!      0     8  magic            "FTVMSTAT" (x86-64 machine state)
//!      8     2  major            format version: a reader refuses another major,
//!     10     2  minor              and a newer minor than its own;
//!     12     2  patch              patch levels are always compatible
//!     14     2  reserved         zero
//!     16     8  payload length   at most MAX_STATE_SIZE
//!     24    32  blake3(payload)
//!     56     …  payload          bincode 1 (varint integers), no trailing bytes
//! ```
//!
//! The format version is the container's, not the product's: bump the minor version when a field
//! is added that an older reader may ignore, the major one for anything else. Every way a blob
//! can be wrong (truncated, corrupted, foreign, too new, too large) is a [`StateDecodeError`],
//! never a panic: the limit given to bincode also bounds what a hostile length prefix inside the
//! payload can make it allocate.

use bincode::Options as _;
use ftvm_guest_abi::BootInfo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::devices::persist::DevicesState;
use crate::vcpu::VcpuState;

/// "FTVMSTAT": an ftvm x86-64 machine state.
pub const STATE_MAGIC: u64 = u64::from_le_bytes(*b"FTVMSTAT");
/// This build's container format version.
pub const FORMAT_VERSION: FormatVersion = FormatVersion {
    major: 1,
    minor: 0,
    patch: 0,
};
/// Largest payload accepted or produced: a machine state is a few KiB per vCPU plus device
/// queues; anything near this is corruption.
pub const MAX_STATE_SIZE: u64 = 16 << 20;
/// Bytes before the payload.
pub const HEADER_SIZE: usize = 56;

/// A semantic version of the container format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FormatVersion {
    /// Incompatible changes.
    pub major: u16,
    /// Additions an older reader may ignore.
    pub minor: u16,
    /// Fixes that do not change the format.
    pub patch: u16,
}

impl std::fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FormatVersion {
    /// Whether a reader at `self` can read a blob written at `blob`.
    pub fn can_read(self, blob: FormatVersion) -> bool {
        blob.major == self.major && blob.minor <= self.minor
    }
}

/// The VM-wide kvmclock (`KVM_GET_CLOCK`), in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// kvmclock value.
    pub clock: u64,
    /// `KVM_CLOCK_*` flags as read (informational; restore sets the value only).
    pub flags: u32,
}

/// Everything needed to resume a VM elsewhere, except guest memory (sent as pages) and the disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// TSC frequency the guest was told (boot info and CPUID), in kHz.
    pub tsc_khz: u32,
    /// The [`BootInfo`] the guest was given, as its bytes (it is also in guest memory, but the
    /// guest may reuse that page).
    pub boot_info: Vec<u8>,
    /// Every vCPU, index = vCPU id.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DevicesState,
    /// The VM's kvmclock, when KVM has `KVM_CAP_ADJUST_CLOCK`.
    pub clock: Option<ClockState>,
}

impl MachineState {
    /// The boot info, if `boot_info` holds one.
    pub fn boot_info(&self) -> Option<BootInfo> {
        boot_info_from_bytes(&self.boot_info)
    }

    /// Encodes into a container (see the module documentation).
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateEncodeError> {
        encode(self)
    }

    /// Decodes a container.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateDecodeError> {
        decode(bytes)
    }
}

/// Reads a [`BootInfo`] from its bytes.
pub fn boot_info_from_bytes(bytes: &[u8]) -> Option<BootInfo> {
    if bytes.len() != std::mem::size_of::<BootInfo>() {
        return None;
    }
    // SAFETY: `bytes` has exactly the size of a BootInfo, which is `repr(C)` with only integer
    // and integer-array fields, so every bit pattern is a valid value; the read is unaligned.
    let bi = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<BootInfo>()) };
    bi.is_valid().then_some(bi)
}

/// Why a state could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum StateEncodeError {
    /// The payload exceeds [`MAX_STATE_SIZE`] (or the codec refused a value).
    #[error("cannot encode the machine state")]
    Codec(#[source] bincode::Error),
}

/// Why a blob is not a state this build can read.
#[derive(Debug, thiserror::Error)]
pub enum StateDecodeError {
    /// Shorter than its header or than the payload length it announces.
    #[error("state blob is truncated: {needed} bytes needed, {available} present")]
    Truncated {
        /// Bytes the header (or the header plus payload) needs.
        needed: u64,
        /// Bytes given.
        available: u64,
    },
    /// Not an ftvm x86-64 machine state.
    #[error("not an ftvm machine state (magic {found:#018x})")]
    BadMagic {
        /// The first eight bytes.
        found: u64,
    },
    /// Written by an incompatible format version.
    #[error("state format {found} cannot be read by this build (format {supported})")]
    UnsupportedVersion {
        /// The blob's version.
        found: FormatVersion,
        /// This build's.
        supported: FormatVersion,
    },
    /// The announced payload is larger than [`MAX_STATE_SIZE`].
    #[error("state payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// [`MAX_STATE_SIZE`].
        max: u64,
    },
    /// Bytes after the payload.
    #[error("{0} unexpected bytes after the state payload")]
    TrailingBytes(u64),
    /// The payload does not match its checksum.
    #[error("state payload is corrupted (checksum mismatch)")]
    Checksum,
    /// The checksum matched but the payload does not decode (a writer bug, or a format change
    /// without a version bump).
    #[error("state payload does not decode")]
    Codec(#[source] bincode::Error),
}

fn codec() -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_little_endian()
        .with_limit(MAX_STATE_SIZE)
        .reject_trailing_bytes()
}

/// Encodes `value` into a container.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StateEncodeError> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Encodes `value` into a container in `out` (cleared first; reusing one buffer per checkpoint
/// saves an allocation).
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), StateEncodeError> {
    out.clear();
    out.resize(HEADER_SIZE, 0);
    codec()
        .serialize_into(&mut *out, value)
        .map_err(StateEncodeError::Codec)?;
    seal_header(out);
    Ok(())
}

/// Fills in the header of `out` (its first [`HEADER_SIZE`] bytes) for the payload after it.
fn seal_header(out: &mut [u8]) {
    let payload_len = (out.len() - HEADER_SIZE) as u64;
    let hash = blake3::hash(&out[HEADER_SIZE..]);
    let h = &mut out[..HEADER_SIZE];
    h[0..8].copy_from_slice(&STATE_MAGIC.to_le_bytes());
    h[8..10].copy_from_slice(&FORMAT_VERSION.major.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_VERSION.minor.to_le_bytes());
    h[12..14].copy_from_slice(&FORMAT_VERSION.patch.to_le_bytes());
    h[14..16].copy_from_slice(&0u16.to_le_bytes());
    h[16..24].copy_from_slice(&payload_len.to_le_bytes());
    h[24..56].copy_from_slice(hash.as_bytes());
}

/// A valid container (this build's version, the right length and checksum) around any payload
/// bytes, so that the fuzz targets (fuzz/) and tests reach the payload decoder behind the
/// checksum. Not an API: real containers come from [`encode`].
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub fn container_around(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0; HEADER_SIZE];
    out.extend_from_slice(payload);
    seal_header(&mut out);
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks a container's header and checksum and decodes its payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateDecodeError> {
    let available = bytes.len() as u64;
    // The magic first: a short blob of something else is "not ours", not "truncated".
    if bytes.len() >= 8 && u64_at(bytes, 0) != STATE_MAGIC {
        return Err(StateDecodeError::BadMagic {
            found: u64_at(bytes, 0),
        });
    }
    if bytes.len() < HEADER_SIZE {
        return Err(StateDecodeError::Truncated {
            needed: HEADER_SIZE as u64,
            available,
        });
    }
    let found = FormatVersion {
        major: u16_at(bytes, 8),
        minor: u16_at(bytes, 10),
        patch: u16_at(bytes, 12),
    };
    if !FORMAT_VERSION.can_read(found) {
        return Err(StateDecodeError::UnsupportedVersion {
            found,
            supported: FORMAT_VERSION,
        });
    }
    let len = u64_at(bytes, 16);
    if len > MAX_STATE_SIZE {
        return Err(StateDecodeError::TooLarge {
            len,
            max: MAX_STATE_SIZE,
        });
    }
    let needed = HEADER_SIZE as u64 + len;
    if available < needed {
        return Err(StateDecodeError::Truncated { needed, available });
    }
    if available > needed {
        return Err(StateDecodeError::TrailingBytes(available - needed));
    }
    let payload = &bytes[HEADER_SIZE..];
    if blake3::hash(payload).as_bytes() != &bytes[24..56] {
        return Err(StateDecodeError::Checksum);
    }
    codec()
        .deserialize(payload)
        .map_err(StateDecodeError::Codec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u32>,
        c: Option<String>,
    }

    fn sample() -> Sample {
        Sample {
            a: 0x1234_5678_9abc,
            b: (0..300).collect(),
            c: Some("state".into()),
        }
    }

    #[test]
    fn round_trips_and_reuses_the_buffer() {
        let blob = encode(&sample()).unwrap();
        assert_eq!(&blob[..8], b"FTVMSTAT");
        assert_eq!(decode::<Sample>(&blob).unwrap(), sample());
        let mut buf = vec![0xaa; 3];
        encode_into(&sample(), &mut buf).unwrap();
        assert_eq!(buf, blob);
    }

    #[test]
    fn a_container_around_a_payload_is_what_encode_writes() {
        let blob = encode(&sample()).unwrap();
        assert_eq!(container_around(&blob[HEADER_SIZE..]), blob);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let blob = encode(&sample()).unwrap();
        for len in 0..blob.len() {
            match decode::<Sample>(&blob[..len]) {
                Err(StateDecodeError::Truncated { available, .. }) => {
                    assert_eq!(available, len as u64)
                }
                other => panic!("{len} bytes: {other:?}"),
            }
        }
    }

    #[test]
    fn every_flipped_payload_byte_is_a_checksum_error() {
        let blob = encode(&sample()).unwrap();
        for i in HEADER_SIZE..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(
                matches!(decode::<Sample>(&bad), Err(StateDecodeError::Checksum)),
                "byte {i}"
            );
        }
        // A corrupted checksum too.
        let mut bad = blob.clone();
        bad[30] ^= 1;
        assert!(matches!(
            decode::<Sample>(&bad),
            Err(StateDecodeError::Checksum)
        ));
    }

    #[test]
    fn wrong_magic_and_versions() {
        let blob = encode(&sample()).unwrap();
        let mut bad = blob.clone();
        bad[..8].copy_from_slice(b"FTVMSTAX");
        assert!(matches!(
            decode::<Sample>(&bad),
            Err(StateDecodeError::BadMagic { .. })
        ));
        assert!(matches!(
            decode::<Sample>(b"\x7fELF\x02\x01\x01\x00"),
            Err(StateDecodeError::BadMagic { .. })
        ));
        let set_version = |major: u16, minor: u16, patch: u16| {
            let mut b = blob.clone();
            b[8..10].copy_from_slice(&major.to_le_bytes());
            b[10..12].copy_from_slice(&minor.to_le_bytes());
            b[12..14].copy_from_slice(&patch.to_le_bytes());
            b
        };
        for (major, minor) in [
            (FORMAT_VERSION.major + 1, 0),
            (FORMAT_VERSION.major - 1, FORMAT_VERSION.minor),
            (FORMAT_VERSION.major, FORMAT_VERSION.minor + 1),
        ] {
            let e = decode::<Sample>(&set_version(major, minor, 0)).unwrap_err();
            assert!(
                matches!(e, StateDecodeError::UnsupportedVersion { found, .. }
                    if found.major == major && found.minor == minor),
                "{major}.{minor}: {e:?}"
            );
        }
        // Another patch level reads fine.
        let ok = set_version(FORMAT_VERSION.major, FORMAT_VERSION.minor, 7);
        assert_eq!(decode::<Sample>(&ok).unwrap(), sample());
        let e = decode::<Sample>(&set_version(2, 0, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "state format 2.0.0 cannot be read by this build (format 1.0.0)"
        );
    }

    #[test]
    fn size_cap_and_trailing_bytes() {
        let blob = encode(&sample()).unwrap();
        let mut huge = blob.clone();
        huge[16..24].copy_from_slice(&(MAX_STATE_SIZE + 1).to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&huge),
            Err(StateDecodeError::TooLarge { .. })
        ));
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(
            decode::<Sample>(&long),
            Err(StateDecodeError::TrailingBytes(1))
        ));
        // Too large to encode.
        let big = vec![7u8; MAX_STATE_SIZE as usize + 1];
        assert!(matches!(encode(&big), Err(StateEncodeError::Codec(_))));
    }

    #[test]
    fn a_payload_that_checks_but_does_not_decode_is_an_error() {
        // A valid container around a payload of the wrong type: a hostile length prefix.
        let blob = encode(&(u64::MAX, 1u8)).unwrap();
        assert!(matches!(
            decode::<Sample>(&blob),
            Err(StateDecodeError::Codec(_))
        ));
    }
}
