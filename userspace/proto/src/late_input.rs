//! Guest input that reached a primary after its daemon died: the datagrams its lease watchdog
//! sends to the backup.
//!
//! A client's request that arrives at the primary's TAP in the milliseconds between the daemon's
//! death and the backup's takeover would otherwise be lost with the TAP, and the client would wait
//! for its retransmission timeout (200 ms at least on Linux). The watchdog, which outlives the
//! daemon and holds the same TAP, reads those frames and sends each, as it was read (virtio-net
//! header first), to the backup's A-Link address over UDP; the backup gives them to the VM it
//! resumes. Input only: none of this releases guest output, and a lost datagram only costs the
//! client its retransmission.
//!
//! Each datagram is tagged with a key derived from the A-Link secret and a random id the primary's
//! daemon chose at its start and told the backup in its A-Link session (`LeaseTerm` frame, from
//! protocol 1.8). A datagram of another daemon's life, or forged without the secret, does not
//! open. The sequence number lets the backup take each frame once.
//!
//! The watchdog also sends a *death notice* (kind 1, no frame) as soon as it has released the dead
//! daemon's lease, so that the backup takes over at once instead of waiting for the daemon's
//! A-Link connection to close or fall silent. It carries the same authority as the "daemon dead"
//! of the host's heartbeat responder, which the same watchdog sets first. A backup of an earlier
//! version refuses it (its kind byte was reserved), which costs it only the notice.
//!
//! ```text
//! magic "FTLI" | version u8 (1) | kind u8 (0 frame, 1 death notice) | 0 0 | term u64 | seq u64
//!   | frame | tag [32]
//! ```
//! (little-endian; the tag is keyed BLAKE3 over everything before it)

use crate::le::u64_at;
use crate::limits::MAX_GUEST_FRAME;

/// The first bytes of every datagram.
pub const LATE_INPUT_MAGIC: [u8; 4] = *b"FTLI";
/// The datagram layout's version.
pub const LATE_INPUT_VERSION: u8 = 1;
/// Bytes before the frame.
pub const LATE_INPUT_HEAD: usize = 24;
/// Bytes of the tag after the frame.
pub const LATE_INPUT_TAG: usize = 32;
/// The largest datagram: the largest guest frame with its head and tag.
pub const MAX_LATE_INPUT_DATAGRAM: usize = LATE_INPUT_HEAD + MAX_GUEST_FRAME + LATE_INPUT_TAG;
/// Bytes of the daemon's id.
pub const LATE_INPUT_ID_LEN: usize = 16;

/// The random id a primary's daemon chose at its start (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LateInputId(pub [u8; LATE_INPUT_ID_LEN]);

impl LateInputId {
    /// A fresh id from the kernel's random source.
    pub fn random() -> std::io::Result<Self> {
        let mut id = [0u8; LATE_INPUT_ID_LEN];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut id)?;
        Ok(Self(id))
    }

    /// Lower-case hex, for a command line.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`Self::to_hex`]'s form.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 2 * LATE_INPUT_ID_LEN || !s.is_ascii() {
            return None;
        }
        let mut id = [0u8; LATE_INPUT_ID_LEN];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(id))
    }
}

impl std::fmt::Debug for LateInputId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LateInputId({})", self.to_hex())
    }
}

/// The key that tags the late input of the daemon with `id`.
pub fn late_input_key(secret: &[u8], id: &LateInputId) -> [u8; 32] {
    let mut material = Vec::with_capacity(secret.len() + LATE_INPUT_ID_LEN);
    material.extend_from_slice(secret);
    material.extend_from_slice(&id.0);
    blake3::derive_key("ftvm a-link 2026 late input key", &material)
}

/// Why a datagram was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LateInputError {
    /// Shorter than a head and a tag, or longer than the largest datagram.
    #[error("late input datagram of {0} bytes (a head and a tag, at most {MAX_LATE_INPUT_DATAGRAM} bytes)")]
    Size(usize),
    /// Not a late input datagram.
    #[error("not a late input datagram (bad magic)")]
    Magic,
    /// A layout this side does not know.
    #[error("late input datagram version {0} (this side reads {LATE_INPUT_VERSION})")]
    Version(u8),
    /// The tag does not match: another key (another daemon's life, another secret) or changed bytes.
    #[error("late input datagram fails authentication")]
    Tag,
    /// Reserved bytes not zero.
    #[error("reserved bytes set in a late input datagram")]
    Reserved,
    /// A kind this side does not know.
    #[error("late input datagram of kind {0} (this side reads 0, a frame, and 1, a death notice)")]
    Kind(u8),
    /// A death notice with a frame (of this many bytes) or a sequence number.
    #[error("a death notice with {0} bytes of frame or a sequence number")]
    BadNotice(usize),
}

