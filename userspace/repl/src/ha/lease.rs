//! A host's hold on the VM's lease: claimed from the quorum, renewed in the background, and read
//! by whatever must not act without it (the output release, the kernel gate, the simplex VM).
//!
//! Time is [`monotonic_us`]. A grant counts from the moment its request was *sent*, less
//! [`LeaseConfig::margin`]: the quorum starts its own count when it receives the request, so this
//! host's view always ends first, even with clocks that run a little apart.
//!
//! The renewer asks every [`LeaseConfig::renew_every`]. A refused renewal means another host holds
//! the VM now: the lease is *lost* for good ([`Lease::lost`]) and the holder must stop its copy. An
//! unreachable quorum only lets the lease run out ([`Lease::is_valid`] turns false), and renewals
//! go on: if the quorum comes back before anyone else claimed, the lease is valid again.
//!
//! Subscribers ([`Lease::subscribe`]) hear of every change of term or validity: the term file, the
//! watchdog that releases the lease when this process dies, the kernel gate's map.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::heartbeat::monotonic_us;
use super::quorum::{Claim, ClaimOutcome, LeaseGrant, NoQuorum, QuorumClient, ReleaseReason};
use crate::ErrorChain;
use crate::lock;

/// How long after an epoch was sent its acknowledgement alone lets the primary release the
/// epoch's output, when the lease is not valid (the quorum cannot be reached, and the pair stays
/// protected). The acknowledgement shows the backup was a standby when it sent it; a backup that
/// takes over from an *expired* lease waits [`TAKEOVER_QUIET`] after its receiver stopped (after
/// its last acknowledgement) before its VM runs, so output released under this rule has left before
/// the new primary's could.
pub const ACK_AUTHORITY: Duration = Duration::from_millis(50);
/// See [`ACK_AUTHORITY`]; longer than it by a margin for clock rates and scheduling.
pub const TAKEOVER_QUIET: Duration = Duration::from_millis(75);
/// How often a host that will need the quorum at once (a backup for its takeover, a primary's
/// watchdog for its release) reopens its connection: under the witness's idle timeout (30 s), so
/// that the connection is open when it is needed.
pub const QUORUM_CONNECTION_REFRESH: Duration = Duration::from_secs(20);

/// How a [`Lease`] is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How often the renewer asks.
    pub renew_every: Duration,
    /// Taken off every grant's TTL (clock rate, scheduling).
    pub margin: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self { renew_every: Duration::from_millis(150), margin: Duration::from_millis(100) }
    }
}

/// What subscribers are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseView {
    /// The term held (or last held).
    pub term: u64,
    /// Held and not lost.
    pub held: bool,
    /// Until when it is valid ([`monotonic_us`]; `u64::MAX`: for ever).
    pub valid_until_us: u64,
}

type Subscriber = Box<dyn Fn(LeaseView) + Send>;

struct Inner {
    client: Mutex<Box<dyn QuorumClient>>,
    backend: &'static str,
    cfg: LeaseConfig,
    term: AtomicU64,
    held: AtomicBool,
    valid_until_us: AtomicU64,
    lost: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    subscribers: Mutex<Vec<Subscriber>>,
    stop: AtomicBool,
}

/// A host's lease on the VM. Cloning shares it.
#[derive(Clone)]
pub struct Lease(Arc<Inner>);

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("backend", &self.0.backend)
            .field("term", &self.term())
            .field("held", &self.0.held.load(Ordering::SeqCst))
            .field("valid_until_us", &self.valid_until_us())
            .finish_non_exhaustive()
    }
}

impl Default for Lease {
    /// No quorum: every claim granted, valid for ever.
    fn default() -> Self {
        Self::new(Box::new(NoQuorum), LeaseConfig::default(), 0)
    }
}

impl Lease {
    /// A lease not yet claimed, asking `client`; `term` is the term this host's copy is current
    /// for (from its term file; 0 for a new disk).
    pub fn new(client: Box<dyn QuorumClient>, cfg: LeaseConfig, term: u64) -> Self {
        let backend = client.backend();
        Self(Arc::new(Inner {
            client: Mutex::new(client),
            backend,
            cfg,
            term: AtomicU64::new(term),
            held: AtomicBool::new(false),
            valid_until_us: AtomicU64::new(0),
            lost: Mutex::new(None),
            last_error: Mutex::new(None),
            subscribers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }))
    }

