//! The lease rules every quorum backend keeps, as a pure state machine over times it is given.
//!
//! Per VM the book keeps the current term, its holder, when the holder's lease runs out and whether
//! it was given up. Rules:
//! * **acquire** (start, run alone, take over) for a copy current as of `known`:
//!   - no record: only a start is granted (term `known + 1`); a takeover or a run-alone claim
//!     for a VM the book does not know is refused, since the book cannot know who else runs it;
//!   - the caller already holds the term that a claim for `known` made (`known + 1`, unreleased):
//!     a retry whose first answer was lost, granted again with the same term (see
//!     [`won_before`]);
//!   - `known` older than the term: refused, stale (that copy must never serve);
//!   - `known` newer than the term: refused too (the book lost state or was rolled back; the
//!     operator must look), reported as stale from the book's side;
//!   - another host holds an unexpired, unreleased lease: refused, held;
//!   - otherwise granted: the term grows by one, the caller holds the lease for the TTL.
//! * **renew** of `term`: granted, with the same term, while the caller is the holder of that term
//!   and has not given it up, even after its expiry (nobody else took it meanwhile).
//! * **release** of `term` by its holder: the lease ends now; the reason is kept, so that the next
//!   holder knows whether the last one can still emit anything.
//!
//! A book loaded from disk after a restart ([`LeaseBook::restored`]) counts every held lease as
//! renewed at that moment: it cannot know when it was last renewed.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{ClaimOutcome, LeaseGrant, Previous, Refusal, ReleaseReason};

/// The longest VM id and host name a book accepts (bytes).
pub const MAX_NAME_LEN: usize = 64;

/// One VM's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The current term.
    pub term: u64,
    /// Who holds (or last held) it.
    pub owner: String,
    /// When the holder's lease runs out (the book's clock, microseconds).
    pub expires_us: u64,
    /// Set when the holder gave it up.
    pub released: Option<ReleaseReason>,
}

/// What changed in the book, for a caller that persists it: a new term or a release must survive a
/// restart; a renewal need not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing to persist.
    None,
    /// The term, holder or release state changed.
    Durable,
}

/// The leases of every VM the quorum serves.
#[derive(Clone, Debug)]
pub struct LeaseBook {
    ttl: Duration,
    vms: BTreeMap<String, LeaseRecord>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Whether a claim by `host` for its copy current as of `known` is a retry of the claim that made
/// the current `term`, held by `owner` and not `released`: the quorum granted it, and its answer
/// was lost on the way (a timeout, a reset). Granting it again with the same term is safe: nobody
/// else took the lease since (the owner is still the caller), and the caller's copy is the one
/// the term was made for (a holder stores a new term with its disk before it serves under it, so
/// a copy still at `known` never served under `term`). Refusing it as stale would stop the only
/// host that may run the VM.
///
/// How the previous holder's lease ended is not kept; its answer is [`Previous::Expired`], the
/// cautious one (a taker then waits out anything the old holder may still let out).
pub fn won_before(term: u64, owner: &str, released: bool, host: &str, known: u64) -> bool {
    owner == host && !released && known.checked_add(1) == Some(term)
}

/// Whether `s` is acceptable as a VM id or host name: 1 to [`MAX_NAME_LEN`] of `[A-Za-z0-9._-]`.
pub fn is_valid_name(s: &str) -> bool {
    valid_name(s)
}

impl LeaseBook {
    /// An empty book granting leases of `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, vms: BTreeMap::new() }
    }

    /// A book holding `records` after a restart at `now_us`: every lease held is counted as renewed
    /// now.
    pub fn restored(ttl: Duration, records: impl IntoIterator<Item = (String, LeaseRecord)>, now_us: u64) -> Self {
        let mut book = Self::new(ttl);
        for (vm, mut r) in records {
            if r.released.is_none() {
                r.expires_us = now_us.saturating_add(ttl_us(ttl));
            }
            book.vms.insert(vm, r);
        }
        book
    }

    /// The TTL of the leases it grants.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Every VM's record, for persisting.
    pub fn records(&self) -> impl Iterator<Item = (&String, &LeaseRecord)> {
        self.vms.iter()
    }

    /// One VM's record.
    pub fn record(&self, vm: &str) -> Option<&LeaseRecord> {
        self.vms.get(vm)
    }

    fn grant(&self, term: u64, previous: Previous) -> ClaimOutcome {
        ClaimOutcome::Granted(LeaseGrant { term, ttl: Some(self.ttl), previous })
    }

