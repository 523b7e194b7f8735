//! The host's side of the witness (see [`crate::witness`]): one authenticated session, kept open
//! and made anew after any error, one request and one reply at a time, every request within
//! [`WitnessClientConfig::timeout`] from connect to reply.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ftvm_proto::frame::{FrameKind, FrameOpener, FrameSealer};
use ftvm_proto::handshake;
use ftvm_proto::witness::{
    WitnessClaim, WitnessOp, WitnessPrevious, WitnessReleaseReason, WitnessReply, WitnessRequest, MAX_REPLY_LEN,
};

use super::rules::is_valid_name;
use crate::transport::deadline::DeadlineStream;
use super::{Claim, ClaimOutcome, LeaseGrant, Previous, QuorumClient, QuorumError, Refusal, ReleaseReason};

/// Settings of a [`WitnessQuorum`].
#[derive(Clone)]
pub struct WitnessClientConfig {
    /// The witness's address.
    pub addr: SocketAddr,
    /// The witness secret.
    pub secret: Vec<u8>,
    /// This VM's id.
    pub vm: String,
    /// This host's name.
    pub host: String,
    /// Longest time for one request, connection and handshake included.
    pub timeout: Duration,
}

impl std::fmt::Debug for WitnessClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessClientConfig")
            .field("addr", &self.addr)
            .field("vm", &self.vm)
            .field("host", &self.host)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

struct Connection {
    stream: TcpStream,
    sealer: FrameSealer,
    opener: FrameOpener,
}

/// A [`QuorumClient`] asking the built-in witness.
pub struct WitnessQuorum {
    cfg: WitnessClientConfig,
    conn: Option<Connection>,
}

impl std::fmt::Debug for WitnessQuorum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessQuorum").field("cfg", &self.cfg).field("connected", &self.conn.is_some()).finish()
    }
}

impl WitnessQuorum {
    /// A client; nothing is sent before the first request. Names must be `[A-Za-z0-9._-]{1,64}`.
    pub fn new(cfg: WitnessClientConfig) -> Result<Self, QuorumError> {
        for (what, name) in [("VM id", &cfg.vm), ("host name", &cfg.host)] {
            if !is_valid_name(name) {
                return Err(QuorumError(format!("invalid {what} {name:?}: 1 to 64 of [A-Za-z0-9._-]")));
            }
        }
        if cfg.secret.len() < handshake::MIN_SECRET_LEN {
            return Err(QuorumError(format!("the witness secret is shorter than {} bytes", handshake::MIN_SECRET_LEN)));
        }
        Ok(Self { cfg, conn: None })
    }

    fn remaining(deadline: Instant) -> Result<Duration, QuorumError> {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| QuorumError("the witness did not answer in time".into()))
    }

    fn connect(&self, deadline: Instant) -> Result<Connection, QuorumError> {
        let addr = self.cfg.addr;
        let err = |what: &str, e: &dyn std::fmt::Display| QuorumError(format!("witness {addr}: {what}: {e}"));
        let stream = TcpStream::connect_timeout(&addr, Self::remaining(deadline)?).map_err(|e| err("cannot connect", &e))?;
        stream.set_nodelay(true).map_err(|e| err("socket", &e))?;
        let session = handshake::initiate(&mut DeadlineStream::new(&stream, deadline), &self.cfg.secret)
            .map_err(|e| err("handshake refused", &crate::ErrorChain(&e)))?;
        Ok(Connection {
            stream,
            sealer: session.sealer,
            opener: session.opener.with_max_payload(MAX_REPLY_LEN as u32),
        })
    }

    fn exchange(&mut self, op: WitnessOp, term: u64) -> Result<WitnessReply, QuorumError> {
        let deadline = Instant::now() + self.cfg.timeout;
        let req = WitnessRequest { op, term, vm: self.cfg.vm.clone(), host: self.cfg.host.clone() };
        let payload = req.encode().map_err(|e| QuorumError(e.to_string()))?;
        // A kept connection may have died since its last use (the witness restarted): one retry on
        // a fresh connection, within the same deadline.
        for attempt in 0..2 {
            let fresh = self.conn.is_none();
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => self.connect(deadline)?,
            };
            match Self::round_trip(&mut conn, &payload, deadline) {
                Ok(reply) => {
                    self.conn = Some(conn);
                    return match reply {
                        WitnessReply::Error(m) => Err(QuorumError(format!("the witness refused the request: {m}"))),
                        r => Ok(r),
                    };
                }
                Err(e) if fresh || attempt == 1 => return Err(e),
                Err(_) => continue,
            }
        }
        Err(QuorumError("the witness did not answer".into()))
    }

    fn round_trip(conn: &mut Connection, payload: &[u8], deadline: Instant) -> Result<WitnessReply, QuorumError> {
        let io = |e: &(dyn std::error::Error + 'static)| QuorumError(format!("witness: {}", crate::ErrorChain(e)));
        // The request in one write; the reply read through the deadline.
        let mut out = Vec::with_capacity(payload.len() + 64);
        conn.sealer.write(&mut out, FrameKind::WitnessRequest, 0, 0, &[payload]).map_err(|e| io(&e))?;
        DeadlineStream::new(&conn.stream, deadline).write_all(&out).map_err(|e| io(&e))?;
        let frame = conn.opener.read(&mut DeadlineStream::new(&conn.stream, deadline)).map_err(|e| io(&e))?;
        if frame.header.kind != FrameKind::WitnessReply {
            return Err(QuorumError(format!("witness: unexpected frame {:?}", frame.header.kind)));
        }
        WitnessReply::decode(&frame.payload).map_err(|e| QuorumError(format!("witness: malformed reply: {e}")))
    }
}

