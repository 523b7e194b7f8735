//! The quorum's etcd backend: the VM's lease kept in an etcd v3 cluster, through etcd's JSON gateway.
//!
//! etcd is spoken to over plain HTTP/1.1 (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/lease/grant`,
//! `/v3/lease/revoke`, `/v3/lease/timetolive`) by a small blocking client of its own: one
//! connection per request, every step bounded by the request timeout. TLS is not supported yet.
//!
//! # Data layout
//! Under `<prefix>/<vm>/`:
//! * `term`: the durable record, JSON `{"term": u64, "owner": "<host>", "released": null |
//!   "stopped" | "holder-died"}`, with no etcd lease;
//! * `lease`: the holder's name, attached to an etcd lease of the configured TTL. etcd deletes it
//!   when that lease expires.
//!
//! The lease is **held** while the `lease` key exists and the record is not released. The rules
//! are [`super::rules::LeaseBook`]'s; the only differences are of timing: etcd counts TTLs in
//! whole seconds (a TTL is rounded up, and etcd may raise it to its own minimum, see
//! [`LeaseGrant::ttl`]), and an expired lease is only gone once etcd has revoked it (its leader
//! checks about twice a second), so a claim can be refused as held for up to about a second after
//! the TTL ran out.
//!
//! etcd grants at least its minimum TTL, 1.5 election timeouts rounded up to a whole second: 2 s
//! with etcd's default flags, 1 s with `--election-timeout 500`. [`LeaseGrant::ttl`] is the TTL
//! etcd granted, which can be more than asked.
//!
//! [`Refusal::Held::remaining`] comes from `/v3/lease/timetolive` on the holder's etcd lease.
//! etcd answers in whole seconds, truncated; the refusal reports that rounded up (one second
//! more), at most the lease's granted TTL: an upper bound to within a second, so that a caller
//! waiting for it does not come back too early. When etcd cannot say, it is the full TTL.
//!
//! # Changes
//! Every change of state is one etcd transaction guarded by the state the decision was made on:
//! the `term` key's `mod_revision` (or its absence) and the `lease` key's (or its absence). Two
//! claims of the same term can therefore never both win: the second's guard fails, it reads again
//! and decides again (a bounded number of times). A claim or renewal first grants a fresh etcd
//! lease, then the transaction puts the `lease` key with it; a lease the transaction did not use
//! is revoked, and so is the one it replaced (best effort: an unused lease only expires).
//!
//! A transaction whose answer was lost (a timeout after the request was sent, a 5xx) may still
//! have been applied. It is not sent again elsewhere: the state is read again, and a `lease` key
//! attached to that attempt's etcd lease means it was (the lease ids are etcd's, unique). The
//! leases of such attempts that turn out unused are revoked before the call returns, so that none
//! can still be applied later.
//!
//! # Endpoints
//! Each request tries the endpoints in order, starting from the last one that answered, until one
//! answers; an endpoint that cannot be connected to, or answers 5xx, passes the request to the
//! next (except a transaction already sent, see above). All failing is a [`QuorumError`] naming
//! every endpoint and why it failed. Host names are resolved by the system's resolver (not bounded
//! by the request timeout): prefer IP addresses.
//!
//! A call makes a few requests (acquire and renew: read, grant, transaction, revoke; a refusal as
//! held: read, time-to-live), each bounded by the request timeout per endpoint tried; a call that
//! keeps finding the state changed gives up after a few attempts. With every endpoint refusing
//! connections a call fails at once; with endpoints that accept and never answer, after one
//! request timeout per endpoint.
//!
//! # Timing
//! The etcd lease is granted during the call, so after the caller sent its request: the caller's
//! count of the lease (from its request, for [`LeaseGrant::ttl`]) ends before etcd's.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::rules::{self, is_valid_name};
use super::{Claim, ClaimOutcome, LeaseGrant, Previous, QuorumClient, QuorumError, Refusal, ReleaseReason};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ftvm";

/// The default timeout of one request to one endpoint.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest reply accepted from etcd (headers and body).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// etcd's largest lease TTL (seconds).
const MAX_TTL_SECS: u64 = 9_000_000_000;

/// How many times a call reads and decides again after its guard failed.
const MAX_ATTEMPTS: usize = 8;

/// The longest prefix accepted (bytes).
const MAX_PREFIX_LEN: usize = 128;

/// How to reach etcd and what to claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd's client URLs, `http://host:port`, tried in order.
    pub endpoints: Vec<String>,
    /// The VM's id.
    pub vm: String,
    /// This host's name.
    pub host: String,
    /// The lease's TTL; etcd counts whole seconds, so it is rounded up.
    pub ttl: Duration,
    /// The longest one request to one endpoint may take (connect, send, answer).
    pub request_timeout: Duration,
    /// The keys' prefix ([`DEFAULT_PREFIX`]): `/` then `[A-Za-z0-9._-]` segments separated by `/`.
    pub prefix: String,
}

impl EtcdConfig {
    /// A configuration with the default request timeout and prefix.
    pub fn new(endpoints: Vec<String>, vm: impl Into<String>, host: impl Into<String>, ttl: Duration) -> Self {
        Self {
            endpoints,
            vm: vm.into(),
            host: host.into(),
            ttl,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            prefix: DEFAULT_PREFIX.to_string(),
        }
    }
}

/// Why an [`EtcdConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdConfigError {
    /// No endpoint was given.
    #[error("etcd quorum: no endpoint given")]
    NoEndpoints,
    /// An endpoint is not `http://host:port`.
    #[error("etcd quorum: endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The VM id is not 1 to 64 of `[A-Za-z0-9._-]`.
    #[error("etcd quorum: invalid VM id {0:?} (1 to 64 of A-Z a-z 0-9 . _ -)")]
    Vm(String),
    /// The host name is not 1 to 64 of `[A-Za-z0-9._-]`.
    #[error("etcd quorum: invalid host name {0:?} (1 to 64 of A-Z a-z 0-9 . _ -)")]
    Host(String),
    /// The prefix is malformed.
    #[error("etcd quorum: invalid key prefix {0:?} (\"/\" then segments of A-Z a-z 0-9 . _ - separated by \"/\", no trailing \"/\", at most 128 bytes)")]
    Prefix(String),
    /// The TTL is zero or longer than etcd accepts.
    #[error("etcd quorum: the lease TTL must be more than 0 and at most 9000000000 s, not {0:?}")]
    Ttl(Duration),
    /// The request timeout is zero.
    #[error("etcd quorum: the request timeout must be more than 0")]
    RequestTimeout,
}

