//! What a host and the witness (the built-in quorum service) say to each other.
//!
//! The session is the A-Link's: the same authenticated handshake (with the witness's own secret),
//! then sealed frames, so a request cannot be forged, replayed from another session or reordered.
//! A host sends one [`WitnessRequest`] frame and reads one [`WitnessReply`] frame, as often as it
//! likes on one connection. Both payloads are small, fixed-layout and little-endian; names are
//! length-prefixed and at most [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._-]`.
//!
//! ```text
//! request: op u8 | claim u8 | reason u8 | 0 u8 | term u64 | vm_len u8 | host_len u8 | vm | host
//! reply:   status u8 | previous u8 | 0 0 | term u64 | known u64 | ttl_ms u32 | remaining_ms u32
//!          | text_len u8 | text   (the owner's name, or an error message)
//! ```

use crate::le::{u32_at, u64_at};

/// The longest VM id or host name.
pub const MAX_NAME_LEN: usize = 64;
/// The longest request payload.
pub const MAX_REQUEST_LEN: usize = 14 + 2 * MAX_NAME_LEN;
/// The longest reply payload.
pub const MAX_REPLY_LEN: usize = REPLY_HEAD + 255;
const REPLY_HEAD: usize = 29;

/// Why a witness payload was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WitnessDecodeError {
    /// Shorter than its fixed part, or than its names say.
    #[error("Witness message truncated")]
    Truncated,
    /// Bytes after the end.
    #[error("Witness message has {0} trailing bytes")]
    Trailing(usize),
    /// An unknown operation, claim, reason or status code.
    #[error("Unknown {what} code {code}")]
    UnknownCode {
        /// Which field.
        what: &'static str,
        /// Its value.
        code: u8,
    },
    /// A name that is empty, too long, or has characters outside `[A-Za-z0-9._-]`.
    #[error("Invalid name in a witness message")]
    BadName,
    /// Reserved bytes not zero.
    #[error("Reserved bytes set in a witness message")]
    Reserved,
}

/// Whether `s` is a valid VM id or host name.
pub fn valid_name(s: &[u8]) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

/// What a host asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitnessOp {
    /// Claim the lease for a copy current as of `term`.
    Acquire(WitnessClaim),
    /// Renew the lease held for `term`.
    Renew,
    /// Give the lease of `term` up.
    Release(WitnessReleaseReason),
}

/// The kind of claim (see `ftvm_repl::ha::quorum::Claim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitnessClaim {
    /// A primary starts the VM.
    Start = 1,
    /// The primary goes on without its backup.
    RunAlone = 2,
    /// The backup takes over.
    TakeOver = 3,
}

/// Why a lease is given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitnessReleaseReason {
    /// Stopped on purpose.
    Stopped = 1,
    /// The holder's process died (said by a watchdog on its host).
    HolderDied = 2,
}

/// A request to the witness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessRequest {
    /// What is asked.
    pub op: WitnessOp,
    /// The term named (known for an acquire, held for a renew or release).
    pub term: u64,
    /// The VM's id.
    pub vm: String,
    /// The asking host's name.
    pub host: String,
}

fn name<'a>(b: &'a [u8], at: &mut usize, len: usize) -> Result<&'a str, WitnessDecodeError> {
    let end = at.checked_add(len).ok_or(WitnessDecodeError::Truncated)?;
    let s = b.get(*at..end).ok_or(WitnessDecodeError::Truncated)?;
    if !valid_name(s) {
        return Err(WitnessDecodeError::BadName);
    }
    *at = end;
    // Checked ASCII above.
    std::str::from_utf8(s).map_err(|_| WitnessDecodeError::BadName)
}

impl WitnessRequest {
    /// The payload bytes. Names must be valid ([`valid_name`]); an invalid one is refused.
    pub fn encode(&self) -> Result<Vec<u8>, WitnessDecodeError> {
        if !valid_name(self.vm.as_bytes()) || !valid_name(self.host.as_bytes()) {
            return Err(WitnessDecodeError::BadName);
        }
        let (op, claim, reason) = match self.op {
            WitnessOp::Acquire(c) => (1u8, c as u8, 0u8),
            WitnessOp::Renew => (2, 0, 0),
            WitnessOp::Release(r) => (3, 0, r as u8),
        };
        let mut out = Vec::with_capacity(14 + self.vm.len() + self.host.len());
        out.extend_from_slice(&[op, claim, reason, 0]);
        out.extend_from_slice(&self.term.to_le_bytes());
        out.push(self.vm.len() as u8);
        out.push(self.host.len() as u8);
        out.extend_from_slice(self.vm.as_bytes());
        out.extend_from_slice(self.host.as_bytes());
        Ok(out)
    }