    /// A claim by `host` for its copy current as of `known` (see the module documentation).
    pub fn acquire(&mut self, vm: &str, host: &str, start: bool, known: u64, now_us: u64) -> (ClaimOutcome, Change) {
        let expires_us = now_us.saturating_add(ttl_us(self.ttl));
        let Some(r) = self.vms.get_mut(vm) else {
            if !start {
                return (ClaimOutcome::Refused(Refusal::Unknown), Change::None);
            }
            let term = known.saturating_add(1);
            self.vms.insert(vm.to_string(), LeaseRecord { term, owner: host.to_string(), expires_us, released: None });
            return (self.grant(term, Previous::None), Change::Durable);
        };
        if won_before(r.term, &r.owner, r.released.is_some(), host, known) {
            r.expires_us = expires_us;
            let term = r.term;
            return (self.grant(term, Previous::Expired), Change::None);
        }
        if known != r.term {
            let refusal = Refusal::Stale { known, current: r.term, owner: Some(r.owner.clone()) };
            return (ClaimOutcome::Refused(refusal), Change::None);
        }
        let previous = if r.owner == host {
            Previous::None
        } else if let Some(reason) = r.released {
            Previous::Released(reason)
        } else if r.expires_us > now_us {
            let remaining = Duration::from_micros(r.expires_us - now_us);
            let refusal = Refusal::Held { owner: r.owner.clone(), term: r.term, remaining };
            return (ClaimOutcome::Refused(refusal), Change::None);
        } else {
            Previous::Expired
        };
        r.term = r.term.saturating_add(1);
        r.owner = host.to_string();
        r.expires_us = expires_us;
        r.released = None;
        let term = r.term;
        (self.grant(term, previous), Change::Durable)
    }

    /// A renewal by `host` of its lease of `term`.
    pub fn renew(&mut self, vm: &str, host: &str, term: u64, now_us: u64) -> ClaimOutcome {
        let ttl = self.ttl;
        let Some(r) = self.vms.get_mut(vm) else {
            return ClaimOutcome::Refused(Refusal::Unknown);
        };
        if r.term != term || r.owner != host {
            return ClaimOutcome::Refused(Refusal::Stale { known: term, current: r.term, owner: Some(r.owner.clone()) });
        }
        if r.released.is_some() {
            // A holder that gave its lease up must claim it anew.
            return ClaimOutcome::Refused(Refusal::Released);
        }
        r.expires_us = now_us.saturating_add(ttl_us(ttl));
        ClaimOutcome::Granted(LeaseGrant { term, ttl: Some(ttl), previous: Previous::None })
    }

    /// `host` gives up its lease of `term`; whether anything changed.
    pub fn release(&mut self, vm: &str, host: &str, term: u64, reason: ReleaseReason, now_us: u64) -> Change {
        match self.vms.get_mut(vm) {
            Some(r) if r.term == term && r.owner == host && r.released.is_none() => {
                r.released = Some(reason);
                r.expires_us = now_us;
                Change::Durable
            }
            _ => Change::None,
        }
    }
}

