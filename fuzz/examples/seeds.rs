//! Writes the seed corpora, `<dir>/<target>/seed-<name>`, in each target's input format, from the
//! project's real encoders: valid messages give the fuzzer a start past the first checks.
//!
//! Run by `cargo xtask fuzz --seed` (or `cargo run --example seeds -- fuzz/corpus` in fuzz/).

use std::path::{Path, PathBuf};

use ftvm_fuzz::{seal, FrameSpec, KEY, SECRET};
use ftvm_guest_abi::{BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use ftvm_proto::frame::{FrameKind, FrameSealer, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use ftvm_proto::handshake::fuzzing_hello_key;
use ftvm_proto::late_input::{seal_death_notice, seal_late_frame, LateInputId};
use ftvm_proto::pages::PageRange;
use ftvm_proto::witness::{
    WitnessClaim, WitnessOp, WitnessPrevious, WitnessReleaseReason, WitnessReply, WitnessRequest,
};
use ftvm_proto::EpochId;
use ftvm_proto::cpu::{CpuidReg, CpuidWord, HostCpuCaps};
use ftvm_proto::epoch::{DiskMarks, DiskWrite};
use ftvm_proto::epoch::{
    encode_disk_image_head, encode_disk_writes_head, encode_output_frame, encode_pages_head, EpochAck, EpochBegin,
    EpochCommit, LeaseTerm, StandbyInfo,
};
use ftvm_repl::ha::quorum::etcd::fuzzing::b64_encode;
use ftvm_proto::limits::PAGE_SIZE;
use ftvm_vmm::devices::persist::{DevicesState, VirtioDeviceState};
use ftvm_vmm::devices::virtio::block::{BlockState, InflightRequestState, RequestType, SegmentState};
use ftvm_vmm::devices::virtio::net::persist::NetState;
use ftvm_vmm::devices::virtio::persist::{MmioTransportState, VirtqueueState};
use ftvm_vmm::state::{ClockState, MachineState, HEADER_SIZE};
use ftvm_vmm::vcpu::state::{FpuRegs, FpuState, MsrEntry};
use ftvm_vmm::vcpu::VcpuState;

struct Seeds {
    dir: PathBuf,
}

impl Seeds {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let d = self.dir.join(target);
        std::fs::create_dir_all(&d).expect("create the corpus directory");
        std::fs::write(d.join(format!("seed-{name}")), bytes).expect("write a seed");
    }
}

fn spec(kind: FrameKind, epoch: u64, payload: &[u8]) -> FrameSpec {
    FrameSpec { kind, flags: 0, epoch, payload: payload.to_vec() }
}

fn specs(head: &[u8], frames: &[FrameSpec]) -> Vec<u8> {
    let mut out = head.to_vec();
    for f in frames {
        f.write(&mut out);
    }
    out
}

fn hello(major: u8, minor: u8) -> Vec<u8> {
    let mut p = vec![major, minor];
    p.extend_from_slice(&[0x42; 32]);
    p
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let s = Seeds { dir: Path::new(&dir).to_path_buf() };
    let begin = EpochBegin {
        epoch: EpochId(3),
        page_count: 2,
        state_len: 100,
        disk_write_count: 1,
        disk_image_bytes: 0,
        initial_sync: false,
    };

    // alink_frame: a real stream under the opener's key (raw mode reads it as is), and the same
    // frames described for sealing, whole, damaged, and over a limit.
    let frames = [
        spec(FrameKind::EpochBegin, 3, &begin.encode()),
        spec(FrameKind::Heartbeat, 0, b""),
        spec(FrameKind::EpochAck, 3, &EpochAck { epoch: EpochId(3) }.encode()),
    ];
    let (stream, _) = seal(KEY, &frames);
    s.put("alink_frame", "raw-stream", &[[0, 255].as_slice(), &stream].concat());
    s.put("alink_frame", "sealed", &specs(&[1, 7, 0, 0, 0, 0, 0], &frames));
    s.put("alink_frame", "sealed-tampered", &specs(&[1, 255, 40, 0, 1, 0, 0], &frames));
    s.put("alink_frame", "sealed-cut", &specs(&[1, 255, 0, 0, 0, 100, 0], &frames));
    s.put("alink_frame", "sealed-limit", &specs(&[3, 255, 16, 0, 0, 0, 0, 0, 0], &frames));

    // handshake: the peer's Hello sealed with the Hello key, raw and described, for each role.
    let mut hello_stream = Vec::new();
    FrameSealer::new(fuzzing_hello_key(SECRET))
        .write(&mut hello_stream, FrameKind::Hello, 0, 0, &[&hello(PROTOCOL_MAJOR, PROTOCOL_MINOR)])
        .expect("write to a Vec");
    for role in 0..3u8 {
        s.put("handshake", &format!("raw-hello-{role}"), &[[role, 255, 0].as_slice(), &hello_stream].concat());
        let ok = [spec(FrameKind::Hello, 0, &hello(PROTOCOL_MAJOR, PROTOCOL_MINOR))];
        s.put("handshake", &format!("hello-{role}"), &specs(&[role, 255, 1, 1], &ok));
        let other = [spec(FrameKind::Hello, 0, &hello(PROTOCOL_MAJOR + 1, 0))];
        s.put("handshake", &format!("other-major-{role}"), &specs(&[role, 5, 1, 1], &other));
    }
    let refusal = [spec(FrameKind::Refused, 0, &[b"busy".as_slice(), &[7; 32]].concat())];
    s.put("handshake", "refused", &specs(&[1, 255, 1, 1], &refusal));

    // epoch_payloads: kind byte, size for the three kinds that are checked against one.
    s.put("epoch_payloads", "begin", &[[0].as_slice(), &begin.encode()].concat());
    let commit = EpochCommit { epoch: EpochId(3), pages: 2, state_bytes: 100, disk_writes: 1, disk_image_bytes: 0, digest: [9; 32] };
    s.put("epoch_payloads", "commit", &[[1].as_slice(), &commit.encode()].concat());
    s.put("epoch_payloads", "ack", &[[2].as_slice(), &EpochAck { epoch: EpochId(3) }.encode()].concat());
    let info = StandbyInfo { committed: Some(EpochId(2)), restorable: true, memory_bytes: 1 << 24, disk_bytes: 1 << 20 };
    s.put("epoch_payloads", "standby", &[[3].as_slice(), &info.encode()].concat());
    let ranges = [PageRange { start: 1, len: 1 }, PageRange { start: 9, len: 1 }];
    let mut pages = Vec::new();
    let n = encode_pages_head(&ranges, &mut pages);
    pages.resize(pages.len() + n as usize * PAGE_SIZE, 0xab);
    s.put("epoch_payloads", "pages", &[[4].as_slice(), &4096u64.to_le_bytes(), &pages].concat());
    let writes = [DiskWrite::new(2, vec![1; 512]), DiskWrite::new(8, vec![2; 1024])];
    let mut dw = Vec::new();
    encode_disk_writes_head(&writes, &mut dw);
    for w in &writes {
        dw.extend_from_slice(&w.data);
    }
    s.put("epoch_payloads", "disk-writes", &[[5].as_slice(), &(1u64 << 20).to_le_bytes(), &dw].concat());
    let image = [encode_disk_image_head(1024).as_slice(), &[3; 512]].concat();
    s.put("epoch_payloads", "disk-image", &[[6].as_slice(), &(1u64 << 20).to_le_bytes(), &image].concat());
    let mut held = Vec::new();
    encode_output_frame(&[0x11; 60], &mut held);
    encode_output_frame(&[0x22; 14], &mut held);
    s.put("epoch_payloads", "held-output", &[[7].as_slice(), &held].concat());
    let cpu = HostCpuCaps {
        words: vec![(CpuidWord::new(1, 0, CpuidReg::Edx), 0x078b_fbff), (CpuidWord::new(7, 0, CpuidReg::Ebx), 0x20)],
        xcr0: 7,
        xsave_bytes: 832,
        msrs: vec![0x10, 0x174, 0xc000_0103],
    };
    s.put("epoch_payloads", "host-cpu", &[[8].as_slice(), &cpu.encode()].concat());
    let marks = DiskMarks { region_bytes: 256 << 10, regions: Some(vec![0, 3, 255]) };
    s.put("epoch_payloads", "disk-marks", &[[9].as_slice(), &(64u64 << 20).to_le_bytes(), &marks.encode()].concat());

    // page_ranges: base, frame size, then ops (insert, bitmap, union, drain, contains, clear).
    s.put("page_ranges", "inserts", &[0, 4, 0, 10, 0, 5, 0, 20, 0, 5, 2, 15, 0, 5, 4, 12, 0]);
    s.put(
        "page_ranges",
        "bitmap-top",
        &[[2, 3, 1, 0, 1, 2].as_slice(), &0x8000_0000_0000_0007u64.to_le_bytes(), &1u64.to_le_bytes(), &[3, 0, 0, 0, 2, 1]]
            .concat(),
    );

    // machine_state: a realistic state's payload (mode 1: wrapped by the target) and container.
    let state = machine_state();
    let blob = state.to_bytes().expect("a machine state encodes");
    s.put("machine_state", "payload", &[[1].as_slice(), &blob[HEADER_SIZE..]].concat());
    s.put("machine_state", "container", &[[0].as_slice(), &blob].concat());
    let small = MachineState { vcpus: Vec::new(), devices: DevicesState::default(), clock: None, ..state };
    s.put("machine_state", "small-payload", &[[1].as_slice(), &small.to_bytes().expect("encodes")[HEADER_SIZE..]].concat());

    // resp_parser: chunk size, then requests as redis-cli and clients send them.
    s.put("resp_parser", "multibulk", b"\x03*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n");
    s.put("resp_parser", "inline", b"\x05PING\r\nSET k \"a\\x41\\n\" 'b\\'c'\r\nINCR -12\r\n");
    s.put("resp_parser", "errors", b"\x01*-1\r\n*1\r\nX\r\n*2\r\n$99999999\r\n$1\r\nk\r\n\"open\r\n");
    s.put("resp_parser", "integer", b"\x00-9223372036854775808");

    // witness_request: requests (0) and replies (1).
    let req = |op| WitnessRequest { op, term: 7, vm: "vm-1".into(), host: "host_a".into() };
    for (name, op) in [
        ("acquire", WitnessOp::Acquire(WitnessClaim::TakeOver)),
        ("renew", WitnessOp::Renew),
        ("release", WitnessOp::Release(WitnessReleaseReason::HolderDied)),
    ] {
        s.put("witness_request", name, &[[0].as_slice(), &req(op).encode().expect("valid names")].concat());
    }
    for (name, reply) in [
        ("granted", WitnessReply::Granted { term: 8, ttl_ms: 3000, previous: WitnessPrevious::Expired }),
        ("held", WitnessReply::Held { owner: "host_b".into(), term: 8, remaining_ms: 100 }),
        ("stale", WitnessReply::Stale { known: 6, current: 8, owner: "host_b".into() }),
        ("error", WitnessReply::Error("no such vm".into())),
    ] {
        s.put("witness_request", name, &[[1].as_slice(), &reply.encode()].concat());
    }

    // page_delta: a payload of two records over 8 pages of zero bytes, and a page.
    let mut page = vec![0u8; 4096];
    page[100..110].fill(7);
    let mut runs = Vec::new();
    ftvm_proto::xor_runs::encode(&[0u8; 4096], &page, &mut runs);
    let mut deltas = Vec::new();
    ftvm_proto::page_delta::start(&mut deltas);
    ftvm_proto::page_delta::push(&mut deltas, 2, &page, &runs);
    ftvm_proto::page_delta::push(&mut deltas, 5, &page, &runs);
    s.put("page_delta", "two-records", &[[8, 0].as_slice(), &deltas].concat());
    s.put("page_delta", "page", &[[1, 0].as_slice(), &page[..200]].concat());

    // late_input: a datagram (0), LeaseTerm payloads (1), fields to seal (2).
    let frame: Vec<u8> = (0..80u8).collect();
    s.put("late_input", "datagram", &[[0].as_slice(), &seal_late_frame(&KEY, 3, 17, &frame)].concat());
    s.put("late_input", "death-notice", &[[0].as_slice(), &seal_death_notice(&KEY, 3)].concat());
    s.put("late_input", "lease-term", &[[1].as_slice(), &LeaseTerm { term: 3, late_input: None }.encode()].concat());
    let with_id = LeaseTerm { term: 3, late_input: Some(LateInputId([0x42; 16])) };
    s.put("late_input", "lease-term-id", &[[1].as_slice(), &with_id.encode()].concat());
    s.put("late_input", "fields", &[[2].as_slice(), &3u64.to_le_bytes(), &17u64.to_le_bytes(), &frame].concat());

    // etcd_response: replies as etcd's JSON gateway sends them, and base64.
    let json = br#"{"header":{"cluster_id":"1","revision":"5"},"succeeded":true,"responses":[{"response_range":{"kvs":[{"key":"L2Z0dm0vdm0vdGVybQ==","value":"eyJ0ZXJtIjoyfQ==","mod_revision":"4"}]}}]}"#;
    let length = [format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", json.len()).as_bytes(), json].concat();
    s.put("etcd_response", "content-length", &[[0].as_slice(), &length].concat());
    let chunked = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
        format!("{:x};ext=1\r\n", 40).as_bytes(),
        &json[..40],
        b"\r\n",
        format!("{:x}\r\n", json.len() - 40).as_bytes(),
        &json[40..],
        b"\r\n0\r\nX-Trailer: 1\r\n\r\n",
    ]
    .concat();
    s.put("etcd_response", "chunked", &[[0xfe].as_slice(), &chunked].concat());
    s.put("etcd_response", "to-close", b"\x00HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n\r\nbusy");
    s.put("etcd_response", "base64", &[[1].as_slice(), b64_encode(b"/ftvm/vm/lease\x00\xff").as_bytes()].concat());
}

/// A machine state like one a real VM saves: a vCPU with XSAVE, LAPIC and MSRs, both devices
/// with queues and a request in flight, the clock.
fn machine_state() -> MachineState {
    let mut boot_info = vec![0u8; std::mem::size_of::<ftvm_guest_abi::BootInfo>()];
    boot_info[..8].copy_from_slice(&BOOT_INFO_MAGIC.to_le_bytes());
    boot_info[8..12].copy_from_slice(&BOOT_INFO_VERSION.to_le_bytes());
    let vcpu = |fpu| VcpuState {
        cpuid: vec![Default::default(); 2],
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        fpu,
        xcrs: Some(Default::default()),
        debug_regs: None,
        lapic: Some(Default::default()),
        msrs: vec![MsrEntry { index: 0x10, data: 123_456 }, MsrEntry { index: 0xc000_0082, data: 0xffff_8000_0000_1000 }],
        vcpu_events: Default::default(),
        tsc_khz: Some(2_000_000),
    };
    let legacy = FpuRegs {
        fpr: [[0; 16]; 8],
        fcw: 0x37f,
        fsw: 0,
        ftwx: 0,
        last_opcode: 0,
        last_ip: 0,
        last_dp: 0,
        xmm: [[1; 16]; 16],
        mxcsr: 0x1f80,
    };
    let queue = VirtqueueState { max_size: 256, size: 256, ready: true, desc_table: 0x10_0000, avail_ring: 0x10_1000, used_ring: 0x10_2000, next_avail: 5, next_used: 4, event_idx_enabled: true };
    let transport = |device_type| MmioTransportState { device_type, status: 15, activated: true, queues: vec![queue; 2], ..Default::default() };
    MachineState {
        mem_size: 64 << 20,
        tsc_khz: 2_000_000,
        boot_info,
        vcpus: vec![vcpu(FpuState::Xsave(vec![0; 1024])), vcpu(FpuState::Fpu(Box::new(legacy)))],
        devices: DevicesState {
            net: Some(VirtioDeviceState {
                transport: transport(1),
                device: NetState { mac: [2, 0, 0, 0, 0, 1], rx_starved: false, rx_notifications_on: true, rx_pending: Some(vec![0; 20]), tx_stalled: false },
            }),
            block: Some(VirtioDeviceState {
                transport: transport(2),
                device: BlockState {
                    capacity: 2048,
                    inflight: vec![InflightRequestState {
                        head: 3,
                        request_type: RequestType::Out,
                        sector: 8,
                        segments: vec![SegmentState { addr: 0x20_0000, len: 512 }],
                        status_addr: 0x20_1000,
                    }],
                },
            }),
        },
        clock: Some(ClockState { clock: 1_000_000_000, flags: 2 }),
    }
}
