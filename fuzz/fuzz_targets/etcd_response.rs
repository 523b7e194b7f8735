//! The etcd client's HTTP/1.1 reply parser (chunked bodies included) and its base64 decoder
//! (userspace/repl/src/ha/quorum/etcd.rs); etcd, or whatever answers on its port, is outside input.
//!
//! Input: `which u8 | bytes`. which & 1 == 0: the bytes are a reply read so far; which & 1 == 1:
//! base64 text. A reply complete before the connection closed is the same reply once it has, and
//! its prefixes are incomplete or that same reply, never an error. Base64 that decodes is canonical,
//! so it re-encodes to the same text, and every byte string survives a round trip.
#![no_main]

use ftvm_repl::ha::quorum::etcd::fuzzing::{b64_decode, b64_encode, parse_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, b)) = data.split_first() else { return };
    if which & 1 == 0 {
        let open = parse_response(b, false);
        let closed = parse_response(b, true);
        if let Ok(Some(reply)) = &open {
            assert_eq!(closed.as_ref().ok(), Some(&Some(reply.clone())), "a complete reply changed at the close");
            // Any prefix is still incomplete, or already this reply (a body with a length).
            let cut = usize::from(which >> 1) * b.len() / 128;
            match parse_response(&b[..cut], false) {
                Ok(None) => {}
                Ok(Some(r)) => assert_eq!(&r, reply, "prefix of {cut} bytes"),
                Err(e) => panic!("a prefix of {cut} bytes of a valid reply is an error: {e}"),
            }
        }
    } else {
        if let Ok(text) = std::str::from_utf8(b) {
            if let Some(bytes) = b64_decode(text) {
                assert_eq!(b64_encode(&bytes), text);
            }
        }
        assert_eq!(b64_decode(&b64_encode(b)).as_deref(), Some(b));
    }
});