fn ttl_us(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000;
    const TTL: Duration = Duration::from_millis(1000);

    fn granted(o: &ClaimOutcome) -> Option<LeaseGrant> {
        match o {
            ClaimOutcome::Granted(g) => Some(*g),
            ClaimOutcome::Refused(_) => None,
        }
    }

    #[test]
    fn a_start_makes_term_one_and_only_a_start_creates_a_record() {
        let mut b = LeaseBook::new(TTL);
        assert_eq!(b.acquire("vm", "b", false, 0, 0).0, ClaimOutcome::Refused(Refusal::Unknown));
        assert_eq!(b.renew("vm", "a", 1, 0), ClaimOutcome::Refused(Refusal::Unknown));
        let (o, c) = b.acquire("vm", "a", true, 0, 0);
        assert_eq!(granted(&o).map(|g| g.term), Some(1));
        assert_eq!(c, Change::Durable);
    }

    #[test]
    fn the_holder_renews_the_other_is_refused_until_expiry_then_the_term_grows() {
        let mut b = LeaseBook::new(TTL);
        b.acquire("vm", "a", true, 0, 0);
        assert!(granted(&b.renew("vm", "a", 1, 500 * MS)).is_some());
        // B's copy is current (term 1), but A holds the lease until 1500 ms.
        let (o, _) = b.acquire("vm", "b", false, 1, 1400 * MS);
        assert!(matches!(o, ClaimOutcome::Refused(Refusal::Held { ref owner, term: 1, remaining }) if owner == "a" && remaining == Duration::from_millis(100)));
        let (o, c) = b.acquire("vm", "b", false, 1, 1500 * MS);
        let g = granted(&o).expect("granted after expiry");
        assert_eq!((g.term, g.previous, c), (2, Previous::Expired, Change::Durable));
        // A comes back: its renewal and its claims are refused, its copy is stale.
        assert!(matches!(b.renew("vm", "a", 1, 1600 * MS), ClaimOutcome::Refused(Refusal::Stale { known: 1, current: 2, .. })));
        assert!(matches!(b.acquire("vm", "a", false, 1, 5000 * MS).0, ClaimOutcome::Refused(Refusal::Stale { .. })));
        // Even long after B's lease ran out.
        assert!(matches!(b.acquire("vm", "a", true, 1, 9000 * MS).0, ClaimOutcome::Refused(Refusal::Stale { .. })));
    }

    #[test]
    fn running_alone_moves_the_term_so_the_old_backup_is_stale() {
        let mut b = LeaseBook::new(TTL);
        b.acquire("vm", "a", true, 0, 0);
        let g = granted(&b.acquire("vm", "a", false, 1, 10 * MS).0).expect("the holder may run alone");
        assert_eq!((g.term, g.previous), (2, Previous::None));
        // The backup, current as of term 1, may never take over now, even after expiry.
        assert!(matches!(b.acquire("vm", "b", false, 1, 10_000 * MS).0, ClaimOutcome::Refused(Refusal::Stale { known: 1, current: 2, .. })));
    }

    #[test]
    fn two_claims_of_the_same_term_only_one_wins() {
        let mut b = LeaseBook::new(TTL);
        b.acquire("vm", "a", true, 0, 0);
        // A's lease expired; both claim with term 1 at once.
        let first = b.acquire("vm", "b", false, 1, 2000 * MS).0;
        let second = b.acquire("vm", "a", false, 1, 2000 * MS).0;
        assert_eq!(granted(&first).map(|g| g.term), Some(2));
        assert!(granted(&second).is_none());
    }

    #[test]
    fn release_ends_the_lease_at_once_and_says_why() {
        let mut b = LeaseBook::new(TTL);
        b.acquire("vm", "a", true, 0, 0);
        assert_eq!(b.release("vm", "b", 1, ReleaseReason::HolderDied, 10 * MS), Change::None, "not the holder");
        assert_eq!(b.release("vm", "a", 0, ReleaseReason::HolderDied, 10 * MS), Change::None, "not the term");
        assert_eq!(b.release("vm", "a", 1, ReleaseReason::HolderDied, 10 * MS), Change::Durable);
        assert_eq!(b.release("vm", "a", 1, ReleaseReason::HolderDied, 11 * MS), Change::None, "idempotent");
        assert!(granted(&b.renew("vm", "a", 1, 12 * MS)).is_none(), "a released lease is not renewed");
        let g = granted(&b.acquire("vm", "b", false, 1, 12 * MS).0).expect("granted at once");
        assert_eq!((g.term, g.previous), (2, Previous::Released(ReleaseReason::HolderDied)));
    }

    #[test]
    fn a_claim_retried_after_its_answer_was_lost_is_granted_the_same_term() {
        let mut b = LeaseBook::new(TTL);
        // A's start was granted (term 1) but A never heard it; A asks again for its term-0 copy.
        b.acquire("vm", "a", true, 0, 0);
        let (o, c) = b.acquire("vm", "a", true, 0, 300 * MS);
        let g = granted(&o).expect("the retry of a won start");
        assert_eq!((g.term, g.previous, c), (1, Previous::Expired, Change::None));
        let held = b.acquire("vm", "b", false, 1, 1200 * MS).0;
        assert!(matches!(held, ClaimOutcome::Refused(Refusal::Held { .. })), "the retry renewed the lease");
        // The same for a takeover: B won term 2 and asks again as of term 1, even after expiry.
        let g = granted(&b.acquire("vm", "b", false, 1, 1300 * MS).0).expect("takeover after expiry");
        assert_eq!(g.term, 2);
        let g = granted(&b.acquire("vm", "b", false, 1, 9000 * MS).0).expect("the retry of a won takeover");
        assert_eq!((g.term, g.previous), (2, Previous::Expired));
        // Never for another host, a copy two terms behind, or a lease its holder gave up.
        assert!(matches!(b.acquire("vm", "a", false, 1, 9100 * MS).0, ClaimOutcome::Refused(Refusal::Stale { .. })));
        assert!(matches!(b.acquire("vm", "b", false, 0, 9100 * MS).0, ClaimOutcome::Refused(Refusal::Stale { .. })));
        b.release("vm", "b", 2, ReleaseReason::Stopped, 9200 * MS);
        assert!(matches!(b.acquire("vm", "b", false, 1, 9300 * MS).0, ClaimOutcome::Refused(Refusal::Stale { .. })));
    }

    #[test]
    fn a_newer_term_than_the_books_is_refused() {
        let mut b = LeaseBook::new(TTL);
        b.acquire("vm", "a", true, 0, 0);
        assert!(matches!(b.acquire("vm", "b", false, 5, 9000 * MS).0, ClaimOutcome::Refused(Refusal::Stale { known: 5, current: 1, .. })));
    }

    #[test]
    fn a_restored_book_counts_held_leases_as_renewed_at_restart() {
        let mut b = LeaseBook::new(TTL);
        b.acquire("vm", "a", true, 0, 0);
        b.acquire("gone", "a", true, 0, 0);
        b.release("gone", "a", 1, ReleaseReason::Stopped, 5 * MS);
        let records: Vec<_> = b.records().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut r = LeaseBook::restored(TTL, records, 100_000 * MS);
        assert!(matches!(r.acquire("vm", "b", false, 1, 100_500 * MS).0, ClaimOutcome::Refused(Refusal::Held { .. })));
        assert!(granted(&r.acquire("vm", "b", false, 1, 101_000 * MS).0).is_some());
        assert!(granted(&r.acquire("gone", "b", false, 1, 100_000 * MS).0).is_some(), "a released lease stays released");
    }

    #[test]
    fn names() {
        assert!(is_valid_name("ftvm-site_1.vm"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name(&"x".repeat(MAX_NAME_LEN + 1)));
    }
}
