//! The page deltas of A-Link 1.9 (userspace/proto/src/page_delta.rs, xor_runs.rs).
//!
//! Input: `memory_pages u8 | base page byte | bytes`: `bytes` as a `PageDeltas` payload, decoded
//! against a memory of that many pages, each record made into a page from a base page filled with
//! the given byte (which must never panic, and must make a whole page or nothing); then `bytes` cut
//! to a page as a new page, made a delta from that base, which must make exactly it again.
#![no_main]

use ftvm_proto::limits::PAGE_SIZE;
use ftvm_proto::page_delta::{decode, make_page, push, start};
use ftvm_proto::xor_runs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[pages, fill], bytes)) = data.split_first_chunk::<2>() else { return };
    let base = vec![fill; PAGE_SIZE];
    if let Ok(records) = decode(bytes, u64::from(pages)) {
        for d in &records {
            assert!(d.pfn < u64::from(pages));
            let mut out = Vec::new();
            match make_page(&base, d, &mut out) {
                Ok(()) => assert_eq!(out.len(), PAGE_SIZE),
                Err(_) => assert!(out.is_empty()),
            }
        }
    }
    let mut new = bytes[..bytes.len().min(PAGE_SIZE)].to_vec();
    new.resize(PAGE_SIZE, fill);
    let mut runs = Vec::new();
    xor_runs::encode(&base, &new, &mut runs);
    if runs.len() > PAGE_SIZE {
        return;
    }
    let mut payload = Vec::new();
    start(&mut payload);
    push(&mut payload, 0, &new, &runs);
    let records = decode(&payload, 1).expect("a payload of one record decodes");
    let mut out = Vec::new();
    make_page(&base, &records[0], &mut out).expect("a delta makes its page from its own base");
    assert!(out == new);
});
