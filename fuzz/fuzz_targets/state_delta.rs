//! The machine-state delta of A-Link 1.6 (userspace/proto/src/state_delta.rs).
//!
//! Input: `split u16 | bytes`: the bytes up to `split` are a base state, the rest a delta to apply
//! to it (which must never panic, and must make at most MAX_STATE_BYTES); then the same bytes as a
//! base and a new state: their delta must apply to the base and make exactly the new state.
#![no_main]

use ftvm_proto::state_delta::{apply, encode, is_delta, DELTA_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((split, body)) = data.split_first_chunk::<2>() else { return };
    let split = usize::from(u16::from_le_bytes(*split)).min(body.len());
    let (base, rest) = body.split_at(split);
    // A delta past its header, from the input; a base it names by digest cannot be guessed by the
    // fuzzer, so the header's digest is set to the base's, and the runs are what is fuzzed.
    if rest.len() >= DELTA_HEADER_LEN {
        let mut delta = rest.to_vec();
        delta[..4].copy_from_slice(b"FTSD");
        delta[4..8].copy_from_slice(&(base.len() as u32).to_le_bytes());
        let new_len = u32::from_le_bytes([delta[8], delta[9], delta[10], delta[11]]) % 65_536;
        delta[8..12].copy_from_slice(&new_len.to_le_bytes());
        delta[12..44].copy_from_slice(blake3::hash(base).as_bytes());
        assert!(is_delta(&delta));
        if let Ok(state) = apply(base, &delta) {
            assert!(state.len() < 65_536);
        }
    }
    let mut delta = Vec::new();
    encode(base, rest, &mut delta);
    assert_eq!(apply(base, &delta).expect("a delta applies to its own base"), rest);
});
