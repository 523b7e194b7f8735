//! A-Link frames: a fixed 32-byte header, the payload, and a 32-byte authentication tag.
//!
//! ```text
//! offset size field
//!      0    4 magic        "FTAL"
//!      4    1 major        protocol major version
//!      5    1 minor        protocol minor version
//!      6    2 kind         FrameKind (0 is never valid)
//!      8    2 flags        per-kind flags
//!     10    2 reserved     zero
//!     12    4 payload_len  bytes of payload after the header
//!     16    8 seq          per-direction sequence number, 1, 2, 3, …
//!     24    8 epoch        the checkpoint epoch the frame belongs to (0 when none)
//!     32    n payload
//!   32+n   32 tag          keyed BLAKE3 of header and payload
//! ```
//! All integers are little-endian. The tag is keyed with the session key of the direction (see
//! [`crate::handshake`]), so it checks integrity (a flipped bit, a truncated payload) and
//! authenticity (a peer without the shared secret) at once; the sequence number, covered by the
//! tag, must be exactly the next one, so a replayed, dropped or reordered frame is refused too.

use std::io::{self, Read, Write};

use crate::le::{u16_at, u32_at, u64_at};

/// "FTAL", little-endian.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FTAL");
/// Protocol major version: peers with different majors do not talk.
pub const PROTOCOL_MAJOR: u8 = 1;
/// Protocol minor version: a peer accepts any minor of its major and uses the lower one.
#[cfg(not(feature = "previous-minor"))]
pub const PROTOCOL_MINOR: u8 = 9;
/// Protocol minor version of a build made to speak the previous minor (see the crate's
/// `previous-minor` feature).
#[cfg(feature = "previous-minor")]
pub const PROTOCOL_MINOR: u8 = 4;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 32;
/// Size of the authentication tag.
pub const TAG_LEN: usize = 32;
/// Largest payload a receiver accepts (a whole epoch of pages is sent as several frames).
pub const MAX_PAYLOAD: u32 = crate::limits::MAX_FRAME_PAYLOAD;

