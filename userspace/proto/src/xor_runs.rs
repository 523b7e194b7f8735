//! Runs of XOR between a base and a new byte string: what the state deltas
//! ([`crate::state_delta`]) and the page deltas ([`crate::page_delta`]) carry.
//!
//! A run is `skip (varint) | count (varint) | count bytes`: `skip` bytes left as they are in the
//! base, then `count` bytes XORed into it. Runs follow each other from the start of the string;
//! past the last run, the base's bytes stay. A base shorter than the new string reads as zeros
//! past its end, so those bytes travel as they are.

/// Runs of unchanged bytes shorter than this stay inside a literal run (a new run costs two
/// varints).
const MIN_SKIP: usize = 4;

/// A run that does not fit: the offset of its first byte in the runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedRun(pub usize);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Unchanged bytes are skipped a block at a time first (a slice comparison, which the C library
/// does with vector instructions).
const SKIP_BLOCK: usize = 64;

/// The first index from `i` on where `new` and `base` differ (`new.len()` if none). Unchanged
/// bytes are most of a page that was written a little: they are skipped a block, then eight
/// bytes, at a time.
fn next_change(base: &[u8], new: &[u8], mut i: usize) -> usize {
    let common = base.len().min(new.len());
    while i + SKIP_BLOCK <= common && base[i..i + SKIP_BLOCK] == new[i..i + SKIP_BLOCK] {
        i += SKIP_BLOCK;
    }
    let word = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    while i + 8 <= common && word(base, i) == word(new, i) {
        i += 8;
    }
    while i < new.len() && new[i] == base.get(i).copied().unwrap_or(0) {
        i += 1;
    }
    i
}

/// Appends to `out` the runs that turn `base` into `new`.
pub fn encode(base: &[u8], new: &[u8], out: &mut Vec<u8>) {
    if base.len() >= new.len() && base[..new.len()] == *new {
        // Unchanged (a hot page the guest did not write): one comparison, no run.
        return;
    }
    let x = |i: usize| new[i] ^ base.get(i).copied().unwrap_or(0);
    let mut i = 0;
    while i < new.len() {
        let skip_from = i;
        i = next_change(base, new, i);
        if i == new.len() {
            // Unchanged to the end: no run needed.
            break;
        }
        // The literal run ends at the first run of MIN_SKIP unchanged bytes (or the end).
        let lit_from = i;
        let mut zeros = 0;
        while i < new.len() && zeros < MIN_SKIP {
            zeros = if x(i) == 0 { zeros + 1 } else { 0 };
            i += 1;
        }
        let lit_to = if zeros == MIN_SKIP { i - MIN_SKIP } else { i };
        i = lit_to;
        put_varint(out, (lit_from - skip_from) as u64);
        put_varint(out, (lit_to - lit_from) as u64);
        out.extend((lit_from..lit_to).map(x));
    }
}

/// XORs `runs` into `target` (the base, already as long as the new string). A run that is cut,
/// has a varint over 64 bits, or reaches past `target` is refused; `target` is then partly
/// changed, and must be thrown away.
pub fn apply(target: &mut [u8], runs: &[u8]) -> Result<(), MalformedRun> {
    let mut at = 0usize;
    let mut i = 0usize;
    while at < runs.len() {
        let run_at = at;
        let bad = MalformedRun(run_at);
        let skip = get_varint(runs, &mut at).ok_or(bad)?;
        let count = get_varint(runs, &mut at).ok_or(bad)?;
        let lit_from = usize::try_from(skip).ok().and_then(|s| i.checked_add(s)).ok_or(bad)?;
        let count = usize::try_from(count).map_err(|_| bad)?;
        let lit_to = lit_from.checked_add(count).ok_or(bad)?;
        let bytes_to = at.checked_add(count).ok_or(bad)?;
        if lit_to > target.len() || bytes_to > runs.len() {
            return Err(bad);
        }
        for (b, x) in target[lit_from..lit_to].iter_mut().zip(&runs[at..bytes_to]) {
            *b ^= x;
        }
        at = bytes_to;
        i = lit_to;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(base: &[u8], new: &[u8]) -> Vec<u8> {
        let mut runs = Vec::new();
        encode(base, new, &mut runs);
        let mut target = base.to_vec();
        target.resize(new.len(), 0);
        apply(&mut target, &runs).unwrap();
        target
    }

    #[test]
    fn runs_turn_the_base_into_the_new_string() {
        let base: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut new = base.clone();
        for i in [0usize, 7, 8, 9, 15, 16, 63, 64, 65, 100, 101, 191, 192, 4000, 4095] {
            new[i] ^= 0xa5;
        }
        assert_eq!(made(&base, &new), new);
        let mut runs = Vec::new();
        encode(&base, &new, &mut runs);
        assert!(runs.len() < 64, "{} bytes", runs.len());
        // Unchanged: no run at all.
        runs.clear();
        encode(&base, &base, &mut runs);
        assert!(runs.is_empty());
    }

    #[test]
    fn every_single_byte_change_at_every_offset() {
        let base = vec![0x11u8; 64];
        for i in 0..64 {
            let mut new = base.clone();
            new[i] = 0x22;
            assert_eq!(made(&base, &new), new, "byte {i}");
        }
    }

    #[test]
    fn a_shorter_base_reads_as_zeros_past_its_end() {
        assert_eq!(made(&[1, 2, 3], &[1, 2, 3, 4, 5]), vec![1, 2, 3, 4, 5]);
        assert_eq!(made(&[], &[0, 0, 9]), vec![0, 0, 9]);
    }

    #[test]
    fn runs_past_the_target_or_cut_are_refused() {
        let mut t = [0u8; 8];
        // skip 6, count 4: past the end.
        assert_eq!(apply(&mut t, &[6, 4, 1, 1, 1, 1]), Err(MalformedRun(0)));
        // count 3 with two bytes left.
        assert_eq!(apply(&mut t, &[0, 3, 1, 1]), Err(MalformedRun(0)));
        // A varint that never ends.
        assert_eq!(apply(&mut t, &[0xff; 12]), Err(MalformedRun(0)));
        // A second run that is cut.
        assert_eq!(apply(&mut t, &[0, 1, 9, 1]), Err(MalformedRun(3)));
        let mut fresh = [0u8; 8];
        assert_eq!(apply(&mut fresh, &[0, 1, 9]), Ok(()));
        assert_eq!(fresh, [9, 0, 0, 0, 0, 0, 0, 0]);
    }
}
