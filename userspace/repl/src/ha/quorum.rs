//! Who may run the VM alone when the two hosts stop hearing each other.
//!
//! Two hosts alone cannot tell a dead peer from a cut A-Link: both would run the VM. A quorum (a
//! witness service, etcd: a later issue) settles it: only the host that holds the lease runs. The
//! engine asks before it goes on without its backup, the backup daemon before it takes over; a
//! refused claim means the other side runs the VM, and this side must not (the primary fences
//! itself, the backup stays standby).
//!
//! [`NoQuorum`], the default, grants every claim: two hosts and no third party, as today.

/// What a host claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The primary goes on without its backup (simplex).
    RunAlone,
    /// The backup takes over from a primary it declared dead.
    TakeOver,
}

/// Why a claim could not be decided (the quorum cannot be reached, say). The caller treats it as
/// refused: running without the lease risks two copies.
#[derive(Debug, thiserror::Error)]
#[error("Quorum unreachable: {0}")]
pub struct QuorumError(pub String);

/// A source of the right to run the VM alone. Implementations must answer within a bounded time.
pub trait QuorumClient: Send + std::fmt::Debug {
    /// Claims the right to run the VM alone; `Ok(true)` granted, `Ok(false)` refused (another host
    /// holds it).
    fn claim(&mut self, claim: Claim) -> Result<bool, QuorumError>;
}

/// No quorum: every claim is granted.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoQuorum;

impl QuorumClient for NoQuorum {
    fn claim(&mut self, _claim: Claim) -> Result<bool, QuorumError> {
        Ok(true)
    }
}

/// Whether `client` grants `claim`; an error counts as a refusal (logged).
pub fn granted(client: &mut dyn QuorumClient, claim: Claim) -> bool {
    match client.claim(claim) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, ?claim, "quorum claim failed: treated as refused");
            false
        }
    }
}

/// A quorum client that answers from a fixed list, for tests.
#[derive(Clone, Debug)]
pub struct FixedQuorum {
    /// The answer to every claim.
    pub grant: bool,
}

impl QuorumClient for FixedQuorum {
    fn claim(&mut self, _claim: Claim) -> Result<bool, QuorumError> {
        Ok(self.grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Unreachable;

    impl QuorumClient for Unreachable {
        fn claim(&mut self, _claim: Claim) -> Result<bool, QuorumError> {
            Err(QuorumError("no witness".into()))
        }
    }

    #[test]
    fn no_quorum_grants_and_errors_refuse() {
        assert!(granted(&mut NoQuorum, Claim::TakeOver));
        assert!(granted(&mut NoQuorum, Claim::RunAlone));
        assert!(!granted(&mut FixedQuorum { grant: false }, Claim::TakeOver));
        assert!(!granted(&mut Unreachable, Claim::RunAlone));
    }
}
