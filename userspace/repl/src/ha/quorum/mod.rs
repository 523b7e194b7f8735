//! Who may run the VM alone: the lease, its term, and the services that grant it.
//!
//! Two hosts alone cannot tell a dead peer from a cut A-Link: both would run the VM. A third party
//! settles it: a host runs the VM alone (the primary going on without its backup, the backup
//! taking over) only while it holds the VM's **lease** from the quorum.
//!
//! The lease has a **term** that grows whenever the set of up-to-date copies changes: when a
//! primary starts a VM, when it goes on alone (its backup's copy falls behind), when a backup takes
//! over. Each host stores the term with its copy of the disk ([`crate::ha::term`]); a claim names
//! the term the caller's copy is current for, and the quorum refuses a claim whose term is older
//! than its own (a stale copy never serves). The exact rules are [`rules::LeaseBook`]'s, and every
//! backend (the built-in witness, etcd) keeps them.
//!
//! A lease expires unless renewed. The caller counts its lease from the moment it *sent* the
//! request (before the quorum's own count began), less a margin for clock rate, so that its own
//! expiry always comes before the quorum's.
//!
//! [`NoQuorum`] grants every claim, forever: two hosts and no third party, today's behaviour
//! without the guarantee (status and logs say so).

pub mod etcd;
pub mod rules;
pub mod witness;

use std::time::Duration;

/// What a host claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Claim {
    /// A primary starts the VM (with a backup to sync, or alone).
    Start,
    /// The primary goes on without its backup (simplex): the backup's copy falls behind.
    RunAlone,
    /// The backup takes over from a primary it declared dead.
    TakeOver,
}

impl Claim {
    /// The claim's name on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::RunAlone => "run-alone",
            Self::TakeOver => "take-over",
        }
    }
}

/// Why a lease was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReleaseReason {
    /// Its holder stopped the VM on purpose.
    Stopped,
    /// Its holder's process died; a watchdog on the holder's host said so. The holder can emit
    /// nothing any more, so the next holder need not wait for anything it may still release.
    HolderDied,
}

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// The term the caller now holds (its copy is the current one).
    pub term: u64,
    /// How long the lease lasts from the moment the request was sent; `None`: for ever (no quorum).
    pub ttl: Option<Duration>,
    /// How the previous holder's lease ended (for a claim that changed the term).
    pub previous: Previous,
}

/// How the previous holder's lease ended when a claim was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Previous {
    /// Nobody held it (a new VM), or the caller itself held it.
    None,
    /// It expired: its holder may have been stalled, and may still hold output it believes it may
    /// send until its own (earlier) view of the lease ran out.
    Expired,
    /// Its holder gave it up.
    Released(ReleaseReason),
}

/// Why a claim was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another host holds the lease, for `remaining` more (as the quorum counts).
    Held {
        /// The holder.
        owner: String,
        /// Its term.
        term: u64,
        /// Until the lease expires unless renewed.
        remaining: Duration,
    },
    /// The caller's copy is older than the current term: it must never serve.
    Stale {
        /// The caller's term.
        known: u64,
        /// The quorum's term.
        current: u64,
        /// Who holds (or last held) it.
        owner: Option<String>,
    },
    /// A renewal of a lease its holder gave up: it must be claimed anew.
    Released,
    /// A takeover or a renewal of a VM the quorum has no record of (its state was lost, or this is
    /// not the VM's id): refused, since the quorum cannot know who else runs it.
    Unknown,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Held { owner, term, remaining } => {
                write!(f, "host {owner} holds the lease (term {term}) for {} ms more", remaining.as_millis())
            }
            Self::Stale { known, current, owner } => {
                write!(f, "this copy is stale: its term is {known}, the current term is {current}")?;
                if let Some(o) = owner {
                    write!(f, " (host {o})")?;
                }
                Ok(())
            }
            Self::Released => write!(f, "this host gave the lease up"),
            Self::Unknown => write!(f, "the quorum has no record of this VM"),
        }
    }
}

/// A quorum's answer to a claim or a renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The caller holds the lease.
    Granted(LeaseGrant),
    /// It does not.
    Refused(Refusal),
}

/// Why the quorum could not answer (unreachable, a refused session, a malformed reply). The caller
/// treats it as "not granted": running without the lease risks two copies.
#[derive(Debug, thiserror::Error)]
#[error("Quorum unreachable: {0}")]
pub struct QuorumError(pub String);

/// A source of the right to run the VM alone. Implementations answer within a bounded time (each
/// has its own request timeout).
pub trait QuorumClient: Send + std::fmt::Debug {
    /// The backend's name for status and logs (`none`, `witness`, `etcd`).
    fn backend(&self) -> &'static str;

