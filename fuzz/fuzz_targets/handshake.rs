//! The A-Link handshake (userspace/proto/src/handshake.rs): the responder, the initiator and the
//! refusing side, each driven in memory by a fuzzed peer.
//!
//! Input: `role u8 | chunk u8 | mode u8 | …` (role % 3: respond, initiate, refuse; reads return
//! at most `chunk` bytes).
//! * mode & 1 == 0, raw: the rest is the peer's stream (nothing gets past the Hello tag; checks
//!   the header and tag paths never panic).
//! * mode & 1 == 1, sealed: `count u8 | FrameSpec × count | trailing bytes`: the frames are sealed
//!   with the Hello key of the shared secret, as a peer that knows it would, so the Hello and
//!   refusal decoders behind the tag run. Each side's result must follow from the peer's first
//!   frame exactly; after a handshake that succeeds, the trailing bytes go to the session's opener
//!   (which must refuse them: their tags cannot be right).
#![no_main]

use ftvm_fuzz::{seal, FrameSpec, Input, Pipe, SECRET};
use ftvm_proto::frame::{FrameKind, FrameOpener, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use ftvm_proto::handshake::{self, fuzzing_hello_key, HandshakeError, Session};
use libfuzzer_sys::fuzz_target;

const HELLO_LEN: usize = 34;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Respond,
    Initiate,
    Refuse,
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let role = [Role::Respond, Role::Initiate, Role::Refuse][usize::from(input.u8() % 3)];
    let chunk = usize::from(input.u8()).max(1);
    let mode = input.u8();
    let key = fuzzing_hello_key(SECRET);
    let (stream, first) = if mode & 1 == 0 {
        (input.rest().to_vec(), None)
    } else {
        let count = input.u8();
        let mut specs = Vec::new();
        for _ in 0..count {
            match FrameSpec::read(&mut input) {
                Some(s) => specs.push(s),
                None => break,
            }
        }
        let (mut stream, _) = seal(key, &specs);
        stream.extend_from_slice(input.rest());
        // Without a sealed frame the trailing bytes are the whole stream: nothing to predict.
        (stream, specs.into_iter().next())
    };
    let mut pipe = Pipe { input: &stream, output: Vec::new(), chunk };
    // A session, or None when this side refused the peer as asked.
    let result: Result<Option<Session>, HandshakeError> = match role {
        Role::Respond => handshake::respond(&mut pipe, SECRET).map(Some),
        Role::Initiate => handshake::initiate(&mut pipe, SECRET).map(Some),
        Role::Refuse => handshake::refuse(&mut pipe, SECRET, "busy").map(|()| None),
    };
    // What this side wrote, opened as its peer would.
    let mut out = &pipe.output[..];
    let mut peer_view = FrameOpener::new(key);
    let mut written = Vec::new();
    while let Ok(f) = peer_view.read(&mut out) {
        written.push(f);
    }
    assert!(out.is_empty(), "this side wrote only whole, valid frames");
    if role == Role::Initiate {
        let hello = written.first().expect("the initiator speaks first");
        assert_eq!(hello.header.kind, FrameKind::Hello);
        assert_eq!(&hello.payload[..2], &[PROTOCOL_MAJOR, PROTOCOL_MINOR]);
    }
    if let Some(first) = first {
        check_sealed(role, first, &result, &written);
    }
    if let Ok(Some(mut session)) = result {
        assert_eq!(written.last().map(|f| f.header.kind), Some(FrameKind::Hello));
        // Bytes after the handshake are under the session key, which no input can know.
        let rest = pipe.input;
        assert!(session.opener.read(&mut Pipe { input: rest, output: Vec::new(), chunk }).is_err());
    }
});

/// The result each role must reach from the peer's first (sealed) frame.
fn check_sealed(
    role: Role,
    first: FrameSpec,
    result: &Result<Option<Session>, HandshakeError>,
    written: &[ftvm_proto::frame::Frame],
) {
    let p = &first.payload;
    match first.kind {
        FrameKind::Hello if p.len() != HELLO_LEN => {
            assert!(matches!(result, Err(HandshakeError::MalformedHello)), "{result:?}");
        }
        FrameKind::Hello if role == Role::Refuse => {
            // `refuse` answered the Hello with a refusal (whatever its version).
            assert!(matches!(result, Ok(None)), "{result:?}");
            assert_eq!(written.last().map(|f| f.header.kind), Some(FrameKind::Refused));
        }
        FrameKind::Hello if p[0] != PROTOCOL_MAJOR => {
            assert!(
                matches!(result, Err(HandshakeError::Version { major, minor }) if *major == p[0] && *minor == p[1]),
                "{result:?}"
            );
            if role == Role::Respond {
                assert_eq!(written.last().map(|f| f.header.kind), Some(FrameKind::Refused), "told why");
            }
        }
        FrameKind::Hello => {
            let Ok(Some(session)) = result else { panic!("a valid Hello of this major is refused: {result:?}") };
            assert_eq!(session.minor, p[1].min(PROTOCOL_MINOR));
        }
        // No input can bind a refusal to a nonce drawn after it was written.
        FrameKind::Refused => assert!(matches!(result, Err(HandshakeError::ForgedRefusal(_))), "{result:?}"),
        other => assert!(matches!(result, Err(HandshakeError::Unexpected(k)) if *k == other), "{result:?}"),
    }
}