/// What a frame carries.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Handshake: version and nonce.
    Hello = 1,
    /// Handshake refused; the payload is a UTF-8 reason.
    Refused = 2,
    /// An epoch starts; the payload describes it.
    EpochBegin = 16,
    /// Guest pages of the epoch.
    Pages = 17,
    /// vCPU state of the epoch.
    VcpuState = 18,
    /// Device state of the epoch.
    DeviceState = 19,
    /// Disk writes of the epoch.
    DiskWrites = 20,
    /// Everything of the epoch has been sent.
    EpochCommit = 21,
    /// The backup holds the epoch.
    EpochAck = 22,
    /// The machine state of the epoch: an opaque blob (the VMM's own versioned container), possibly
    /// split over several frames.
    MachineState = 23,
    /// A chunk of the whole disk image, during an initial synchronisation.
    DiskImage = 24,
    /// Sent by the backup right after the handshake: what its standby holds (committed epoch,
    /// memory and disk sizes), or a `Goodbye` instead when it refuses the session.
    StandbyInfo = 25,
    /// The guest frames the epoch's output hold sealed (the backup replays them at a takeover: the
    /// primary may have died before it released them, and the restored guest believes them sent).
    HeldOutput = 26,
    /// From the primary, its first frame after the handshake (minor 2 and later; the backup's
    /// `StandbyInfo` answers it): the lease term its copy is current for (u64; 0 without a
    /// quorum). The backup stores it with its disk once its copy is restorable, and names it when
    /// it claims the lease to take over. Being the first frame under the session key, it is what
    /// makes the backup count the session as started. From minor 8 it may carry the id of the
    /// primary's late input ([`crate::epoch::LeaseTerm`]).
    LeaseTerm = 27,
    /// From the backup, right after its `StandbyInfo` (minor 3 and later): what its KVM can
    /// restore (`crate::cpu::HostCpuCaps`), so that the primary can refuse a backup that could not
    /// resume this guest.
    HostCpu = 28,
    /// From the backup, right after its `HostCpu` (minor 5 and later): its disk's write-intent
    /// marks (`crate::epoch::DiskMarks`), so that a rejoin copies only the regions that may differ.
    DiskMarks = 29,
    /// From the backup, right after its `DiskMarks` (minor 5 and later): the blake3 digest of the
    /// machine state of the epoch its standby holds (32 bytes; zeros when it holds none that can
    /// be resumed). A primary that resumed from exactly that state (a switchover's old primary
    /// coming back as the backup) sends it only the pages written since, not all of memory.
    StandbyDigest = 30,
    /// From the primary (minor 7 and later), at any moment, inside an epoch or between two, and
    /// outside every epoch's digest: guest frames its VM took in from the network (the layout of a
    /// `HeldOutput` payload), all taken after the pause of the epoch before the one in the header.
    /// The backup keeps those of epochs it has not committed; a takeover delivers them to the
    /// restored VM, which never saw them, so that requests the dead primary had taken are answered
    /// without waiting for the clients to retransmit.
    Ingress = 31,
    /// Liveness probe.
    Heartbeat = 32,
    /// Liveness answer.
    HeartbeatReply = 33,
    /// Guest pages of the epoch as their difference from the backup's copy (minor 9 and later,
    /// never in a synchronisation): the layout of [`crate::page_delta`]. Counted with the epoch's
    /// pages, in its digest.
    PageDeltas = 34,
    /// RDMA set-up (`crate::rdma::RdmaEndpoint`), only on a link both operators asked to carry
    /// pages by RDMA: the primary's queue pair right after the backup's last set-up frame, then the
    /// backup's queue pair and staging ring as the answer.
    RdmaEndpoint = 40,
    /// In an epoch on an RDMA link, instead of `Pages` (`crate::rdma::RdmaPages`): which guest
    /// pages the primary wrote where in the backup's staging ring, and their hash.
    RdmaPages = 41,
    /// Orderly close; the payload is a UTF-8 reason. From the primary: it leaves on purpose (its
    /// silence is no death). From the backup: it drops the session (the primary goes on alone).
    Goodbye = 48,
    /// From the backup: it has declared the primary dead and resumes the VM itself; a primary that
    /// still hears this must stop its copy at once (fencing). The payload is a UTF-8 reason.
    TakingOver = 49,
    /// From the primary (minor 4 and later), a planned switchover: it has stopped its VM at the
    /// epoch in the header, that epoch is acknowledged and its output released, and it has given
    /// the lease up; the backup resumes the VM from that epoch at once. No payload.
    Handover = 50,
    /// To the witness: a lease request (`crate::witness::WitnessRequest`).
    WitnessRequest = 64,
    /// From the witness: its answer (`crate::witness::WitnessReply`).
    WitnessReply = 65,
}

impl FrameKind {
    /// Decodes a kind; 0 and unknown values are `None`.
    pub fn from_u16(v: u16) -> Option<Self> {
        use FrameKind::*;
        Some(match v {
            1 => Hello,
            2 => Refused,
            16 => EpochBegin,
            17 => Pages,
            18 => VcpuState,
            19 => DeviceState,
            20 => DiskWrites,
            21 => EpochCommit,
            22 => EpochAck,
            23 => MachineState,
            24 => DiskImage,
            25 => StandbyInfo,
            26 => HeldOutput,
            27 => LeaseTerm,
            28 => HostCpu,
            29 => DiskMarks,
            30 => StandbyDigest,
            31 => Ingress,
            34 => PageDeltas,
            32 => Heartbeat,
            33 => HeartbeatReply,
            40 => RdmaEndpoint,
            41 => RdmaPages,
            48 => Goodbye,
            49 => TakingOver,
            50 => Handover,
            64 => WitnessRequest,
            65 => WitnessReply,
            _ => return None,
        })
    }
}

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version of the sender (major, minor).
    pub version: (u8, u8),
    /// What the frame carries.
    pub kind: FrameKind,
    /// Per-kind flags.
    pub flags: u16,
    /// Payload bytes.
    pub payload_len: u32,
    /// Sequence number in its direction.
    pub seq: u64,
    /// Epoch the frame belongs to.
    pub epoch: u64,
}

