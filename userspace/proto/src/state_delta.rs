//! The machine state of an epoch as a difference from the previous epoch's (A-Link 1.6).
//!
//! A machine state is about 5.7 KiB here (registers, XSAVE, MSRs, LAPIC, device queues), sent with
//! every epoch, and most of it is the same from one epoch to the next. An epoch that answers one
//! client carries a few dozen pages, so the state alone made the A-Link carry about 10 % more than
//! the dirty memory. A delta is the XOR of the new state with the previous one, with its runs of
//! zero bytes (the unchanged bytes) left out:
//!
//! ```text
//! offset size field
//!      0    4 magic        "FTSD" (a full state starts with "FTVMSTAT", so the two cannot be taken
//!                          for each other)
//!      4    4 base_len     bytes of the state it applies to
//!      8    4 new_len      bytes of the state it makes (at most MAX_STATE_BYTES)
//!     12   32 base_digest  BLAKE3 of the state it applies to
//!     44    … runs         until the end ([`crate::xor_runs`]): skip (varint), count (varint),
//!                          count bytes of XOR of new and base (bytes past the end of the base are
//!                          the new state's own)
//! ```
//! The sender keeps the previous state it sent in the session and sends a full state first in every
//! session; the receiver applies a delta to the state it holds only when the digest matches, so a
//! delta can never be applied to another base than the one it was made from.

use crate::le::u32_at;
use crate::limits::MAX_FRAME_PAYLOAD;

/// First bytes of a delta.
pub const DELTA_MAGIC: [u8; 4] = *b"FTSD";
/// Bytes before the runs.
pub const DELTA_HEADER_LEN: usize = 44;
/// Largest state a delta can make: a state travels in one frame.
pub const MAX_STATE_BYTES: usize = MAX_FRAME_PAYLOAD as usize;

/// Why a delta cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    /// Shorter than its header, or not a delta.
    #[error("not a state delta")]
    NotADelta,
    /// It applies to another state than the one held.
    #[error("the state delta was made from another state ({base_len} bytes) than the one held ({held_len} bytes, or another digest)")]
    WrongBase {
        /// Bytes of the base it names.
        base_len: u32,
        /// Bytes of the state held.
        held_len: usize,
    },
    /// It makes a state larger than a frame can carry.
    #[error("the state delta makes a state of {0} bytes")]
    TooLarge(u32),
    /// A run goes past the end of the new state, a varint is cut or too long, or the runs do not
    /// cover the new state exactly.
    #[error("malformed state delta at byte {0}")]
    Malformed(usize),
}

/// Whether `payload` is a delta (rather than a full state).
pub fn is_delta(payload: &[u8]) -> bool {
    payload.len() >= DELTA_HEADER_LEN && payload[..4] == DELTA_MAGIC
}

