//! The A-Link handshake: version negotiation and mutual authentication with a shared secret.
//!
//! ```text
//! initiator                                   responder
//!   Hello{major, minor, nonce_i}  ──────────▶   (tag keyed with K0 = KDF(secret))
//!                                 ◀──────────   Hello{major, minor, nonce_r}  or  Refused{reason}
//! both: minor = min(minor_i, minor_r)
//!       K_i→r = KDF(secret ‖ nonce_i ‖ nonce_r, "initiator to responder")
//!       K_r→i = KDF(secret ‖ nonce_i ‖ nonce_r, "responder to initiator")
//! ```
//! The Hello frames are tagged with a key derived from the secret alone, so a peer without the
//! secret fails at its first frame. A refusal answers a Hello: its reason carries a tag keyed with
//! the secret and the initiator's fresh nonce, so a refusal recorded earlier and replayed to a
//! starting initiator reads as forged ([`HandshakeError::ForgedRefusal`]), not as a refusal. Every later frame is tagged with a per-session, per-direction
//! key derived from both fresh nonces, so frames recorded from an earlier session cannot be
//! replayed into a new one, and frames cannot be reflected back to their sender.

use std::io::{Read, Write};

use crate::frame::{FrameError, FrameKind, FrameOpener, FrameSealer, PROTOCOL_MAJOR, PROTOCOL_MINOR};

/// Shortest shared secret accepted.
pub const MIN_SECRET_LEN: usize = 16;
const NONCE_LEN: usize = 32;
const HELLO_LEN: usize = 2 + NONCE_LEN;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The configured secret is too short to be worth anything.
    #[error("Shared secret is shorter than {MIN_SECRET_LEN} bytes")]
    WeakSecret,
    /// Reading the system's random source failed.
    #[error("Cannot read random bytes for the nonce")]
    Random(#[source] std::io::Error),
    /// A frame of the handshake was refused (this includes a wrong secret: `BadTag`).
    #[error("Handshake frame refused")]
    Frame(#[from] FrameError),
    /// The peer sent something other than the handshake.
    #[error("Peer sent {0:?} during the handshake")]
    Unexpected(FrameKind),
    /// The peer's Hello payload is malformed.
    #[error("Malformed Hello from the peer")]
    MalformedHello,
    /// The peer refused us.
    #[error("Peer refused the handshake: {0}")]
    Refused(String),
    /// A refusal that does not answer this side's Hello (replayed, or from an older peer): not to
    /// be believed; the caller may try again.
    #[error("A refusal that does not answer this Hello (replayed?): {0}")]
    ForgedRefusal(String),
    /// A peer of another major protocol version.
    #[error("Peer speaks protocol {major}.{minor}, this side speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}")]
    Version {
        /// The peer's major.
        major: u8,
        /// The peer's minor.
        minor: u8,
    },
}

/// An authenticated A-Link session: one sealer and one opener, each with its own key.
#[derive(Debug)]
pub struct Session {
    /// Seals the frames this side sends.
    pub sealer: FrameSealer,
    /// Opens the frames this side receives.
    pub opener: FrameOpener,
    /// The protocol minor version both sides use.
    pub minor: u8,
}

fn hello_key(secret: &[u8]) -> [u8; 32] {
    blake3::derive_key("ftvm a-link 2026 hello key", secret)
}

/// The key of the handshake frames, so that the fuzz targets (fuzz/) can seal a peer's Hello and
/// reach what lies behind its tag. Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn fuzzing_hello_key(secret: &[u8]) -> [u8; 32] {
    hello_key(secret)
}

fn refusal_key(secret: &[u8], nonce_i: &[u8]) -> [u8; 32] {
    let mut material = Vec::with_capacity(secret.len() + NONCE_LEN);
    material.extend_from_slice(secret);
    material.extend_from_slice(nonce_i);
    blake3::derive_key("ftvm a-link 2026 refusal key", &material)
}

/// A refusal's payload: the reason, then a tag binding it to the initiator's nonce.
fn refusal_payload(secret: &[u8], nonce_i: &[u8], reason: &str) -> Vec<u8> {
    let mut p = reason.as_bytes().to_vec();
    p.extend_from_slice(blake3::keyed_hash(&refusal_key(secret, nonce_i), reason.as_bytes()).as_bytes());
    p
}