/// One etcd client URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    /// As given, for messages.
    url: String,
    /// Host name or address, without IPv6 brackets.
    host: String,
    port: u16,
    /// The `Host` header's value.
    authority: String,
}

fn parse_endpoint(url: &str) -> Result<Endpoint, EtcdConfigError> {
    let bad = |reason: &str| EtcdConfigError::Endpoint { endpoint: url.to_string(), reason: reason.to_string() };
    if url.len() >= 8 && url[..8].eq_ignore_ascii_case("https://") {
        return Err(bad("TLS (https) is not supported yet by the etcd quorum client: give an http:// endpoint"));
    }
    let rest = match url.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &url[7..],
        _ => return Err(bad("must be http://host:port")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('#') || rest.contains('@') {
        return Err(bad("must be http://host:port, without a path, query or user"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err(bad("unclosed [ in an IPv6 address"));
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address between [ and ]"));
        }
        let Some(p) = after.strip_prefix(':') else {
            return Err(bad("a port is required (http://host:port)"));
        };
        (h, p)
    } else {
        let Some((h, p)) = rest.rsplit_once(':') else {
            return Err(bad("a port is required (http://host:port)"));
        };
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
            return Err(bad("not a host name or IPv4 address"));
        }
        (h, p)
    };
    let port: u16 = match parse_port(port) {
        Some(p) if p != 0 => p,
        _ => return Err(bad("the port must be 1 to 65535")),
    };
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok(Endpoint { url: url.to_string(), host: host.to_string(), port, authority })
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn valid_prefix(p: &str) -> bool {
    p.len() <= MAX_PREFIX_LEN
        && p.len() >= 2
        && p.starts_with('/')
        && p[1..].split('/').all(|seg| !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
}

/// The release state in the `term` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Released {
    Stopped,
    HolderDied,
}

impl From<ReleaseReason> for Released {
    fn from(r: ReleaseReason) -> Self {
        match r {
            ReleaseReason::Stopped => Self::Stopped,
            ReleaseReason::HolderDied => Self::HolderDied,
        }
    }
}

impl From<Released> for ReleaseReason {
    fn from(r: Released) -> Self {
        match r {
            Released::Stopped => Self::Stopped,
            Released::HolderDied => Self::HolderDied,
        }
    }
}

/// The `term` key's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TermRecord {
    term: u64,
    owner: String,
    released: Option<Released>,
}

/// A key as read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kv {
    value: Vec<u8>,
    mod_revision: i64,
    /// The etcd lease it is attached to (0: none).
    lease: i64,
}

/// The VM's two keys, read at one revision.
#[derive(Clone, Debug)]
struct Snapshot {
    term: Option<(TermRecord, i64)>,
    lease: Option<Kv>,
}

/// What to do after reading the state.
enum Decision {
    /// Answer this, with no change.
    Answer(ClaimOutcome),
    /// Refused as held by `owner` for `term`, for as long as etcd lease `lease` lasts.
    Held { owner: String, term: u64, lease: i64 },
    /// Write: put `record` (if any) and the `lease` key with a fresh etcd lease, granting `term`.
    Write { record: Option<TermRecord>, term: u64, previous: Previous },
}

/// A write of the lease key: the etcd lease it attaches, what it grants, and the etcd lease it
/// replaces (0: none).
#[derive(Clone, Copy, Debug)]
struct Attempt {
    lease: i64,
    grant: LeaseGrant,
    replaces: i64,
}

/// A quorum kept in etcd (see the module documentation).
#[derive(Debug)]
pub struct EtcdQuorum {
    http: Http,
    vm: String,
    host: String,
    ttl_secs: u64,
    term_key: String,
    lease_key: String,
    /// The start and end of the range holding the VM's keys (`<prefix>/<vm>/` to `<prefix>/<vm>0`).
    dir: (String, String),
}

impl EtcdQuorum {
    /// A client for `config` (nothing is sent yet).
    pub fn new(config: EtcdConfig) -> Result<Self, EtcdConfigError> {
        if config.endpoints.is_empty() {
            return Err(EtcdConfigError::NoEndpoints);
        }
        let endpoints = config.endpoints.iter().map(|e| parse_endpoint(e)).collect::<Result<Vec<_>, _>>()?;
        if !is_valid_name(&config.vm) {
            return Err(EtcdConfigError::Vm(config.vm));
        }
        if !is_valid_name(&config.host) {
            return Err(EtcdConfigError::Host(config.host));
        }
        if !valid_prefix(&config.prefix) {
            return Err(EtcdConfigError::Prefix(config.prefix));
        }
        if config.ttl.is_zero() || config.ttl > Duration::from_secs(MAX_TTL_SECS) {
            return Err(EtcdConfigError::Ttl(config.ttl));
        }
        if config.request_timeout.is_zero() {
            return Err(EtcdConfigError::RequestTimeout);
        }
        let ttl_secs = config.ttl.as_secs() + u64::from(config.ttl.subsec_nanos() > 0);
        let base = format!("{}/{}", config.prefix, config.vm);
        Ok(Self {
            http: Http { endpoints, timeout: config.request_timeout, preferred: 0 },
            ttl_secs,
            term_key: format!("{base}/term"),
            lease_key: format!("{base}/lease"),
            // '0' follows '/': the range holds exactly the keys under `<base>/`.
            dir: (format!("{base}/"), format!("{base}0")),
            vm: config.vm,
            host: config.host,
        })
    }