/// The delta that turns `base` into `new`, into `out` (cleared first). `new` must be at most
/// [`MAX_STATE_BYTES`] long (a larger state could not be sent whole either).
pub fn encode(base: &[u8], new: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&DELTA_MAGIC);
    out.extend_from_slice(&u32::try_from(base.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&u32::try_from(new.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(blake3::hash(base).as_bytes());
    crate::xor_runs::encode(base, new, out);
}

/// The state `delta` makes from `base`.
pub fn apply(base: &[u8], delta: &[u8]) -> Result<Vec<u8>, DeltaError> {
    if !is_delta(delta) {
        return Err(DeltaError::NotADelta);
    }
    let (base_len, new_len) = (u32_at(delta, 4), u32_at(delta, 8));
    if base_len as usize != base.len() || delta[12..44] != *blake3::hash(base).as_bytes() {
        return Err(DeltaError::WrongBase { base_len, held_len: base.len() });
    }
    if new_len as usize > MAX_STATE_BYTES {
        return Err(DeltaError::TooLarge(new_len));
    }
    let new_len = new_len as usize;
    let mut new = Vec::with_capacity(new_len);
    new.extend_from_slice(&base[..base.len().min(new_len)]);
    new.resize(new_len, 0);
    crate::xor_runs::apply(&mut new, &delta[DELTA_HEADER_LEN..])
        .map_err(|bad| DeltaError::Malformed(DELTA_HEADER_LEN + bad.0))?;
    // Past the last run, the new state is the base's bytes unchanged (or zeros past its end).
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| if i % 97 < 3 { seed.wrapping_add(i as u8) } else { (i / 7) as u8 }).collect()
    }

    #[test]
    fn a_delta_makes_the_new_state_and_is_small_when_little_changed() {
        let base = state(1, 5754);
        let mut new = base.clone();
        for i in [0usize, 1, 100, 101, 102, 3000, 5753] {
            new[i] ^= 0x5a;
        }
        let mut d = Vec::new();
        encode(&base, &new, &mut d);
        assert!(is_delta(&d));
        assert!(d.len() < DELTA_HEADER_LEN + 40, "{} bytes", d.len());
        assert_eq!(apply(&base, &d).unwrap(), new);
        // Identical: a header and nothing else.
        encode(&base, &base, &mut d);
        assert_eq!(d.len(), DELTA_HEADER_LEN);
        assert_eq!(apply(&base, &d).unwrap(), base);
    }

    #[test]
    fn states_of_other_lengths_and_empty_ones() {
        for (b, n) in [(0usize, 10usize), (10, 0), (100, 300), (300, 100), (0, 0)] {
            let (base, new) = (state(3, b), state(9, n));
            let mut d = Vec::new();
            encode(&base, &new, &mut d);
            assert_eq!(apply(&base, &d).unwrap(), new, "{b} -> {n}");
        }
    }

    #[test]
    fn a_delta_applies_to_its_own_base_only() {
        let (base, new) = (state(1, 1000), state(2, 1000));
        let mut d = Vec::new();
        encode(&base, &new, &mut d);
        let mut other = base.clone();
        other[500] ^= 1;
        assert_eq!(apply(&other, &d), Err(DeltaError::WrongBase { base_len: 1000, held_len: 1000 }));
        assert!(matches!(apply(&base[..999], &d), Err(DeltaError::WrongBase { .. })));
        assert_eq!(apply(&base, &new), Err(DeltaError::NotADelta), "a full state is not a delta");
        assert_eq!(apply(&base, &d[..DELTA_HEADER_LEN - 1]), Err(DeltaError::NotADelta));
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let base = state(1, 64);
        let mut d = Vec::new();
        encode(&base, &state(2, 64), &mut d);
        // Every cut of the runs is refused or makes a state of the announced length.
        for cut in DELTA_HEADER_LEN..d.len() {
            if let Ok(s) = apply(&base, &d[..cut]) {
                assert_eq!(s.len(), 64);
            }
        }
        // A run past the end of the new state; a varint that never ends; a huge length.
        let mut bad = d[..DELTA_HEADER_LEN].to_vec();
        bad.extend([60, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(matches!(apply(&base, &bad), Err(DeltaError::Malformed(_))));
        let mut endless = d[..DELTA_HEADER_LEN].to_vec();
        endless.extend([0xff; 12]);
        assert!(matches!(apply(&base, &endless), Err(DeltaError::Malformed(_))));
        let mut huge = d.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(apply(&base, &huge), Err(DeltaError::TooLarge(u32::MAX)));
    }

    /// Random pairs (a deterministic generator): every delta round-trips.
    #[test]
    fn random_states_round_trip() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let len = (next() % 2000) as usize;
            let base: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut new = base.clone();
            new.resize((next() % 2000) as usize, 0);
            for _ in 0..(next() % 50) {
                if !new.is_empty() {
                    let i = (next() % new.len() as u64) as usize;
                    new[i] = next() as u8;
                }
            }
            let mut d = Vec::new();
            encode(&base, &new, &mut d);
            assert_eq!(apply(&base, &d).unwrap(), new);
        }
    }
}