fn session_key(secret: &[u8], nonce_i: &[u8], nonce_r: &[u8], direction: &str) -> [u8; 32] {
    let context = format!("ftvm a-link 2026 session key {direction}");
    let mut material = Vec::with_capacity(secret.len() + 2 * NONCE_LEN);
    material.extend_from_slice(secret);
    material.extend_from_slice(nonce_i);
    material.extend_from_slice(nonce_r);
    blake3::derive_key(&context, &material)
}

fn nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut n)).map_err(HandshakeError::Random)?;
    Ok(n)
}

fn hello_payload(nonce: &[u8; NONCE_LEN]) -> [u8; HELLO_LEN] {
    let mut p = [0u8; HELLO_LEN];
    p[0] = PROTOCOL_MAJOR;
    p[1] = PROTOCOL_MINOR;
    p[2..].copy_from_slice(nonce);
    p
}

/// A peer's Hello.
#[derive(Debug)]
struct Hello {
    major: u8,
    minor: u8,
    nonce: [u8; NONCE_LEN],
}

/// Reads the peer's Hello, of any version. A refusal is believed only when it answers
/// `own_nonce` (the initiator's side).
fn read_hello<S: Read>(
    stream: &mut S,
    opener: &mut FrameOpener,
    secret: &[u8],
    own_nonce: Option<&[u8; NONCE_LEN]>,
) -> Result<Hello, HandshakeError> {
    let frame = opener.read(stream)?;
    match frame.header.kind {
        FrameKind::Hello => {}
        FrameKind::Refused => {
            let p = &frame.payload;
            let (reason, tag) = p.split_at(p.len().saturating_sub(32));
            let text = String::from_utf8_lossy(reason).into_owned();
            let genuine = own_nonce.is_some_and(|n| {
                tag.len() == 32 && blake3::Hash::from(*blake3::keyed_hash(&refusal_key(secret, n), reason).as_bytes())
                    == blake3::Hash::from(<[u8; 32]>::try_from(tag).unwrap_or([0; 32]))
            });
            return Err(if genuine { HandshakeError::Refused(text) } else { HandshakeError::ForgedRefusal(text) });
        }
        other => return Err(HandshakeError::Unexpected(other)),
    }
    if frame.payload.len() != HELLO_LEN {
        return Err(HandshakeError::MalformedHello);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&frame.payload[2..]);
    Ok(Hello { major: frame.payload[0], minor: frame.payload[1], nonce })
}

/// Both sides use the lower of the two minors.
// While PROTOCOL_MINOR is 0 clippy sees the min as a no-op; it stops being one at minor 1.
#[allow(clippy::unnecessary_min_or_max)]
fn negotiated_minor(peer_minor: u8) -> u8 {
    peer_minor.min(PROTOCOL_MINOR)
}

fn check_secret(secret: &[u8]) -> Result<(), HandshakeError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(HandshakeError::WeakSecret);
    }
    Ok(())
}

fn session(secret: &[u8], nonce_i: &[u8], nonce_r: &[u8], initiator: bool, minor: u8) -> Session {
    let i2r = session_key(secret, nonce_i, nonce_r, "initiator to responder");
    let r2i = session_key(secret, nonce_i, nonce_r, "responder to initiator");
    let (send, recv) = if initiator { (i2r, r2i) } else { (r2i, i2r) };
    let mut sealer = FrameSealer::new(send);
    sealer.set_minor(minor);
    Session { sealer, opener: FrameOpener::new(recv), minor }
}

/// Runs the initiator's side (the primary connecting to the backup).
pub fn initiate<S: Read + Write>(stream: &mut S, secret: &[u8]) -> Result<Session, HandshakeError> {
    initiate_with_version(stream, secret, PROTOCOL_MAJOR, PROTOCOL_MINOR)
}

/// The initiator's side, announcing the given version in its Hello. Only tests need another
/// version than this build's (to check that a peer refuses it); the frame headers still carry this
/// build's version, as the Hello payload is what the responder negotiates on.
pub fn initiate_with_version<S: Read + Write>(
    stream: &mut S,
    secret: &[u8],
    major: u8,
    minor: u8,
) -> Result<Session, HandshakeError> {
    check_secret(secret)?;
    let key = hello_key(secret);
    let nonce_i = nonce()?;
    let mut hello = hello_payload(&nonce_i);
    hello[0] = major;
    hello[1] = minor;
    FrameSealer::new(key).write(stream, FrameKind::Hello, 0, 0, &[&hello])?;
    stream.flush().map_err(FrameError::Io)?;
    let peer = read_hello(stream, &mut FrameOpener::new(key), secret, Some(&nonce_i))?;
    if peer.major != PROTOCOL_MAJOR {
        return Err(HandshakeError::Version { major: peer.major, minor: peer.minor });
    }
    Ok(session(secret, &nonce_i, &peer.nonce, true, negotiated_minor(peer.minor).min(minor)))
}