impl FrameHeader {
    /// The 32 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4] = self.version.0;
        b[5] = self.version.1;
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..10].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        b
    }

    /// Checks and decodes 32 header bytes: magic, major version, kind, reserved bits, length.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = u32_at(b, 0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if b[4] != PROTOCOL_MAJOR {
            return Err(FrameError::UnsupportedVersion { major: b[4], minor: b[5] });
        }
        let kind = FrameKind::from_u16(u16_at(b, 6)).ok_or(FrameError::UnknownKind(u16_at(b, 6)))?;
        if u16_at(b, 10) != 0 {
            return Err(FrameError::ReservedBits);
        }
        let payload_len = u32_at(b, 12);
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(payload_len));
        }
        Ok(Self { version: (b[4], b[5]), kind, flags: u16_at(b, 8), payload_len, seq: u64_at(b, 16), epoch: u64_at(b, 24) })
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly between frames.
    #[error("Peer closed the connection")]
    Closed,
    /// The stream ended inside a frame.
    #[error("Frame truncated")]
    Truncated,
    /// Reading or writing the stream failed.
    #[error("Frame I/O failed")]
    Io(#[source] io::Error),
    /// Not an A-Link frame.
    #[error("Bad frame magic {0:#010x}")]
    BadMagic(u32),
    /// A peer of another major version.
    #[error("Unsupported protocol version {major}.{minor} (this side speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR})")]
    UnsupportedVersion {
        /// Peer's major.
        major: u8,
        /// Peer's minor.
        minor: u8,
    },
    /// Kind 0 or a kind this version does not know.
    #[error("Unknown frame kind {0}")]
    UnknownKind(u16),
    /// Reserved header bits set.
    #[error("Reserved header bits set")]
    ReservedBits,
    /// Payload longer than [`MAX_PAYLOAD`].
    #[error("Frame payload of {0} bytes is over the limit")]
    TooLarge(u32),
    /// The tag does not match: corrupted, or sent by a peer without the shared secret.
    #[error("Frame {seq} failed authentication (corrupted, or wrong shared secret)")]
    BadTag {
        /// The sequence number the header claimed.
        seq: u64,
    },
    /// An authentic frame, but not the next one: replayed, duplicated or reordered.
    #[error("Frame out of sequence: expected {expected}, got {got}")]
    OutOfSequence {
        /// The sequence number expected.
        expected: u64,
        /// The sequence number received.
        got: u64,
    },
}

/// A received, checked frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Its header.
    pub header: FrameHeader,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// How much of a payload is read before it is hashed.
const READ_PIECE: usize = 256 << 10;

/// The sending half of one direction: numbers and tags frames.
#[derive(Clone)]
pub struct FrameSealer {
    key: [u8; 32],
    next_seq: u64,
    version: (u8, u8),
    last_tag: Option<[u8; TAG_LEN]>,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("FrameSealer").field("next_seq", &self.next_seq).finish_non_exhaustive()
    }
}

