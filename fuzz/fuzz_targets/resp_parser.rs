//! The guest's RESP2 request parser (guest/kv/src/resp.rs: `Parser::parse_next`, `parse_i64`).
//!
//! Input: `chunk u8 | bytes`. The bytes are parsed once fed whole and once fed `chunk % 32 + 1`
//! bytes at a time: a streaming parser must find the same commands and errors either way (inputs
//! stay below the 64 KiB line limit, the one place where how much is buffered matters).
//! `parse_i64` must accept exactly the canonical decimal form of an i64.
#![no_main]

use ftvm_guest_kv::resp::{parse_i64, Parsed, Parser, MAX_COMMAND_BYTES, MAX_INLINE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, body)) = data.split_first() else { return };
    let whole = parse(body, body.len().max(1));
    if body.len() < MAX_INLINE_LEN {
        let pieces = parse(body, usize::from(chunk % 32) + 1);
        assert_eq!(whole, pieces, "the same input in pieces parses differently");
    }
    for p in &whole {
        match p {
            Parsed::Command(args) => {
                assert!(!args.is_empty());
                assert!(args.iter().map(Vec::len).sum::<usize>() <= MAX_COMMAND_BYTES);
            }
            Parsed::Error(e) => assert!(e.starts_with("ERR "), "{e}"),
        }
    }
    let s = &body[..body.len().min(24)];
    let canonical = std::str::from_utf8(s).ok().and_then(|t| t.parse::<i64>().ok()).filter(|v| v.to_string().as_bytes() == s);
    assert_eq!(parse_i64(s), canonical, "{:?}", String::from_utf8_lossy(s));
});

fn parse(body: &[u8], chunk: usize) -> Vec<Parsed> {
    let mut parser = Parser::new();
    let mut out = Vec::new();
    for piece in body.chunks(chunk) {
        parser.feed(piece);
        while let Some(p) = parser.parse_next() {
            out.push(p);
        }
    }
    out
}