/// Runs the responder's side (the backup accepting the primary). A peer of another major version
/// is told so (a `Refused` frame) before the error is returned.
pub fn respond<S: Read + Write>(stream: &mut S, secret: &[u8]) -> Result<Session, HandshakeError> {
    respond_with_minor(stream, secret, PROTOCOL_MINOR)
}

/// The responder's side, announcing minor `minor` (at most this build's) in its Hello. Only tests
/// need another minor than this build's (to play an older backup).
pub fn respond_with_minor<S: Read + Write>(stream: &mut S, secret: &[u8], minor: u8) -> Result<Session, HandshakeError> {
    let minor = minor.min(PROTOCOL_MINOR);
    check_secret(secret)?;
    let key = hello_key(secret);
    let hello = read_hello(stream, &mut FrameOpener::new(key), secret, None)?;
    if hello.major != PROTOCOL_MAJOR {
        let reason = format!("this side speaks protocol {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}");
        let _ = refuse_hello(stream, secret, &hello.nonce, &reason);
        return Err(HandshakeError::Version { major: hello.major, minor: hello.minor });
    }
    let nonce_r = nonce()?;
    let mut payload = hello_payload(&nonce_r);
    payload[1] = minor;
    FrameSealer::new(key).write(stream, FrameKind::Hello, 0, 0, &[&payload])?;
    stream.flush().map_err(FrameError::Io)?;
    Ok(session(secret, &hello.nonce, &nonce_r, false, negotiated_minor(hello.minor).min(minor)))
}

/// Answers an initiator's Hello (nonce `nonce_i`) with a refusal its [`initiate`] returns as
/// [`HandshakeError::Refused`].
fn refuse_hello<S: Write>(stream: &mut S, secret: &[u8], nonce_i: &[u8], reason: &str) -> Result<(), HandshakeError> {
    let payload = refusal_payload(secret, nonce_i, reason);
    FrameSealer::new(hello_key(secret)).write(stream, FrameKind::Refused, 0, 0, &[&payload])?;
    stream.flush().map_err(FrameError::Io)?;
    Ok(())
}

