//! The primary host's lifecycle with a real KVM guest and a real backup receiver on 127.0.0.1: how
//! each way a run can end shows in the outcome, the fence and the lease. Needs `/dev/kvm` (root).

mod common;

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::common::{init_tracing, TempPath, SECRET};
    use ftvm_guest_abi::GUEST_LOAD_GPA;
    use ftvm_proto::epoch::{EpochBegin, StandbyInfo};
    use ftvm_proto::pages::PageRangeSet;
    use ftvm_proto::EpochId;
    use ftvm_repl::backup::{BackupReceiver, ReceiverConfig};
    use ftvm_repl::disk::DiskWrite;
    use ftvm_repl::epoch::engine::{DiskSource, EngineConfig, EngineState, EngineStatus};
    use ftvm_repl::ha::fence::Fence;
    use ftvm_repl::ha::lease::{Lease, LeaseConfig};
    use ftvm_repl::ha::primary::{PrimaryExit, PrimaryHost, PrimaryHostConfig, PrimaryHostRunError};
    use ftvm_repl::ha::quorum::{Claim, ClaimOutcome, LeaseGrant, Previous, QuorumClient, QuorumError, ReleaseReason};
    use ftvm_repl::transport::tcp::{TcpOptions, TcpTransport};
    use ftvm_repl::transport::{
        AckListener, AckToken, BeginEpochError, CheckpointTransport, CommitError, HandOverError, LinkError, PageSource,
        SendDiskImageError, SendDiskWritesError, SendOutputError, SendPagesError, SendStateError, WaitAckError,
    };
    use ftvm_vmm::boot::elf::build_test_elf;
    use ftvm_vmm::boot::BootParams;
    use ftvm_vmm::devices::{BlockConfig, DeviceConfig};
    use ftvm_vmm::dirty::DirtyTracking;
    use ftvm_vmm::machine::{Machine, MachineExit, MachineHandle, VmConfig};

    const MEM: u64 = 32 << 20;
    const DISK: u64 = 1 << 20;

    /// A guest that waits on PORT_WAIT, 1 ms at a time, for ever:
    /// `loop: mov eax, 1000 ; mov dx, 0x500 ; out dx, eax ; jmp loop`.
    const WAITING_GUEST: [u8; 12] = [0xb8, 0xe8, 0x03, 0x00, 0x00, 0x66, 0xba, 0x00, 0x05, 0xef, 0xeb, 0xf4];

    /// Counts the fences.
    #[derive(Debug, Default)]
    struct CountFence(AtomicUsize);

    impl Fence for CountFence {
        fn fence(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A quorum that grants every claim for ever and writes down every release.
    #[derive(Debug, Clone, Default)]
    struct ReleaseBook(Arc<Mutex<Vec<ReleaseReason>>>);

    impl QuorumClient for ReleaseBook {
        fn backend(&self) -> &'static str {
            "book"
        }
        fn acquire(&mut self, _claim: Claim, known_term: u64) -> Result<ClaimOutcome, QuorumError> {
            Ok(ClaimOutcome::Granted(LeaseGrant { term: known_term + 1, ttl: None, previous: Previous::None }))
        }
        fn renew(&mut self, term: u64) -> Result<ClaimOutcome, QuorumError> {
            Ok(ClaimOutcome::Granted(LeaseGrant { term, ttl: None, previous: Previous::None }))
        }
        fn release(&mut self, _term: u64, reason: ReleaseReason) -> Result<(), QuorumError> {
            self.0.lock().unwrap().push(reason);
            Ok(())
        }
    }

    /// The TCP transport, whose next `commit` or heartbeat panics once armed (the test's guest
    /// waits and writes nothing, so its pair has no checkpoint to take, only heartbeats): an
    /// engine that breaks while its VM runs (a bug), the case the supervisor exists for.
    struct PanicOnCommit {
        inner: TcpTransport,
        armed: Arc<AtomicBool>,
    }

    impl CheckpointTransport for PanicOnCommit {
        fn peer_standby(&self) -> StandbyInfo {
            self.inner.peer_standby()
        }
        fn set_ack_listener(&mut self, listener: AckListener) {
            self.inner.set_ack_listener(listener)
        }
        fn begin_epoch(&mut self, begin: &EpochBegin) -> Result<(), BeginEpochError> {
            self.inner.begin_epoch(begin)
        }
        fn send_pages(&mut self, pages: &PageRangeSet, source: &dyn PageSource) -> Result<u64, SendPagesError> {
            self.inner.send_pages(pages, source)
        }
        fn send_state(&mut self, state: &[u8]) -> Result<(), SendStateError> {
            self.inner.send_state(state)
        }
        fn send_disk_writes(&mut self, writes: &[DiskWrite]) -> Result<(), SendDiskWritesError> {
            self.inner.send_disk_writes(writes)
        }
        fn send_output(&mut self, frames: &[&[u8]]) -> Result<u64, SendOutputError> {
            self.inner.send_output(frames)
        }
        fn send_disk_image(&mut self, offset: u64, data: &[u8]) -> Result<(), SendDiskImageError> {
            self.inner.send_disk_image(offset, data)
        }
        fn commit(&mut self, epoch: EpochId) -> Result<AckToken, CommitError> {
            assert!(!self.armed.load(Ordering::SeqCst), "test: the transport breaks at the commit of {epoch:?}");
            self.inner.commit(epoch)
        }
        fn wait_ack(&self, token: AckToken, deadline: Instant) -> Result<EpochId, WaitAckError> {
            self.inner.wait_ack(token, deadline)
        }
        fn acked(&self) -> Option<EpochId> {
            self.inner.acked()
        }
        fn heartbeat(&mut self) -> Result<(), LinkError> {
            assert!(!self.armed.load(Ordering::SeqCst), "test: the transport breaks at a heartbeat");
            self.inner.heartbeat()
        }
        fn abandon(&mut self, reason: &str) {
            self.inner.abandon(reason)
        }

        fn hand_over(&mut self, epoch: EpochId) -> Result<(), HandOverError> {
            self.inner.hand_over(epoch)
        }
    }

    /// A primary host built and running on its own thread, its backup's receiver, and what the
    /// test looks at.
    struct Running {
        outcome: mpsc::Receiver<Result<PrimaryExit, PrimaryHostRunError>>,
        status: Arc<EngineStatus>,
        machine: MachineHandle,
        /// Taken by a test that stops it.
        receiver: Option<BackupReceiver>,
        fence: Arc<CountFence>,
        releases: ReleaseBook,
        reports: Arc<AtomicUsize>,
        _files: [TempPath; 3],
    }

    impl Running {
        fn wait_protected(&self) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.status.snapshot().state != EngineState::Protected {
                assert!(Instant::now() < deadline, "not protected: {:?}", self.status.snapshot().state);
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// The host's outcome: it must end by itself (or by what the test did) within seconds.
        fn outcome(&self) -> PrimaryExit {
            self.outcome.recv_timeout(Duration::from_secs(20)).expect("the primary host does not end").unwrap()
        }

        fn releases(&self) -> Vec<ReleaseReason> {
            self.releases.0.lock().unwrap().clone()
        }
    }

    fn start(tag: &str, wrap: impl FnOnce(TcpTransport) -> Box<dyn CheckpointTransport>) -> Running {
        init_tracing();
        let elf = TempPath::new(&format!("host-{tag}-elf"));
        std::fs::write(&elf.0, build_test_elf(GUEST_LOAD_GPA, &WAITING_GUEST, 0)).unwrap();
        let disk = TempPath::new(&format!("host-{tag}-disk"));
        std::fs::write(&disk.0, vec![0x5a; DISK as usize]).unwrap();
        let machine = Machine::create(VmConfig {
            mem_size: MEM,
            guest_elf: elf.0.clone(),
            boot: BootParams::default(),
            devices: DeviceConfig { block: Some(BlockConfig::new(disk.0.clone())), ..Default::default() },
            console: Box::new(io::sink()),
            dirty_tracking: DirtyTracking::KvmBitmap,
        })
        .unwrap();

        let standby = TempPath::new(&format!("host-{tag}-standby"));
        let mut rcfg = ReceiverConfig::new("127.0.0.1:0".parse().unwrap(), SECRET, MEM, standby.0.clone(), DISK);
        rcfg.link_timeout = Duration::from_secs(3);
        let receiver = BackupReceiver::bind(rcfg).unwrap();
        let opts = TcpOptions { memory_bytes: Some(MEM), disk_bytes: Some(DISK), ..TcpOptions::default() };
        let transport = TcpTransport::connect(receiver.local_addr(), SECRET, &opts).unwrap();

        let releases = ReleaseBook::default();
        let lease = Lease::new(Box::new(releases.clone()), LeaseConfig::default(), 0);
        lease.claim(Claim::Start).unwrap();
        let fence = Arc::new(CountFence::default());
        let mut cfg = PrimaryHostConfig::new(machine, Ok(wrap(transport)), lease, fence.clone());
        cfg.engine = EngineConfig { ack_timeout: Duration::from_secs(5), ..EngineConfig::default() };
        cfg.disk = Some(DiskSource::new(disk.0.clone(), DISK));
        cfg.supervise_every = Duration::from_millis(10);
        let host = PrimaryHost::new(cfg).unwrap();
        let status = host.engine_status();
        let machine = host.machine_handle();
        let reports = Arc::new(AtomicUsize::new(0));
        let (tx, outcome) = mpsc::channel();
        let counted = reports.clone();
        std::thread::spawn(move || {
            let exit = host.run(|_| {
                counted.fetch_add(1, Ordering::SeqCst);
            });
            let _ = tx.send(exit);
        });
        Running { outcome, status, machine, receiver: Some(receiver), fence, releases, reports, _files: [elf, disk, standby] }
    }

    fn plain(t: TcpTransport) -> Box<dyn CheckpointTransport> {
        Box::new(t)
    }

    /// Stopped by its owner: the machine's exit, nothing fenced, the lease given back as stopped.
    #[test]
    fn a_primary_host_stopped_by_its_owner_releases_its_lease() {
        let mut host = start("stopped", plain);
        host.wait_protected();
        host.machine.stop();
        assert!(matches!(host.outcome(), PrimaryExit::Stopped(MachineExit::Stopped)));
        assert_eq!(host.fence.0.load(Ordering::SeqCst), 0, "a stopped primary was fenced");
        assert_eq!(host.releases(), [ReleaseReason::Stopped]);
        assert!(host.reports.load(Ordering::SeqCst) > 0, "the status was never reported");
        assert_eq!(host.status.snapshot().state, EngineState::Stopped);
        let _ = host.receiver.take().unwrap().stop();
    }

    /// The backup takes over: the host fences its copy, stops the VM, and says why.
    #[test]
    fn a_primary_host_whose_backup_takes_over_is_fenced_and_stops() {
        let mut host = start("fenced", plain);
        host.wait_protected();
        let _standby = host.receiver.take().unwrap().stop_taking_over("test: the backup takes over").unwrap();
        let PrimaryExit::Fenced { reason } = host.outcome() else { panic!("not fenced: {:?}", host.status.snapshot()) };
        assert!(reason.contains("the backup takes over"), "{reason}");
        assert!(host.fence.0.load(Ordering::SeqCst) > 0, "the gate was not closed");
        assert_eq!(host.releases(), [ReleaseReason::Stopped]);
    }

    /// The engine's thread ends with an error while the VM runs: the VM is stopped (nobody else
    /// stops it here), the gate closed, the outcome says the engine failed, and the lease goes as
    /// if this host had died, so that the backup takes over at once.
    #[test]
    fn a_primary_host_whose_engine_breaks_stops_the_vm_and_releases_as_dead() {
        let armed = Arc::new(AtomicBool::new(false));
        let trigger = armed.clone();
        let mut host = start("failed", move |t| Box::new(PanicOnCommit { inner: t, armed: trigger }));
        host.wait_protected();
        armed.store(true, Ordering::SeqCst);
        let PrimaryExit::Failed { reason } = host.outcome() else { panic!("not failed: {:?}", host.status.snapshot()) };
        assert!(reason.contains("panicked"), "{reason}");
        assert!(matches!(host.status.snapshot().state, EngineState::Failed { .. }));
        assert!(host.fence.0.load(Ordering::SeqCst) > 0, "the gate was not closed");
        assert_eq!(host.releases(), [ReleaseReason::HolderDied]);
        let _ = host.receiver.take().unwrap().stop();
    }
}