    /// The key of the durable term record.
    pub fn term_key(&self) -> &str {
        &self.term_key
    }

    /// The key that exists while the lease is held.
    pub fn lease_key(&self) -> &str {
        &self.lease_key
    }

    /// The TTL asked of etcd (whole seconds; etcd may grant more).
    pub fn requested_ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }

    fn error(&self, what: &str, e: impl fmt::Display) -> QuorumError {
        QuorumError(format!("etcd, VM {}: {what}: {e}", self.vm))
    }

    /// Reads both keys at one revision.
    fn read(&mut self) -> Result<Snapshot, QuorumError> {
        let body = json!({ "key": b64::encode(self.dir.0.as_bytes()), "range_end": b64::encode(self.dir.1.as_bytes()) });
        let reply = self.http.post("/v3/kv/range", &body, Idempotent::Yes).map_err(|e| self.error("reading the lease", e))?;
        self.parse_snapshot(&reply).map_err(|e| self.error("reading the lease: malformed reply", e))
    }

    fn parse_snapshot(&self, reply: &Value) -> Result<Snapshot, String> {
        let mut snap = Snapshot { term: None, lease: None };
        let kvs = match reply.get("kvs") {
            None | Some(Value::Null) => return Ok(snap),
            Some(Value::Array(a)) => a,
            Some(_) => return Err("kvs is not an array".into()),
        };
        for kv in kvs {
            let key = b64::decode(str_field(kv, "key")?).ok_or("a key is not base64")?;
            let value = b64::decode(str_field(kv, "value")?).ok_or("a value is not base64")?;
            let parsed = Kv { value, mod_revision: int_field(kv, "mod_revision")?, lease: int_field(kv, "lease")? };
            if key == self.term_key.as_bytes() {
                let record: TermRecord = serde_json::from_slice(&parsed.value)
                    .map_err(|e| format!("{} holds no term record ({e}): {:?}", self.term_key, String::from_utf8_lossy(&parsed.value)))?;
                snap.term = Some((record, parsed.mod_revision));
            } else if key == self.lease_key.as_bytes() {
                snap.lease = Some(parsed);
            }
        }
        Ok(snap)
    }

    /// The guard of a change decided on `snap`: both keys as they were.
    fn guard(&self, snap: &Snapshot) -> Vec<Value> {
        let cmp = |key: &str, rev: Option<i64>| match rev {
            Some(r) => json!({ "key": b64::encode(key.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string() }),
            None => json!({ "key": b64::encode(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }),
        };
        vec![cmp(&self.term_key, snap.term.as_ref().map(|t| t.1)), cmp(&self.lease_key, snap.lease.as_ref().map(|l| l.mod_revision))]
    }

    fn put_record(&self, record: &TermRecord) -> Value {
        let value = serde_json::to_vec(record).unwrap_or_default();
        json!({ "request_put": { "key": b64::encode(self.term_key.as_bytes()), "value": b64::encode(&value) } })
    }

    /// Runs a transaction: `Ok(true)` applied, `Ok(false)` its guard failed.
    fn txn(&mut self, compare: Vec<Value>, success: Vec<Value>) -> Result<bool, CallError> {
        let body = json!({ "compare": compare, "success": success });
        let reply = self.http.post("/v3/kv/txn", &body, Idempotent::No)?;
        match reply.get("succeeded") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(CallError::Ambiguous(format!("malformed transaction reply: succeeded = {other}"))),
        }
    }

    /// Grants a fresh etcd lease: its id and the TTL etcd granted.
    fn grant(&mut self) -> Result<(i64, Duration), QuorumError> {
        let body = json!({ "TTL": self.ttl_secs.to_string(), "ID": "0" });
        let reply = self.http.post("/v3/lease/grant", &body, Idempotent::Yes).map_err(|e| self.error("granting an etcd lease", e))?;
        let parse = || -> Result<(i64, i64), String> {
            if let Some(e) = reply.get("error").and_then(Value::as_str).filter(|e| !e.is_empty()) {
                return Err(e.to_string());
            }
            Ok((int_field(&reply, "ID")?, int_field(&reply, "TTL")?))
        };
        match parse() {
            Ok((id, ttl)) if id != 0 && ttl > 0 => Ok((id, Duration::from_secs(ttl.unsigned_abs()))),
            Ok((id, ttl)) => Err(self.error("granting an etcd lease", format!("etcd granted lease {id} with TTL {ttl}"))),
            Err(e) => Err(self.error("granting an etcd lease", e)),
        }
    }

    /// Revokes etcd lease `id` (and deletes its keys); best effort, whether it worked.
    fn revoke(&mut self, id: i64) -> bool {
        if id == 0 {
            return true;
        }
        match self.http.post("/v3/lease/revoke", &json!({ "ID": id.to_string() }), Idempotent::Yes) {
            Ok(_) => true,
            Err(CallError::Status { code: 5, .. }) => true, // Not found: it expired already.
            Err(e) => {
                tracing::warn!(vm = %self.vm, lease = id, error = %e, "etcd quorum: could not revoke an unused etcd lease (it will expire)");
                false
            }
        }
    }

    /// Revokes etcd leases no key uses any more (best effort), stopping at the first failure:
    /// etcd is not answering, the rest would fail too (and cost a timeout each).
    fn revoke_all(&mut self, ids: impl IntoIterator<Item = i64>) {
        for id in ids {
            if !self.revoke(id) {
                return;
            }
        }
    }

    /// How long etcd lease `id` has left: `None` when it is gone. etcd answers in whole seconds,
    /// truncated: this is rounded up (an upper bound), and at most the lease's granted TTL.
    fn remaining(&mut self, id: i64) -> Option<Duration> {
        let full = Duration::from_secs(self.ttl_secs);
        if id == 0 {
            // A key with no lease: never expires (someone wrote it by hand).
            return Some(full);
        }
        let reply = match self.http.post("/v3/lease/timetolive", &json!({ "ID": id.to_string() }), Idempotent::Yes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(vm = %self.vm, error = %e, "etcd quorum: no time-to-live for the holder's lease, reporting the full TTL");
                return Some(full);
            }
        };
        match (int_field(&reply, "TTL"), int_field(&reply, "grantedTTL")) {
            (Ok(ttl), _) if ttl < 0 => None,
            (Ok(ttl), Ok(granted)) => {
                let up = ttl.saturating_add(1);
                let secs = if granted > 0 { up.min(granted) } else { up };
                Some(Duration::from_secs(secs.unsigned_abs()))
            }
            _ => Some(full),
        }
    }

    /// The common loop of `acquire` and `renew`: read, decide, write under guard; again if the
    /// state changed meanwhile.
    fn claim_loop(&mut self, what: &str, decide: impl Fn(&Self, &Snapshot) -> Decision) -> Result<ClaimOutcome, QuorumError> {
        // Attempts whose transaction may or may not have been applied.
        let mut pending: Vec<Attempt> = Vec::new();
        let result = self.claim_attempts(what, &decide, &mut pending);
        // The etcd leases no key uses: those of the attempts that were not applied (revoked, none
        // can be applied later), and the one the applied attempt replaced.
        let (used, replaced) = match &result {
            Ok((_, Some(a))) => (a.lease, a.replaces),
            _ => (0, 0),
        };
        let unused: Vec<i64> = pending.iter().map(|a| a.lease).filter(|&l| l != used).chain([replaced]).filter(|&l| l != 0).collect();
        self.revoke_all(unused);
        result.map(|(o, _)| o)
    }

    /// The outcome and the attempt that was applied, if any.
    fn claim_attempts(
        &mut self,
        what: &str,
        decide: &impl Fn(&Self, &Snapshot) -> Decision,
        pending: &mut Vec<Attempt>,
    ) -> Result<(ClaimOutcome, Option<Attempt>), QuorumError> {
        for _ in 0..MAX_ATTEMPTS {
            let snap = self.read()?;
            if let Some(l) = snap.lease.as_ref().filter(|l| l.lease != 0) {
                if let Some(a) = pending.iter().find(|a| a.lease == l.lease) {
                    // An earlier attempt whose answer was lost was applied.
                    return Ok((ClaimOutcome::Granted(a.grant), Some(*a)));
                }
            }
            match decide(self, &snap) {
                Decision::Answer(o) => return Ok((o, None)),
                Decision::Held { owner, term, lease } => match self.remaining(lease) {
                    Some(remaining) => return Ok((ClaimOutcome::Refused(Refusal::Held { owner, term, remaining }), None)),
                    // Revoked since it was read: decide again.
                    None => continue,
                },
                Decision::Write { record, term, previous } => {
                    let (id, ttl) = self.grant()?;
                    let grant = LeaseGrant { term, ttl: Some(ttl), previous };
                    // The lease key's etcd lease this replaces: it will hold no key.
                    let replaces = snap.lease.as_ref().map_or(0, |l| l.lease);
                    let attempt = Attempt { lease: id, grant, replaces };
                    let mut success = Vec::with_capacity(2);
                    if let Some(r) = &record {
                        success.push(self.put_record(r));
                    }
                    success.push(json!({ "request_put": {
                        "key": b64::encode(self.lease_key.as_bytes()),
                        "value": b64::encode(self.host.as_bytes()),
                        "lease": id.to_string(),
                    }}));
                    match self.txn(self.guard(&snap), success) {
                        Ok(true) => return Ok((ClaimOutcome::Granted(grant), Some(attempt))),
                        Ok(false) => {
                            tracing::debug!(vm = %self.vm, "etcd quorum: the lease changed since it was read; deciding again");
                            self.revoke(id);
                        }
                        Err(CallError::Ambiguous(e)) => {
                            tracing::warn!(vm = %self.vm, error = %e, "etcd quorum: a {what} transaction's answer was lost; reading again");
                            pending.push(attempt);
                        }
                        Err(e) => {
                            self.revoke(id);
                            return Err(self.error(what, e));
                        }
                    }
                }
            }
        }
        Err(self.error(what, format!("the lease kept changing under {MAX_ATTEMPTS} attempts")))
    }
}