/// Refuses an initiator (for example: the responder is busy with another peer): reads its Hello,
/// then answers it with `reason`, which only that Hello's sender can take for a refusal.
pub fn refuse<S: Read + Write>(stream: &mut S, secret: &[u8], reason: &str) -> Result<(), HandshakeError> {
    check_secret(secret)?;
    let hello = read_hello(stream, &mut FrameOpener::new(hello_key(secret)), secret, None)?;
    refuse_hello(stream, secret, &hello.nonce, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const SECRET: &[u8] = b"correct horse battery staple";

    fn pair(secret_a: &'static [u8], secret_b: &'static [u8]) -> (Result<Session, HandshakeError>, Result<Session, HandshakeError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || respond(&mut b, secret_b));
        let ra = initiate(&mut a, secret_a);
        drop(a);
        (ra, t.join().unwrap())
    }

    #[test]
    fn both_sides_agree_and_frames_flow_both_ways() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = respond(&mut b, SECRET).unwrap();
            let f = s.opener.read(&mut b).unwrap();
            s.sealer.write(&mut b, FrameKind::EpochAck, 0, f.header.epoch, &[]).unwrap();
            f.payload
        });
        let mut s = initiate(&mut a, SECRET).unwrap();
        s.sealer.write(&mut a, FrameKind::EpochCommit, 0, 5, &[b"hello"]).unwrap();
        let ack = s.opener.read(&mut a).unwrap();
        assert_eq!((ack.header.kind, ack.header.epoch), (FrameKind::EpochAck, 5));
        assert_eq!(t.join().unwrap(), b"hello");
    }

    /// An older peer on either side (minor 2 here) makes both sides use its minor.
    #[test]
    fn the_lower_minor_wins_on_both_sides() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || respond_with_minor(&mut b, SECRET, 2).unwrap().minor);
        assert_eq!(initiate(&mut a, SECRET).unwrap().minor, 2);
        assert_eq!(t.join().unwrap(), 2);

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || respond(&mut b, SECRET).unwrap().minor);
        assert_eq!(initiate_with_version(&mut a, SECRET, PROTOCOL_MAJOR, 2).unwrap().minor, 2);
        assert_eq!(t.join().unwrap(), 2);

        let (a, b) = pair(SECRET, SECRET);
        assert_eq!((a.unwrap().minor, b.unwrap().minor), (PROTOCOL_MINOR, PROTOCOL_MINOR));
    }

    #[test]
    fn a_wrong_secret_fails_on_both_sides() {
        let (a, b) = pair(SECRET, b"another secret of enough length");
        assert!(matches!(b, Err(HandshakeError::Frame(FrameError::BadTag { .. }))), "{b:?}");
        assert!(a.is_err());
    }

    #[test]
    fn a_short_secret_is_refused() {
        let (a, _) = pair(b"short", b"short");
        assert!(matches!(a, Err(HandshakeError::WeakSecret)));
    }

    #[test]
    fn another_major_version_is_refused_with_a_reason() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || respond(&mut b, SECRET));
        let mut hello = hello_payload(&[1; NONCE_LEN]);
        hello[0] = PROTOCOL_MAJOR + 1;
        FrameSealer::new(hello_key(SECRET)).write(&mut a, FrameKind::Hello, 0, 0, &[&hello]).unwrap();
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::Version { .. })));
        let err = read_hello(&mut a, &mut FrameOpener::new(hello_key(SECRET)), SECRET, Some(&[1; NONCE_LEN])).unwrap_err();
        assert!(matches!(err, HandshakeError::Refused(ref r) if r.contains("protocol")), "{err}");
    }

    #[test]
    fn another_announced_version_is_refused_and_a_refusal_reads_as_such() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || respond(&mut b, SECRET));
        let err = initiate_with_version(&mut a, SECRET, PROTOCOL_MAJOR + 1, 0).unwrap_err();
        assert!(matches!(err, HandshakeError::Refused(ref r) if r.contains("protocol")), "{err}");
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::Version { .. })));

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            refuse(&mut b, SECRET, "busy").unwrap();
            b
        });
        let err = initiate(&mut a, SECRET).unwrap_err();
        assert!(matches!(err, HandshakeError::Refused(ref r) if r == "busy"), "{err}");
        drop(t.join().unwrap());
    }

    /// A refusal recorded from one handshake and replayed to the next initiator is not believed.
    #[test]
    fn a_replayed_refusal_is_forged() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut recorded = Vec::new();
            let mut both = Tee { inner: &mut b, out: &mut recorded };
            refuse(&mut both, SECRET, "busy").unwrap();
            recorded
        });
        assert!(matches!(initiate(&mut a, SECRET), Err(HandshakeError::Refused(_))));
        let recorded = t.join().unwrap();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            // The attacker reads the new Hello and answers with the recording.
            let mut hello = [0u8; 32 + HELLO_LEN + 32];
            b.read_exact(&mut hello).unwrap();
            b.write_all(&recorded).unwrap();
        });
        let err = initiate(&mut a, SECRET).unwrap_err();
        assert!(matches!(err, HandshakeError::ForgedRefusal(ref r) if r == "busy"), "{err}");
        t.join().unwrap();
    }

    /// Writes go to the stream and to a recording.
    struct Tee<'a, S> {
        inner: &'a mut S,
        out: &'a mut Vec<u8>,
    }

    impl<S: Read> Read for Tee<'_, S> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl<S: Write> Write for Tee<'_, S> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn frames_of_one_session_do_not_open_in_another() {
        let (a1, b1) = pair(SECRET, SECRET);
        let (_, b2) = pair(SECRET, SECRET);
        let mut a1 = a1.unwrap();
        let (_b1, mut b2) = (b1.unwrap(), b2.unwrap());
        let mut wire = Vec::new();
        a1.sealer.write(&mut wire, FrameKind::EpochCommit, 0, 1, &[]).unwrap();
        assert!(matches!(b2.opener.read(&mut &wire[..]), Err(FrameError::BadTag { .. })));
        // Nor does a frame reflected back to its sender.
        assert!(matches!(a1.opener.read(&mut &wire[..]), Err(FrameError::BadTag { .. })));
    }
}
