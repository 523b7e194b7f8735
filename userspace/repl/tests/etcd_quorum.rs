//! The quorum's etcd backend against a real etcd (Debian's `etcd-server`, `/usr/bin/etcd`): each
//! test starts its own single-member etcd on free loopback ports with a temporary data directory,
//! and stops it (and removes the directory) when it ends, however it ends.
//!
//! etcd runs with `--heartbeat-interval 50 --election-timeout 500`: its smallest lease TTL is then
//! 1 s (etcd's minimum is 1.5 election timeouts, rounded up to a whole second), so expiry can be
//! waited for in real time.

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use ftvm_repl::ha::quorum::etcd::{EtcdConfig, EtcdQuorum};
    use ftvm_repl::ha::quorum::rules::LeaseBook;
    use ftvm_repl::ha::quorum::{Claim, ClaimOutcome, LeaseGrant, Previous, QuorumClient, Refusal, ReleaseReason};

    const ETCD: &str = "/usr/bin/etcd";
    /// The TTL most tests ask for: etcd's minimum with the flags above.
    const TTL: Duration = Duration::from_secs(1);
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

    /// A single-member etcd, killed and its directory removed on drop.
    struct Etcd {
        child: Child,
        dir: PathBuf,
        /// `127.0.0.1:port` of its client URL.
        addr: String,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local address").port()
    }

    impl Etcd {
        fn start() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let mut failures = Vec::new();
            // A port found free may be taken before etcd binds it: try again with others.
            for _ in 0..3 {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let dir = std::env::temp_dir().join(format!("ftvm-etcd-test-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("create the etcd directory");
                let (client, peer) = (free_port(), free_port());
                let addr = format!("127.0.0.1:{client}");
                let client_url = format!("http://{addr}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let log = std::fs::File::create(dir.join("etcd.log")).expect("create the etcd log");
                let child = Command::new(ETCD)
                    .args(["--name", "ftvm-test", "--data-dir"])
                    .arg(dir.join("data"))
                    .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                    .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &format!("ftvm-test={peer_url}"), "--initial-cluster-state", "new"])
                    .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().expect("log"))
                    .stderr(log)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run {ETCD} ({e}): install Debian's etcd-server (scripts/install.sh)"));
                let mut etcd = Etcd { child, dir, addr };
                match etcd.wait_healthy(Duration::from_secs(10)) {
                    Ok(()) => return etcd,
                    Err(e) => {
                        let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
                        let tail: String = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                        failures.push(format!("{e}; log:\n{tail}"));
                    }
                }
            }
            panic!("etcd did not start:\n{}", failures.join("\n---\n"));
        }

        fn wait_healthy(&mut self, limit: Duration) -> Result<(), String> {
            let deadline = Instant::now() + limit;
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(format!("etcd exited: {status}"));
                }
                if let Some((200, body)) = http(&self.addr, "GET", "/health", "") {
                    if body.contains("\"health\":\"true\"") {
                        return Ok(());
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!("etcd not healthy within {limit:?}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        fn quorum(&self, vm: &str, host: &str, ttl: Duration) -> EtcdQuorum {
            quorum_at(vec![self.url()], vm, host, ttl)
        }

        /// A key's value, read with a request of the test's own.
        fn get(&self, key: &str) -> Option<String> {
            let (status, body) = http(&self.addr, "POST", "/v3/kv/range", &format!("{{\"key\":\"{}\"}}", b64(key.as_bytes()))).expect("etcd answers");
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let value = v.get("kvs")?.get(0)?.get("value").and_then(|s| s.as_str()).unwrap_or("");
            Some(String::from_utf8(unb64(value)).expect("UTF-8"))
        }
    }

    fn quorum_at(endpoints: Vec<String>, vm: &str, host: &str, ttl: Duration) -> EtcdQuorum {
        let mut c = EtcdConfig::new(endpoints, vm, host, ttl);
        c.request_timeout = REQUEST_TIMEOUT;
        EtcdQuorum::new(c).expect("valid configuration")
    }

    /// A plain HTTP/1.1 exchange (the reply read to the end of the connection, Content-Length
    /// bodies only): the status and the body.
    fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        s.write_all(req.as_bytes()).ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        let (head, body) = reply.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    }

    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    fn b64(data: &[u8]) -> String {
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                out.push(if i <= c.len() { char::from(B64[(n >> (18 - 6 * i)) as usize & 63]) } else { '=' });
            }
        }
        out
    }

    fn unb64(text: &str) -> Vec<u8> {
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in text.bytes().filter(|&c| c != b'=') {
            bits = (bits << 6) | B64.iter().position(|&x| x == c).expect("base64") as u32;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        out
    }

    fn granted(o: ClaimOutcome) -> LeaseGrant {
        match o {
            ClaimOutcome::Granted(g) => g,
            ClaimOutcome::Refused(r) => panic!("refused: {r}"),
        }
    }

    fn refused(o: ClaimOutcome) -> Refusal {
        match o {
            ClaimOutcome::Granted(g) => panic!("granted: {g:?}"),
            ClaimOutcome::Refused(r) => r,
        }
    }

    /// The port of a listener that was closed: connecting is refused.
    fn closed_endpoint() -> String {
        format!("http://127.0.0.1:{}", free_port())
    }

    /// What the proxy does with the next transactions.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Lose {
        /// Forwards it, then closes the client's connection without the answer.
        Reply,
        /// Closes the client's connection without forwarding it.
        Request,
    }

    /// A loopback HTTP proxy to etcd that loses transactions (their request or their answer) on
    /// demand; stopped on drop.
    struct LossyProxy {
        url: String,
        lose: Arc<Mutex<Vec<Lose>>>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl LossyProxy {
        fn new(etcd_addr: &str) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let lose: Arc<Mutex<Vec<Lose>>> = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let (l, st, upstream) = (Arc::clone(&lose), Arc::clone(&stop), etcd_addr.to_string());
            let thread = std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => Self::serve(conn, &upstream, &l),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            Self { url, lose, stop, thread: Some(thread) }
        }

        fn serve(mut conn: TcpStream, upstream: &str, lose: &Mutex<Vec<Lose>>) {
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            let total = loop {
                if let Some(h) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&req[..h]).to_ascii_lowercase();
                    let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap_or(0));
                    if req.len() >= h + 4 + len {
                        break h + 4 + len;
                    }
                }
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            };
            let is_txn = req.starts_with(b"POST /v3/kv/txn ");
            let action = if is_txn { lose.lock().unwrap().pop() } else { None };
            if action == Some(Lose::Request) {
                return;
            }
            let Ok(mut up) = TcpStream::connect(upstream) else { return };
            let _ = up.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reply = Vec::new();
            if up.write_all(&req[..total]).is_err() || up.read_to_end(&mut reply).is_err() {
                return;
            }
            if action != Some(Lose::Reply) {
                let _ = conn.write_all(&reply);
            }
        }

        /// Loses the next transactions, in this order.
        fn lose(&self, next: &[Lose]) {
            let mut l = self.lose.lock().unwrap();
            l.clear();
            l.extend(next.iter().rev());
        }

        fn lost_all(&self) -> bool {
            self.lose.lock().unwrap().is_empty()
        }
    }

    impl Drop for LossyProxy {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// The ids of every etcd lease alive.
    fn leases(etcd: &Etcd) -> Vec<String> {
        let (status, body) = http(&etcd.addr, "POST", "/v3/lease/leases", "{}").expect("etcd answers");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        v.get("leases").and_then(|l| l.as_array()).map_or_else(Vec::new, |l| l.iter().filter_map(|x| x.get("ID")?.as_str().map(str::to_string)).collect())
    }

    #[test]
    fn a_lost_transaction_answer_is_recognised_and_unused_leases_are_revoked() {
        let etcd = Etcd::start();
        let proxy = LossyProxy::new(&etcd.addr);
        let ttl = Duration::from_secs(30);
        let mut a = quorum_at(vec![proxy.url.clone()], "vm-lossy", "a", ttl);
        let mut b = quorum_at(vec![proxy.url.clone()], "vm-lossy", "b", ttl);

        // Applied, answer lost: the next read finds the lease key on this attempt's etcd lease.
        proxy.lose(&[Lose::Reply]);
        let g = granted(a.acquire(Claim::Start, 0).unwrap());
        assert!(proxy.lost_all());
        assert_eq!((g.term, g.previous), (1, Previous::None));
        assert_eq!(etcd.get("/ftvm/vm-lossy/term").as_deref(), Some(r#"{"term":1,"owner":"a","released":null}"#));
        assert_eq!(leases(&etcd).len(), 1, "one etcd lease, the one in use");

        // Not applied (the request itself lost), then applied with its answer lost: the first
        // attempt's lease is revoked, the second's kept.
        proxy.lose(&[Lose::Request, Lose::Reply]);
        assert_eq!(granted(a.renew(1).unwrap()).term, 1);
        assert!(proxy.lost_all());
        assert_eq!(leases(&etcd).len(), 1, "the unused and the replaced etcd leases are revoked");
        assert!(matches!(refused(b.acquire(Claim::TakeOver, 1).unwrap()), Refusal::Held { term: 1, .. }));

        proxy.lose(&[Lose::Request, Lose::Request, Lose::Reply]);
        let g = granted(a.acquire(Claim::RunAlone, 1).unwrap());
        assert_eq!((g.term, g.previous), (2, Previous::None));
        assert_eq!(leases(&etcd).len(), 1);

        // A release whose answer was lost: read again, it is done.
        proxy.lose(&[Lose::Reply]);
        a.release(2, ReleaseReason::Stopped).unwrap();
        assert!(proxy.lost_all());
        assert_eq!(etcd.get("/ftvm/vm-lossy/term").as_deref(), Some(r#"{"term":2,"owner":"a","released":"stopped"}"#));
        assert_eq!(etcd.get("/ftvm/vm-lossy/lease"), None);
        assert!(leases(&etcd).is_empty(), "{:?}", leases(&etcd));
        let g = granted(b.acquire(Claim::TakeOver, 2).unwrap());
        assert_eq!((g.term, g.previous), (3, Previous::Released(ReleaseReason::Stopped)));
    }

    #[test]
    fn a_start_grants_term_one_the_holder_renews_and_ttls_are_whole_seconds_from_one() {
        let etcd = Etcd::start();
        let mut a = etcd.quorum("vm-start", "a", TTL);
        let mut b = etcd.quorum("vm-start", "b", TTL);
        assert_eq!(a.backend(), "etcd");
        // Unknown VM: only a start creates the record.
        assert_eq!(refused(b.acquire(Claim::TakeOver, 0).unwrap()), Refusal::Unknown);
        assert_eq!(refused(b.acquire(Claim::RunAlone, 0).unwrap()), Refusal::Unknown);
        assert_eq!(refused(b.renew(1).unwrap()), Refusal::Unknown);
        b.release(1, ReleaseReason::Stopped).expect("a release of nothing is no error");

        let g = granted(a.acquire(Claim::Start, 0).unwrap());
        assert_eq!((g.term, g.previous, g.ttl), (1, Previous::None, Some(TTL)));
        assert_eq!(etcd.get("/ftvm/vm-start/term").as_deref(), Some(r#"{"term":1,"owner":"a","released":null}"#));
        assert_eq!(etcd.get("/ftvm/vm-start/lease").as_deref(), Some("a"));
        for _ in 0..3 {
            let g = granted(a.renew(1).unwrap());
            assert_eq!((g.term, g.previous, g.ttl), (1, Previous::None, Some(TTL)));
        }
        // B is not the holder: its renewal is refused as stale (it does not hold term 1).
        assert!(matches!(refused(b.renew(1).unwrap()), Refusal::Stale { known: 1, current: 1, owner: Some(ref o) } if o == "a"));

        // etcd's smallest TTL with these flags is 1 s; asked less, it grants that; TTLs are whole
        // seconds, rounded up.
        let mut short = etcd.quorum("vm-short", "a", Duration::from_millis(100));
        assert_eq!(granted(short.acquire(Claim::Start, 0).unwrap()).ttl, Some(Duration::from_secs(1)));
        let mut odd = etcd.quorum("vm-odd", "a", Duration::from_millis(1500));
        assert_eq!(granted(odd.acquire(Claim::Start, 0).unwrap()).ttl, Some(Duration::from_secs(2)));
    }

    #[test]
    fn another_host_is_held_off_until_the_lease_expires_then_the_old_holder_is_stale() {
        let etcd = Etcd::start();
        // 2 s rather than the smallest TTL: a loaded machine must not delay a renewal past it.
        let ttl = Duration::from_secs(2);
        let mut a = etcd.quorum("vm-expiry", "a", ttl);
        let mut b = etcd.quorum("vm-expiry", "b", ttl);
        granted(a.acquire(Claim::Start, 0).unwrap());
        // While A renews, B is held off, for longer than the TTL.
        let renewing = Instant::now();
        let mut last_renewal = Instant::now();
        while renewing.elapsed() < 2 * ttl {
            last_renewal = Instant::now();
            assert_eq!(granted(a.renew(1).unwrap()), LeaseGrant { term: 1, ttl: Some(ttl), previous: Previous::None });
            match refused(b.acquire(Claim::TakeOver, 1).unwrap()) {
                Refusal::Held { owner, term, remaining } => {
                    assert_eq!((owner.as_str(), term), ("a", 1));
                    assert!(remaining > Duration::ZERO && remaining <= ttl, "{remaining:?}");
                }
                r => panic!("not held: {r}"),
            }
            std::thread::sleep(ttl / 8);
        }
        // A stops renewing: B is refused until the lease expires (never before the TTL counted
        // from A's last renewal request), then granted term 2.
        let limit = Instant::now() + Duration::from_secs(10);
        let g = loop {
            match b.acquire(Claim::TakeOver, 1).unwrap() {
                ClaimOutcome::Granted(g) => break g,
                ClaimOutcome::Refused(Refusal::Held { .. }) => {
                    assert!(Instant::now() < limit, "the lease never expired");
                    std::thread::sleep(Duration::from_millis(50));
                }
                ClaimOutcome::Refused(r) => panic!("refused: {r}"),
            }
        };
        let waited = last_renewal.elapsed();
        assert!(waited >= ttl, "granted {waited:?} after the holder's last renewal, TTL {ttl:?}");
        assert_eq!((g.term, g.previous), (2, Previous::Expired));
        assert_eq!(etcd.get("/ftvm/vm-expiry/term").as_deref(), Some(r#"{"term":2,"owner":"b","released":null}"#));
        // A comes back: its renewal and its claims are stale.
        assert!(matches!(refused(a.renew(1).unwrap()), Refusal::Stale { known: 1, current: 2, owner: Some(ref o) } if o == "b"));
        assert!(matches!(refused(a.acquire(Claim::RunAlone, 1).unwrap()), Refusal::Stale { known: 1, current: 2, .. }));
        assert!(matches!(refused(a.acquire(Claim::Start, 1).unwrap()), Refusal::Stale { known: 1, current: 2, .. }));
        a.release(1, ReleaseReason::Stopped).unwrap();
        assert_eq!(granted(b.renew(2).unwrap()).term, 2, "A's release of an old term changed nothing");
    }

    #[test]
    fn running_alone_moves_the_term_so_the_old_backup_is_stale_even_after_expiry() {
        let etcd = Etcd::start();
        let mut a = etcd.quorum("vm-alone", "a", TTL);
        let mut b = etcd.quorum("vm-alone", "b", TTL);
        granted(a.acquire(Claim::Start, 0).unwrap());
        let g = granted(a.acquire(Claim::RunAlone, 1).unwrap());
        assert_eq!((g.term, g.previous), (2, Previous::None));
        assert!(matches!(refused(b.acquire(Claim::TakeOver, 1).unwrap()), Refusal::Stale { known: 1, current: 2, .. }));
        // Long after A's lease ran out (and etcd deleted its key), B's copy is still stale.
        let limit = Instant::now() + Duration::from_secs(10);
        while etcd.get("/ftvm/vm-alone/lease").is_some() {
            assert!(Instant::now() < limit, "the lease key was never deleted");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(matches!(refused(b.acquire(Claim::TakeOver, 1).unwrap()), Refusal::Stale { known: 1, current: 2, .. }));
        // A, renewing after its expiry, still holds term 2 (nobody took it meanwhile).
        assert_eq!(granted(a.renew(2).unwrap()).term, 2);
        assert_eq!(etcd.get("/ftvm/vm-alone/lease").as_deref(), Some("a"));
    }

    #[test]
    fn a_release_by_a_dead_holder_lets_the_other_host_claim_at_once() {
        let etcd = Etcd::start();
        let mut a = etcd.quorum("vm-release", "a", Duration::from_secs(30));
        let mut b = etcd.quorum("vm-release", "b", Duration::from_secs(30));
        granted(a.acquire(Claim::Start, 0).unwrap());
        assert!(matches!(refused(b.acquire(Claim::TakeOver, 1).unwrap()), Refusal::Held { term: 1, .. }));
        // Releases by another host or of another term change nothing.
        b.release(1, ReleaseReason::HolderDied).unwrap();
        a.release(0, ReleaseReason::HolderDied).unwrap();
        assert!(matches!(refused(b.acquire(Claim::TakeOver, 1).unwrap()), Refusal::Held { .. }));

        a.release(1, ReleaseReason::HolderDied).unwrap();
        assert_eq!(etcd.get("/ftvm/vm-release/term").as_deref(), Some(r#"{"term":1,"owner":"a","released":"holder-died"}"#));
        assert_eq!(etcd.get("/ftvm/vm-release/lease"), None);
        a.release(1, ReleaseReason::HolderDied).unwrap();
        assert_eq!(refused(a.renew(1).unwrap()), Refusal::Released, "a released lease is not renewed");
        let started = Instant::now();
        let g = granted(b.acquire(Claim::TakeOver, 1).unwrap());
        assert!(started.elapsed() < Duration::from_secs(1), "no wait for the 30 s lease");
        assert_eq!((g.term, g.previous), (2, Previous::Released(ReleaseReason::HolderDied)));
        assert_eq!(etcd.get("/ftvm/vm-release/lease").as_deref(), Some("b"));
    }

    #[test]
    fn two_claims_of_the_same_term_at_once_only_one_wins() {
        let etcd = Etcd::start();
        let mut winners = [0usize; 3];
        for round in 0..10 {
            let vm = format!("vm-race-{round}");
            // Released, not expired: a long TTL, so that a slow round cannot turn one into the other.
            let ttl = Duration::from_secs(30);
            let mut a = etcd.quorum(&vm, "a", ttl);
            granted(a.acquire(Claim::Start, 0).unwrap());
            a.release(1, ReleaseReason::HolderDied).unwrap();
            // The holder running alone again and two hosts taking over, all for term 1.
            let claims = [("a", Claim::RunAlone), ("b", Claim::TakeOver), ("c", Claim::TakeOver)];
            let barrier = Arc::new(Barrier::new(claims.len()));
            let threads: Vec<_> = claims
                .iter()
                .map(|&(host, claim)| {
                    let mut q = etcd.quorum(&vm, host, ttl);
                    let barrier = Arc::clone(&barrier);
                    std::thread::spawn(move || {
                        barrier.wait();
                        q.acquire(claim, 1).expect("etcd answers")
                    })
                })
                .collect();
            let outcomes: Vec<ClaimOutcome> = threads.into_iter().map(|t| t.join().expect("claim thread")).collect();
            let won: Vec<usize> = (0..claims.len()).filter(|&i| matches!(outcomes[i], ClaimOutcome::Granted(_))).collect();
            assert_eq!(won.len(), 1, "round {round}: {outcomes:?}");
            let w = won[0];
            winners[w] += 1;
            let g = granted(outcomes[w].clone());
            let previous = if w == 0 { Previous::None } else { Previous::Released(ReleaseReason::HolderDied) };
            assert_eq!((g.term, g.previous), (2, previous), "round {round}");
            for (i, o) in outcomes.iter().enumerate().filter(|&(i, _)| i != w) {
                assert!(
                    matches!(o, ClaimOutcome::Refused(Refusal::Stale { known: 1, current: 2, owner: Some(ref owner) }) if owner == claims[w].0),
                    "round {round}, loser {i}: {o:?}"
                );
            }
            let record = etcd.get(&format!("/ftvm/{vm}/term")).expect("record");
            assert_eq!(record, format!(r#"{{"term":2,"owner":"{}","released":null}}"#, claims[w].0));
            assert_eq!(etcd.get(&format!("/ftvm/{vm}/lease")).as_deref(), Some(claims[w].0));
        }
        eprintln!("winners (a run-alone, b, c take-over): {winners:?}");
    }

    #[test]
    fn answers_match_the_lease_books() {
        #[derive(Clone, Copy, Debug)]
        enum Step {
            Acquire(usize, Claim, u64),
            Renew(usize, u64),
            Release(usize, u64, ReleaseReason),
        }
        use ReleaseReason::{HolderDied, Stopped};
        use Step::{Acquire, Release, Renew};
        let (a, b) = (0, 1);
        let script = [
            Acquire(b, Claim::TakeOver, 0),
            Renew(b, 1),
            Acquire(a, Claim::RunAlone, 0),
            Acquire(a, Claim::Start, 0),
            Renew(a, 1),
            Acquire(b, Claim::TakeOver, 1),
            Acquire(b, Claim::TakeOver, 0),
            Acquire(b, Claim::TakeOver, 5),
            Renew(b, 1),
            Release(b, 1, HolderDied),
            Acquire(b, Claim::TakeOver, 1),
            Acquire(a, Claim::RunAlone, 1),
            Acquire(a, Claim::Start, 2),
            Acquire(b, Claim::TakeOver, 2),
            Acquire(b, Claim::TakeOver, 3),
            Release(a, 3, Stopped),
            Renew(a, 3),
            Release(a, 3, Stopped),
            Acquire(b, Claim::TakeOver, 3),
            Acquire(a, Claim::Start, 3),
            Release(b, 4, HolderDied),
            Acquire(a, Claim::TakeOver, 4),
            Acquire(b, Claim::Start, 4),
            Renew(a, 4),
            Renew(a, 5),
            Release(a, 5, Stopped),
            Acquire(a, Claim::Start, 5),
            Renew(a, 6),
            Acquire(b, Claim::RunAlone, 6),
        ];
        let etcd = Etcd::start();
        let ttl = Duration::from_secs(60);
        let names = ["a", "b"];
        let mut clients = names.map(|h| etcd.quorum("vm-book", h, ttl));
        let mut book = LeaseBook::new(ttl);
        // Remaining times and TTLs differ in granularity: compare the rest.
        let normal = |o: ClaimOutcome| match o {
            ClaimOutcome::Granted(g) => ClaimOutcome::Granted(LeaseGrant { ttl: None, ..g }),
            ClaimOutcome::Refused(Refusal::Held { owner, term, .. }) => ClaimOutcome::Refused(Refusal::Held { owner, term, remaining: Duration::ZERO }),
            r => r,
        };
        for (i, step) in script.into_iter().enumerate() {
            match step {
                Acquire(h, claim, known) => {
                    let want = book.acquire("vm-book", names[h], claim == Claim::Start, known, 0).0;
                    let got = clients[h].acquire(claim, known).unwrap();
                    assert_eq!(normal(got), normal(want), "step {i}: {step:?}");
                }
                Renew(h, term) => {
                    let want = book.renew("vm-book", names[h], term, 0);
                    assert_eq!(normal(clients[h].renew(term).unwrap()), normal(want), "step {i}: {step:?}");
                }
                Release(h, term, reason) => {
                    book.release("vm-book", names[h], term, reason, 0);
                    clients[h].release(term, reason).unwrap();
                }
            }
        }
        let r = book.record("vm-book").expect("record");
        let want = format!(r#"{{"term":{},"owner":"{}","released":null}}"#, r.term, r.owner);
        assert_eq!(etcd.get("/ftvm/vm-book/term"), Some(want));
    }

    #[test]
    fn dead_endpoints_are_passed_over() {
        let etcd = Etcd::start();
        // Connecting to the first is refused.
        // A long TTL: B's claims below must find A's lease held, after waiting for a timeout.
        let ttl = Duration::from_secs(30);
        let mut a = quorum_at(vec![closed_endpoint(), etcd.url()], "vm-endpoints", "a", ttl);
        assert_eq!(granted(a.acquire(Claim::Start, 0).unwrap()).term, 1);
        assert_eq!(granted(a.renew(1).unwrap()).term, 1);
        // The first accepts connections but never answers: one request waits for its timeout,
        // then the endpoint that answered is tried first.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_url = format!("http://{}", silent.local_addr().unwrap());
        let mut c = EtcdConfig::new(vec![silent_url, etcd.url()], "vm-endpoints", "b", ttl);
        c.request_timeout = Duration::from_secs(1);
        let mut b = EtcdQuorum::new(c).unwrap();
        let started = Instant::now();
        assert!(matches!(refused(b.acquire(Claim::TakeOver, 1).unwrap()), Refusal::Held { .. }));
        let first = started.elapsed();
        assert!(first >= Duration::from_secs(1) && first < Duration::from_secs(4), "{first:?}");
        let started = Instant::now();
        assert!(matches!(refused(b.acquire(Claim::TakeOver, 1).unwrap()), Refusal::Held { .. }));
        assert!(started.elapsed() < Duration::from_secs(1), "the answering endpoint is tried first: {:?}", started.elapsed());
        drop(silent);
    }

    #[test]
    fn all_endpoints_dead_is_an_error_within_the_request_timeout() {
        let dead = [closed_endpoint(), closed_endpoint()];
        let mut q = quorum_at(dead.to_vec(), "vm-dead", "a", TTL);
        let started = Instant::now();
        let e = q.acquire(Claim::Start, 0).unwrap_err().to_string();
        assert!(started.elapsed() < REQUEST_TIMEOUT, "{:?}", started.elapsed());
        assert!(dead.iter().all(|d| e.contains(d.as_str())), "the error names every endpoint: {e}");
        assert!(q.renew(1).is_err() && q.release(1, ReleaseReason::Stopped).is_err());

        // An endpoint that never answers: the request's own timeout bounds it.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = EtcdConfig::new(vec![format!("http://{}", silent.local_addr().unwrap())], "vm-dead", "a", TTL);
        c.request_timeout = Duration::from_millis(300);
        let mut q = EtcdQuorum::new(c).unwrap();
        let started = Instant::now();
        let e = q.acquire(Claim::Start, 0).unwrap_err().to_string();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
        assert!(e.contains("no answer within 300 ms"), "{e}");
    }
}