/// What a datagram says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LateKind {
    /// A frame that reached the dead primary's TAP.
    Frame,
    /// The primary's daemon died; its lease was released (see the module documentation).
    DeathNotice,
}

impl LateKind {
    fn byte(self) -> u8 {
        match self {
            Self::Frame => 0,
            Self::DeathNotice => 1,
        }
    }
}

/// One opened datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct LateFrame<'a> {
    /// A frame, or the death notice (whose `frame` is empty).
    pub kind: LateKind,
    /// The dead primary's lease term.
    pub term: u64,
    /// The frame's number among those its watchdog sent, from 0.
    pub seq: u64,
    /// The frame as read from the TAP, virtio-net header first.
    pub frame: &'a [u8],
}

/// The datagram carrying `frame` (at most [`MAX_GUEST_FRAME`] bytes: longer ones are cut, and then
/// refused by the backup's device like any frame no receive path could have read).
pub fn seal_late_frame(key: &[u8; 32], term: u64, seq: u64, frame: &[u8]) -> Vec<u8> {
    seal(key, LateKind::Frame, term, seq, &frame[..frame.len().min(MAX_GUEST_FRAME)])
}

/// The death notice of the daemon whose late input `key` tags, which held lease `term`.
pub fn seal_death_notice(key: &[u8; 32], term: u64) -> Vec<u8> {
    seal(key, LateKind::DeathNotice, term, 0, &[])
}

fn seal(key: &[u8; 32], kind: LateKind, term: u64, seq: u64, frame: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(LATE_INPUT_HEAD + frame.len() + LATE_INPUT_TAG);
    d.extend_from_slice(&LATE_INPUT_MAGIC);
    d.extend_from_slice(&[LATE_INPUT_VERSION, kind.byte(), 0, 0]);
    d.extend_from_slice(&term.to_le_bytes());
    d.extend_from_slice(&seq.to_le_bytes());
    d.extend_from_slice(frame);
    let tag = blake3::keyed_hash(key, &d);
    d.extend_from_slice(tag.as_bytes());
    d
}

