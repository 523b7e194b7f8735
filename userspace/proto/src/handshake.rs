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
//! secret fails at its first frame. Every later frame is tagged with a per-session, per-direction
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

/// Reads the peer's Hello and returns (minor, nonce).
fn read_hello<S: Read>(stream: &mut S, opener: &mut FrameOpener) -> Result<(u8, [u8; NONCE_LEN]), HandshakeError> {
    let frame = opener.read(stream)?;
    match frame.header.kind {
        FrameKind::Hello => {}
        FrameKind::Refused => {
            return Err(HandshakeError::Refused(String::from_utf8_lossy(&frame.payload).into_owned()))
        }
        other => return Err(HandshakeError::Unexpected(other)),
    }
    if frame.payload.len() != HELLO_LEN {
        return Err(HandshakeError::MalformedHello);
    }
    let (major, minor) = (frame.payload[0], frame.payload[1]);
    if major != PROTOCOL_MAJOR {
        return Err(HandshakeError::Version { major, minor });
    }
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(&frame.payload[2..]);
    Ok((minor, n))
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
    let (minor, nonce_r) = read_hello(stream, &mut FrameOpener::new(key))?;
    Ok(session(secret, &nonce_i, &nonce_r, true, negotiated_minor(minor)))
}

/// Runs the responder's side (the backup accepting the primary). A peer of another major version
/// is told so (a `Refused` frame) before the error is returned.
pub fn respond<S: Read + Write>(stream: &mut S, secret: &[u8]) -> Result<Session, HandshakeError> {
    check_secret(secret)?;
    let key = hello_key(secret);
    let mut sealer = FrameSealer::new(key);
    let (minor, nonce_i) = match read_hello(stream, &mut FrameOpener::new(key)) {
        Ok(hello) => hello,
        Err(HandshakeError::Version { major, minor }) => {
            let reason = format!("this side speaks protocol {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}");
            let _ = sealer.write(stream, FrameKind::Refused, 0, 0, &[reason.as_bytes()]);
            return Err(HandshakeError::Version { major, minor });
        }
        Err(e) => return Err(e),
    };
    let nonce_r = nonce()?;
    sealer.write(stream, FrameKind::Hello, 0, 0, &[&hello_payload(&nonce_r)])?;
    stream.flush().map_err(FrameError::Io)?;
    Ok(session(secret, &nonce_i, &nonce_r, false, negotiated_minor(minor)))
}

/// Refuses an initiator without reading its Hello (for example: the responder is busy with
/// another peer), with a reason the initiator's [`initiate`] returns as [`HandshakeError::Refused`].
/// Only a peer with the secret can read the refusal as authentic.
pub fn refuse<S: Write>(stream: &mut S, secret: &[u8], reason: &str) -> Result<(), HandshakeError> {
    check_secret(secret)?;
    FrameSealer::new(hello_key(secret)).write(stream, FrameKind::Refused, 0, 0, &[reason.as_bytes()])?;
    stream.flush().map_err(FrameError::Io)?;
    Ok(())
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
        let err = read_hello(&mut a, &mut FrameOpener::new(hello_key(SECRET))).unwrap_err();
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
        refuse(&mut b, SECRET, "busy").unwrap();
        let err = initiate(&mut a, SECRET).unwrap_err();
        assert!(matches!(err, HandshakeError::Refused(ref r) if r == "busy"), "{err}");
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