    /// Checks and decodes a payload.
    pub fn decode(b: &[u8]) -> Result<Self, WitnessDecodeError> {
        if b.len() < 14 {
            return Err(WitnessDecodeError::Truncated);
        }
        if b[3] != 0 {
            return Err(WitnessDecodeError::Reserved);
        }
        let op = match (b[0], b[1], b[2]) {
            (1, c, 0) => WitnessOp::Acquire(match c {
                1 => WitnessClaim::Start,
                2 => WitnessClaim::RunAlone,
                3 => WitnessClaim::TakeOver,
                code => return Err(WitnessDecodeError::UnknownCode { what: "claim", code }),
            }),
            (2, 0, 0) => WitnessOp::Renew,
            (3, 0, r) => WitnessOp::Release(match r {
                1 => WitnessReleaseReason::Stopped,
                2 => WitnessReleaseReason::HolderDied,
                code => return Err(WitnessDecodeError::UnknownCode { what: "reason", code }),
            }),
            (1..=3, _, _) => return Err(WitnessDecodeError::Reserved),
            (code, _, _) => return Err(WitnessDecodeError::UnknownCode { what: "operation", code }),
        };
        let term = u64_at(b, 4);
        let (vm_len, host_len) = (usize::from(b[12]), usize::from(b[13]));
        let mut at = 14;
        let vm = name(b, &mut at, vm_len)?.to_string();
        let host = name(b, &mut at, host_len)?.to_string();
        if at != b.len() {
            return Err(WitnessDecodeError::Trailing(b.len() - at));
        }
        Ok(Self { op, term, vm, host })
    }
}

/// The witness's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WitnessReply {
    /// The caller holds the lease of `term` for `ttl_ms` from its request.
    Granted {
        /// The term held.
        term: u64,
        /// The lease's length.
        ttl_ms: u32,
        /// How the previous holder's lease ended.
        previous: WitnessPrevious,
    },
    /// Another host holds the lease.
    Held {
        /// The holder.
        owner: String,
        /// Its term.
        term: u64,
        /// Until it expires unless renewed.
        remaining_ms: u32,
    },
    /// The caller's copy is not current.
    Stale {
        /// The caller's term.
        known: u64,
        /// The witness's term.
        current: u64,
        /// Its holder.
        owner: String,
    },
    /// The witness has no record of the VM.
    Unknown,
    /// The caller gave the lease up and must claim it anew.
    Released,
    /// A release was recorded (or there was nothing to release).
    Done,
    /// The request could not be served (a message for the operator).
    Error(String),
}

/// How the previous holder's lease ended (see `ftvm_repl::ha::quorum::Previous`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitnessPrevious {
    /// No other holder.
    None = 0,
    /// It expired.
    Expired = 1,
    /// Released on purpose.
    ReleasedStopped = 2,
    /// Released by a watchdog: the holder died.
    ReleasedDied = 3,
}

impl WitnessReply {
    /// The payload bytes (an owner name or message over 255 bytes is cut).
    pub fn encode(&self) -> Vec<u8> {
        let (status, previous, term, known, ttl, remaining, text): (u8, u8, u64, u64, u32, u32, &str) = match self {
            Self::Granted { term, ttl_ms, previous } => (1, *previous as u8, *term, 0, *ttl_ms, 0, ""),
            Self::Held { owner, term, remaining_ms } => (2, 0, *term, 0, 0, *remaining_ms, owner),
            Self::Stale { known, current, owner } => (3, 0, *current, *known, 0, 0, owner),
            Self::Unknown => (4, 0, 0, 0, 0, 0, ""),
            Self::Released => (5, 0, 0, 0, 0, 0, ""),
            Self::Done => (6, 0, 0, 0, 0, 0, ""),
            Self::Error(m) => (7, 0, 0, 0, 0, 0, m),
        };
        let mut text = text.as_bytes();
        if text.len() > 255 {
            text = &text[..255];
        }
        let mut out = Vec::with_capacity(REPLY_HEAD + text.len());
        out.extend_from_slice(&[status, previous, 0, 0]);
        out.extend_from_slice(&term.to_le_bytes());
        out.extend_from_slice(&known.to_le_bytes());
        out.extend_from_slice(&ttl.to_le_bytes());
        out.extend_from_slice(&remaining.to_le_bytes());
        out.push(text.len() as u8);
        out.extend_from_slice(text);
        out
    }