/// Checks and opens a datagram sealed with `key`.
pub fn open_late_frame<'a>(key: &[u8; 32], d: &'a [u8]) -> Result<LateFrame<'a>, LateInputError> {
    if d.len() < LATE_INPUT_HEAD + LATE_INPUT_TAG || d.len() > MAX_LATE_INPUT_DATAGRAM {
        return Err(LateInputError::Size(d.len()));
    }
    if d[0..4] != LATE_INPUT_MAGIC {
        return Err(LateInputError::Magic);
    }
    if d[4] != LATE_INPUT_VERSION {
        return Err(LateInputError::Version(d[4]));
    }
    let (body, tag) = d.split_at(d.len() - LATE_INPUT_TAG);
    let tag: [u8; LATE_INPUT_TAG] = tag.try_into().map_err(|_| LateInputError::Tag)?;
    // blake3::Hash compares in constant time.
    if blake3::keyed_hash(key, body) != blake3::Hash::from(tag) {
        return Err(LateInputError::Tag);
    }
    if d[6..8] != [0, 0] {
        return Err(LateInputError::Reserved);
    }
    let frame = &body[LATE_INPUT_HEAD..];
    let (term, seq) = (u64_at(body, 8), u64_at(body, 16));
    let kind = match d[5] {
        0 => LateKind::Frame,
        1 if frame.is_empty() && seq == 0 => LateKind::DeathNotice,
        1 => return Err(LateInputError::BadNotice(frame.len())),
        other => return Err(LateInputError::Kind(other)),
    };
    Ok(LateFrame { kind, term, seq, frame })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn key() -> [u8; 32] {
        late_input_key(SECRET, &LateInputId([7; LATE_INPUT_ID_LEN]))
    }

    #[test]
    fn a_sealed_frame_opens_with_its_term_and_sequence() {
        let frame: Vec<u8> = (0..100u8).collect();
        let d = seal_late_frame(&key(), 9, 3, &frame);
        assert_eq!(d.len(), LATE_INPUT_HEAD + frame.len() + LATE_INPUT_TAG);
        assert_eq!(open_late_frame(&key(), &d), Ok(LateFrame { kind: LateKind::Frame, term: 9, seq: 3, frame: &frame }));
    }

    #[test]
    fn a_death_notice_opens_as_one_and_carries_no_frame() {
        let d = seal_death_notice(&key(), 9);
        assert_eq!(open_late_frame(&key(), &d), Ok(LateFrame { kind: LateKind::DeathNotice, term: 9, seq: 0, frame: &[] }));
        let other = late_input_key(SECRET, &LateInputId([8; LATE_INPUT_ID_LEN]));
        assert_eq!(open_late_frame(&other, &d), Err(LateInputError::Tag));
        // Kinds are checked once the tag is: a notice with a frame, or an unknown kind, sealed
        // with the right key, is refused by name.
        let with_kind = |mut d: Vec<u8>, kind: u8| {
            d[5] = kind;
            let body = d.len() - LATE_INPUT_TAG;
            let tag = blake3::keyed_hash(&key(), &d[..body]);
            d[body..].copy_from_slice(tag.as_bytes());
            d
        };
        let with_frame = with_kind(seal_late_frame(&key(), 9, 0, &[1, 2]), 1);
        assert_eq!(open_late_frame(&key(), &with_frame), Err(LateInputError::BadNotice(2)));
        let unknown = with_kind(seal_death_notice(&key(), 9), 7);
        assert_eq!(open_late_frame(&key(), &unknown), Err(LateInputError::Kind(7)));
    }

    #[test]
    fn another_daemons_key_or_any_changed_byte_is_refused() {
        let d = seal_late_frame(&key(), 9, 3, &[1, 2, 3, 4]);
        let other = late_input_key(SECRET, &LateInputId([8; LATE_INPUT_ID_LEN]));
        assert_eq!(open_late_frame(&other, &d), Err(LateInputError::Tag));
        let other_secret = late_input_key(b"another secret of 16+ bytes", &LateInputId([7; LATE_INPUT_ID_LEN]));
        assert_eq!(open_late_frame(&other_secret, &d), Err(LateInputError::Tag));
        for i in 0..d.len() {
            for bit in 0..8 {
                let mut bad = d.clone();
                bad[i] ^= 1 << bit;
                assert!(open_late_frame(&key(), &bad).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn sizes_out_of_bounds_are_refused() {
        let d = seal_late_frame(&key(), 1, 0, &[]);
        assert!(open_late_frame(&key(), &d).is_ok());
        for len in 0..d.len() {
            assert!(open_late_frame(&key(), &d[..len]).is_err(), "{len} bytes");
        }
        let long = vec![0u8; MAX_LATE_INPUT_DATAGRAM + 1];
        assert_eq!(open_late_frame(&key(), &long), Err(LateInputError::Size(long.len())));
        // A frame longer than any guest frame is cut to the largest.
        let d = seal_late_frame(&key(), 1, 0, &vec![5u8; MAX_GUEST_FRAME + 10]);
        assert_eq!(open_late_frame(&key(), &d).map(|f| f.frame.len()), Ok(MAX_GUEST_FRAME));
    }

    #[test]
    fn a_wrong_magic_or_version_is_named() {
        let mut d = seal_late_frame(&key(), 1, 0, &[1]);
        d[0] = b'X';
        assert_eq!(open_late_frame(&key(), &d), Err(LateInputError::Magic));
        let mut d = seal_late_frame(&key(), 1, 0, &[1]);
        d[4] = 2;
        assert_eq!(open_late_frame(&key(), &d), Err(LateInputError::Version(2)));
    }

    #[test]
    fn ids_round_trip_through_hex() {
        let id = LateInputId([0xa5; LATE_INPUT_ID_LEN]);
        assert_eq!(LateInputId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(LateInputId::from_hex("zz"), None);
        assert_eq!(LateInputId::from_hex(&"g".repeat(32)), None);
        assert_ne!(LateInputId::random().unwrap(), LateInputId::random().unwrap());
    }
}
