//! The built-in witness, for real over loopback: the lease rules through the client, a restart
//! that keeps every term, and requests it must refuse (wrong secret, garbage, a recorded session
//! replayed, an oversized frame) while it keeps serving the hosts.

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use ftvm_repl::ha::quorum::witness::{WitnessClientConfig, WitnessQuorum};
    use ftvm_repl::ha::quorum::{Claim, ClaimOutcome, Previous, QuorumClient, Refusal, ReleaseReason};
    use ftvm_repl::witness::{Witness, WitnessConfig};

    const SECRET: &[u8] = b"witness secret for the tests 0123";
    const TTL: Duration = Duration::from_millis(300);

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ftvm-witness-test-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Self(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn start(dir: &Dir, listen: SocketAddr) -> Witness {
        Witness::start(WitnessConfig { listen, secret: SECRET.to_vec(), state_dir: dir.0.clone(), ttl: TTL }).expect("witness starts")
    }

    fn client(addr: SocketAddr, host: &str, secret: &[u8]) -> WitnessQuorum {
        WitnessQuorum::new(WitnessClientConfig {
            addr,
            secret: secret.to_vec(),
            vm: "vm-1".into(),
            host: host.into(),
            timeout: Duration::from_millis(500),
        })
        .expect("valid client")
    }

    fn term_of(o: ClaimOutcome) -> Option<(u64, Previous)> {
        match o {
            ClaimOutcome::Granted(g) => Some((g.term, g.previous)),
            ClaimOutcome::Refused(_) => None,
        }
    }

    #[test]
    fn the_lease_rules_hold_over_the_wire_and_across_a_restart() {
        let dir = Dir::new("rules");
        let w = start(&dir, "127.0.0.1:0".parse().unwrap());
        let addr = w.local_addr();
        let mut a = client(addr, "host-a", SECRET);
        let mut b = client(addr, "host-b", SECRET);

        assert_eq!(b.acquire(Claim::TakeOver, 0).unwrap(), ClaimOutcome::Refused(Refusal::Unknown));
        assert_eq!(term_of(a.acquire(Claim::Start, 0).unwrap()), Some((1, Previous::None)));
        assert!(term_of(a.renew(1).unwrap()).is_some());
        let held = b.acquire(Claim::TakeOver, 1).unwrap();
        assert!(matches!(&held, ClaimOutcome::Refused(Refusal::Held { owner, term: 1, .. }) if owner == "host-a"), "{held:?}");

        // A stops renewing: B gets the lease once it expired, with a new term.
        let deadline = Instant::now() + Duration::from_secs(3);
        let granted = loop {
            if let Some(g) = term_of(b.acquire(Claim::TakeOver, 1).unwrap()) {
                break g;
            }
            assert!(Instant::now() < deadline, "the lease never expired");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(granted, (2, Previous::Expired));
        assert!(matches!(a.renew(1).unwrap(), ClaimOutcome::Refused(Refusal::Stale { known: 1, current: 2, .. })));

        // The witness restarts on the same address: the term survives, B's lease counts as renewed.
        drop(w);
        let w = start(&dir, addr);
        assert_eq!(w.lease_of("vm-1"), Some((2, "host-b".to_string())));
        assert!(term_of(b.renew(2).unwrap()).is_some(), "the client reconnects by itself");
        assert!(matches!(a.acquire(Claim::Start, 1).unwrap(), ClaimOutcome::Refused(Refusal::Stale { .. })));

        // B's process dies; its watchdog releases: A (had it term 2) gets it at once.
        b.release(2, ReleaseReason::HolderDied).unwrap();
        let mut a2 = client(addr, "host-a", SECRET);
        assert_eq!(term_of(a2.acquire(Claim::TakeOver, 2).unwrap()), Some((3, Previous::Released(ReleaseReason::HolderDied))));
    }

    /// The lease watchdog's way: a client of the holder's host connected ahead of time, with no
    /// request, releases the lease the moment the holder dies; its kept connection survives a
    /// witness restart (the release reconnects within its deadline). Connecting ahead to a witness
    /// that is not there is an error, within the timeout.
    #[test]
    fn a_client_connected_ahead_releases_on_its_kept_connection() {
        let dir = Dir::new("ahead");
        let w = start(&dir, "127.0.0.1:0".parse().unwrap());
        let addr = w.local_addr();
        let mut a = client(addr, "host-a", SECRET);
        let mut watchdog = client(addr, "host-a", SECRET);
        let mut b = client(addr, "host-b", SECRET);
        assert_eq!(term_of(a.acquire(Claim::Start, 0).unwrap()), Some((1, Previous::None)));
        watchdog.connect_ahead().unwrap();
        // Connecting changed nothing: the lease is A's.
        assert!(matches!(b.acquire(Claim::TakeOver, 1).unwrap(), ClaimOutcome::Refused(Refusal::Held { term: 1, .. })));
        watchdog.release(1, ReleaseReason::HolderDied).unwrap();
        assert_eq!(term_of(b.acquire(Claim::TakeOver, 1).unwrap()), Some((2, Previous::Released(ReleaseReason::HolderDied))));

        // Connected ahead, then the witness restarts: the release still goes through.
        watchdog.connect_ahead().unwrap();
        drop(w);
        let w = start(&dir, addr);
        watchdog.release(2, ReleaseReason::HolderDied).unwrap();
        assert_eq!(w.lease_of("vm-1").map(|l| l.0), Some(2), "a release by another host's name changes nothing");
        drop(w);
        let t = Instant::now();
        assert!(watchdog.connect_ahead().is_err(), "no witness there");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn bad_peers_change_nothing_and_the_witness_keeps_serving() {
        let dir = Dir::new("bad");
        let w = start(&dir, "127.0.0.1:0".parse().unwrap());
        let addr = w.local_addr();

        // A wrong secret.
        let mut wrong = client(addr, "host-a", b"not the witness secret at all!!");
        let err = wrong.acquire(Claim::Start, 0).unwrap_err();
        assert!(err.to_string().contains("handshake"), "{err}");

        // Garbage, and a header announcing a huge payload (refused before any allocation of that size).
        for junk in [vec![0xffu8; 100], {
            let mut h = b"FTAL".to_vec();
            h.extend_from_slice(&[1, 2, 1, 0, 0, 0, 0, 0]);
            h.extend_from_slice(&(60u32 << 20).to_le_bytes());
            h.extend_from_slice(&[0; 16]);
            h
        }] {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.write_all(&junk).unwrap();
            let mut buf = [0u8; 64];
            // The witness closes the connection (0 bytes or a reset), within its handshake deadline.
            let _ = s.read(&mut buf);
        }

        // A whole session recorded from the wire and replayed on a new connection grants nothing:
        // the replayed request is sealed with the old session's key.
        let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        // A full-duplex relay (one thread each way), so that neither direction waits for the
        // other: the client's handshake must not time out behind the recorder on a busy machine.
        let recorder = std::thread::spawn(move || {
            let (mut c, _) = proxy.accept().unwrap();
            let mut up = TcpStream::connect(addr).unwrap();
            let (mut c_out, mut up_in) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                // Ends when the witness closes or the relay shuts the connections down.
                let _ = std::io::copy(&mut up_in, &mut c_out);
            });
            c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut sent = Vec::new();
            let mut buf = [0u8; 4096];
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                match c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        sent.extend_from_slice(&buf[..n]);
                        up.write_all(&buf[..n]).unwrap();
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
            let _ = up.shutdown(std::net::Shutdown::Both);
            let _ = c.shutdown(std::net::Shutdown::Both);
            back.join().unwrap();
            sent
        });
        let mut via_proxy = client(proxy_addr, "host-a", SECRET);
        assert_eq!(term_of(via_proxy.acquire(Claim::Start, 0).unwrap()), Some((1, Previous::None)));
        drop(via_proxy);
        let recorded = recorder.join().unwrap();
        assert!(!recorded.is_empty());
        // Release the lease, then replay the recorded start claim: were it accepted, term 2 would exist.
        let mut a = client(addr, "host-a", SECRET);
        a.release(1, ReleaseReason::Stopped).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(&recorded).unwrap();
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
        assert_eq!(w.lease_of("vm-1"), Some((1, "host-a".to_string())), "the replay changed the lease");

        // The witness still serves.
        let mut b = client(addr, "host-b", SECRET);
        assert_eq!(term_of(b.acquire(Claim::TakeOver, 1).unwrap()), Some((2, Previous::Released(ReleaseReason::Stopped))));
    }

    #[test]
    fn an_unreachable_witness_is_an_error_within_the_timeout() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut c = client(closed, "host-a", SECRET);
        let t = Instant::now();
        assert!(c.acquire(Claim::Start, 0).is_err());
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(Witness::start(WitnessConfig {
            listen: "0.0.0.0:0".parse().unwrap(),
            secret: SECRET.to_vec(),
            state_dir: Dir::new("unspec").0.clone(),
            ttl: TTL,
        })
        .is_err());
    }
}