fn decide_acquire(q: &EtcdQuorum, snap: &Snapshot, claim: Claim, known: u64) -> Decision {
    let Some((r, _)) = &snap.term else {
        if claim != Claim::Start {
            return Decision::Answer(ClaimOutcome::Refused(Refusal::Unknown));
        }
        let term = known.saturating_add(1);
        let record = TermRecord { term, owner: q.host.clone(), released: None };
        return Decision::Write { record: Some(record), term, previous: Previous::None };
    };
    if rules::won_before(r.term, &r.owner, r.released.is_some(), &q.host, known) {
        // Granted again with the same term: a fresh etcd lease, the record unchanged.
        return Decision::Write { record: None, term: r.term, previous: Previous::Expired };
    }
    if known != r.term {
        return Decision::Answer(ClaimOutcome::Refused(Refusal::Stale { known, current: r.term, owner: Some(r.owner.clone()) }));
    }
    let previous = if r.owner == q.host {
        Previous::None
    } else if let Some(reason) = r.released {
        Previous::Released(reason.into())
    } else if let Some(l) = &snap.lease {
        return Decision::Held { owner: r.owner.clone(), term: r.term, lease: l.lease };
    } else {
        Previous::Expired
    };
    let term = r.term.saturating_add(1);
    Decision::Write { record: Some(TermRecord { term, owner: q.host.clone(), released: None }), term, previous }
}

fn decide_renew(q: &EtcdQuorum, snap: &Snapshot, term: u64) -> Decision {
    let Some((r, _)) = &snap.term else {
        return Decision::Answer(ClaimOutcome::Refused(Refusal::Unknown));
    };
    if r.term != term || r.owner != q.host {
        return Decision::Answer(ClaimOutcome::Refused(Refusal::Stale { known: term, current: r.term, owner: Some(r.owner.clone()) }));
    }
    if r.released.is_some() {
        return Decision::Answer(ClaimOutcome::Refused(Refusal::Released));
    }
    Decision::Write { record: None, term, previous: Previous::None }
}

