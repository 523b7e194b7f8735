//! Every epoch payload decoder (userspace/proto/src/epoch.rs).
//!
//! Input: `kind u8 | [size u64, for Pages (memory pages), DiskWrites, DiskImage and DiskMarks
//! (disk bytes), RdmaPages (memory pages)] | payload`. kind % 12: EpochBegin, EpochCommit, EpochAck, StandbyInfo, Pages,
//! DiskWrites, DiskImage, HeldOutput, HostCpu (userspace/proto/src/cpu.rs), DiskMarks, and (kind % 12)
//! RdmaEndpoint and RdmaPages (memory pages; userspace/proto/src/rdma.rs). What decodes must re-encode to the same bytes: every one of
//! these formats is canonical (reserved fields zero, exact lengths).
#![no_main]

use ftvm_fuzz::Input;
use ftvm_proto::epoch::{
    decode_output, disk_writes_payload_len, encode_disk_image_head, encode_disk_writes_head, encode_output_frame,
    encode_pages_head, pages_payload_len, DiskImageView, DiskWritesView, EpochAck, EpochBegin, EpochCommit, PagesView,
    DiskMarks, DiskWrite, StandbyInfo,
};
use ftvm_proto::cpu::HostCpuCaps;
use ftvm_proto::rdma::{RdmaEndpoint, RdmaPages};
use ftvm_proto::limits::MAX_RDMA_PAGES_PER_FRAME;
use ftvm_proto::limits::{PAGE_SIZE, SECTOR_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 12 {
        0 => fixed(input.rest(), EpochBegin::decode, |v| v.encode().to_vec()),
        1 => fixed(input.rest(), EpochCommit::decode, |v| v.encode().to_vec()),
        2 => fixed(input.rest(), EpochAck::decode, |v| v.encode().to_vec()),
        3 => fixed(input.rest(), StandbyInfo::decode, |v| v.encode().to_vec()),
        4 => pages(input.u64(), input.rest()),
        5 => disk_writes(input.u64(), input.rest()),
        6 => disk_image(input.u64(), input.rest()),
        7 => held_output(input.rest()),
        8 => fixed(input.rest(), HostCpuCaps::decode, HostCpuCaps::encode),
        9 => {
            let disk_bytes = input.u64();
            fixed(input.rest(), |p| DiskMarks::decode(p, disk_bytes), DiskMarks::encode)
        }
        10 => fixed(input.rest(), RdmaEndpoint::decode, |v| v.encode().to_vec()),
        _ => rdma_pages(input.u64(), input.rest()),
    }
});

fn fixed<T, E>(p: &[u8], decode: impl Fn(&[u8]) -> Result<T, E>, encode: impl Fn(&T) -> Vec<u8>) {
    if let Ok(v) = decode(p) {
        assert_eq!(encode(&v), p);
    }
}

fn pages(memory_pages: u64, p: &[u8]) {
    let Ok(v) = PagesView::decode(p, memory_pages) else { return };
    let mut total = 0u64;
    let mut prev_end = None;
    for (r, bytes) in v.runs() {
        assert!(r.len > 0 && r.start.checked_add(r.len).is_some_and(|end| end <= memory_pages));
        assert!(prev_end.is_none_or(|e| e <= r.start), "ascending and disjoint");
        prev_end = Some(r.start + r.len);
        assert_eq!(bytes.len() as u64, r.len * PAGE_SIZE as u64);
        total += r.len;
    }
    assert_eq!(total, v.page_count());
    let mut again = Vec::new();
    assert_eq!(encode_pages_head(v.ranges(), &mut again), total);
    assert_eq!(pages_payload_len(v.ranges()), p.len());
    again.extend(v.runs().flat_map(|(_, b)| b.iter().copied()));
    assert_eq!(again, p);
}

fn disk_writes(disk_bytes: u64, p: &[u8]) {
    let Ok(v) = DiskWritesView::decode(p, disk_bytes) else { return };
    let writes: Vec<DiskWrite> = v.entries().iter().map(|&(sector, b)| DiskWrite::new(sector, b.to_vec())).collect();
    for w in &writes {
        let end = w.sector.checked_mul(SECTOR_SIZE).and_then(|o| o.checked_add(w.data.len() as u64));
        assert!(end.is_some_and(|e| e <= disk_bytes) && !w.data.is_empty());
    }
    let mut again = Vec::new();
    encode_disk_writes_head(&writes, &mut again);
    for w in &writes {
        again.extend_from_slice(&w.data);
    }
    assert_eq!(disk_writes_payload_len(&writes), p.len());
    assert_eq!(again, p);
}

fn disk_image(disk_bytes: u64, p: &[u8]) {
    let Ok(v) = DiskImageView::decode(p, disk_bytes) else { return };
    assert!(v.offset.checked_add(v.data.len() as u64).is_some_and(|e| e <= disk_bytes));
    let mut again = encode_disk_image_head(v.offset).to_vec();
    again.extend_from_slice(v.data);
    assert_eq!(again, p);
}

fn held_output(p: &[u8]) {
    let Ok(frames) = decode_output(p) else { return };
    let mut again = Vec::new();
    for f in &frames {
        encode_output_frame(f, &mut again);
    }
    assert_eq!(again, p);
}

fn rdma_pages(memory_pages: u64, p: &[u8]) {
    let Ok(d) = RdmaPages::decode(p, memory_pages) else { return };
    let n = d.page_count();
    assert!(n >= 1 && n <= MAX_RDMA_PAGES_PER_FRAME && d.ring_offset % PAGE_SIZE as u64 == 0);
    assert!(d.ring_offset.checked_add(d.byte_len()).is_some());
    let mut prev_end = None;
    for r in &d.ranges {
        assert!(r.len > 0 && r.start.checked_add(r.len).is_some_and(|end| end <= memory_pages));
        assert!(prev_end.is_none_or(|e| e <= r.start), "ascending and disjoint");
        prev_end = Some(r.start + r.len);
    }
    assert_eq!(d.encode(), p);
}