    /// Checks and decodes a payload.
    pub fn decode(b: &[u8]) -> Result<Self, WitnessDecodeError> {
        if b.len() < REPLY_HEAD {
            return Err(WitnessDecodeError::Truncated);
        }
        if b[2] != 0 || b[3] != 0 {
            return Err(WitnessDecodeError::Reserved);
        }
        let (term, known, ttl_ms, remaining_ms) = (u64_at(b, 4), u64_at(b, 12), u32_at(b, 20), u32_at(b, 24));
        let text_len = usize::from(b[28]);
        let text = b.get(REPLY_HEAD..REPLY_HEAD + text_len).ok_or(WitnessDecodeError::Truncated)?;
        if b.len() != REPLY_HEAD + text_len {
            return Err(WitnessDecodeError::Trailing(b.len() - REPLY_HEAD - text_len));
        }
        let owner = || -> Result<String, WitnessDecodeError> {
            if !valid_name(text) {
                return Err(WitnessDecodeError::BadName);
            }
            Ok(String::from_utf8_lossy(text).into_owned())
        };
        let previous = match b[1] {
            0 => WitnessPrevious::None,
            1 => WitnessPrevious::Expired,
            2 => WitnessPrevious::ReleasedStopped,
            3 => WitnessPrevious::ReleasedDied,
            code => return Err(WitnessDecodeError::UnknownCode { what: "previous", code }),
        };
        if b[0] != 1 && previous != WitnessPrevious::None {
            return Err(WitnessDecodeError::Reserved);
        }
        Ok(match b[0] {
            1 => Self::Granted { term, ttl_ms, previous },
            2 => Self::Held { owner: owner()?, term, remaining_ms },
            3 => Self::Stale { known, current: term, owner: owner()? },
            4 => Self::Unknown,
            5 => Self::Released,
            6 => Self::Done,
            7 => Self::Error(String::from_utf8_lossy(text).into_owned()),
            code => return Err(WitnessDecodeError::UnknownCode { what: "status", code }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: WitnessOp) -> WitnessRequest {
        WitnessRequest { op, term: 41, vm: "ftvm-vm.1".into(), host: "host_b".into() }
    }

    #[test]
    fn requests_round_trip() {
        for op in [
            WitnessOp::Acquire(WitnessClaim::Start),
            WitnessOp::Acquire(WitnessClaim::RunAlone),
            WitnessOp::Acquire(WitnessClaim::TakeOver),
            WitnessOp::Renew,
            WitnessOp::Release(WitnessReleaseReason::Stopped),
            WitnessOp::Release(WitnessReleaseReason::HolderDied),
        ] {
            let r = req(op);
            let b = r.encode().unwrap();
            assert!(b.len() <= MAX_REQUEST_LEN);
            assert_eq!(WitnessRequest::decode(&b), Ok(r));
        }
    }

    #[test]
    fn replies_round_trip() {
        for r in [
            WitnessReply::Granted { term: 3, ttl_ms: 1000, previous: WitnessPrevious::ReleasedDied },
            WitnessReply::Held { owner: "a".into(), term: 3, remaining_ms: 10 },
            WitnessReply::Stale { known: 1, current: 4, owner: "b".into() },
            WitnessReply::Unknown,
            WitnessReply::Released,
            WitnessReply::Done,
            WitnessReply::Error("bad request".into()),
        ] {
            let b = r.encode();
            assert!(b.len() <= MAX_REPLY_LEN);
            assert_eq!(WitnessReply::decode(&b), Ok(r));
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        assert!(req(WitnessOp::Renew).encode().is_ok());
        let bad = WitnessRequest { vm: "a b".into(), ..req(WitnessOp::Renew) };
        assert_eq!(bad.encode(), Err(WitnessDecodeError::BadName));
        let good = req(WitnessOp::Renew).encode().unwrap();
        assert_eq!(WitnessRequest::decode(&good[..10]), Err(WitnessDecodeError::Truncated));
        assert_eq!(WitnessRequest::decode(&good[..good.len() - 1]), Err(WitnessDecodeError::Truncated));
        let mut long = good.clone();
        long.push(b'x');
        assert_eq!(WitnessRequest::decode(&long), Err(WitnessDecodeError::Trailing(1)));
        let mut b = good.clone();
        b[0] = 9;
        assert!(matches!(WitnessRequest::decode(&b), Err(WitnessDecodeError::UnknownCode { .. })));
        let mut b = good.clone();
        b[3] = 1;
        assert_eq!(WitnessRequest::decode(&b), Err(WitnessDecodeError::Reserved));
        let mut b = good.clone();
        b[12] = 0;
        assert!(WitnessRequest::decode(&b).is_err(), "an empty VM id");
        let mut b = good;
        b[14] = b'/';
        assert_eq!(WitnessRequest::decode(&b), Err(WitnessDecodeError::BadName));
    }

    #[test]
    fn bad_replies_are_refused() {
        let good = WitnessReply::Held { owner: "a".into(), term: 3, remaining_ms: 10 }.encode();
        assert_eq!(WitnessReply::decode(&good[..5]), Err(WitnessDecodeError::Truncated));
        let mut b = good.clone();
        b[28] = 200;
        assert_eq!(WitnessReply::decode(&b), Err(WitnessDecodeError::Truncated));
        let mut b = good.clone();
        b[0] = 99;
        assert!(WitnessReply::decode(&b).is_err());
        let mut b = good;
        b[1] = 2;
        assert_eq!(WitnessReply::decode(&b), Err(WitnessDecodeError::Reserved));
    }
}