impl QuorumClient for EtcdQuorum {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn acquire(&mut self, claim: Claim, known_term: u64) -> Result<ClaimOutcome, QuorumError> {
        self.claim_loop(claim.as_str(), |q, s| decide_acquire(q, s, claim, known_term))
    }

    fn renew(&mut self, term: u64) -> Result<ClaimOutcome, QuorumError> {
        self.claim_loop("renewal", |q, s| decide_renew(q, s, term))
    }

    fn release(&mut self, term: u64, reason: ReleaseReason) -> Result<(), QuorumError> {
        // The etcd leases of the lease key as seen before a release that may have been applied:
        // to revoke once no key uses them.
        let mut seen: Vec<i64> = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            let snap = self.read()?;
            let (record, rev) = match &snap.term {
                Some((r, rev)) if r.term == term && r.owner == self.host && r.released.is_none() => (r.clone(), *rev),
                // Not (or no longer) ours: nothing to do.
                _ => {
                    let current = snap.lease.as_ref().map_or(0, |l| l.lease);
                    seen.sort_unstable();
                    seen.dedup();
                    self.revoke_all(seen.into_iter().filter(|&l| l != 0 && l != current));
                    return Ok(());
                }
            };
            let released = TermRecord { released: Some(reason.into()), ..record };
            let compare = vec![json!({ "key": b64::encode(self.term_key.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string() })];
            let success = vec![self.put_record(&released), json!({ "request_delete_range": { "key": b64::encode(self.lease_key.as_bytes()) } })];
            match self.txn(compare, success) {
                Ok(true) => {
                    // The lease key is gone: no key uses any of them.
                    seen.extend(snap.lease.as_ref().map(|l| l.lease));
                    seen.sort_unstable();
                    seen.dedup();
                    self.revoke_all(seen.into_iter().filter(|&l| l != 0));
                    return Ok(());
                }
                // Changed meanwhile (or perhaps applied): read again.
                Ok(false) | Err(CallError::Ambiguous(_)) => seen.extend(snap.lease.as_ref().map(|l| l.lease)),
                Err(e) => return Err(self.error("release", e)),
            }
        }
        Err(self.error("release", format!("the lease kept changing under {MAX_ATTEMPTS} attempts")))
    }
}

fn str_field<'a>(v: &'a Value, name: &str) -> Result<&'a str, String> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("{name} is not a string: {other}")),
    }
}

/// An int64 field: the gateway sends them as strings, and leaves zeros out.
fn int_field(v: &Value, name: &str) -> Result<i64, String> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| format!("{name} is not an integer: {s:?}")),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| format!("{name} is not an int64: {n}")),
        Some(other) => Err(format!("{name} is not an integer: {other}")),
    }
}

/// Whether a request may be sent again to another endpoint after it was sent to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Idempotent {
    Yes,
    No,
}

/// Why a request failed.
#[derive(Debug)]
enum CallError {
    /// No endpoint answered (or each answered 5xx): it was not applied, or is harmless if it was.
    Unreachable(String),
    /// etcd answered with an error.
    Status { http: u16, code: i64, message: String, endpoint: String },
    /// A transaction was sent but its answer was lost or was a server error: it may have been
    /// applied.
    Ambiguous(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(m) => write!(f, "{m}"),
            Self::Status { http, code, message, endpoint } => {
                write!(f, "etcd at {endpoint} answered HTTP {http}: {message} (gRPC code {code})")
            }
            Self::Ambiguous(m) => write!(f, "{m} (the change may or may not have been applied)"),
        }
    }
}

/// The HTTP side: endpoints, timeout, and the one that answered last.
#[derive(Debug)]
struct Http {
    endpoints: Vec<Endpoint>,
    timeout: Duration,
    preferred: usize,
}

impl Http {
    /// POSTs `body` to `path`, trying each endpoint in turn from the preferred one; the reply's
    /// JSON.
    fn post(&mut self, path: &str, body: &Value, idempotent: Idempotent) -> Result<Value, CallError> {
        let body = serde_json::to_vec(body).unwrap_or_default();
        let n = self.endpoints.len();
        let mut failures = Vec::with_capacity(n);
        for i in 0..n {
            let idx = (self.preferred + i) % n;
            let ep = &self.endpoints[idx];
            let (status, reply) = match exchange(ep, path, &body, self.timeout) {
                Ok(r) => r,
                Err(e) => {
                    if e.sent && idempotent == Idempotent::No {
                        return Err(CallError::Ambiguous(format!("etcd at {}: {}", ep.url, e.message)));
                    }
                    tracing::debug!(endpoint = %ep.url, error = %e.message, "etcd quorum: endpoint failed");
                    failures.push(format!("{}: {}", ep.url, e.message));
                    continue;
                }
            };
            if status == 200 {
                self.preferred = idx;
                return serde_json::from_slice(&reply).map_err(|e| {
                    let m = format!("etcd at {} sent malformed JSON ({e}): {}", ep.url, excerpt(&reply));
                    if idempotent == Idempotent::No {
                        CallError::Ambiguous(m)
                    } else {
                        CallError::Unreachable(m)
                    }
                });
            }
            let (code, message) = match serde_json::from_slice::<Value>(&reply) {
                Ok(v) => (
                    v.get("code").and_then(Value::as_i64).unwrap_or(-1),
                    v.get("message").or_else(|| v.get("error")).and_then(Value::as_str).map_or_else(|| excerpt(&reply), str::to_string),
                ),
                Err(_) => (-1, excerpt(&reply)),
            };
            if status >= 500 {
                if idempotent == Idempotent::No {
                    // A timed-out proposal may still be applied.
                    return Err(CallError::Ambiguous(format!("etcd at {} answered HTTP {status}: {message} (gRPC code {code})", ep.url)));
                }
                failures.push(format!("{}: HTTP {status}: {message}", ep.url));
                continue;
            }
            self.preferred = idx;
            return Err(CallError::Status { http: status, code, message, endpoint: ep.url.clone() });
        }
        Err(CallError::Unreachable(format!("no etcd endpoint answered {path}: {}", failures.join("; "))))
    }
}

