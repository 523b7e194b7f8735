//! The primary's epoch engine with a real KVM guest and a real backup receiver on 127.0.0.1:
//! failover at the VMM level (restore the backup's committed standby into a fresh VM and check the
//! guest carries on), a backup that dies mid-stream (simplex, no page lost, held output released),
//! and output commit (no frame leaves before its epoch's acknowledgement). Needs `/dev/kvm` (root).

mod common;

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use super::common::{init_tracing, Rng, TempPath, SECRET};
    use ftvm_guest_abi::GUEST_LOAD_GPA;
    use ftvm_repl::backup::{BackupReceiver, ReceiverConfig};
    use ftvm_repl::epoch::engine::{
        CheckpointCopy, DiskSource, EngineConfig, EngineHandle, EngineReport, EngineState, EngineStatus, PauseProbe,
        PrimaryEngine, StatusSnapshot,
    };
    use ftvm_repl::ha::heartbeat::SessionEnd;
    use ftvm_repl::ha::lease::{Lease, LeaseConfig};
    use ftvm_repl::ha::quorum::{Claim, FixedQuorum, NoQuorum, QuorumClient};
    use ftvm_repl::transport::tcp::{TcpOptions, TcpTransport};
    use ftvm_vmm::boot::elf::build_test_elf;
    use ftvm_vmm::boot::BootParams;
    use ftvm_repl::output::hold::{HoldEvent, OutputHold};
    use ftvm_vmm::devices::virtio::net::handler::FrameSink;
    use ftvm_vmm::devices::{BlockConfig, DeviceConfig};
    use ftvm_vmm::dirty::DirtyTracking;
    use ftvm_vmm::machine::{Machine, MachineExit, MachineHandle, MachineRunError, MemoryImage, VmConfig};
    use ftvm_vmm::memory::GuestMemory;
    use ftvm_vmm::state::MachineState;
    use vm_memory::{Bytes, GuestAddress};

    const MEM: u64 = 32 << 20;
    const DISK: u64 = 1 << 20;
    const COUNTER_GPA: u64 = 0x40_0000;
    const PAGES_GPA: u64 = 0x50_0000;

    /// The epoch test guest: a register counter (rbx) and a memory counter that must stay equal, and
    /// 16 pages of which the one for iteration n holds n; each iteration checks the previous one's page.
    /// Every 2^20 iterations (about a millisecond) it waits 300 µs on PORT_WAIT, so checkpoints fall
    /// both in spinning and in waiting. A failed check exits with 0x100 (counter) or 0x300 (page).
    ///
    /// ```text
    ///        mov rsi, 0x400000
    ///        xor ebx, ebx
    ///        mov qword [rsi], 0
    /// loop:  mov rax, [rsi]
    ///        cmp rax, rbx
    ///        jne fail_mem
    ///        test rbx, rbx
    ///        jz body
    ///        lea rdx, [rbx-1]
    ///        mov rcx, rdx
    ///        and ecx, 15
    ///        shl rcx, 12
    ///        cmp [rcx+0x500000], rdx
    ///        jne fail_page
    /// body:  inc rbx
    ///        inc qword [rsi]
    ///        mov rcx, rbx
    ///        and ecx, 15
    ///        shl rcx, 12
    ///        mov [rcx+0x500000], rbx
    ///        test ebx, 0xfffff
    ///        jnz loop
    ///        mov eax, 300 ; mov dx, 0x500 ; out dx, eax     (PORT_WAIT, 300 µs)
    ///        jmp loop
    /// fail_mem:  mov eax, 0x100 ; mov dx, 0x501 ; out dx, eax
    /// fail_page: mov eax, 0x300 ; mov dx, 0x501 ; out dx, eax
    /// ```
    const EPOCH_GUEST: [u8; 115] = [
        0x48, 0xc7, 0xc6, 0x00, 0x00, 0x40, 0x00, 0x31, 0xdb, 0x48, 0xc7, 0x06, 0x00, 0x00, 0x00, 0x00, 0x48, 0x8b,
        0x06, 0x48, 0x39, 0xd8, 0x75, 0x47, 0x48, 0x85, 0xdb, 0x74, 0x17, 0x48, 0x8d, 0x53, 0xff, 0x48, 0x89, 0xd1,
        0x83, 0xe1, 0x0f, 0x48, 0xc1, 0xe1, 0x0c, 0x48, 0x39, 0x91, 0x00, 0x00, 0x50, 0x00, 0x75, 0x35, 0x48, 0xff,
        0xc3, 0x48, 0xff, 0x06, 0x48, 0x89, 0xd9, 0x83, 0xe1, 0x0f, 0x48, 0xc1, 0xe1, 0x0c, 0x48, 0x89, 0x99, 0x00,
        0x00, 0x50, 0x00, 0xf7, 0xc3, 0xff, 0xff, 0x0f, 0x00, 0x75, 0xbd, 0xb8, 0x2c, 0x01, 0x00, 0x00, 0x66, 0xba,
        0x00, 0x05, 0xef, 0xeb, 0xb1, 0xb8, 0x00, 0x01, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xef, 0xb8, 0x00, 0x03,
        0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xef,
    ];
    const GUEST_LOOP: u64 = GUEST_LOAD_GPA + 0x10;
    const GUEST_FAIL: u64 = GUEST_LOAD_GPA + 0x5f;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-engine-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A guest that waits for a device event again and again and writes no memory:
    /// `idle: mov eax, WAIT_FOREVER; mov dx, PORT_WAIT; out dx, eax; jmp idle`.
    const IDLE_GUEST: [u8; 12] = [0xb8, 0xff, 0xff, 0xff, 0xff, 0x66, 0xba, 0x00, 0x05, 0xef, 0xeb, 0xf4];

    /// A guest that answers nobody and rewrites 1 024 pages (0x600000..0xa00000) for ever:
    /// `d: mov rsi, 0x600000; l: inc qword [rsi]; add rsi, 4096; cmp rsi, 0xa00000; jb l; jmp d`.
    const DIRTYING_GUEST: [u8; 40] = [
        0x48, 0xc7, 0xc6, 0x00, 0x00, 0x60, 0x00, 0x48, 0xff, 0x06, 0x48, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00, 0x48,
        0x81, 0xfe, 0x00, 0x00, 0xa0, 0x00, 0x72, 0xed, 0xeb, 0xe4, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
        0x90, 0x90, 0x90, 0x90,
    ];

    fn config(name: &str, disk: PathBuf, tracking: DirtyTracking) -> VmConfig {
        config_running(name, disk, tracking, &EPOCH_GUEST)
    }

    fn config_running(name: &str, disk: PathBuf, tracking: DirtyTracking, code: &[u8]) -> VmConfig {
        VmConfig {
            mem_size: MEM,
            guest_elf: temp_file(name, &build_test_elf(GUEST_LOAD_GPA, code, 0)),
            boot: BootParams::default(),
            devices: DeviceConfig { block: Some(BlockConfig::new(disk)), ..Default::default() },
            console: Box::new(io::sink()),
            dirty_tracking: tracking,
        }
    }

    fn spawn_run(mut m: Machine) -> JoinHandle<Result<MachineExit, MachineRunError>> {
        std::thread::spawn(move || m.run())
    }

    fn read_u64(mem: &[u8], gpa: u64) -> u64 {
        u64::from_le_bytes(mem[gpa as usize..gpa as usize + 8].try_into().unwrap())
    }

    /// Checks the guest's invariants in a consistent image (memory + rbx, rip); returns rbx.
    fn check_image(mem: &[u8], state: &MachineState) -> u64 {
        let regs = &state.vcpus[0].regs;
        let (rbx, rip) = (regs.rbx, regs.rip);
        assert!((GUEST_LOOP..GUEST_FAIL).contains(&rip) || rip < GUEST_LOOP, "rip {rip:#x} outside the guest's loop");
        let counter = read_u64(mem, COUNTER_GPA);
        // The capture may fall between `inc rbx` and `inc qword [rsi]`.
        assert!(counter == rbx || counter + 1 == rbx, "memory counter {counter} vs rbx {rbx}");
        if rbx > 1 {
            // The page of the previous iteration holds its number, or (between the increments and
            // the page write) the one before.
            let page = |n: u64| read_u64(mem, PAGES_GPA + (n & 15) * 4096);
            assert!(page(rbx) == rbx || page(rbx - 1) == rbx - 1, "pages lag behind rbx {rbx}");
        }
        rbx
    }

    /// Everything one test needs: a primary machine running the guest, a receiver, a connected engine.
    struct Pair {
        machine: MachineHandle,
        run: JoinHandle<Result<MachineExit, MachineRunError>>,
        mem: GuestMemory,
        engine: EngineHandle,
        receiver: BackupReceiver,
        disk: PathBuf,
        _standby_disk: TempPath,
    }

    fn start_pair(tag: &str, cfg: EngineConfig) -> Pair {
        start_pair_with(tag, cfg, DirtyTracking::KvmBitmap)
    }

    fn start_pair_with(tag: &str, cfg: EngineConfig, tracking: DirtyTracking) -> Pair {
        start_pair_full(tag, cfg, tracking, Box::new(NoQuorum))
    }

    fn start_pair_full(tag: &str, cfg: EngineConfig, tracking: DirtyTracking, quorum: Box<dyn QuorumClient>) -> Pair {
        start_pair_inner(tag, cfg, config(tag, temp_disk(tag), tracking), quorum, None)
    }

    fn start_pair_probed(tag: &str, cfg: EngineConfig, tracking: DirtyTracking, probe: PauseProbe) -> Pair {
        start_pair_inner(tag, cfg, config(tag, temp_disk(tag), tracking), Box::new(NoQuorum), Some(probe))
    }

    /// A pair whose guest runs `code`.
    fn start_pair_running(tag: &str, cfg: EngineConfig, code: &[u8]) -> Pair {
        let vm = config_running(tag, temp_disk(tag), DirtyTracking::KvmBitmap, code);
        start_pair_inner(tag, cfg, vm, Box::new(NoQuorum), None)
    }

    fn temp_disk(tag: &str) -> PathBuf {
        let mut rng = Rng(0x5eed_0000 ^ tag.len() as u64);
        temp_file(&format!("{tag}-disk"), &rng.bytes(DISK as usize))
    }

    fn start_pair_inner(
        tag: &str,
        cfg: EngineConfig,
        vm: VmConfig,
        quorum: Box<dyn QuorumClient>,
        probe: Option<PauseProbe>,
    ) -> Pair {
        init_tracing();
        let disk = vm.devices.block.as_ref().map(|b| b.path.clone()).expect("the test VMs have a disk");
        let mut m = Machine::create(vm).unwrap();
        let source = m.checkpoint_source().unwrap();
        let mem = source.guest_memory();
        let machine = m.handle();
        let run = spawn_run(m);

        let (receiver, standby_disk, transport) = new_backup(tag);
        let engine =
            PrimaryEngine::new(source, Box::new(transport), Some(DiskSource::new(disk.clone(), DISK)), cfg)
                .unwrap()
                .with_lease(started_lease(quorum));
        let engine = match probe {
            Some(p) => engine.with_pause_probe(p),
            None => engine,
        };
        let engine = engine.spawn().unwrap();
        Pair { machine, run, mem, engine, receiver, disk, _standby_disk: standby_disk }
    }

    /// The lease a primary starts its VM under, as `claim_start` leaves it (a quorum that refuses
    /// every claim leaves it not held). Without one, output would leave only on acknowledgements
    /// faster than `ACK_AUTHORITY`, which a loaded test machine does not always give.
    fn started_lease(quorum: Box<dyn QuorumClient>) -> Lease {
        let lease = Lease::new(quorum, LeaseConfig::default(), 0);
        let _ = lease.claim(Claim::Start);
        lease
    }

    /// A backup receiver with a blank standby disk, and the primary's link to it.
    fn new_backup(tag: &str) -> (BackupReceiver, TempPath, TcpTransport) {
        let standby_disk = TempPath::new(tag);
        let mut rcfg = ReceiverConfig::new("127.0.0.1:0".parse().unwrap(), SECRET, MEM, standby_disk.0.clone(), DISK);
        rcfg.link_timeout = Duration::from_secs(3);
        let receiver = BackupReceiver::bind(rcfg).unwrap();
        let opts = TcpOptions { memory_bytes: Some(MEM), disk_bytes: Some(DISK), ..TcpOptions::default() };
        let transport = TcpTransport::connect(receiver.local_addr(), SECRET, &opts).unwrap();
        (receiver, standby_disk, transport)
    }

    /// Waits until `f` holds for the status, or fails the test after `limit`.
    fn wait_status(
        status: &ftvm_repl::epoch::engine::EngineStatus,
        what: &str,
        limit: Duration,
        f: impl Fn(&StatusSnapshot) -> bool,
    ) -> StatusSnapshot {
        let deadline = Instant::now() + limit;
        loop {
            let s = status.snapshot();
            if f(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn percentile(v: &mut [Duration], p: f64) -> Duration {
        if v.is_empty() {
            return Duration::ZERO;
        }
        v.sort();
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    fn print_figures(name: &str, report: &EngineReport, elapsed: Duration) {
        let e = &report.epochs;
        let parts = |f: &dyn Fn(&ftvm_repl::epoch::context::EpochMetrics) -> Duration| {
            let mut v: Vec<Duration> = e.iter().map(f).collect();
            (percentile(&mut v, 0.5), percentile(&mut v, 0.99))
        };
        let pause = parts(&|m| m.pause);
        let wait = parts(&|m| m.pause_wait);
        let harvest = parts(&|m| m.capture.harvest);
        let vcpus = parts(&|m| m.capture.vcpus);
        let devices = parts(&|m| m.capture.devices);
        let copy = parts(&|m| m.copy);
        let resume = parts(&|m| m.resume);
        let pages: u64 = e.iter().map(|m| m.pages).sum();
        let s = &report.status;
        eprintln!(
            "[{name}] {} epochs in {elapsed:?} = {:.0} epochs/s (status {:.0}/s); pages/epoch {:.1}; \
             pause p50 {:?} p99 {:?} (pause wait {:?}/{:?}, harvest {:?}/{:?}, vCPU state {:?}/{:?}, devices {:?}/{:?}, copy {:?}/{:?}, resume {:?}/{:?}); \
             last ack round trip {:?}; A-Link bytes / dirty bytes = {:.3} ({} / {})",
            e.len(),
            e.len() as f64 / elapsed.as_secs_f64(),
            s.epochs_per_sec,
            pages as f64 / e.len().max(1) as f64,
            pause.0,
            pause.1,
            wait.0,
            wait.1,
            harvest.0,
            harvest.1,
            vcpus.0,
            vcpus.1,
            devices.0,
            devices.1,
            copy.0,
            copy.1,
            resume.0,
            resume.1,
            s.last_ack_round_trip,
            s.link_per_dirty_byte().unwrap_or(0.0),
            s.link_bytes,
            s.dirty_bytes,
        );
    }

    /// Simulated guest output: appends a small frame to the hold every 200 µs until told to stop.
    fn spawn_appender(hold: Arc<OutputHold>, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
        std::thread::spawn(move || {
            let mut n = 0u64;
            let frame = [0u8; 64];
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if hold.append(&frame).is_ok() {
                    n += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            n
        })
    }

    /// A protected pair whose output hold is fed by an appender thread and drained into a
    /// counting sink, after `epochs` acknowledged epochs.
    struct HeldPair {
        pair: Pair,
        status: Arc<EngineStatus>,
        hold: Arc<OutputHold>,
        sink: CountSink,
        stop_append: Arc<AtomicBool>,
        appender: JoinHandle<u64>,
    }

    /// Drains the pair's hold into a counting sink and feeds it from an appender thread (stopped by
    /// the flag; it returns how many frames it appended).
    fn feed_output(pair: &Pair) -> (Arc<OutputHold>, CountSink, Arc<AtomicBool>, JoinHandle<u64>) {
        let hold = pair.engine.output_hold().expect("the default gate");
        let sink = CountSink::default();
        hold.attach_output(Box::new(sink.clone()));
        let stop_append = Arc::new(AtomicBool::new(false));
        let appender = spawn_appender(hold.clone(), stop_append.clone());
        (hold, sink, stop_append, appender)
    }

    fn protected_pair_with_output(tag: &str, cfg: EngineConfig, epochs: u64) -> HeldPair {
        protected_pair_with_output_and_quorum(tag, cfg, epochs, Box::new(NoQuorum))
    }

    fn protected_pair_with_output_and_quorum(
        tag: &str,
        cfg: EngineConfig,
        epochs: u64,
        quorum: Box<dyn QuorumClient>,
    ) -> HeldPair {
        let pair = start_pair_full(tag, cfg, DirtyTracking::KvmBitmap, quorum);
        let status = pair.engine.status();
        let (hold, sink, stop_append, appender) = feed_output(&pair);
        wait_status(&status, "protection", Duration::from_secs(20), |s| s.state == EngineState::Protected);
        let s = status.snapshot();
        wait_status(&status, "epochs", Duration::from_secs(20), |x| x.epochs_committed >= s.epochs_committed + epochs);
        HeldPair { pair, status, hold, sink, stop_append, appender }
    }

    #[derive(Clone, Default)]
    struct CountSink(Arc<AtomicU64>);

    impl FrameSink for CountSink {
        fn send_frame(&mut self, _frame: &[u8]) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Checks output commit in the hold's debug ring: every frame written out belongs to an epoch a
    /// release covered before it, and every release (other than the final unprotected one) names an
    /// epoch the backup had committed. Returns (frames released after acks, frames released unprotected).
    fn check_output_commit(events: &[HoldEvent], committed: u64) -> (u64, u64) {
        let mut covered: Option<u64> = None;
        let mut sealed: Option<u64> = None;
        let (mut acked_frames, mut unprotected) = (0, 0);
        for ev in events {
            match *ev {
                HoldEvent::Sealed { epoch, .. } => sealed = Some(epoch),
                HoldEvent::ReleaseRequested { through, .. } => {
                    if through != u64::MAX {
                        assert!(through <= committed, "released through {through}, the backup committed {committed}");
                    }
                    covered = covered.max(Some(through));
                }
                HoldEvent::Released { epoch, .. } => {
                    assert!(sealed.is_some_and(|s| s >= epoch), "frame of epoch {epoch} released before its seal");
                    assert!(
                        covered.is_some_and(|c| c >= epoch),
                        "frame of epoch {epoch} released before its acknowledgement"
                    );
                    if covered == Some(u64::MAX) {
                        unprotected += 1;
                    } else {
                        acked_frames += 1;
                    }
                }
                _ => {}
            }
        }
        (acked_frames, unprotected)
    }

    /// The primary crashes after a few hundred epochs; the backup's committed standby, restored into a
    /// fresh VM, carries on from the committed epoch. Also checks output commit on the way.
    #[test]
    fn failover_at_the_vmm_level_resumes_the_guest_from_the_committed_epoch() {
        failover("failover", DirtyTracking::KvmBitmap);
    }

    /// The same with the KVM bitmap protecting every written page at each harvest (the default
    /// tracker above leaves the guest's hot pages, its counter page among them, writable).
    #[test]
    fn failover_with_the_exact_bitmap_tracker() {
        failover("failover-exact", DirtyTracking::KvmBitmapExact);
    }

    /// The same with the KVM dirty ring as the tracker.
    #[test]
    fn failover_with_the_dirty_ring_tracker() {
        failover("failover-ring", DirtyTracking::kvm_ring());
    }

    /// The same with the userfaultfd write-protect tracker (no KVM dirty logging).
    #[test]
    fn failover_with_the_userfaultfd_tracker() {
        failover("failover-uffd", DirtyTracking::Uffd);
    }

    /// The same with copy-on-write checkpoints. The guest rewrites its counter and its pages all
    /// the time, so writes hit pages not copied yet; on top of the image checks, every page the
    /// backup holds is the page of the pause of the last committed epoch that carried it (hashed
    /// in that pause). The exact bitmap, so that every page is write-protected (the default
    /// tracker leaves this guest's pages, written in every epoch, writable: see the next test).
    #[test]
    fn failover_with_copy_on_write_checkpoints() {
        let report = failover_with("failover-cow", DirtyTracking::KvmBitmapExact, CheckpointCopy::CopyOnWrite);
        assert_eq!(report.status.copy, CheckpointCopy::CopyOnWrite, "copy-on-write stayed armed");
        assert_eq!(report.status.tracker, "bitmap-exact");
        let copied_later = report.epochs.iter().filter(|m| m.copy_after_resume > Duration::ZERO).count();
        let faults: u64 = report.epochs.iter().map(|m| m.write_faults).sum();
        eprintln!("[failover-cow] {copied_later} of {} epochs copied after their resume; {faults} guest writes waited for their page", report.epochs.len());
        assert!(copied_later * 2 > report.epochs.len(), "most epochs copy after the resume");
        assert!(faults > 0, "the guest wrote pages of an epoch before they were copied");
    }

    /// Copy-on-write with the default tracker: the pages it leaves writable are copied in the
    /// pause instead of write-protected. In every epoch exactly the pages that were not hot are
    /// copied after the resume, and hot pages occur; the image and page checks hold all the same.
    #[test]
    fn failover_with_copy_on_write_copies_hot_pages_in_the_pause() {
        let report = failover_with("failover-cow-hot", DirtyTracking::KvmBitmap, CheckpointCopy::CopyOnWrite);
        assert_eq!(report.status.copy, CheckpointCopy::CopyOnWrite, "copy-on-write stayed armed");
        assert_eq!(report.status.tracker, "bitmap", "status names the tracker as it runs");
        let copied_later = report.epochs.iter().filter(|m| m.copy_after_resume > Duration::ZERO).count();
        let hot = report.epochs.iter().filter(|m| m.hot_pages > 0).count();
        eprintln!("[failover-cow-hot] {copied_later} of {} epochs copied after their resume, {hot} carried hot pages", report.epochs.len());
        // How many epochs carry hot pages depends on how the guest's writes fall into epochs (a
        // busy machine makes epochs short); which pages each epoch copies when does not.
        assert!(hot > 0, "hot pages occur");
        for m in &report.epochs {
            assert_eq!(m.copied_later_pages, m.pages - m.hot_pages, "epoch {:?}: only the pages that were not hot are copied after the resume", m.epoch);
        }
    }

    fn failover(tag: &str, tracking: DirtyTracking) {
        failover_with(tag, tracking, CheckpointCopy::StopAndCopy);
    }

    /// Blake3 of each page at the pause of the last epoch that carried it.
    type PauseHashes = Arc<std::sync::Mutex<std::collections::HashMap<u64, (u64, [u8; 32])>>>;

    fn failover_with(tag: &str, tracking: DirtyTracking, copy: CheckpointCopy) -> EngineReport {
        // A generous ack timeout: under a loaded test machine a slow acknowledgement must not turn
        // this test into the simplex one.
        let cfg = EngineConfig { ack_timeout: Duration::from_secs(5), copy, ..EngineConfig::default() };
        let hashes = PauseHashes::default();
        let probe = {
            let hashes = hashes.clone();
            move |epoch: ftvm_proto::EpochId, pages: &ftvm_proto::pages::PageRangeSet, mem: &GuestMemory| {
                let mut h = hashes.lock().unwrap();
                let mut page = vec![0u8; 4096];
                for pfn in pages.pages() {
                    mem.read_slice(&mut page, GuestAddress(pfn * 4096)).unwrap();
                    h.insert(pfn, (epoch.0, *blake3::hash(&page).as_bytes()));
                }
            }
        };
        let pair = start_pair_probed(tag, cfg, tracking, Box::new(probe));
        let status = pair.engine.status();
        let (hold, sink, stop_append, appender) = feed_output(&pair);

        let protected =
            wait_status(&status, "protection", Duration::from_secs(20), |s| s.state == EngineState::Protected);
        let t0 = Instant::now();
        let before = protected.epochs_committed;
        wait_status(&status, "200 epochs", Duration::from_secs(30), |s| s.epochs_committed >= before + 200);
        let elapsed = t0.elapsed();
        stop_append.store(true, Ordering::Relaxed);
        let appended = appender.join().unwrap();

        // The crash: no final checkpoint; the machine stops right after the engine.
        let report = pair.engine.stop().unwrap();
        pair.machine.stop();
        assert_eq!(pair.run.join().unwrap().unwrap(), MachineExit::Stopped);
        print_figures(tag, &report, elapsed);

        let standby = pair.receiver.stop().unwrap();
        let committed = standby.committed().expect("the backup committed an epoch");
        let (after_ack, unprotected) = check_output_commit(&hold.debug_events(), committed.0);
        eprintln!(
            "[{tag}] output: {appended} frames appended, {after_ack} released after their ack, {unprotected} released when the engine stopped; sink got {}",
            sink.0.load(Ordering::Relaxed)
        );
        assert!(after_ack > 0, "some frames were released by acknowledgements");
        assert_eq!(after_ack + unprotected, appended);

        // Every page the backup holds as of an epoch's pause, for the pages of committed epochs
        // whose later epochs did not commit.
        let image = standby.memory().as_slice();
        let mut checked = 0;
        for (&pfn, &(epoch, hash)) in hashes.lock().unwrap().iter() {
            if epoch <= committed.0 {
                let page = &image[(pfn * 4096) as usize..][..4096];
                assert_eq!(*blake3::hash(page).as_bytes(), hash, "[{tag}] page {pfn:#x} differs from the pause of epoch {epoch}");
                checked += 1;
            }
        }
        assert!(checked > 16, "[{tag}] {checked} pages checked");
        resume_standby(tag, &standby, &pair.disk);
        report
    }

    /// Checks a committed standby as a takeover would find it: its disk is the primary's `disk`
    /// (the test guest never writes its disk: the synchronisation's image), its memory and state
    /// are one consistent image of the guest, and restored into a fresh VM the guest carries on
    /// from there, its own checks passing.
    fn resume_standby(tag: &str, standby: &ftvm_repl::backup::Standby, disk: &std::path::Path) {
        let committed = standby.committed().expect("the backup committed an epoch");
        assert_eq!(std::fs::read(standby.disk_path()).unwrap(), std::fs::read(disk).unwrap());
        let state = MachineState::from_bytes(standby.state()).unwrap();
        let image = standby.memory().as_slice();
        let committed_rbx = check_image(image, &state);
        assert!(committed_rbx > 0, "the guest had run at the committed epoch");

        // The backup takes over.
        let mut m2 = Machine::restore(
            config(&format!("{tag}-b"), standby.disk_path().to_path_buf(), DirtyTracking::Off),
            MemoryImage::Bytes(image),
            &state,
        )
        .unwrap();
        let mut src2 = m2.checkpoint_source().unwrap();
        let run2 = spawn_run(m2);
        let mem2 = src2.guest_memory();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem2.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap() < committed_rbx + 1_000_000 {
            assert!(!run2.is_finished(), "the restored guest exited (failed its own check?)");
            assert!(Instant::now() < deadline, "the restored guest does not progress");
            std::thread::sleep(Duration::from_millis(1));
        }
        src2.pause().unwrap();
        let later = src2.capture_state().unwrap();
        let mut after = vec![0u8; MEM as usize];
        mem2.read_slice(&mut after, GuestAddress(0)).unwrap();
        let rbx2 = check_image(&after, &later);
        assert!(rbx2 >= committed_rbx + 1_000_000, "carried on: {committed_rbx} -> {rbx2}");
        src2.handle().stop();
        // Stopped, not GuestExit(0x100/0x300): the guest's own checks never failed.
        assert_eq!(run2.join().unwrap().unwrap(), MachineExit::Stopped);
        eprintln!(
            "[{tag}] committed epoch {} at guest iteration {committed_rbx}; restored guest reached {rbx2}",
            committed.0
        );
    }

    /// A guest that waits and writes nothing is not checkpointed at every interval: the engine sees
    /// no dirty page, no output and no disk write, skips, and the backup hears heartbeats.
    #[test]
    fn an_idle_guest_costs_heartbeats_not_checkpoints() {
        let cfg = EngineConfig { epoch_interval: Duration::from_millis(10), ..EngineConfig::default() };
        let pair = start_pair_running("idle", cfg, &IDLE_GUEST);
        let status = pair.engine.status();
        wait_status(&status, "protection", Duration::from_secs(20), |s| s.state == EngineState::Protected);
        let settled = wait_status(&status, "skipped checkpoints", Duration::from_secs(10), |s| s.checkpoints.skipped >= 10);
        std::thread::sleep(Duration::from_millis(300));
        let later = status.snapshot();
        let report = pair.engine.stop().unwrap();
        pair.machine.stop();
        assert_eq!(pair.run.join().unwrap().unwrap(), MachineExit::Stopped);
        eprintln!("[idle] checkpoints {:?} then {:?}; committed {} then {}", settled.checkpoints, later.checkpoints, settled.epochs_committed, later.epochs_committed);
        assert_eq!(later.state, EngineState::Protected, "the backup heard the primary all along");
        assert!(later.checkpoints.skipped >= settled.checkpoints.skipped + 20, "300 ms at a 10 ms interval: {:?}", later.checkpoints);
        assert!(
            later.checkpoints.interval <= settled.checkpoints.interval + 2,
            "an idle guest is not checkpointed: {:?} -> {:?}",
            settled.checkpoints,
            later.checkpoints
        );
        assert_eq!(report.status.checkpoints.dirty, 0);
        drop(pair.receiver);
    }

    /// A guest that answers nobody and dirties memory is checkpointed when its dirty pages pass the
    /// bound (which follows the link's rate), before the interval.
    #[test]
    fn a_silent_guest_that_dirties_memory_is_checkpointed_early() {
        let cfg = EngineConfig { epoch_interval: Duration::from_secs(1), ..EngineConfig::default() };
        let pair = start_pair_running("dirtying", cfg, &DIRTYING_GUEST);
        let status = pair.engine.status();
        wait_status(&status, "protection", Duration::from_secs(20), |s| s.state == EngineState::Protected);
        let s = wait_status(&status, "checkpoints for the dirty bound", Duration::from_secs(10), |s| s.checkpoints.dirty >= 20);
        let report = pair.engine.stop().unwrap();
        pair.machine.stop();
        assert_eq!(pair.run.join().unwrap().unwrap(), MachineExit::Stopped);
        let pages: Vec<u64> = report.epochs.iter().map(|m| m.pages).collect();
        eprintln!(
            "[dirtying] checkpoints {:?}, bound {} pages, link {:.0} MiB/s; pages per epoch {:?}",
            s.checkpoints,
            s.dirty_bound_pages,
            s.link_bytes_per_sec.unwrap_or(0.0) / (1 << 20) as f64,
            &pages[..pages.len().min(20)]
        );
        // A second-long interval: every checkpoint but the first came from the bound.
        assert!(s.checkpoints.interval <= 2, "{:?}", s.checkpoints);
        assert!(s.link_bytes_per_sec.is_some(), "the link's rate was measured");
        drop(pair.receiver);
    }

    /// The backup dies mid-stream: the engine goes simplex, the VM keeps running, and held output
    /// leaves.
    #[test]
    fn a_dead_backup_leaves_the_vm_running_unprotected() {
        // The socket closing is what tells the engine here; the timeout only guards a loaded machine.
        let cfg = EngineConfig { ack_timeout: Duration::from_secs(2), ..EngineConfig::default() };
        let HeldPair { pair, status, hold, sink, stop_append, appender } = protected_pair_with_output("simplex", cfg, 50);
        stop_append.store(true, Ordering::Relaxed);
        let appended = appender.join().unwrap();

        // Kill the backup mid-run (its socket closes).
        let killed_at = Instant::now();
        let _ = pair.receiver.stop().unwrap();
        let s =
            wait_status(&status, "simplex", Duration::from_secs(5), |s| matches!(s.state, EngineState::Simplex { .. }));
        eprintln!("[simplex] simplex {:?} after the backup died: {s:?}", killed_at.elapsed());

        // Every frame the guest sent is out, none is held.
        assert_eq!(hold.held_frames(), 0, "frames still held in simplex");
        assert_eq!(hold.stats().released, appended);
        assert_eq!(sink.0.load(Ordering::Relaxed), appended);

        // The VM keeps running.
        let c0 = pair.mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pair.mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap() < c0 + 1_000_000 {
            assert!(!pair.run.is_finished(), "the VM stopped");
            assert!(Instant::now() < deadline, "the VM does not progress in simplex");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!pair.engine.is_finished(), "the engine ended on a lost backup");
        let report = pair.engine.stop().unwrap();
        assert!(matches!(report.status.state, EngineState::Simplex { .. }));
        pair.machine.stop();
        assert_eq!(pair.run.join().unwrap().unwrap(), MachineExit::Stopped);
    }

    /// The backup dies, the VM runs alone, then a new backup (a blank disk) joins while the VM
    /// runs: the engine synchronises it in full and the pair is protected again, its standby one
    /// consistent image from which the guest carries on; output is held again meanwhile.
    #[test]
    fn a_backup_that_joins_later_protects_the_vm_again() {
        let cfg = EngineConfig { ack_timeout: Duration::from_secs(2), ..EngineConfig::default() };
        let HeldPair { pair, status, hold, sink, stop_append, appender } = protected_pair_with_output("rejoin", cfg, 20);
        let _ = pair.receiver.stop().unwrap();
        let simplex = wait_status(&status, "simplex", Duration::from_secs(5), |s| matches!(s.state, EngineState::Simplex { .. }));
        let last_epoch = simplex.last_sent.expect("epochs were sent").0;

        let (receiver, _disk, link) = new_backup("rejoin-2");
        pair.engine.attacher().attach(Box::new(link));
        let synced = wait_status(&status, "protection again", Duration::from_secs(20), |s| {
            s.state == EngineState::Protected && s.epochs_committed >= 30
        });
        assert!(
            synced.last_acked.is_some_and(|e| e.0 > last_epoch),
            "epoch numbers go on after the lost backup's ({last_epoch}): {synced:?}"
        );
        // Output is held again: a frame appended now waits for an acknowledgement.
        let released_before = hold.stats().released;
        stop_append.store(true, Ordering::Relaxed);
        let appended = appender.join().unwrap();
        assert!(hold.stats().released >= released_before && sink.0.load(Ordering::Relaxed) <= appended);

        let report = pair.engine.stop().unwrap();
        pair.machine.stop();
        assert_eq!(pair.run.join().unwrap().unwrap(), MachineExit::Stopped);
        assert_eq!(report.status.state, EngineState::Stopped);
        let standby = receiver.stop().unwrap();
        let committed = standby.committed().expect("the new backup committed");
        // After the simplex release (through every epoch), frames leave again only through the
        // new backup's acknowledgements: of epochs it committed, sealed before them.
        let events = hold.debug_events();
        let release_all = |e: &HoldEvent| matches!(e, HoldEvent::ReleaseRequested { through: u64::MAX, .. });
        let simplex_at = events.iter().position(release_all).expect("the simplex release is in the debug ring");
        // From the first seal for the new backup (frames appended while alone went out directly)
        // to the engine's stop, which releases everything once more.
        let held_again = simplex_at
            + events[simplex_at..]
                .iter()
                .position(|e| matches!(e, HoldEvent::Sealed { epoch, .. } if *epoch > last_epoch))
                .expect("no seal for the new backup");
        let stopped_at = events.iter().rposition(release_all).unwrap();
        let rejoined = &events[held_again..stopped_at];
        let acked: Vec<u64> = rejoined
            .iter()
            .filter_map(|e| match e {
                HoldEvent::ReleaseRequested { through, .. } => Some(*through),
                _ => None,
            })
            .collect();
        assert!(!acked.is_empty(), "no release on the new backup's acknowledgements");
        assert!(acked.iter().all(|&t| t > last_epoch && t <= committed.0), "releases {acked:?}, committed {committed:?}");
        let (after_ack, _) = check_output_commit(rejoined, committed.0);
        assert!(after_ack > 0, "no frame was released by the new backup's acknowledgements");
        resume_standby("rejoin", &standby, &pair.disk);
    }

    /// A host that took over runs its VM alone from the start: an engine built `alone` checkpoints
    /// nothing until a backup joins, then protects the VM like any other.
    #[test]
    fn an_engine_started_alone_protects_the_vm_once_a_backup_joins() {
        init_tracing();
        let tag = "alone";
        let disk = temp_file(&format!("{tag}-disk"), &Rng(0x5eed_a10e).bytes(DISK as usize));
        let mut m = Machine::create(config(tag, disk.clone(), DirtyTracking::KvmBitmap)).unwrap();
        let source = m.checkpoint_source().unwrap();
        let machine = m.handle();
        let run = spawn_run(m);
        // The lease the takeover claimed.
        let lease = Lease::new(Box::new(NoQuorum), LeaseConfig::default(), 0);
        lease.claim(Claim::TakeOver).unwrap();
        let engine = PrimaryEngine::alone(
            source,
            Some(DiskSource::new(disk.clone(), DISK)),
            EngineConfig { ack_timeout: Duration::from_secs(2), ..EngineConfig::default() },
            "took over".into(),
        )
        .unwrap()
        .numbering_after(ftvm_proto::EpochId(1000))
        .with_lease(lease)
        .spawn()
        .unwrap();
        let status = engine.status();
        std::thread::sleep(Duration::from_millis(100));
        let alone = status.snapshot();
        assert_eq!(alone.state, EngineState::Simplex { reason: "took over".into() });
        assert_eq!(alone.last_sent, None, "an engine alone sent an epoch");

        let (receiver, _standby_disk, link) = new_backup(&format!("{tag}-b"));
        engine.attacher().attach(Box::new(link));
        let s = wait_status(&status, "protection", Duration::from_secs(20), |s| {
            s.state == EngineState::Protected && s.epochs_committed >= 30
        });
        assert!(s.last_acked.is_some_and(|e| e.0 > 1000), "numbering goes on after the restored epoch: {s:?}");
        engine.stop().unwrap();
        machine.stop();
        assert_eq!(run.join().unwrap().unwrap(), MachineExit::Stopped);
        resume_standby(tag, &receiver.stop().unwrap(), &disk);
    }

    /// The backup takes over while this primary still runs (it took it for dead): the primary
    /// hears it, pauses its VM for good and releases nothing more, since the backup's copy resumes
    /// from its last committed epoch and two copies must never serve.
    #[test]
    fn a_primary_whose_backup_takes_over_is_fenced() {
        let cfg = EngineConfig { ack_timeout: Duration::from_secs(5), ..EngineConfig::default() };
        let HeldPair { pair, status, hold, sink, stop_append, appender } = protected_pair_with_output("fenced", cfg, 20);

        let standby = pair.receiver.stop_taking_over("test: the backup takes over").unwrap();
        let committed = standby.committed().expect("the backup committed epochs");
        let s = wait_status(&status, "fenced", Duration::from_secs(5), |s| matches!(s.state, EngineState::Fenced { .. }));
        assert!(matches!(&s.state, EngineState::Fenced { reason } if reason.contains("the backup takes over")), "{s:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pair.engine.is_finished() {
            assert!(Instant::now() < deadline, "the fenced engine does not end");
            std::thread::sleep(Duration::from_millis(2));
        }
        stop_append.store(true, Ordering::Relaxed);
        let appended = appender.join().unwrap();
        // Every frame that left belongs to an epoch the backup had committed when it took over,
        // and none left unprotected. (Whether any frame was still held at the fence depends on
        // where the appender was: on a loaded machine it may not have run between the last
        // release and the fence, so a frame appended now stands for the guest's next one.)
        let (acked, unprotected) = check_output_commit(&hold.debug_events(), committed.0);
        assert_eq!(unprotected, 0, "the fenced primary released output without an acknowledgement");
        assert!(acked > 0, "no output was released while protected");
        hold.append(&[0u8; 64]).expect("the fenced hold takes the frame");
        let appended = appended + 1;

        // Nothing held leaves any more: what was out stays out, the rest is never released.
        let released = sink.0.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(sink.0.load(Ordering::Relaxed), released, "output left after the fence");
        assert!(released < appended, "every frame left ({released} of {appended}): nothing was held back");
        assert!(hold.held_frames() > 0, "the frames after the last acknowledgement must stay held");

        // The VM is paused: its counter no longer moves.
        let c0 = pair.mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pair.mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap(), c0, "the fenced VM still runs");
        let report = pair.engine.stop().unwrap();
        assert!(matches!(report.status.state, EngineState::Fenced { .. }), "{:?}", report.status.state);
        pair.machine.stop();
        assert_eq!(pair.run.join().unwrap().unwrap(), MachineExit::Stopped);
    }

    /// The backup dies, but the quorum does not let this primary run alone (the other side holds
    /// it): the primary fences itself instead of going simplex, and releases nothing more.
    #[test]
    fn a_primary_the_quorum_refuses_to_run_alone_fences_itself() {
        let cfg = EngineConfig { ack_timeout: Duration::from_secs(2), ..EngineConfig::default() };
        let quorum = Box::new(FixedQuorum { grant: false });
        let HeldPair { pair, status, hold, sink, stop_append, appender } =
            protected_pair_with_output_and_quorum("no-quorum", cfg, 20, quorum);
        let _ = pair.receiver.stop().unwrap();
        let s = wait_status(&status, "fenced", Duration::from_secs(5), |s| matches!(s.state, EngineState::Fenced { .. }));
        assert!(matches!(&s.state, EngineState::Fenced { reason } if reason.contains("quorum")), "{s:?}");
        stop_append.store(true, Ordering::Relaxed);
        let appended = appender.join().unwrap();
        let released = sink.0.load(Ordering::Relaxed);
        assert!(released < appended && hold.held_frames() > 0, "held output left: {released} of {appended}");
        let c0 = pair.mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pair.mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap(), c0, "the fenced VM still runs");
        pair.machine.stop();
        assert_eq!(pair.run.join().unwrap().unwrap(), MachineExit::Stopped);
        let _ = pair.engine.stop();
    }

    /// The machine ends first (the guest exits, or the operator stops it): the engine notices at
    /// its next pause and ends with an error instead of hanging.
    #[test]
    fn the_engine_ends_when_its_machine_does() {
        let pair = start_pair("machine-ends", EngineConfig { ack_timeout: Duration::from_secs(5), ..EngineConfig::default() });
        let status = pair.engine.status();
        wait_status(&status, "protection", Duration::from_secs(20), |s| s.state == EngineState::Protected);
        pair.machine.stop();
        assert_eq!(pair.run.join().unwrap().unwrap(), MachineExit::Stopped);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pair.engine.is_finished() {
            assert!(Instant::now() < deadline, "the engine outlives its machine");
            std::thread::sleep(Duration::from_millis(2));
        }
        let err = pair.engine.stop().unwrap_err();
        eprintln!("[machine-ends] engine ended with: {}", ftvm_repl::ErrorChain(&err));
        assert_eq!(status.snapshot().state, EngineState::Stopped);
        // A VM stopped on purpose is not the backup's to bring back: it was told goodbye.
        let activity = pair.receiver.link_activity();
        let deadline = Instant::now() + Duration::from_secs(5);
        while activity.session_end() != SessionEnd::Goodbye {
            assert!(Instant::now() < deadline, "no goodbye: {:?}", activity.session_end());
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = pair.receiver.stop();
    }

    /// Frames appended in epoch N are not released before N's acknowledgement, checked without a VM
    /// between seals and releases made by hand on the hold (the rule the engine relies on).
    #[test]
    fn frames_of_an_epoch_wait_for_its_acknowledgement() {
        let hold = OutputHold::new(1 << 20).unwrap();
        let sink = CountSink::default();
        hold.attach_output(Box::new(sink.clone()));
        hold.append(&[1u8; 64]).unwrap();
        hold.seal(1).unwrap();
        hold.append(&[2u8; 64]).unwrap();
        hold.seal(2).unwrap();
        hold.append(&[3u8; 64]).unwrap();
        assert_eq!(hold.release_through(0).unwrap().frames, 0);
        assert_eq!(hold.release_through(1).unwrap().frames, 1);
        assert_eq!(sink.0.load(Ordering::Relaxed), 1);
        assert_eq!(hold.release_through(2).unwrap().frames, 1);
        // The unsealed frame stays.
        assert_eq!(hold.release_through(u64::MAX).unwrap().frames, 0);
        assert_eq!(hold.held_frames(), 1);
        let (acked, unprotected) = check_output_commit(&hold.debug_events(), 2);
        assert_eq!((acked, unprotected), (2, 0));
    }
}
