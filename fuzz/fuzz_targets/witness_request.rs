//! The witness's request and reply payloads (userspace/proto/src/witness.rs).
//!
//! Input: `which u8 | payload`; which & 1 == 0: `WitnessRequest::decode`, else
//! `WitnessReply::decode`. A request's encoding is canonical (every byte is checked), so one that
//! decodes re-encodes to the same bytes. A reply ignores the fields its status does not use, so
//! it must only decode again to the same value (when its text fits the 255 bytes `encode` keeps).
#![no_main]

use ftvm_proto::witness::{WitnessReply, WitnessRequest, MAX_REPLY_LEN, MAX_REQUEST_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, p)) = data.split_first() else { return };
    if which & 1 == 0 {
        let Ok(req) = WitnessRequest::decode(p) else { return };
        assert!(p.len() <= MAX_REQUEST_LEN);
        assert_eq!(req.encode().expect("a decoded request has valid names"), p);
    } else {
        let Ok(reply) = WitnessReply::decode(p) else { return };
        assert!(p.len() <= MAX_REPLY_LEN);
        let again = reply.encode();
        if again.len() < MAX_REPLY_LEN {
            assert_eq!(WitnessReply::decode(&again).as_ref(), Ok(&reply));
        }
    }
});