impl FrameSealer {
    /// A sealer whose first frame has sequence number 1.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key, next_seq: 1, version: (PROTOCOL_MAJOR, PROTOCOL_MINOR), last_tag: None }
    }

    /// Sets the minor version written into headers (after negotiation).
    pub fn set_minor(&mut self, minor: u8) {
        self.version.1 = minor;
    }

    /// Writes one frame: header, payload, tag. The payload may be given in pieces (e.g. a page
    /// list and the pages) to avoid copying them together.
    pub fn write<W: Write>(
        &mut self,
        out: &mut W,
        kind: FrameKind,
        flags: u16,
        epoch: u64,
        payload: &[&[u8]],
    ) -> Result<(), FrameError> {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        let payload_len = u32::try_from(len).ok().filter(|&l| l <= MAX_PAYLOAD).ok_or(FrameError::TooLarge(u32::MAX))?;
        let header = FrameHeader { version: self.version, kind, flags, payload_len, seq: self.next_seq, epoch }.encode();
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&header);
        for p in payload {
            h.update(p);
        }
        let tag = *h.finalize().as_bytes();
        out.write_all(&header).map_err(FrameError::Io)?;
        for p in payload {
            out.write_all(p).map_err(FrameError::Io)?;
        }
        out.write_all(&tag).map_err(FrameError::Io)?;
        self.next_seq += 1;
        self.last_tag = Some(tag);
        Ok(())
    }

    /// Starts a frame whose payload the caller writes itself, for senders that hand the header, the
    /// payload pieces and the tag to one vectored write, hashing each piece just before it is
    /// written (one pass over the pages, while they are in cache).
    ///
    /// The sequence number is taken now: the caller must write the header, exactly `payload_len`
    /// bytes fed through [`SealingFrame::update`], and the tag from [`SealingFrame::finish`], or
    /// abandon the stream.
    pub fn start(&mut self, kind: FrameKind, flags: u16, epoch: u64, payload_len: usize) -> Result<SealingFrame, FrameError> {
        let len = u32::try_from(payload_len).ok().filter(|&l| l <= MAX_PAYLOAD).ok_or(FrameError::TooLarge(u32::MAX))?;
        let header = FrameHeader { version: self.version, kind, flags, payload_len: len, seq: self.next_seq, epoch }.encode();
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(&header);
        self.next_seq += 1;
        Ok(SealingFrame { header, hasher, remaining: payload_len })
    }

    /// The sequence number the next frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The tag of the last frame written by [`FrameSealer::write`] (frames sealed through
    /// [`FrameSealer::start`] return theirs from [`SealingFrame::finish`]).
    pub fn last_tag(&self) -> Option<[u8; TAG_LEN]> {
        self.last_tag
    }
}

/// A frame being sealed piece by piece (see [`FrameSealer::start`]).
pub struct SealingFrame {
    header: [u8; HEADER_LEN],
    hasher: blake3::Hasher,
    remaining: usize,
}

impl std::fmt::Debug for SealingFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingFrame").field("remaining", &self.remaining).finish_non_exhaustive()
    }
}

/// The payload fed to a [`SealingFrame`] does not have the length its header announced.
#[derive(Debug, thiserror::Error)]
#[error("Frame payload length differs from its header by {excess} bytes")]
pub struct PayloadLengthMismatch {
    /// Bytes fed minus bytes announced (negative when too few were fed).
    pub excess: i64,
}

impl SealingFrame {
    /// The 32 header bytes, to be written first.
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// Feeds the next payload piece to the tag.
    pub fn update(&mut self, piece: &[u8]) {
        self.hasher.update(piece);
        // Wrapping: an overfeed is reported by finish, not by a panic here.
        self.remaining = self.remaining.wrapping_sub(piece.len());
    }

    /// The tag, to be written after the payload. Fails if the payload fed does not have the
    /// announced length (the frame would be refused by the peer).
    pub fn finish(self) -> Result<[u8; TAG_LEN], PayloadLengthMismatch> {
        if self.remaining != 0 {
            // remaining counts down from the announced length; as a two's complement difference it
            // is announced - fed.
            let excess = (self.remaining as i64).wrapping_neg();
            return Err(PayloadLengthMismatch { excess });
        }
        Ok(*self.hasher.finalize().as_bytes())
    }
}

/// The receiving half of one direction: checks every frame before anyone sees its payload.
#[derive(Clone)]
pub struct FrameOpener {
    key: [u8; 32],
    next_seq: u64,
    last_tag: Option<[u8; TAG_LEN]>,
    max_payload: u32,
}

impl std::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameOpener").field("next_seq", &self.next_seq).finish_non_exhaustive()
    }
}

fn read_full<R: Read>(input: &mut R, buf: &mut [u8], at_frame_start: bool) -> Result<(), FrameError> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_frame_start => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