    /// The quorum backend's name (`none`, `witness`, `etcd`).
    pub fn backend(&self) -> &'static str {
        self.0.backend
    }

    /// Whether there is a quorum at all (`none` grants for ever).
    pub fn has_quorum(&self) -> bool {
        self.0.backend != "none"
    }

    /// The term held, or the one this copy is current for.
    pub fn term(&self) -> u64 {
        self.0.term.load(Ordering::SeqCst)
    }

    /// Sets the term this host's copy is current for, before a claim (a backup learns it from its
    /// primary). Ignored while a lease is held.
    pub fn set_known_term(&self, term: u64) {
        if !self.0.held.load(Ordering::SeqCst) {
            self.0.term.store(term, Ordering::SeqCst);
        }
    }

    /// Until when the lease is valid ([`monotonic_us`]); 0 when not held.
    pub fn valid_until_us(&self) -> u64 {
        self.0.valid_until_us.load(Ordering::SeqCst)
    }

    /// Whether this host holds a valid lease at `now_us`.
    pub fn is_valid(&self, now_us: u64) -> bool {
        now_us < self.valid_until_us()
    }

    /// Why the lease was lost to another host, if it was (for good).
    pub fn lost(&self) -> Option<String> {
        lock(&self.0.lost).clone()
    }

    /// The last error talking to the quorum (cleared by the next answer).
    pub fn last_error(&self) -> Option<String> {
        lock(&self.0.last_error).clone()
    }

    /// What subscribers would be told now.
    pub fn view(&self) -> LeaseView {
        LeaseView { term: self.term(), held: self.0.held.load(Ordering::SeqCst), valid_until_us: self.valid_until_us() }
    }

    /// Calls `f` at every change of term or validity (from the claiming or renewing thread), and
    /// once now.
    pub fn subscribe(&self, f: impl Fn(LeaseView) + Send + 'static) {
        f(self.view());
        lock(&self.0.subscribers).push(Box::new(f));
    }

    fn notify(&self) {
        let v = self.view();
        for s in lock(&self.0.subscribers).iter() {
            s(v);
        }
    }

    fn until(sent_us: u64, grant: &LeaseGrant, margin: Duration) -> u64 {
        match grant.ttl {
            None => u64::MAX,
            Some(ttl) => {
                let ttl = u64::try_from(ttl.saturating_sub(margin).as_micros()).unwrap_or(u64::MAX);
                sent_us.saturating_add(ttl)
            }
        }
    }

    /// Opens (or reopens) the connection to the quorum now, so that the next claim or release is
    /// one round trip (see [`QuorumClient::connect_ahead`]); a failure only costs that request a
    /// fresh connection. Call it every [`QUORUM_CONNECTION_REFRESH`] at most.
    pub fn connect_ahead(&self) {
        if let Err(e) = lock(&self.0.client).connect_ahead() {
            tracing::debug!(backend = self.0.backend, error = %ErrorChain(&e), "cannot reach the quorum ahead of time");
        }
    }

    /// Claims the lease for this host's copy (current as of [`Lease::term`]); granted, the new term
    /// is held and subscribers are told before this returns. Refused or unreachable: why.
    pub fn claim(&self, claim: Claim) -> Result<LeaseGrant, String> {
        // The client's lock is held from reading the term to storing the new one: a renewal
        // cannot read the old term, wait for this claim, and then renew a term the quorum just
        // retired (which it would refuse as stale, and this host would count its lease lost).
        let mut client = lock(&self.0.client);
        let known = self.term();
        let sent = monotonic_us();
        let answer = client.acquire(claim, known);
        let granted = match answer {
            Ok(ClaimOutcome::Granted(g)) => {
                *lock(&self.0.last_error) = None;
                *lock(&self.0.lost) = None;
                self.0.term.store(g.term, Ordering::SeqCst);
                self.0.held.store(true, Ordering::SeqCst);
                self.0.valid_until_us.store(Self::until(sent, &g, self.0.cfg.margin), Ordering::SeqCst);
                tracing::info!(backend = self.0.backend, claim = claim.as_str(), term = g.term, previous = ?g.previous, "lease granted");
                g
            }
            Ok(ClaimOutcome::Refused(r)) => {
                *lock(&self.0.last_error) = None;
                return Err(r.to_string());
            }
            Err(e) => {
                let msg = ErrorChain(&e).to_string();
                *lock(&self.0.last_error) = Some(msg.clone());
                return Err(msg);
            }
        };
        drop(client);
        self.notify();
        Ok(granted)
    }

    /// Renews once (the renewer's step; tests call it directly).
    pub fn renew_once(&self) {
        if !self.0.held.load(Ordering::SeqCst) {
            return;
        }
        // Under the client's lock, as in `claim`: the term renewed is the latest one granted.
        let mut client = lock(&self.0.client);
        let term = self.term();
        let sent = monotonic_us();
        let answer = client.renew(term);
        drop(client);
        match answer {
            Ok(ClaimOutcome::Granted(g)) => {
                *lock(&self.0.last_error) = None;
                let before = self.valid_until_us();
                let until = Self::until(sent, &g, self.0.cfg.margin).max(before);
                self.0.valid_until_us.store(until, Ordering::SeqCst);
                if before <= sent {
                    tracing::info!(term, "lease valid again");
                }
                self.notify();
            }
            // A claim granted a newer term since this renewal was answered: the refusal is about
            // a term this host no longer holds.
            Ok(ClaimOutcome::Refused(r)) if self.term() != term => {
                tracing::debug!(term, refusal = %r, "renewal of a superseded term refused");
            }
            Ok(ClaimOutcome::Refused(r)) => {
                let reason = format!("the quorum refused to renew the lease of term {term}: {r}");
                tracing::error!(%reason, "lease lost");
                *lock(&self.0.lost) = Some(reason);
                self.0.held.store(false, Ordering::SeqCst);
                self.0.valid_until_us.store(0, Ordering::SeqCst);
                self.notify();
            }
            Err(e) => {
                let msg = ErrorChain(&e).to_string();
                let first = lock(&self.0.last_error).replace(msg.clone()).is_none();
                if first {
                    tracing::warn!(error = %msg, "cannot renew the lease: it runs out unless the quorum answers");
                }
            }
        }
    }

    /// Gives the lease up (the holder stops on purpose); nothing if not held.
    pub fn release(&self, reason: ReleaseReason) {
        if !self.0.held.swap(false, Ordering::SeqCst) {
            return;
        }
        self.0.valid_until_us.store(0, Ordering::SeqCst);
        let mut client = lock(&self.0.client);
        let term = self.term();
        if let Err(e) = client.release(term, reason) {
            tracing::warn!(error = %ErrorChain(&e), term, "cannot release the lease: it runs out by itself");
        }
        drop(client);
        self.notify();
    }

    /// Starts the renewer thread; it stops when the returned handle is dropped.
    pub fn spawn_renewer(&self) -> std::io::Result<Renewer> {
        let lease = self.clone();
        let every = self.0.cfg.renew_every.max(Duration::from_millis(10));
        let thread = std::thread::Builder::new().name("ftvm-lease".into()).spawn(move || {
            // Bounded by the stop flag; one renewal per period.
            while !lease.0.stop.load(Ordering::SeqCst) {
                let started = std::time::Instant::now();
                if lease.has_quorum() && lease.lost().is_none() {
                    lease.renew_once();
                }
                std::thread::sleep(every.saturating_sub(started.elapsed()).max(Duration::from_millis(5)));
            }
        })?;
        Ok(Renewer { lease: self.clone(), thread: Some(thread) })
    }
}

