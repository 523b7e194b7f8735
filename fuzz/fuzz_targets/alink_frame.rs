//! The A-Link frame header (`FrameHeader::decode`) and the frame opener, tag and sequence checks
//! included (userspace/proto/src/frame.rs).
//!
//! Input: `mode u8 | chunk u8 | [limit u16 when mode & 2] | …`; the opener reads at most `chunk`
//! bytes per call and, with mode & 2, refuses payloads over `limit` (`with_max_payload`).
//! * mode & 1 == 0, raw: the rest is the peer's byte stream. No random stream carries a valid
//!   tag, so this checks that nothing panics, that a header that decodes re-encodes to its own
//!   bytes, and that a frame announcing a large payload costs this side at most one read piece of
//!   memory before its tag is checked (a stranger's header must not make the receiver allocate).
//! * mode & 1 == 1, sealed: `tamper_at u16 | tamper_xor u8 | cut u16 | FrameSpec*`: the frames
//!   are sealed with the opener's key, then one byte may be flipped and the stream cut short (cut
//!   0 keeps it whole). The opener must return exactly the frames before the damage, byte for
//!   byte, and refuse the damaged one (and any frame over the limit).
#![no_main]

use ftvm_fuzz::{peak_allocation, seal, CountingAlloc, FrameSpec, Input, Pipe, KEY};
use ftvm_proto::frame::{FrameError, FrameHeader, FrameOpener, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The opener grows a payload buffer one piece at a time as bytes arrive (`READ_PIECE` in
/// frame.rs, 256 KiB); beyond one piece, only bytes actually received may cost memory.
const READ_PIECE: usize = 256 << 10;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let chunk = usize::from(input.u8()).max(1);
    let limit = (mode & 2 != 0).then(|| u32::from(input.u16()));
    let opener = || {
        let o = FrameOpener::new(KEY);
        match limit {
            Some(l) => o.with_max_payload(l),
            None => o,
        }
    };
    if mode & 1 == 0 {
        raw(input.rest(), chunk, opener());
    } else {
        sealed(&mut input, chunk, limit, opener());
    }
});

fn raw(stream: &[u8], chunk: usize, mut opener: FrameOpener) {
    if let Some(head) = stream.get(..HEADER_LEN) {
        let head: &[u8; HEADER_LEN] = head.try_into().expect("32 bytes");
        if let Ok(h) = FrameHeader::decode(head) {
            // The header has no slack: magic, version, kind, flags, zero reserved bits, length,
            // sequence and epoch are all of it.
            assert_eq!(&h.encode(), head, "a decoded header re-encodes to its bytes");
        }
    }
    let mut pipe = Pipe { input: stream, output: Vec::new(), chunk };
    loop {
        let (r, peak) = peak_allocation(|| opener.read(&mut pipe));
        let bound = READ_PIECE + 3 * stream.len() + 4096;
        assert!(peak <= bound, "the opener allocated {peak} bytes for a {}-byte stream", stream.len());
        if r.is_err() {
            break;
        }
    }
}

fn sealed(input: &mut Input<'_>, chunk: usize, limit: Option<u32>, mut opener: FrameOpener) {
    let tamper_at = usize::from(input.u16());
    let tamper_xor = input.u8();
    let cut = usize::from(input.u16());
    let mut specs = Vec::new();
    while let Some(s) = FrameSpec::read(input) {
        specs.push(s);
    }
    let (mut stream, ranges) = seal(KEY, &specs);
    if let Some(b) = stream.get_mut(tamper_at) {
        *b ^= tamper_xor;
    }
    let tampered = tamper_xor != 0 && tamper_at < stream.len();
    let end = if cut == 0 { stream.len() } else { cut.min(stream.len()) };
    stream.truncate(end);
    let mut pipe = Pipe { input: &stream, output: Vec::new(), chunk };
    let mut buf = Vec::new();
    for (i, (spec, range)) in specs.iter().zip(&ranges).enumerate() {
        // Alternate the two entry points; read_into reuses its buffer from frame to frame.
        let got = if i % 2 == 0 {
            opener.read(&mut pipe).map(|f| (f.header, f.payload))
        } else {
            opener.read_into(&mut pipe, &mut buf).map(|h| (h, buf.clone()))
        };
        let damaged = (tampered && range.contains(&tamper_at)) || end < range.end;
        let too_large = limit.is_some_and(|l| spec.payload.len() as u64 > u64::from(l));
        match got {
            Ok((h, payload)) => {
                assert!(!damaged, "frame {i} was damaged but accepted");
                assert!(!too_large, "frame {i} is over the limit but accepted");
                assert_eq!((h.kind, h.flags, h.epoch, h.seq), (spec.kind, spec.flags, spec.epoch, i as u64 + 1));
                assert_eq!(payload, spec.payload);
            }
            Err(e) => {
                assert!(damaged || too_large, "intact frame {i} refused: {e}");
                if end == range.start {
                    assert!(matches!(e, FrameError::Closed), "a cut between frames is a close: {e}");
                }
                if !damaged {
                    assert!(matches!(e, FrameError::TooLarge(_)), "{e}");
                }
                return;
            }
        }
    }
    assert!(matches!(opener.read(&mut pipe), Err(FrameError::Closed)), "the stream ends after its frames");
}