impl FrameOpener {
    /// An opener that expects sequence number 1 first.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key, next_seq: 1, last_tag: None, max_payload: MAX_PAYLOAD }
    }

    /// Refuses payloads over `limit` bytes (at most [`MAX_PAYLOAD`]) before reading them: for
    /// sessions whose frames are all small (the witness's).
    pub fn with_max_payload(mut self, limit: u32) -> Self {
        self.max_payload = limit.min(MAX_PAYLOAD);
        self
    }

    /// Reads and checks the next frame. On any error the stream must be considered broken: the
    /// caller drops the connection (and with it any epoch that was not complete).
    pub fn read<R: Read>(&mut self, input: &mut R) -> Result<Frame, FrameError> {
        let mut payload = Vec::new();
        let header = self.read_into(input, &mut payload)?;
        Ok(Frame { header, payload })
    }

    /// Like [`FrameOpener::read`], into a caller's buffer (resized to the payload), so a receiver
    /// can reuse its buffers from frame to frame. On error the buffer's content is unspecified.
    pub fn read_into<R: Read>(&mut self, input: &mut R, payload: &mut Vec<u8>) -> Result<FrameHeader, FrameError> {
        let mut header_bytes = [0u8; HEADER_LEN];
        read_full(input, &mut header_bytes, true)?;
        let header = FrameHeader::decode(&header_bytes)?;
        if header.payload_len > self.max_payload {
            return Err(FrameError::TooLarge(header.payload_len));
        }
        let len = header.payload_len as usize;
        payload.clear();
        // Hash each piece as soon as it is read, while it is still in cache (and while the sender
        // may still be writing the rest), rather than in a second pass over the whole payload. The
        // buffer grows piece by piece as bytes arrive: a header claiming a large payload, before
        // its tag is checked, costs its sender the bytes, not this side an allocation.
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&header_bytes);
        while payload.len() < len {
            let start = payload.len();
            let end = (start + READ_PIECE).min(len);
            payload.resize(end, 0);
            read_full(input, &mut payload[start..end], false)?;
            h.update(&payload[start..end]);
        }
        let mut got = [0u8; TAG_LEN];
        read_full(input, &mut got, false)?;
        let want = *h.finalize().as_bytes();
        // blake3::Hash's equality is constant-time.
        if blake3::Hash::from(want) != blake3::Hash::from(got) {
            return Err(FrameError::BadTag { seq: header.seq });
        }
        if header.seq != self.next_seq {
            return Err(FrameError::OutOfSequence { expected: self.next_seq, got: header.seq });
        }
        self.next_seq += 1;
        self.last_tag = Some(want);
        Ok(header)
    }

    /// The tag of the last frame accepted: a keyed BLAKE3 of its header and payload, which a
    /// receiver can chain into a digest of several frames without hashing their payloads again.
    pub fn last_tag(&self) -> Option<[u8; TAG_LEN]> {
        self.last_tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn one_frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        FrameSealer::new(KEY).write(&mut out, FrameKind::Pages, 3, 42, &[payload]).unwrap();
        out
    }

    #[test]
    fn round_trip_in_pieces() {
        let mut out = Vec::new();
        let mut s = FrameSealer::new(KEY);
        s.write(&mut out, FrameKind::Pages, 1, 9, &[b"abc", b"", b"defg"]).unwrap();
        s.write(&mut out, FrameKind::EpochCommit, 0, 9, &[]).unwrap();
        let mut o = FrameOpener::new(KEY);
        let mut r = &out[..];
        let f = o.read(&mut r).unwrap();
        assert_eq!((f.header.kind, f.header.flags, f.header.epoch, f.header.seq), (FrameKind::Pages, 1, 9, 1));
        assert_eq!(f.payload, b"abcdefg");
        let f = o.read(&mut r).unwrap();
        assert_eq!((f.header.kind, f.header.seq, f.payload.len()), (FrameKind::EpochCommit, 2, 0));
        assert!(matches!(o.read(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let frame = one_frame(b"payload bytes");
        for i in 0..frame.len() * 8 {
            let mut bad = frame.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(FrameOpener::new(KEY).read(&mut &bad[..]).is_err(), "bit {i} accepted");
        }
    }

    #[test]
    fn truncation_at_every_length_is_refused() {
        let frame = one_frame(b"0123456789");
        for n in 1..frame.len() {
            let err = FrameOpener::new(KEY).read(&mut &frame[..n]).unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "len {n}: {err}");
        }
    }

    #[test]
    fn wrong_key_replay_and_reorder_are_refused() {
        let frame = one_frame(b"x");
        assert!(matches!(FrameOpener::new([8; 32]).read(&mut &frame[..]), Err(FrameError::BadTag { seq: 1 })));
        // Replay: the same frame twice.
        let twice = [frame.clone(), frame].concat();
        let mut o = FrameOpener::new(KEY);
        let mut r = &twice[..];
        o.read(&mut r).unwrap();
        assert!(matches!(o.read(&mut r), Err(FrameError::OutOfSequence { expected: 2, got: 1 })));
    }

    #[test]
    fn a_frame_sealed_in_pieces_opens_like_a_written_one() {
        let mut s = FrameSealer::new(KEY);
        let mut f = s.start(FrameKind::Pages, 2, 7, 10).unwrap();
        f.update(b"0123");
        f.update(b"");
        f.update(b"456789");
        let mut wire = f.header().to_vec();
        wire.extend_from_slice(b"0123456789");
        let t = f.finish().unwrap();
        wire.extend_from_slice(&t);
        s.write(&mut wire, FrameKind::EpochCommit, 0, 7, &[b"x"]).unwrap();
        let mut o = FrameOpener::new(KEY);
        let mut r = &wire[..];
        let mut buf = vec![1, 2, 3];
        let h = o.read_into(&mut r, &mut buf).unwrap();
        assert_eq!((h.kind, h.flags, h.epoch, h.seq, &buf[..]), (FrameKind::Pages, 2, 7, 1, &b"0123456789"[..]));
        assert_eq!(o.last_tag(), Some(t));
        let f = o.read(&mut r).unwrap();
        assert_eq!((f.header.seq, &f.payload[..]), (2, &b"x"[..]));
        assert_eq!(o.last_tag(), s.last_tag());
        assert_eq!(s.next_seq(), 3);
    }

    #[test]
    fn a_wrong_payload_length_is_caught_before_sending() {
        let mut s = FrameSealer::new(KEY);
        let mut f = s.start(FrameKind::Pages, 0, 0, 4).unwrap();
        f.update(b"12345");
        assert_eq!(f.finish().unwrap_err().excess, 1);
        let mut f = s.start(FrameKind::Pages, 0, 0, 4).unwrap();
        f.update(b"12");
        assert_eq!(f.finish().unwrap_err().excess, -2);
        assert!(matches!(s.start(FrameKind::Pages, 0, 0, MAX_PAYLOAD as usize + 1), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn new_kinds_round_trip() {
        for k in [FrameKind::MachineState, FrameKind::DiskImage, FrameKind::StandbyInfo, FrameKind::RdmaEndpoint, FrameKind::RdmaPages] {
            assert_eq!(FrameKind::from_u16(k as u16), Some(k));
        }
    }

    #[test]
    fn header_checks() {
        let good = FrameHeader { version: (1, 0), kind: FrameKind::Hello, flags: 0, payload_len: 5, seq: 1, epoch: 0 };
        assert_eq!(FrameHeader::decode(&good.encode()).unwrap(), good);
        let mut b = good.encode();
        b[4] = 2;
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::UnsupportedVersion { major: 2, .. })));
        let mut b = good.encode();
        b[6] = 0;
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::UnknownKind(0))));
        let mut b = good.encode();
        b[12..16].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::TooLarge(_))));
        let mut b = good.encode();
        b[0] = b'X';
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::BadMagic(_))));
        let mut b = good.encode();
        b[11] = 1;
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::ReservedBits)));
    }
}