fn excerpt(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned();
    if b.len() > 200 {
        format!("{s:?}...")
    } else {
        format!("{s:?}")
    }
}

/// Why one exchange with one endpoint failed.
#[derive(Debug)]
struct ExchangeError {
    /// The whole request had been written (it may have been acted on).
    sent: bool,
    message: String,
}

fn remaining_until(deadline: Instant) -> Option<Duration> {
    let r = deadline.saturating_duration_since(Instant::now());
    (!r.is_zero()).then_some(r)
}

/// One HTTP/1.1 POST to one endpoint on its own connection, all within `timeout`: the status and
/// the body.
fn exchange(ep: &Endpoint, path: &str, body: &[u8], timeout: Duration) -> Result<(u16, Vec<u8>), ExchangeError> {
    let deadline = Instant::now() + timeout;
    let unsent = |message: String| ExchangeError { sent: false, message };
    let addrs: Vec<SocketAddr> = (ep.host.as_str(), ep.port).to_socket_addrs().map_err(|e| unsent(format!("cannot resolve {}: {e}", ep.host)))?.collect();
    if addrs.is_empty() {
        return Err(unsent(format!("{} resolves to no address", ep.host)));
    }
    let mut stream = None;
    let mut last = String::new();
    for addr in addrs {
        let Some(left) = remaining_until(deadline) else {
            last = format!("connecting to {addr}: timed out");
            break;
        };
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    let Some(mut stream) = stream else {
        return Err(unsent(last));
    };
    // Each request is small; no need to wait for a full segment.
    let _ = stream.set_nodelay(true);
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        ep.authority,
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let timed_out = |sent: bool, what: &str| ExchangeError { sent, message: format!("{what}: no answer within {} ms", timeout.as_millis()) };
    let Some(left) = remaining_until(deadline) else {
        return Err(timed_out(false, "sending"));
    };
    stream.set_write_timeout(Some(left)).map_err(|e| unsent(format!("socket: {e}")))?;
    stream.write_all(&request).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => timed_out(false, "sending"),
        _ => unsent(format!("sending: {e}")),
    })?;
    let sent = |message: String| ExchangeError { sent: true, message };
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(r) = parse_response(&buf, false).map_err(&sent)? {
            return Ok(r);
        }
        if buf.len() > MAX_RESPONSE_BYTES {
            return Err(sent(format!("the reply is longer than {MAX_RESPONSE_BYTES} bytes")));
        }
        let Some(left) = remaining_until(deadline) else {
            return Err(timed_out(true, "waiting for the reply"));
        };
        stream.set_read_timeout(Some(left)).map_err(|e| sent(format!("socket: {e}")))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return match parse_response(&buf, true).map_err(&sent)? {
                    Some(r) => Ok(r),
                    None if buf.is_empty() => Err(sent("the connection was closed without a reply".into())),
                    None => Err(sent(format!("the connection was closed in the middle of the reply ({} bytes)", buf.len()))),
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timed_out(true, "waiting for the reply"));
            }
            Err(e) => return Err(sent(format!("reading the reply: {e}"))),
        }
    }
}

/// The longest header block accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Parses an HTTP/1.1 response from `buf`: `Ok(None)` while incomplete (`eof`: the peer closed, so
/// a body without a length ends here).
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
    let mut start = 0;
    loop {
        let rest = &buf[start..];
        let Some(head_len) = find(rest, b"\r\n\r\n") else {
            if rest.len() > MAX_HEAD_BYTES {
                return Err(format!("the reply's headers are longer than {MAX_HEAD_BYTES} bytes"));
            }
            if eof && !rest.is_empty() {
                return Err(format!("the reply ended within its headers: {}", excerpt(rest)));
            }
            return Ok(None);
        };
        let head = std::str::from_utf8(&rest[..head_len]).map_err(|_| "the reply's headers are not UTF-8".to_string())?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = parse_status(status_line).ok_or_else(|| format!("not an HTTP/1.x status line: {:?}", clip(status_line, 100)))?;
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            let (name, value) = line.split_once(':').ok_or_else(|| format!("malformed header line {:?}", clip(line, 100)))?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n: usize = value.parse().map_err(|_| format!("malformed Content-Length {value:?}"))?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length headers".into());
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else if !value.eq_ignore_ascii_case("identity") {
                    return Err(format!("unsupported Transfer-Encoding {value:?}"));
                }
            }
        }
        let body = &rest[head_len + 4..];
        if (100..200).contains(&status) {
            // An interim reply (100 Continue): the real one follows.
            start += head_len + 4;
            continue;
        }
        if chunked {
            return decode_chunked(body, eof).map(|b| b.map(|b| (status, b)));
        }
        if let Some(n) = length {
            if n > MAX_RESPONSE_BYTES {
                return Err(format!("the reply announces {n} bytes, more than the {MAX_RESPONSE_BYTES} accepted"));
            }
            if body.len() >= n {
                return Ok(Some((status, body[..n].to_vec())));
            }
            if eof {
                return Err(format!("the reply ended after {} of its {n} bytes", body.len()));
            }
            return Ok(None);
        }
        // No length: the body runs to the end of the connection.
        return Ok(eof.then(|| (status, body.to_vec())));
    }
}