/// The renewer thread of a [`Lease`]; stops it when dropped.
#[derive(Debug)]
pub struct Renewer {
    lease: Lease,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.lease.0.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::quorum::rules::LeaseBook;
    use crate::ha::quorum::QuorumError;

    /// The rules of a real quorum over a shared book, with a switch to make it unreachable.
    #[derive(Debug, Clone)]
    struct BookQuorum {
        book: Arc<Mutex<LeaseBook>>,
        host: &'static str,
        down: Arc<AtomicBool>,
    }

    impl QuorumClient for BookQuorum {
        fn backend(&self) -> &'static str {
            "book"
        }
        fn acquire(&mut self, claim: Claim, known: u64) -> Result<ClaimOutcome, QuorumError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(QuorumError("down".into()));
            }
            Ok(lock(&self.book).acquire("vm", self.host, claim == Claim::Start, known, monotonic_us()).0)
        }
        fn renew(&mut self, term: u64) -> Result<ClaimOutcome, QuorumError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(QuorumError("down".into()));
            }
            Ok(lock(&self.book).renew("vm", self.host, term, monotonic_us()))
        }
        fn release(&mut self, term: u64, reason: ReleaseReason) -> Result<(), QuorumError> {
            lock(&self.book).release("vm", self.host, term, reason, monotonic_us());
            Ok(())
        }
    }

    /// A quorum whose claims take a while to answer, so that a renewal can start during one.
    #[derive(Debug)]
    struct SlowClaims(BookQuorum, Duration);

    impl QuorumClient for SlowClaims {
        fn backend(&self) -> &'static str {
            "slow"
        }
        fn acquire(&mut self, claim: Claim, known: u64) -> Result<ClaimOutcome, QuorumError> {
            std::thread::sleep(self.1);
            self.0.acquire(claim, known)
        }
        fn renew(&mut self, term: u64) -> Result<ClaimOutcome, QuorumError> {
            self.0.renew(term)
        }
        fn release(&mut self, term: u64, reason: ReleaseReason) -> Result<(), QuorumError> {
            self.0.release(term, reason)
        }
    }

    /// A renewal that starts while a claim moves the term renews the new term: the lease is not
    /// lost (it once was, when the renewal had read the old term before the claim answered).
    #[test]
    fn a_renewal_during_a_claim_renews_the_new_term() {
        let book = Arc::new(Mutex::new(LeaseBook::new(Duration::from_secs(5))));
        let down = Arc::new(AtomicBool::new(false));
        let cfg = LeaseConfig { renew_every: Duration::from_millis(10), margin: Duration::from_millis(10) };
        let quorum = SlowClaims(BookQuorum { book, host: "a", down }, Duration::from_millis(100));
        let a = Lease::new(Box::new(quorum), cfg, 0);
        let first = a.claim(Claim::Start).unwrap().term;
        let claimer = {
            let a = a.clone();
            std::thread::spawn(move || a.claim(Claim::RunAlone))
        };
        std::thread::sleep(Duration::from_millis(30));
        a.renew_once();
        let second = claimer.join().unwrap().unwrap().term;
        assert!(second > first);
        assert_eq!(a.lost(), None);
        assert_eq!(a.term(), second);
        assert!(a.is_valid(monotonic_us()));
    }

    fn pair(ttl_ms: u64) -> (Lease, Lease, Arc<AtomicBool>) {
        let book = Arc::new(Mutex::new(LeaseBook::new(Duration::from_millis(ttl_ms))));
        let down = Arc::new(AtomicBool::new(false));
        let cfg = LeaseConfig { renew_every: Duration::from_millis(10), margin: Duration::from_millis(10) };
        let a = Lease::new(Box::new(BookQuorum { book: book.clone(), host: "a", down: down.clone() }), cfg, 0);
        let b = Lease::new(Box::new(BookQuorum { book, host: "b", down: down.clone() }), cfg, 0);
        (a, b, down)
    }

    #[test]
    fn no_quorum_is_valid_for_ever() {
        let l = Lease::default();
        assert!(!l.has_quorum());
        assert!(l.claim(Claim::Start).is_ok());
        assert!(l.is_valid(u64::MAX - 1));
    }

    #[test]
    fn a_granted_lease_ends_before_the_quorums_and_a_refused_renewal_loses_it() {
        let (a, b, _) = pair(200);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        a.subscribe(move |v| lock(&s).push(v.term));
        let before = monotonic_us();
        assert_eq!(a.claim(Claim::Start).map(|g| g.term), Ok(1));
        let until = a.valid_until_us();
        assert!(until <= before + 200_000 && until + 20_000 >= before + 190_000, "{until} vs {before}");
        assert_eq!(*lock(&seen), vec![0, 1]);
        // B, whose copy is current as of term 1, waits out A's lease, then takes it.
        b.0.term.store(1, Ordering::SeqCst);
        assert!(b.claim(Claim::TakeOver).unwrap_err().contains("holds the lease"));
        std::thread::sleep(Duration::from_millis(210));
        assert!(!a.is_valid(monotonic_us()));
        assert_eq!(b.claim(Claim::TakeOver).map(|g| g.term), Ok(2));
        a.renew_once();
        assert!(a.lost().is_some_and(|r| r.contains("stale")), "{:?}", a.lost());
        assert!(!a.is_valid(monotonic_us()));
    }

    #[test]
    fn the_renewer_keeps_it_valid_and_an_unreachable_quorum_lets_it_run_out() {
        let (a, _b, down) = pair(100);
        a.claim(Claim::Start).unwrap();
        let renewer = a.spawn_renewer().unwrap();
        std::thread::sleep(Duration::from_millis(250));
        assert!(a.is_valid(monotonic_us()), "renewed");
        down.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(150));
        assert!(!a.is_valid(monotonic_us()), "ran out");
        assert!(a.lost().is_none() && a.last_error().is_some());
        down.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(60));
        assert!(a.is_valid(monotonic_us()), "valid again: nobody else claimed it");
        drop(renewer);
        a.release(ReleaseReason::Stopped);
        assert!(!a.is_valid(monotonic_us()));
    }
}
