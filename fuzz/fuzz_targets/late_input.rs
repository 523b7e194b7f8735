//! The late input datagrams a dead primary's watchdog sends the backup, and the `LeaseTerm`
//! payload that carries their key's id (userspace/proto/src/late_input.rs, epoch.rs).
//!
//! Input: `which u8 | payload`.
//! - which % 3 == 0: `open_late_frame` under the fuzzing key. One that opens must carry a frame
//!   no longer than a guest frame (none for a death notice), and sealing its fields again gives
//!   the same bytes (the layout is canonical).
//! - which % 3 == 1: `LeaseTerm::decode`; one that decodes encodes to the same bytes.
//! - which % 3 == 2: `term u64 | seq u64 | frame`, sealed and opened again: the same fields, and
//!   any single changed byte is refused.
#![no_main]

use ftvm_fuzz::KEY;
use ftvm_proto::epoch::LeaseTerm;
use ftvm_proto::late_input::{open_late_frame, seal_death_notice, seal_late_frame, LateFrame, LateKind};
use ftvm_proto::limits::MAX_GUEST_FRAME;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, p)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            let Ok(f) = open_late_frame(&KEY, p) else { return };
            assert!(f.frame.len() <= MAX_GUEST_FRAME);
            match f.kind {
                LateKind::Frame => assert_eq!(seal_late_frame(&KEY, f.term, f.seq, f.frame), p),
                LateKind::DeathNotice => {
                    assert!(f.frame.is_empty() && f.seq == 0);
                    assert_eq!(seal_death_notice(&KEY, f.term), p);
                }
            }
        }
        1 => {
            let Ok(t) = LeaseTerm::decode(p) else { return };
            assert_eq!(t.encode(), p);
        }
        _ => {
            if p.len() < 16 {
                return;
            }
            let term = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
            let seq = u64::from_le_bytes(p[8..16].try_into().expect("8 bytes"));
            let frame = &p[16..p.len().min(16 + MAX_GUEST_FRAME)];
            let d = seal_late_frame(&KEY, term, seq, frame);
            assert_eq!(open_late_frame(&KEY, &d), Ok(LateFrame { kind: LateKind::Frame, term, seq, frame }));
            let at = usize::from(which) * 7 % d.len();
            let mut bad = d.clone();
            bad[at] ^= 0x01;
            assert!(open_late_frame(&KEY, &bad).is_err());
        }
    }
});