/// At most `max` bytes of `s`, for an error message: cut at a character boundary, since a reply's
/// text (valid UTF-8, but anything) may have a multi-byte character across `max`.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked body: `Ok(None)` while incomplete.
fn decode_chunked(mut b: &[u8], eof: bool) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    let incomplete = |what: &str| if eof { Err(format!("the reply ended within its chunked body ({what})")) } else { Ok(None) };
    loop {
        let Some(line_end) = find(b, b"\r\n") else {
            if b.len() > 1024 {
                return Err("malformed chunk size line".into());
            }
            return incomplete("chunk size");
        };
        let line = std::str::from_utf8(&b[..line_end]).map_err(|_| "malformed chunk size line".to_string())?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        if size_text.is_empty() || size_text.len() > 8 || !size_text.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("malformed chunk size {:?}", clip(line, 40)));
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("malformed chunk size {size_text:?}"))?;
        b = &b[line_end + 2..];
        if size == 0 {
            // Trailers, each a line, up to an empty line.
            loop {
                let Some(end) = find(b, b"\r\n") else {
                    return incomplete("trailers");
                };
                if end == 0 {
                    return Ok(Some(out));
                }
                b = &b[end + 2..];
            }
        }
        if out.len() + size > MAX_RESPONSE_BYTES {
            return Err(format!("the reply's body is longer than {MAX_RESPONSE_BYTES} bytes"));
        }
        if b.len() < size + 2 {
            return incomplete("chunk data");
        }
        if &b[size..size + 2] != b"\r\n" {
            return Err("a chunk does not end with CRLF".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// The decoders of etcd's replies, for the fuzz targets (fuzz/). Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// [`super::parse_response`]: an HTTP/1.1 reply, `Ok(None)` while incomplete.
    pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
        super::parse_response(buf, eof)
    }

    /// Standard padded base64.
    pub fn b64_encode(data: &[u8]) -> String {
        super::b64::encode(data)
    }

    /// `None` unless `text` is canonical padded base64.
    pub fn b64_decode(text: &str) -> Option<Vec<u8>> {
        super::b64::decode(text)
    }
}