    /// Claims the lease for a copy current as of `known_term`; granted, the term grows (see the
    /// module documentation).
    fn acquire(&mut self, claim: Claim, known_term: u64) -> Result<ClaimOutcome, QuorumError>;

    /// Renews the lease held for `term`, keeping the term.
    fn renew(&mut self, term: u64) -> Result<ClaimOutcome, QuorumError>;

    /// Gives the lease of `term` up (nothing happens when the caller no longer holds it).
    fn release(&mut self, term: u64, reason: ReleaseReason) -> Result<(), QuorumError>;

    /// Makes the next request fast: a backend that talks over a connection opens (or reopens) it
    /// now, so that the request is one round trip (the lease watchdog releases a dead primary's
    /// lease the moment it dies; the backup's takeover waits for it). Nothing else happens.
    fn connect_ahead(&mut self) -> Result<(), QuorumError> {
        Ok(())
    }
}

/// No quorum: every claim is granted, for ever, and the term never changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoQuorum;

impl QuorumClient for NoQuorum {
    fn backend(&self) -> &'static str {
        "none"
    }

    fn acquire(&mut self, _claim: Claim, known_term: u64) -> Result<ClaimOutcome, QuorumError> {
        Ok(ClaimOutcome::Granted(LeaseGrant { term: known_term, ttl: None, previous: Previous::None }))
    }

    fn renew(&mut self, term: u64) -> Result<ClaimOutcome, QuorumError> {
        self.acquire(Claim::Start, term)
    }

    fn release(&mut self, _term: u64, _reason: ReleaseReason) -> Result<(), QuorumError> {
        Ok(())
    }
}

/// A quorum that grants or refuses everything, for tests.
#[derive(Clone, Debug)]
pub struct FixedQuorum {
    /// The answer to every claim.
    pub grant: bool,
}

impl QuorumClient for FixedQuorum {
    fn backend(&self) -> &'static str {
        "fixed"
    }

    fn acquire(&mut self, _claim: Claim, known_term: u64) -> Result<ClaimOutcome, QuorumError> {
        Ok(if self.grant {
            ClaimOutcome::Granted(LeaseGrant { term: known_term + 1, ttl: None, previous: Previous::None })
        } else {
            ClaimOutcome::Refused(Refusal::Held { owner: "other".into(), term: known_term + 1, remaining: Duration::from_secs(1) })
        })
    }

    fn renew(&mut self, term: u64) -> Result<ClaimOutcome, QuorumError> {
        self.acquire(Claim::Start, term.saturating_sub(1))
    }

    fn release(&mut self, _term: u64, _reason: ReleaseReason) -> Result<(), QuorumError> {
        Ok(())
    }
}

/// A quorum nobody can reach (every request fails: "no witness"), for tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnreachableQuorum;

impl QuorumClient for UnreachableQuorum {
    fn backend(&self) -> &'static str {
        "unreachable"
    }

    fn acquire(&mut self, _claim: Claim, _known_term: u64) -> Result<ClaimOutcome, QuorumError> {
        Err(QuorumError("no witness".into()))
    }

    fn renew(&mut self, _term: u64) -> Result<ClaimOutcome, QuorumError> {
        Err(QuorumError("no witness".into()))
    }

    fn release(&mut self, _term: u64, _reason: ReleaseReason) -> Result<(), QuorumError> {
        Err(QuorumError("no witness".into()))
    }
}

/// `client`'s grant of `claim` for `known_term`, or why not (an error counts as a refusal, logged).
pub fn claim(client: &mut dyn QuorumClient, claim: Claim, known_term: u64) -> Result<LeaseGrant, String> {
    match client.acquire(claim, known_term) {
        Ok(ClaimOutcome::Granted(g)) => Ok(g),
        Ok(ClaimOutcome::Refused(r)) => Err(r.to_string()),
        Err(e) => {
            tracing::error!(error = %e, claim = claim.as_str(), "quorum claim failed: treated as refused");
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_quorum_grants_for_ever_and_errors_refuse() {
        let g = claim(&mut NoQuorum, Claim::TakeOver, 7).expect("granted");
        assert_eq!((g.term, g.ttl), (7, None));
        assert!(claim(&mut NoQuorum, Claim::RunAlone, 0).is_ok());
        assert!(claim(&mut FixedQuorum { grant: false }, Claim::TakeOver, 1).unwrap_err().contains("holds the lease"));
        assert!(claim(&mut UnreachableQuorum, Claim::RunAlone, 1).unwrap_err().contains("no witness"));
    }
}