fn outcome(reply: WitnessReply) -> Result<ClaimOutcome, QuorumError> {
    Ok(match reply {
        WitnessReply::Granted { term, ttl_ms, previous } => ClaimOutcome::Granted(LeaseGrant {
            term,
            ttl: Some(Duration::from_millis(u64::from(ttl_ms))),
            previous: match previous {
                WitnessPrevious::None => Previous::None,
                WitnessPrevious::Expired => Previous::Expired,
                WitnessPrevious::ReleasedStopped => Previous::Released(ReleaseReason::Stopped),
                WitnessPrevious::ReleasedDied => Previous::Released(ReleaseReason::HolderDied),
            },
        }),
        WitnessReply::Held { owner, term, remaining_ms } => {
            ClaimOutcome::Refused(Refusal::Held { owner, term, remaining: Duration::from_millis(u64::from(remaining_ms)) })
        }
        WitnessReply::Stale { known, current, owner } => ClaimOutcome::Refused(Refusal::Stale { known, current, owner: Some(owner) }),
        WitnessReply::Unknown => ClaimOutcome::Refused(Refusal::Unknown),
        WitnessReply::Released => ClaimOutcome::Refused(Refusal::Released),
        other => return Err(QuorumError(format!("witness: unexpected reply {other:?}"))),
    })
}

impl QuorumClient for WitnessQuorum {
    fn backend(&self) -> &'static str {
        "witness"
    }

    fn connect_ahead(&mut self) -> Result<(), QuorumError> {
        // A fresh connection each time: the witness closes one idle for its IDLE_TIMEOUT.
        self.conn = None;
        self.conn = Some(self.connect(Instant::now() + self.cfg.timeout)?);
        Ok(())
    }

    fn acquire(&mut self, claim: Claim, known_term: u64) -> Result<ClaimOutcome, QuorumError> {
        let claim = match claim {
            Claim::Start => WitnessClaim::Start,
            Claim::RunAlone => WitnessClaim::RunAlone,
            Claim::TakeOver => WitnessClaim::TakeOver,
        };
        outcome(self.exchange(WitnessOp::Acquire(claim), known_term)?)
    }

    fn renew(&mut self, term: u64) -> Result<ClaimOutcome, QuorumError> {
        outcome(self.exchange(WitnessOp::Renew, term)?)
    }

    fn release(&mut self, term: u64, reason: ReleaseReason) -> Result<(), QuorumError> {
        let reason = match reason {
            ReleaseReason::Stopped => WitnessReleaseReason::Stopped,
            ReleaseReason::HolderDied => WitnessReleaseReason::HolderDied,
        };
        match self.exchange(WitnessOp::Release(reason), term)? {
            WitnessReply::Done => Ok(()),
            other => Err(QuorumError(format!("witness: unexpected reply {other:?}"))),
        }
    }
}