/// Standard base64 with padding, as etcd's gateway sends bytes.
mod b64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn value(c: u8) -> Option<u32> {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    }

    /// `None` unless `text` is canonical padded base64.
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let t = text.as_bytes();
        if !t.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(t.len() / 4 * 3);
        for (i, q) in t.chunks(4).enumerate() {
            let last = i + 1 == t.len() / 4;
            let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &q[..4 - pad] {
                n = (n << 6) | value(c)?;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            // Bits below the last byte must be zero (canonical form).
            if (pad == 1 && bytes[2] != 0) || (pad == 2 && (bytes[1] != 0 || bytes[2] != 0)) {
                return None;
            }
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EtcdConfig {
        EtcdConfig::new(vec!["http://127.0.0.1:2379".into()], "vm-1", "host-a", Duration::from_millis(1500))
    }

    #[test]
    fn base64_round_trips_and_refuses_garbage() {
        for (plain, coded) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
            assert_eq!(b64::encode(plain.as_bytes()), coded);
            assert_eq!(b64::decode(coded).as_deref(), Some(plain.as_bytes()));
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(b64::decode(&b64::encode(&all)), Some(all));
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9*", "Zh==", "Zm9w=", "===="] {
            assert_eq!(b64::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn endpoints_must_be_plain_http_with_a_port() {
        let ep = parse_endpoint("http://127.0.0.1:2379/").expect("valid");
        assert_eq!((ep.host.as_str(), ep.port, ep.authority.as_str()), ("127.0.0.1", 2379, "127.0.0.1:2379"));
        let ep = parse_endpoint("http://[::1]:2379").expect("valid");
        assert_eq!((ep.host.as_str(), ep.authority.as_str()), ("::1", "[::1]:2379"));
        assert!(parse_endpoint("http://etcd-1.example:2379").is_ok());
        let tls = parse_endpoint("https://127.0.0.1:2379").unwrap_err().to_string();
        assert!(tls.contains("TLS") && tls.contains("not supported"), "{tls}");
        for bad in ["127.0.0.1:2379", "http://127.0.0.1", "http://127.0.0.1:0", "http://127.0.0.1:99999", "http://:2379", "http://a:2379/v3", "http://[::1:2379", "http://u@h:1", "ftp://h:1", "http://h:+1"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configurations_are_checked() {
        let q = EtcdQuorum::new(config()).expect("valid");
        assert_eq!(q.backend(), "etcd");
        assert_eq!((q.term_key(), q.lease_key()), ("/ftvm/vm-1/term", "/ftvm/vm-1/lease"));
        assert_eq!(q.requested_ttl(), Duration::from_secs(2), "rounded up to whole seconds");
        assert_eq!(q.dir, ("/ftvm/vm-1/".to_string(), "/ftvm/vm-10".to_string()));
        let with = |f: &dyn Fn(&mut EtcdConfig)| {
            let mut c = config();
            f(&mut c);
            EtcdQuorum::new(c).map(|_| ()).unwrap_err()
        };
        assert_eq!(with(&|c| c.endpoints.clear()), EtcdConfigError::NoEndpoints);
        assert!(matches!(with(&|c| c.endpoints.push("https://h:2379".into())), EtcdConfigError::Endpoint { .. }));
        assert_eq!(with(&|c| c.vm = "a/b".into()), EtcdConfigError::Vm("a/b".into()));
        assert_eq!(with(&|c| c.host = String::new()), EtcdConfigError::Host(String::new()));
        assert_eq!(with(&|c| c.ttl = Duration::ZERO), EtcdConfigError::Ttl(Duration::ZERO));
        assert_eq!(with(&|c| c.request_timeout = Duration::ZERO), EtcdConfigError::RequestTimeout);
        for bad in ["", "/", "ftvm", "/ftvm/", "//ftvm", "/ft vm", "/a//b"] {
            assert_eq!(with(&|c| c.prefix = bad.into()), EtcdConfigError::Prefix(bad.into()), "{bad:?}");
        }
        let mut c = config();
        c.prefix = "/site-1/ftvm".into();
        assert_eq!(EtcdQuorum::new(c).expect("valid").term_key(), "/site-1/ftvm/vm-1/term");
    }

    #[test]
    fn term_records_are_the_documented_json() {
        let r = TermRecord { term: 3, owner: "b".into(), released: Some(Released::HolderDied) };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"term":3,"owner":"b","released":"holder-died"}"#);
        let r = TermRecord { term: 1, owner: "a".into(), released: None };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"term":1,"owner":"a","released":null}"#);
        let back: TermRecord = serde_json::from_str(r#"{"term":1,"owner":"a","released":"stopped"}"#).unwrap();
        assert_eq!(back.released, Some(Released::Stopped));
        assert!(serde_json::from_str::<TermRecord>(r#"{"term":1,"owner":"a","released":"maybe"}"#).is_err());
    }

    #[test]
    fn snapshots_parse_the_gateways_json_and_refuse_malformed_replies() {
        let q = EtcdQuorum::new(config()).unwrap();
        let record = b64::encode(br#"{"term":2,"owner":"host-a","released":null}"#);
        let reply = json!({ "header": { "revision": "9" }, "kvs": [
            { "key": b64::encode(b"/ftvm/vm-1/lease"), "create_revision": "8", "mod_revision": "8", "version": "1", "value": b64::encode(b"host-a"), "lease": "7587" },
            { "key": b64::encode(b"/ftvm/vm-1/term"), "create_revision": "2", "mod_revision": "8", "version": "2", "value": record },
            { "key": b64::encode(b"/ftvm/vm-1/other"), "mod_revision": "3", "value": "" },
        ], "count": "3" });
        let s = q.parse_snapshot(&reply).expect("parsed");
        assert_eq!(s.term, Some((TermRecord { term: 2, owner: "host-a".into(), released: None }, 8)));
        assert_eq!(s.lease, Some(Kv { value: b"host-a".to_vec(), mod_revision: 8, lease: 7587 }));
        let empty = q.parse_snapshot(&json!({ "header": {} })).unwrap();
        assert!(empty.term.is_none() && empty.lease.is_none());
        for bad in [
            json!({ "kvs": 3 }),
            json!({ "kvs": [{ "key": "%%%" }] }),
            json!({ "kvs": [{ "key": b64::encode(b"/ftvm/vm-1/term"), "value": b64::encode(b"not json") }] }),
            json!({ "kvs": [{ "key": b64::encode(b"/ftvm/vm-1/lease"), "mod_revision": "x" }] }),
            json!({ "kvs": [{ "key": b64::encode(b"/ftvm/vm-1/lease"), "lease": [] }] }),
        ] {
            assert!(q.parse_snapshot(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_parse_with_a_length_chunked_or_to_the_end() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r, false), Ok(Some((200, b"{}".to_vec()))));
        assert_eq!(parse_response(&r[..r.len() - 1], false), Ok(None), "incomplete body");
        assert!(parse_response(&r[..r.len() - 1], true).is_err(), "cut short");
        assert_eq!(parse_response(&r[..20], false), Ok(None), "incomplete head");
        let c = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nTrailer: X\r\n\r\n4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nX: y\r\n\r\n";
        assert_eq!(parse_response(c, false), Ok(Some((404, b"{\"a\":1}".to_vec()))));
        for cut in 1..c.len() {
            assert!(matches!(parse_response(&c[..cut], false), Ok(None)), "cut at {cut}");
            assert!(parse_response(&c[..cut], true).is_err(), "cut at {cut}, closed");
        }
        let interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(parse_response(interim, false), Ok(Some((200, b"x".to_vec()))));
        let to_end = b"HTTP/1.0 200 OK\r\n\r\nabc";
        assert_eq!(parse_response(to_end, false), Ok(None));
        assert_eq!(parse_response(to_end, true), Ok(Some((200, b"abc".to_vec()))));
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffff\r\n",
            b"HTTP/1.1 200 \xff\xfe\r\n\r\n",
        ] {
            assert!(parse_response(bad, false).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse_response(&vec![b'x'; MAX_HEAD_BYTES + 1], false).is_err(), "endless headers");
    }

    /// Found by the fuzz target etcd_response (fuzz/regressions/etcd_response/): a status line with
    /// a 4-byte character across byte 100 made the error message's excerpt panic.
    #[test]
    fn a_multibyte_character_at_the_excerpt_limit_is_an_error_not_a_panic() {
        const CRASH: &[u8] = b"HTTP/2.1.1 200 O\x01\0\0.1 200 OO/jsn\rP/1.1 100 ' 2E00\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x000 OK\x10\nT: \xf3\x9c\x97\x94 '\r\n\r\nHTTP/!.1 200 MK\r\nTransfer-Encoding: chunked\r\n\r\n00;e=ng\r\n\r\n00ex\nContent-Length: 000000 \r\n\r\nHT\0~\r\n";
        for eof in [false, true] {
            assert!(parse_response(CRASH, eof).unwrap_err().starts_with("not an HTTP/1.x status line"));
        }
        // Each excerpt: a character across the limit is left out whole.
        let line = format!("{}\u{dc5d4}", "x".repeat(97));
        assert!(parse_status(&line).is_none());
        assert_eq!(clip(&line, 100), "x".repeat(97));
        let head = format!("HTTP/1.1 200 OK\r\n{}\u{e9}\r\n\r\n", "y".repeat(99));
        assert!(parse_response(head.as_bytes(), false).unwrap_err().starts_with("malformed header line"));
        let chunk = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{}\u{e9}\r\n", "z".repeat(39));
        assert!(parse_response(chunk.as_bytes(), false).unwrap_err().starts_with("malformed chunk size"));
    }

    #[test]
    fn int64_fields_come_as_strings_or_numbers_and_zero_when_left_out() {
        let v = json!({ "a": "-1", "b": 5, "c": "x", "d": 1.5 });
        assert_eq!(int_field(&v, "a"), Ok(-1));
        assert_eq!(int_field(&v, "b"), Ok(5));
        assert_eq!(int_field(&v, "missing"), Ok(0));
        assert!(int_field(&v, "c").is_err() && int_field(&v, "d").is_err());
    }
}
