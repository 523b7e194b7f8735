//! Failure detection and promotion on the backup, with real KVM guests (root, `/dev/kvm`):
//! a primary machine is synchronised to a [`BackupDaemon`] over loopback TCP (a hand-made
//! initial-sync epoch, no epoch engine), then dies without a goodbye; the daemon must notice within
//! its timeout, restore the committed checkpoint into a fresh VM, and the guest must carry on.
//! The announcement test runs in its own network namespace and captures the gratuitous ARPs on
//! the host side of the restored VM's TAP.

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use ftvm_guest_abi::GUEST_LOAD_GPA;
    use ftvm_proto::pages::PageRangeSet;
    use ftvm_proto::EpochId;
    use ftvm_repl::backup::activate::{promote, PromoteConfig, PromoteNet, GARP_FRAME_LEN};
    use ftvm_repl::backup::{BackupReceiver, ReceiverConfig};
    use ftvm_proto::epoch::EpochBegin;
    use ftvm_repl::ha::detector::{DeadReason, DetectorConfig, Suspicion};
    use ftvm_repl::ha::failover::{BackupDaemon, DaemonConfig, Role};
    use ftvm_repl::ha::heartbeat::{monotonic_us, IdleHeartbeat};
    use ftvm_repl::ha::lease::{Lease, LeaseConfig};
    use ftvm_repl::ha::quorum::FixedQuorum;
    use ftvm_repl::transport::tcp::{TcpOptions, TcpTransport};
    use ftvm_repl::transport::{AckEvent, CheckpointTransport, FlatMemory, WaitAckError};
    use ftvm_repl::PAGE_SIZE;
    use ftvm_vmm::boot::elf::build_test_elf;
    use ftvm_vmm::boot::BootParams;
    use ftvm_vmm::devices::{BlockConfig, DeviceConfig, NetConfig};
    use ftvm_vmm::dirty::DirtyTracking;
    use ftvm_vmm::machine::{CheckpointSource, Machine, MachineExit, MachineRunError, VmConfig};
    use vm_memory::{Bytes, GuestAddress};

    const SECRET: &[u8] = b"failover test secret, long enough";
    const MEM: u64 = 32 << 20;
    const DISK: usize = 1 << 20;

    /// The counter guest of the vmm's checkpoint tests: a register, a memory and an SSE counter that
    /// must stay equal; a mismatch exits with 0x100 (memory) or 0x200 (SSE). See
    /// `userspace/vmm/tests/checkpoint.rs` for the assembly.
    const COUNTER_GUEST: [u8; 80] = [
        0x48, 0xc7, 0xc6, 0x00, 0x00, 0x40, 0x00, 0x31, 0xdb, 0x48, 0xc7, 0x06, 0x00, 0x00, 0x00, 0x00, 0x66, 0x0f,
        0xef, 0xc0, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x66, 0x48, 0x0f, 0x6e, 0xf8, 0x48, 0x8b, 0x06, 0x48, 0x39, 0xd8,
        0x75, 0x16, 0x66, 0x48, 0x0f, 0x7e, 0xc1, 0x48, 0x39, 0xd9, 0x75, 0x16, 0x48, 0xff, 0xc3, 0x48, 0xff, 0x06,
        0x66, 0x0f, 0xd4, 0xc7, 0xeb, 0xe2, 0xb8, 0x00, 0x01, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xef, 0xb8, 0x00,
        0x02, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xef,
    ];
    const COUNTER_GPA: u64 = 0x40_0000;
    const COUNTER_LOOP: u64 = GUEST_LOAD_GPA + 0x1e;
    const COUNTER_END: u64 = GUEST_LOAD_GPA + 0x3c;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn init_tracing() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .try_init();
    }

    /// The tests here measure detection times in milliseconds: run alone, not beside each other's
    /// VMs on a two-core host (a starved test thread stops its own heartbeats).
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A per-test directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("ftvm-failover-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The primary: the counter guest with a disk (and a NIC if asked), running.
    struct Primary {
        src: CheckpointSource,
        run: JoinHandle<Result<MachineExit, MachineRunError>>,
        disk: Vec<u8>,
    }

    fn start_primary(dir: &TempDir, net: Option<NetConfig>) -> Primary {
        // A recognisable disk, so that the standby's copy can be checked.
        let disk: Vec<u8> = (0..DISK).map(|i| (i / 512) as u8 ^ 0x5a).collect();
        let cfg = VmConfig {
            mem_size: MEM,
            guest_elf: dir.file("counter.elf", &build_test_elf(GUEST_LOAD_GPA, &COUNTER_GUEST, 0)),
            boot: BootParams::default(),
            devices: DeviceConfig { net, block: Some(BlockConfig::new(dir.file("primary.disk", &disk))) },
            console: Box::new(Sink::default()),
            dirty_tracking: DirtyTracking::Off,
        };
        let mut m = Machine::create(cfg).unwrap();
        let src = m.checkpoint_source().unwrap();
        let run = std::thread::spawn(move || m.run());
        Primary { src, run, disk }
    }

    fn counter(src: &CheckpointSource) -> u64 {
        src.guest_memory().read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap()
    }

    fn wait_for_counter(src: &CheckpointSource, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter(src) <= n {
            assert!(Instant::now() < deadline, "the counter guest did not pass {n}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn receiver_config(dir: &TempDir) -> ReceiverConfig {
        let mut cfg =
            ReceiverConfig::new("127.0.0.1:0".parse().unwrap(), SECRET, MEM, dir.0.join("standby.disk"), DISK as u64);
        cfg.link_timeout = Duration::from_secs(3);
        cfg
    }

    fn connect(addr: SocketAddr) -> TcpTransport {
        let options = TcpOptions { memory_bytes: Some(MEM), disk_bytes: Some(DISK as u64), ..TcpOptions::default() };
        TcpTransport::connect(addr, SECRET, &options).unwrap()
    }

    /// What the epoch engine will do for the first checkpoint, by hand: pause, capture the state,
    /// copy all memory, resume, and send it all as a restorable initial-sync epoch. Returns the
    /// checkpointed counter (rbx, the register counter).
    fn checkpoint(p: &mut Primary, t: &mut TcpTransport, epoch: EpochId) -> u64 {
        p.src.pause().unwrap();
        let state = p.src.capture_state().unwrap();
        let mut image = vec![0u8; MEM as usize];
        p.src.guest_memory().read_slice(&mut image, GuestAddress(0)).unwrap();
        p.src.resume().unwrap();
        let v = &state.vcpus[0];
        assert!((COUNTER_LOOP..COUNTER_END).contains(&v.regs.rip), "rip {:#x}", v.regs.rip);
        let blob = state.to_bytes().unwrap();
        let pages = MEM / PAGE_SIZE as u64;
        let begin = EpochBegin {
            epoch,
            page_count: pages,
            state_len: blob.len() as u64,
            disk_write_count: 0,
            disk_image_bytes: DISK as u64,
            initial_sync: true,
        };
        t.begin_epoch(&begin).unwrap();
        let mut all = PageRangeSet::new();
        all.insert(0, pages);
        t.send_pages(&all, &FlatMemory(&image)).unwrap();
        t.send_disk_image(0, &p.disk).unwrap();
        t.send_state(&blob).unwrap();
        let token = t.commit(epoch).unwrap();
        // Waiting for the acknowledgement, heartbeat as the engine does: the backup must hear a
        // live primary while it applies (a silent wait of 250 ms is a death to these detectors).
        let deadline = Instant::now() + Duration::from_secs(20);
        let acked = loop {
            match t.wait_ack(token, Instant::now() + Duration::from_millis(5)) {
                Ok(e) => break e,
                Err(WaitAckError::TimedOut { .. }) if Instant::now() < deadline => t.heartbeat().unwrap(),
                Err(e) => panic!("epoch {epoch:?} not acknowledged: {e}"),
            }
        };
        assert_eq!(acked, epoch);
        v.regs.rbx
    }

    /// The primary host dies: its VM stops, the A-Link goes silent (no goodbye).
    fn kill(p: Primary, t: TcpTransport) {
        drop(t);
        p.src.handle().stop();
        assert_eq!(p.run.join().unwrap().unwrap(), MachineExit::Stopped);
    }

    fn detector() -> DetectorConfig {
        DetectorConfig {
            silent_after: Duration::from_millis(30),
            dead_after: Duration::from_millis(250),
            stuck_after: Duration::from_secs(1),
        }
    }

    /// A daemon's settings for these tests: no network, a block device, the test detector.
    fn daemon_config(dir: &TempDir) -> DaemonConfig {
        let promote = PromoteConfig {
            net: None,
            block: true,
            console: Box::new(Sink::default()),
            dirty_tracking: DirtyTracking::Off,
            disk_intent: None,
        };
        let mut cfg = DaemonConfig::new(receiver_config(dir), promote);
        cfg.detector = detector();
        cfg
    }

    /// (a) The detector through its trait, on a fake clock: the heartbeat interval keeps the peer
    /// alive; silence makes it suspected at 30 ms and dead at 250 ms; a host that still answers
    /// probes is only "stuck", after the longer timeout.
    #[test]
    fn detector_verdicts_on_a_fake_clock() {
        use ftvm_repl::ha::detector::{FailureDetector, TimeoutDetector};
        let mut d: Box<dyn FailureDetector> = Box::new(TimeoutDetector::new(detector()));
        let ms = |n: u64| n * 1_000;
        assert_eq!(d.suspected(ms(5)), Suspicion::NeverSeen);
        // Heartbeats every 5 ms for a second: never even suspected.
        for t in (0..1_000).step_by(5) {
            d.observe(ms(t));
            assert_eq!(d.suspected(ms(t + 4)), Suspicion::Alive);
        }
        let last = ms(995);
        assert!(matches!(d.suspected(last + ms(30)), Suspicion::Silent { .. }));
        assert!(matches!(
            d.suspected(last + ms(249)),
            Suspicion::Silent { .. }
        ));
        assert!(matches!(
            d.suspected(last + ms(250)),
            Suspicion::Dead { reason: DeadReason::HostSilent, for_ } if for_ == Duration::from_millis(250)
        ));
        // The same silence while the host answers probes: stuck only after a second.
        d.observe(last);
        for t in (0..1_000).step_by(10) {
            d.observe_probe(last + ms(t));
            assert!(!d.suspected(last + ms(t)).is_dead());
        }
        d.observe_probe(last + ms(1_000));
        assert!(matches!(d.suspected(last + ms(1_000)), Suspicion::Dead { reason: DeadReason::DaemonStuck, .. }));
        d.reset();
        assert_eq!(d.suspected(last + ms(2_000)), Suspicion::NeverSeen);
    }

    /// How the primary goes away in [`detect_and_carry_on`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Death {
        /// Its process dies: the kernel closes its end of the link (no goodbye).
        ProcessKilled,
        /// It falls silent with the link still open (a host that lost power, a cut cable): only
        /// the timeout can tell. Here the "dead" primary still listens, and must hear that the
        /// backup takes over.
        SilentLinkOpen,
    }

    /// (b) The primary checkpoints once, heartbeats while idle, then dies: the daemon stays
    /// standby while heartbeats come, declares the primary dead (at once when the link closes,
    /// within its timeout when it falls silent), restores the committed checkpoint, and the guest
    /// carries on from it.
    #[test]
    fn backup_detects_the_dead_primary_and_the_guest_carries_on() {
        detect_and_carry_on(Death::ProcessKilled);
    }

    #[test]
    fn backup_detects_a_silent_primary_tells_it_and_the_guest_carries_on() {
        detect_and_carry_on(Death::SilentLinkOpen);
    }

    fn detect_and_carry_on(death: Death) {
        init_tracing();
        let _serial = one_at_a_time();
        let dir = TempDir::new(match death {
            Death::ProcessKilled => "promote-killed",
            Death::SilentLinkOpen => "promote-silent",
        });
        let cfg = daemon_config(&dir);
        let daemon = BackupDaemon::start(cfg).unwrap();
        assert_eq!(daemon.status().role, Role::Standby);
        assert_eq!(daemon.status().suspicion, Suspicion::NeverSeen);

        let mut p = start_primary(&dir, None);
        let mut t = connect(daemon.local_addr());
        wait_for_counter(&p.src, 1000);
        let checkpointed = checkpoint(&mut p, &mut t, EpochId(0));
        assert!(checkpointed > 1000);

        // Idle: heartbeats every 5 ms for 300 ms keep the backup standing by.
        let mut hb = IdleHeartbeat::new(Duration::from_millis(5));
        hb.note_sent(monotonic_us());
        let until = Instant::now() + Duration::from_millis(300);
        let mut beats = 0;
        while Instant::now() < until {
            if hb.send_if_due(monotonic_us(), &mut t).unwrap() {
                beats += 1;
            }
            let s = daemon.status();
            assert_eq!(s.role, Role::Standby, "{s:?}");
            assert!(!s.suspicion.is_dead(), "{s:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let s = daemon.status();
        assert!(beats >= 30, "{beats} heartbeats");
        assert!(s.restorable && s.committed == Some(EpochId(0)) && s.connected, "{s:?}");
        assert!(s.last_frame_age.is_some_and(|a| a < Duration::from_millis(30)), "{s:?}");
        // The primary's guest went on past the checkpoint; the backup must resume from the checkpoint.
        let primary_reached = counter(&p.src);
        assert!(primary_reached > checkpointed);

        let events = Arc::new(Mutex::new(Vec::new()));
        {
            let events = Arc::clone(&events);
            t.set_ack_listener(Box::new(move |ev| events.lock().unwrap().push(ev)));
        }
        let killed = Instant::now();
        let silent_link = match death {
            Death::ProcessKilled => {
                kill(p, t);
                None
            }
            Death::SilentLinkOpen => {
                p.src.handle().stop();
                assert_eq!(p.run.join().unwrap().unwrap(), MachineExit::Stopped);
                Some(t)
            }
        };
        let s = daemon
            .wait_for_role(Role::Active, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("not active: {:?}", daemon.status()));
        let since_kill = killed.elapsed();
        let timings = s.promotion.unwrap();
        assert_eq!(timings.epoch, EpochId(0));
        match death {
            Death::ProcessKilled => {
                // The closed link says it all: no need to wait for the 250 ms timeout.
                assert!(matches!(s.suspicion, Suspicion::Dead { reason: DeadReason::LinkClosed, .. }), "{s:?}");
                assert!(timings.last_frame_to_dead < Duration::from_millis(250), "{timings:?}");
            }
            Death::SilentLinkOpen => {
                assert!(matches!(s.suspicion, Suspicion::Dead { reason: DeadReason::HostSilent, .. }), "{s:?}");
                // Dead at the 250 ms timeout, give or take a poll and the scheduler.
                assert!(
                    timings.last_frame_to_dead >= Duration::from_millis(250)
                        && timings.last_frame_to_dead < Duration::from_millis(1000),
                    "{timings:?}"
                );
                // A primary still listening hears that the backup takes over (and would stop).
                let deadline = Instant::now() + Duration::from_secs(5);
                while !events.lock().unwrap().iter().any(|e| matches!(e, AckEvent::Superseded { .. })) {
                    assert!(Instant::now() < deadline, "no takeover notice: {:?}", events.lock().unwrap());
                    std::thread::sleep(Duration::from_millis(1));
                }
                drop(silent_link);
            }
        }
        assert!(timings.suspected_to_dead <= timings.last_frame_to_dead);

        // The restored guest resumes from the checkpoint and carries on: its counter grows past the
        // checkpointed value, and its own checks hold (it would exit with 0x100/0x200).
        let mem = daemon.with_source(|src| src.guest_memory()).unwrap();
        let resumed_at = mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap() <= checkpointed + 100_000 {
            assert!(Instant::now() < deadline, "the restored guest does not run");
            std::thread::sleep(Duration::from_millis(1));
        }
        let rbx = daemon
            .with_source(|src| {
                src.pause().unwrap();
                let st = src.capture_state().unwrap();
                src.resume().unwrap();
                st.vcpus[0].regs
            })
            .unwrap();
        assert!((COUNTER_LOOP..COUNTER_END).contains(&rbx.rip));
        assert!(rbx.rbx > checkpointed + 100_000, "carried on: {checkpointed} -> {}", rbx.rbx);
        assert_eq!(daemon.status().role, Role::Active);
        let end = daemon.shutdown();
        assert_eq!(end.exit, Some(MachineExit::Stopped), "{end:?}");
        assert_eq!(end.role, Role::Ended);
        println!(
            "failover ({death:?}): checkpoint at counter {checkpointed} (primary reached {primary_reached}, restored guest \
             started near {resumed_at}); detection (last frame -> dead) {:?}, suspected -> dead {:?}, stop receiver \
             {:?}, restore {:?} (decode {:?}, release standby {:?}, checkpoint source {:?}, promote total {:?}), dead -> resumed {:?}, suspected -> resumed {:?}; kill -> active {:?}",
            timings.last_frame_to_dead,
            timings.suspected_to_dead,
            timings.stop_receiver,
            timings.restore.restore,
            timings.restore.decode,
            timings.restore.release,
            timings.restore.source,
            timings.restore.total,
            timings.dead_to_resumed,
            timings.suspected_to_resumed,
            since_kill
        );
    }

    /// A primary that dies before its first checkpoint leaves nothing to resume: the daemon says
    /// so and keeps standing by (and still accepts a primary).
    #[test]
    fn nothing_to_resume_keeps_the_backup_waiting() {
        init_tracing();
        let _serial = one_at_a_time();
        let dir = TempDir::new("nothing");
        let cfg = daemon_config(&dir);
        let daemon = BackupDaemon::start(cfg).unwrap();
        let mut t = connect(daemon.local_addr());
        t.heartbeat().unwrap();
        drop(t);
        std::thread::sleep(Duration::from_millis(700));
        let s = daemon.status();
        assert_eq!(s.role, Role::Standby, "{s:?}");
        assert!(s.suspicion.is_dead() && !s.restorable, "{s:?}");
        assert!(s.last_error.as_deref().is_some_and(|e| e.contains("nothing to resume")), "{s:?}");
        // A primary can still connect.
        let mut t = connect(daemon.local_addr());
        t.heartbeat().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while daemon.status().suspicion != Suspicion::Alive {
            assert!(Instant::now() < deadline, "{:?}", daemon.status());
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(t);
        assert_eq!(daemon.shutdown().role, Role::Standby);
    }

    /// A primary that says goodbye leaves on purpose (shutdown, switchover): even with a
    /// restorable standby, the backup does not take over.
    #[test]
    fn a_primary_that_says_goodbye_is_not_taken_over() {
        init_tracing();
        let _serial = one_at_a_time();
        let dir = TempDir::new("goodbye");
        let cfg = daemon_config(&dir);
        let daemon = BackupDaemon::start(cfg).unwrap();
        let mut p = start_primary(&dir, None);
        let mut t = connect(daemon.local_addr());
        wait_for_counter(&p.src, 1000);
        checkpoint(&mut p, &mut t, EpochId(0));
        t.close("planned shutdown");
        p.src.handle().stop();
        assert_eq!(p.run.join().unwrap().unwrap(), MachineExit::Stopped);
        std::thread::sleep(Duration::from_millis(700));
        let s = daemon.status();
        assert_eq!(s.role, Role::Standby, "{s:?}");
        assert!(s.restorable && s.primary_left && s.suspicion.is_dead(), "{s:?}");
        assert!(s.last_error.as_deref().is_some_and(|e| e.contains("goodbye")), "{s:?}");
        // A new session voids the goodbye.
        let mut t = connect(daemon.local_addr());
        t.heartbeat().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while daemon.status().primary_left || daemon.status().suspicion != Suspicion::Alive {
            assert!(Instant::now() < deadline, "{:?}", daemon.status());
            std::thread::sleep(Duration::from_millis(1));
        }
        t.close("done");
        assert_eq!(daemon.shutdown().role, Role::Standby);
    }

    /// How a test proxy ends the connection to the backup once the client closed.
    enum ProxyEnd {
        /// Shuts it down in order.
        Close,
        /// Once the flag is set, keeps what the client sends; at the client's close, delivers all
        /// of it at once and resets the connection.
        HoldThenReset(Arc<AtomicBool>),
    }

    /// Forwards one connection to `to`, recording what the client sent; returns the address to
    /// connect to and the recording (complete once the client closed).
    fn proxy(to: SocketAddr, end: ProxyEnd) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut up = std::net::TcpStream::connect(to).unwrap();
            let mut down = up.try_clone().unwrap();
            let mut back = c.try_clone().unwrap();
            down.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
            // Backup to primary, on its own thread; ends when either side closes or at `stop`.
            let stop = Arc::new(AtomicBool::new(false));
            let pump = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while !stop.load(Ordering::SeqCst) {
                        match down.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) if back.write_all(&buf[..n]).is_err() => break,
                            Ok(_) => {}
                            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                            Err(_) => break,
                        }
                    }
                })
            };
            let (mut sent, mut held) = (Vec::new(), Vec::new());
            let mut buf = [0u8; 65536];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sent.extend_from_slice(&buf[..n]);
                match &end {
                    ProxyEnd::HoldThenReset(hold) if hold.load(Ordering::SeqCst) => held.extend_from_slice(&buf[..n]),
                    _ if up.write_all(&buf[..n]).is_err() => break,
                    _ => {}
                }
            }
            stop.store(true, Ordering::SeqCst);
            let _ = pump.join();
            match end {
                ProxyEnd::Close => {
                    let _ = up.shutdown(std::net::Shutdown::Both);
                }
                ProxyEnd::HoldThenReset(_) => {
                    up.write_all(&held).unwrap();
                    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                    // SAFETY: a valid option value for a socket this thread owns (its clone closed
                    // with the pump), so that dropping it sends a reset.
                    let rc = unsafe {
                        libc::setsockopt(
                            up.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&raw const linger).cast(),
                            std::mem::size_of::<libc::linger>() as libc::socklen_t,
                        )
                    };
                    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
                }
            }
            sent
        });
        (addr, t)
    }

    /// A primary's heartbeat and goodbye arrive together and the connection is reset at once: the
    /// backup's answer to the heartbeat fails, yet the goodbye it had already received stands, and
    /// it does not take over.
    #[test]
    fn a_goodbye_followed_by_a_reset_is_still_a_goodbye() {
        init_tracing();
        let _serial = one_at_a_time();
        let dir = TempDir::new("goodbye-reset");
        let daemon = BackupDaemon::start(daemon_config(&dir)).unwrap();
        let mut p = start_primary(&dir, None);
        let hold = Arc::new(AtomicBool::new(false));
        let (proxy, proxied) = proxy(daemon.local_addr(), ProxyEnd::HoldThenReset(Arc::clone(&hold)));
        let mut t = connect(proxy);
        wait_for_counter(&p.src, 1000);
        checkpoint(&mut p, &mut t, EpochId(0));
        hold.store(true, Ordering::SeqCst);
        t.heartbeat().unwrap();
        t.close("planned shutdown");
        proxied.join().unwrap();
        p.src.handle().stop();
        assert_eq!(p.run.join().unwrap().unwrap(), MachineExit::Stopped);
        std::thread::sleep(Duration::from_millis(700));
        let s = daemon.status();
        assert_eq!(s.role, Role::Standby, "a goodbye then a reset caused a takeover: {s:?}");
        assert!(s.restorable && s.primary_left, "{s:?}");
        assert_eq!(daemon.shutdown().role, Role::Standby);
    }

    /// (i) After the primary said goodbye, the bytes of its session (handshake and frames)
    /// replayed to the backup on a new connection cause nothing: they are sealed with the old
    /// session's keys, so no session is ever confirmed, the goodbye stands, no takeover.
    #[test]
    fn a_recorded_session_replayed_after_a_goodbye_causes_no_takeover() {
        use std::io::Write;
        init_tracing();
        let _serial = one_at_a_time();
        let dir = TempDir::new("replay");
        let daemon = BackupDaemon::start(daemon_config(&dir)).unwrap();
        let mut p = start_primary(&dir, None);
        let (proxy, recording) = proxy(daemon.local_addr(), ProxyEnd::Close);
        let mut t = connect(proxy);
        wait_for_counter(&p.src, 1000);
        checkpoint(&mut p, &mut t, EpochId(0));
        t.close("planned shutdown");
        p.src.handle().stop();
        assert_eq!(p.run.join().unwrap().unwrap(), MachineExit::Stopped);
        let recorded = recording.join().unwrap();
        assert!(recorded.len() > 1000, "recorded {} bytes", recorded.len());
        std::thread::sleep(Duration::from_millis(400));
        assert!(daemon.status().primary_left, "{:?}", daemon.status());
        // The whole session, then just its handshake, replayed and cut off.
        for bytes in [&recorded[..], &recorded[..100]] {
            let mut s = std::net::TcpStream::connect(daemon.local_addr()).unwrap();
            let _ = s.write_all(bytes);
            std::thread::sleep(Duration::from_millis(100));
            drop(s);
        }
        std::thread::sleep(Duration::from_millis(700));
        let s = daemon.status();
        assert_eq!(s.role, Role::Standby, "a replay caused a takeover: {s:?}");
        assert!(s.primary_left, "a replay voided the goodbye: {s:?}");
        assert_eq!(daemon.shutdown().role, Role::Standby);
    }

    /// The primary dies, but the quorum refuses the takeover (the primary's side holds it): the
    /// backup stays standby and says why.
    #[test]
    fn a_takeover_the_quorum_refuses_does_not_happen() {
        init_tracing();
        let _serial = one_at_a_time();
        let dir = TempDir::new("quorum");
        let mut cfg = daemon_config(&dir);
        cfg.lease = Lease::new(Box::new(FixedQuorum { grant: false }), LeaseConfig::default(), 0);
        let daemon = BackupDaemon::start(cfg).unwrap();
        let mut p = start_primary(&dir, None);
        let mut t = connect(daemon.local_addr());
        wait_for_counter(&p.src, 1000);
        checkpoint(&mut p, &mut t, EpochId(0));
        kill(p, t);
        std::thread::sleep(Duration::from_millis(700));
        let s = daemon.status();
        assert_eq!(s.role, Role::Standby, "{s:?}");
        assert!(s.restorable && s.suspicion.is_dead(), "{s:?}");
        assert!(s.last_error.as_deref().is_some_and(|e| e.contains("refused the takeover")), "{s:?}");
        assert_eq!(daemon.shutdown().role, Role::Standby);
    }

    /// A uniquely named network namespace, deleted on drop (every exit path, panics included).
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Self {
            let name = format!("ftvm-ha-{tag}-{}", std::process::id());
            // A leftover of an earlier, killed run of this process id.
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            let ok = std::process::Command::new("ip").args(["netns", "add", &name]).status().unwrap();
            assert!(ok.success(), "ip netns add {name}");
            let ns = Self(name);
            ns.ip(&["link", "set", "lo", "up"]);
            ns
        }

        fn ip(&self, args: &[&str]) {
            let ok = std::process::Command::new("ip").args(["-n", &self.0]).args(args).status().unwrap();
            assert!(ok.success(), "ip -n {} {args:?}", self.0);
        }

        /// Moves the calling thread (only it) into the namespace.
        fn enter(&self) {
            let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
            // SAFETY: setns with a valid namespace fd; it changes only this thread's network namespace.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// An `AF_PACKET` socket receiving every ARP frame of the namespace.
    fn arp_capture() -> OwnedFd {
        let proto = (libc::ETH_P_ARP as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
        // SAFETY: SO_RCVTIMEO with a timeval of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        fd
    }

    /// One received frame: the interface index, the packet type and the bytes; None on timeout.
    fn recv_frame(fd: &OwnedFd, buf: &mut [u8]) -> Option<(i32, u8, usize)> {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and addr are valid for their lengths.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut addr as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        usize::try_from(n).ok().map(|n| (addr.sll_ifindex, addr.sll_pkttype, n))
    }

    fn ifindex(name: &str) -> i32 {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: a valid C string.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert!(i > 0, "no interface {name}");
        i32::try_from(i).unwrap()
    }

    /// (c) Promotion of a standby with a NIC announces the guest's MAC/IP: gratuitous ARPs, at the
    /// scheduled growing intervals, come out of the restored VM's TAP on the host side.
    #[test]
    fn promotion_announces_the_guest_with_gratuitous_arp() {
        init_tracing();
        let _serial = one_at_a_time();
        let ns = Netns::new("garp");
        let dir = TempDir::new("garp");
        let mac = [0x52, 0x54, 0x00, 0xfa, 0x11, 0x0e];
        let guest_ip = Ipv4Addr::new(10, 77, 0, 5);
        // Everything that creates a TAP or a socket runs in a thread inside the namespace.
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter();
                let net = NetConfig { tap_name: "ftvmp0".into(), mac, host_ipv4: None };
                let mut p = start_primary(&dir, Some(net));
                let receiver = BackupReceiver::bind(receiver_config(&dir)).unwrap();
                let mut t = connect(receiver.local_addr());
                wait_for_counter(&p.src, 1000);
                let checkpointed = checkpoint(&mut p, &mut t, EpochId(0));
                kill(p, t);
                let standby = receiver.stop().unwrap();

                let cap = arp_capture();
                let schedule = vec![
                    Duration::ZERO,
                    Duration::from_millis(10),
                    Duration::from_millis(50),
                    Duration::from_millis(200),
                ];
                let cfg = PromoteConfig {
                    net: Some(PromoteNet {
                        tap_name: "ftvmb0".into(),
                        mac,
                        guest_ipv4: guest_ip,
                        host_ipv4: Some((Ipv4Addr::new(10, 77, 0, 1), 24)),
                        announce: schedule.clone(),
                    }),
                    block: true,
                    console: Box::new(Sink::default()),
                    dirty_tracking: DirtyTracking::Off,
                    disk_intent: None,
                };
                let started = Instant::now();
                let mut promoted = promote(standby, cfg).unwrap();
                let tap = ifindex("ftvmb0");
                let handle = promoted.machine.handle();
                let mut machine = promoted.machine;
                let run = std::thread::spawn(move || machine.run());

                let mut seen = Vec::new();
                let mut buf = [0u8; 2048];
                let deadline = Instant::now() + Duration::from_secs(2);
                while seen.len() < schedule.len() && Instant::now() < deadline {
                    let Some((ifi, pkttype, n)) = recv_frame(&cap, &mut buf) else { continue };
                    // Frames the TAP receives (from the VMM's fd), not ones the host sends to it.
                    if ifi != tap || pkttype == libc::PACKET_OUTGOING {
                        continue;
                    }
                    let f = &buf[..n];
                    assert_eq!(n, GARP_FRAME_LEN, "{f:02x?}");
                    assert_eq!(&f[0..6], &[0xff; 6]);
                    assert_eq!(&f[6..12], &mac);
                    assert_eq!(&f[12..14], &[0x08, 0x06]);
                    assert_eq!(&f[20..22], &[0, 1], "an ARP request");
                    assert_eq!(&f[22..28], &mac, "sender MAC");
                    assert_eq!(&f[28..32], &guest_ip.octets(), "sender IP");
                    assert_eq!(&f[38..42], &guest_ip.octets(), "target IP = sender IP");
                    seen.push(started.elapsed());
                }
                let announcer = promoted.announcer.take().unwrap();
                let sent = announcer.join();
                // The restored guest runs meanwhile.
                let restored = promoted.source.guest_memory().read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap();
                handle.stop();
                let exit = run.join().unwrap().unwrap();
                (seen, sent, checkpointed, restored, exit)
            })
            .join()
        });
        let (seen, sent, checkpointed, restored, exit) = result.unwrap_or_else(|e| std::panic::resume_unwind(e));
        drop(ns);
        assert_eq!(sent, 4);
        assert_eq!(seen.len(), 4, "gratuitous ARPs captured at {seen:?}");
        // Growing intervals: the last one comes about 200 ms after the first.
        assert!(seen[3] - seen[0] >= Duration::from_millis(150), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
        assert!(restored > checkpointed, "the restored guest ran: {checkpointed} -> {restored}");
        assert_eq!(exit, MachineExit::Stopped);
        println!("gratuitous ARPs captured on the TAP at {seen:?} after the start of promote");
    }
}
