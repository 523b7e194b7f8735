//! A primary and a backup over real TCP on 127.0.0.1: initial synchronisation, many epochs,
//! pipelining, refusal of a second primary, failover hand-over, link failures, and loopback figures.

mod common;

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use crate::common::*;
    use ftvm_proto::pages::PageRangeSet;
    use ftvm_proto::EpochId;
    use ftvm_repl::backup::{BackupReceiver, BindError, DiskSync, ReceiverConfig};
    use ftvm_repl::disk::{DiskReplicator, MemoryDiskReplicator};
    use ftvm_proto::epoch::EpochBegin;
    use ftvm_repl::transport::tcp::{LinkIo, TcpTransport};
    use ftvm_repl::transport::{
        AckEvent, BeginEpochError, CheckpointTransport, CommitError, ConnectError, FlatMemory, LinkError, SendPagesError, WaitAckError,
    };
    use ftvm_repl::PAGE_SIZE;

    const MIB: usize = 1 << 20;

    /// Every way the primary can write to the link.
    const ALL_IO: [LinkIo; 3] = [LinkIo::Socket, LinkIo::Uring { zero_copy: false }, LinkIo::Uring { zero_copy: true }];

    /// Runs `$body(LinkIo)` as three tests: over `writev` (the test's historical name), over
    /// io_uring, and over io_uring with zero-copy sends. The wire does not change; the backup reads
    /// through io_uring when the primary writes through it.
    macro_rules! over_each_link_io {
        ($body:ident => $socket:ident, $uring:ident, $zero_copy:ident) => {
            #[test]
            fn $socket() {
                $body(LinkIo::Socket)
            }

            #[test]
            fn $uring() {
                $body(LinkIo::Uring { zero_copy: false })
            }

            #[test]
            fn $zero_copy() {
                $body(LinkIo::Uring { zero_copy: true })
            }
        };
    }

    over_each_link_io!(
        initial_sync_then_200_epochs => initial_sync_then_200_epochs_keep_the_standby_equal_to_the_primary,
        initial_sync_then_200_epochs_over_io_uring,
        initial_sync_then_200_epochs_over_io_uring_zero_copy
    );

    over_each_link_io!(
        pages_written_a_little => pages_written_a_little_go_as_deltas_and_the_standby_stays_equal,
        pages_written_a_little_over_io_uring,
        pages_written_a_little_over_io_uring_zero_copy
    );

    /// A guest that writes a few bytes of a working set of pages, epoch after epoch, and now and
    /// then rewrites a page whole: from the second epoch that carries a page, the page goes as a
    /// delta from the backup's copy (protocol 1.9), and after every acknowledgement the standby
    /// equals the primary.
    fn pages_written_a_little(io: LinkIo) {
        let mut p = synced_pair(0x5eed_de17a, 8 * MIB, MIB, "page-deltas", io);
        let working_set = 48u64;
        let mut pages_sent = 0u64;
        for e in 1..=60u64 {
            for _ in 0..12 {
                let pfn = 100 + p.rng.below(working_set);
                p.model.touch_page(&mut p.rng, pfn);
            }
            if e % 10 == 0 {
                let pfn = 100 + p.rng.below(working_set);
                p.model.dirty_page(&mut p.rng, pfn);
            }
            p.model.state = p.rng.bytes(300);
            pages_sent += p.model.dirty.page_count();
            let token = send_epoch(&mut p.t, &mut p.model, &mut p.disks, EpochId(e));
            assert_eq!(wait(&p.t, token), EpochId(e));
            p.disks.commit(EpochId(e)).unwrap();
            assert_standby(&p.backup, &p.model, EpochId(e));
        }
        let deltas = p.t.page_deltas();
        // Every page but the first sending of each, and the few rewritten whole, went as a delta.
        assert!(deltas.pages + working_set + 6 >= pages_sent && deltas.pages < pages_sent, "{deltas:?} of {pages_sent} pages");
        assert!(deltas.bytes_saved > deltas.pages * (PAGE_SIZE as u64 - 128), "{deltas:?}");
        assert_eq!(p.backup.stats().pages_applied, pages_sent + p.model.pages(), "the synchronisation's pages and every epoch's");
    }

    /// 64 MiB of memory and 8 MiB of disk, synchronised while the "guest" keeps running, then 200
    /// epochs of random dirty pages, states and disk writes; after every acknowledgement the standby
    /// equals the primary at that epoch.
    fn initial_sync_then_200_epochs(io: LinkIo) {
        init_tracing();
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let mut model = Model::new(&mut rng, 64 * MIB, 8 * MIB);
        let mut disks = MemoryDiskReplicator::new(model.disk.len() as u64, 256 * MIB as u64);
        let (backup, _disk) = start_backup_reading(&model, "main", io != LinkIo::Socket);
        let mut t = connect_io(backup.local_addr(), &model, io);
        assert_eq!(t.peer_standby().committed, None);
        assert!(matches!(
            t.begin_epoch(&EpochBegin { epoch: EpochId(1), state_len: 1, ..EpochBegin::default() }),
            Err(BeginEpochError::NeedsInitialSync)
        ));

        // Epoch 0: every page and the whole disk, streamed in chunks while the guest runs. Dirty
        // tracking starts first: whatever changes during the sync goes out again in epoch 1. The sync
        // carries no machine state (the guest was running), so it is not restorable by itself.
        let started = Instant::now();
        let begin = EpochBegin {
            epoch: EpochId(0),
            page_count: model.pages(),
            state_len: 0,
            disk_write_count: 0,
            disk_image_bytes: model.disk.len() as u64,
            initial_sync: true,
        };
        t.begin_epoch(&begin).unwrap();
        let chunk_pages = 2048u64;
        let mut progress_seen = 0;
        for (i, start) in (0..model.pages()).step_by(chunk_pages as usize).enumerate() {
            let mut chunk = PageRangeSet::new();
            chunk.insert(start, chunk_pages.min(model.pages() - start));
            // A copy of the chunk, as an engine that syncs while the guest runs would send (the guest
            // may write the live pages while they are read).
            let end = (start + chunk.page_count()) as usize * PAGE_SIZE;
            let snapshot = model.mem[start as usize * PAGE_SIZE..end].to_vec();
            t.send_pages(&chunk, &Shifted { first: start, bytes: &snapshot }).unwrap();
            let disk_chunk = model.disk.len() / 8;
            if i < 8 {
                t.send_disk_image((i * disk_chunk) as u64, &model.disk[i * disk_chunk..(i + 1) * disk_chunk]).unwrap();
            }
            // The guest keeps running during the sync.
            model.run(&mut rng, 20, 2, &mut disks);
            if let Some(p) = backup.stats().sync {
                assert!(p.pages_received >= progress_seen && p.pages_total == model.pages());
                progress_seen = p.pages_received;
            }
        }
        let token = t.commit(EpochId(0)).unwrap();
        assert_eq!(wait(&t, token), EpochId(0));
        let sync_time = started.elapsed();
        let stats = backup.stats();
        assert_eq!(stats.committed, Some(EpochId(0)));
        assert!(!stats.restorable && backup.committed().is_none(), "a sync without state is not restorable");
        assert!(progress_seen > 0, "progress was visible during the sync");
        println!(
            "initial sync of {} MiB memory + {} MiB disk while running: {:.0} ms, {:.0} MB/s",
            model.mem.len() / MIB,
            model.disk.len() / MIB,
            sync_time.as_secs_f64() * 1e3,
            (model.mem.len() + model.disk.len()) as f64 / sync_time.as_secs_f64() / 1e6
        );

        // Epoch 1 carries what changed during the sync, and the state: now the standby is restorable.
        let token = send_epoch(&mut t, &mut model, &mut disks, EpochId(1));
        assert_eq!(wait(&t, token), EpochId(1));
        disks.commit(EpochId(1)).unwrap();
        assert_standby(&backup, &model, EpochId(1));

        for e in 2..202u64 {
            let pages = 1 + rng.below(300);
            let writes = rng.below(9);
            model.run(&mut rng, pages, writes, &mut disks);
            let token = send_epoch(&mut t, &mut model, &mut disks, EpochId(e));
            assert_eq!(wait(&t, token), EpochId(e));
            disks.commit(EpochId(e)).unwrap();
            assert_standby(&backup, &model, EpochId(e));
        }
        let stats = backup.stats();
        assert_eq!((stats.epochs_committed, stats.epochs_discarded, stats.sessions), (202, 0, 1));
        assert_eq!(disks.backlog_bytes(), 0);

        // Failover hand-over: stopping the receiver gives the committed standby back.
        drop(t);
        let standby = backup.stop().unwrap();
        assert_eq!(standby.committed(), Some(EpochId(201)));
        assert!(standby.memory().as_slice() == &model.mem[..]);
        assert_eq!(standby.state(), &model.state[..]);
    }

    /// Pages `first..` served from a copy (asked page by page: no contiguous runs).
    struct Shifted<'a> {
        first: u64,
        bytes: &'a [u8],
    }

    impl ftvm_repl::transport::PageSource for Shifted<'_> {
        fn page(&self, pfn: u64) -> Option<&[u8]> {
            let i = usize::try_from(pfn.checked_sub(self.first)?).ok()?;
            self.bytes.get(i * PAGE_SIZE..(i + 1) * PAGE_SIZE)
        }
    }

    over_each_link_io!(
        epochs_pipeline => epochs_pipeline_and_acks_arrive_in_order,
        epochs_pipeline_over_io_uring,
        epochs_pipeline_over_io_uring_zero_copy
    );

    /// Epoch N+1 goes out before N's acknowledgement arrives, and acknowledgements come back in order.
    /// Holding a view of the committed standby stops the receiver from applying (and acknowledging)
    /// anything, which makes "before the ack" certain rather than likely.
    fn epochs_pipeline(io: LinkIo) {
        init_tracing();
        let mut rng = Rng(7);
        let mut model = Model::new(&mut rng, 4 * MIB, MIB);
        let mut disks = MemoryDiskReplicator::new(model.disk.len() as u64, 64 * MIB as u64);
        let (backup, _disk) = start_backup_reading(&model, "pipeline", io != LinkIo::Socket);
        let mut t = connect_io(backup.local_addr(), &model, io);
        let events = Arc::new(Mutex::new(Vec::new()));
        {
            let events = Arc::clone(&events);
            t.set_ack_listener(Box::new(move |e| events.lock().unwrap().push(e)));
        }
        let token = full_sync(&mut t, &mut model, EpochId(0));
        wait(&t, token);

        let view = backup.committed().unwrap();
        let mut tokens = Vec::new();
        for e in 1..=4u64 {
            model.run(&mut rng, 3, 1, &mut disks);
            tokens.push(send_epoch(&mut t, &mut model, &mut disks, EpochId(e)));
        }
        // All four epochs are on the wire; none can have been acknowledged.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(t.acked(), Some(EpochId(0)));
        let err = t.wait_ack(tokens[0], Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, WaitAckError::TimedOut { epoch: EpochId(1), .. }), "{err}");
        drop(view);

        assert_eq!(wait(&t, tokens[3]), EpochId(4));
        let acked: Vec<u64> = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                AckEvent::Acked { epoch, .. } => Some(epoch.0),
                AckEvent::LinkDown { .. } | AckEvent::Superseded { .. } => None,
            })
            .collect();
        assert_eq!(acked, vec![0, 1, 2, 3, 4]);
        // Earlier tokens are satisfied by the later acknowledgement.
        assert_eq!(wait(&t, tokens[0]), EpochId(4));
        assert_standby(&backup, &model, EpochId(4));
    }

    over_each_link_io!(
        held_output_is_kept => held_output_of_committed_epochs_is_kept_for_a_takeover,
        held_output_is_kept_over_io_uring,
        held_output_is_kept_over_io_uring_zero_copy
    );

    /// The held output sent with committed epochs is in the standby a takeover gets (to replay);
    /// the output of an epoch that never committed is not.
    fn held_output_is_kept(io: LinkIo) {
        let SyncedPair { mut rng, mut model, mut disks, backup, mut t, disk: _disk } = synced_pair(11, 4 * MIB, MIB, "output", io);
        let frame = |b: u8, n: usize| vec![b; n];
        let mut epoch_with_output = |t: &mut TcpTransport, model: &mut Model, e: u64, out: &[Vec<u8>], commit: bool| {
            model.run(&mut rng, 3, 0, &mut disks);
            let begin = EpochBegin {
                epoch: EpochId(e),
                page_count: model.dirty.page_count(),
                state_len: model.state.len() as u64,
                disk_write_count: 0,
                disk_image_bytes: 0,
                initial_sync: false,
            };
            t.begin_epoch(&begin).unwrap();
            t.send_pages(&model.dirty, &FlatMemory(&model.mem)).unwrap();
            t.send_state(&model.state).unwrap();
            let frames: Vec<&[u8]> = out.iter().map(Vec::as_slice).collect();
            t.send_output(&frames).unwrap();
            model.dirty.clear();
            commit.then(|| t.commit(EpochId(e)).unwrap())
        };
        let committed = [frame(1, 80), frame(2, 1500)];
        let token = epoch_with_output(&mut t, &mut model, 1, &committed, true).unwrap();
        assert_eq!(wait(&t, token), EpochId(1));
        // Epoch 2 carries output but the primary dies before its commit.
        assert!(epoch_with_output(&mut t, &mut model, 2, &[frame(3, 99)], false).is_none());
        drop(t);
        wait_stats(&backup, "the session to end", |s| s.connected.is_none());
        let standby = backup.stop().unwrap();
        assert_eq!(standby.committed(), Some(EpochId(1)));
        assert_eq!(standby.unreleased_output(), &committed[..]);
    }

    over_each_link_io!(
        input_is_kept => input_sent_ahead_is_kept_until_its_epoch_commits,
        input_is_kept_over_io_uring,
        input_is_kept_over_io_uring_zero_copy
    );

    /// Guest input sent ahead (from another thread, between and among an epoch's frames) is
    /// dropped once its epoch commits, and what the dead primary took in after the committed
    /// epoch is what a takeover gets, in order; an epoch still being sent counts as not committed.
    fn input_is_kept(io: LinkIo) {
        use ftvm_proto::epoch::encode_output_frame;
        let SyncedPair { mut rng, mut model, mut disks, backup, mut t, disk: _disk } = synced_pair(13, 4 * MIB, MIB, "ingress", io);
        let link = t.ingress_link().expect("a 1.7 backup takes input");
        let payload = |frames: &[&[u8]]| {
            let mut p = Vec::new();
            for f in frames {
                encode_output_frame(f, &mut p);
            }
            p
        };
        let frame = |b: u8, n: usize| vec![b; n];
        let (f1, f2, f3, f4) = (frame(1, 60), frame(2, 1514), frame(3, 90), frame(4, 300));
        let mid_link = link.clone();
        let mut epoch = |t: &mut TcpTransport, model: &mut Model, e: u64, commit: bool, mid: Option<(u64, Vec<u8>)>| {
            model.run(&mut rng, 3, 0, &mut disks);
            let begin = EpochBegin {
                epoch: EpochId(e),
                page_count: model.dirty.page_count(),
                state_len: model.state.len() as u64,
                disk_write_count: 0,
                disk_image_bytes: 0,
                initial_sync: false,
            };
            t.begin_epoch(&begin).unwrap();
            t.send_pages(&model.dirty, &FlatMemory(&model.mem)).unwrap();
            if let Some((tag, p)) = mid {
                // Between two of the epoch's frames, outside its digest.
                let l = mid_link.clone();
                std::thread::spawn(move || l.send_ingress(tag, &p).unwrap()).join().unwrap();
            }
            t.send_state(&model.state).unwrap();
            model.dirty.clear();
            commit.then(|| t.commit(EpochId(e)).unwrap())
        };
        // Taken in during epoch 1 (before its pause), sent from another thread.
        let l = link.clone();
        let p1 = payload(&[&f1, &f2]);
        std::thread::spawn(move || l.send_ingress(1, &p1).unwrap()).join().unwrap();
        let token = epoch(&mut t, &mut model, 1, true, Some((2, payload(&[&f3])))).unwrap();
        assert_eq!(wait(&t, token), EpochId(1));
        // Late: epoch 1 is committed already; nothing to keep.
        link.send_ingress(1, &payload(&[&frame(9, 60)])).unwrap();
        // Taken in during epoch 2 (sent above, among epoch 1's frames), then 3; epoch 2 is sent
        // but the primary dies before its commit.
        assert!(epoch(&mut t, &mut model, 2, false, None).is_none());
        // Sent at once by the taking thread: the link is free and the socket has room.
        assert!(matches!(link.try_send_ingress(3, &payload(&[&f4])), Some(Ok(()))));
        wait_stats(&backup, "the input to arrive", |s| s.ingress_frames_held == 2 && s.ingress_late == 1);
        drop(t);
        assert!(link.send_ingress(3, &payload(&[&f4])).is_err(), "input on a closed link");
        wait_stats(&backup, "the session to end", |s| s.connected.is_none());
        let standby = backup.stop().unwrap();
        assert_eq!(standby.committed(), Some(EpochId(1)));
        assert_eq!(standby.replay_ingress(), &[f3, f4][..]);
    }

    /// Every frame size the guest's virtio-net device accepts (from a bare header to a VLAN-tagged
    /// 64 KiB frame) replicates byte for byte; one byte more is refused before anything is sent,
    /// and the epoch still commits. The device, the hold and the wire share one limit.
    #[test]
    fn every_guest_frame_size_the_device_accepts_replicates() {
        use ftvm_proto::limits::{MAX_GUEST_FRAME, MIN_GUEST_FRAME};
        use ftvm_repl::transport::SendOutputError;
        assert_eq!(ftvm_vmm::devices::virtio::net::handler::MAX_FRAME_LEN, MAX_GUEST_FRAME);
        let SyncedPair { model, backup, mut t, disk: _disk, .. } = synced_pair(12, 4 * MIB, MIB, "frame-sizes", LinkIo::Socket);
        let sizes = [MIN_GUEST_FRAME, MIN_GUEST_FRAME + 60, MIN_GUEST_FRAME + 1514, MAX_GUEST_FRAME - 1, MAX_GUEST_FRAME];
        let frames: Vec<Vec<u8>> =
            sizes.iter().enumerate().map(|(i, &n)| (0..n).map(|b| (b as u8).wrapping_mul(31) ^ i as u8).collect()).collect();
        let begin = EpochBegin {
            epoch: EpochId(1),
            page_count: 0,
            state_len: model.state.len() as u64,
            disk_write_count: 0,
            disk_image_bytes: 0,
            initial_sync: false,
        };
        t.begin_epoch(&begin).unwrap();
        t.send_state(&model.state).unwrap();
        let too_big = vec![0u8; MAX_GUEST_FRAME + 1];
        let err = t.send_output(&[&too_big]).unwrap_err();
        assert!(matches!(err, SendOutputError::BadFrame(n) if n == MAX_GUEST_FRAME + 1), "{err}");
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        t.send_output(&refs).unwrap();
        let token = t.commit(EpochId(1)).unwrap();
        assert_eq!(wait(&t, token), EpochId(1));
        drop(t);
        wait_stats(&backup, "the session to end", |s| s.connected.is_none());
        let standby = backup.stop().unwrap();
        assert_eq!(standby.committed(), Some(EpochId(1)));
        assert_eq!(standby.unreleased_output(), &frames[..]);
    }

    /// Only one primary at a time: a second authenticated primary is told so; the first keeps going.
    #[test]
    fn a_second_primary_is_refused_while_one_is_connected() {
        let SyncedPair { mut rng, mut model, mut disks, backup, mut t, disk: _disk } = synced_pair(11, MIB, 256 << 10, "second", LinkIo::Socket);

        let err = TcpTransport::connect(backup.local_addr(), SECRET, &options(&model)).unwrap_err();
        assert!(matches!(err, ConnectError::Refused(ref r) if r.contains("another primary")), "{err}");
        assert!(backup.stats().refused >= 1);

        model.run(&mut rng, 10, 2, &mut disks);
        let token = send_epoch(&mut t, &mut model, &mut disks, EpochId(1));
        wait(&t, token);
        assert_standby(&backup, &model, EpochId(1));

        // Once the first primary is gone, another one gets in, and learns where the standby is.
        drop(t);
        wait_stats(&backup, "the session to end", |s| s.connected.is_none());
        let t2 = connect(backup.local_addr(), &model);
        let info = t2.peer_standby();
        assert_eq!((info.committed, info.restorable), (Some(EpochId(1)), true));
    }

    over_each_link_io!(
        idle_primary => an_idle_primary_is_dropped_unless_it_sends_heartbeats,
        an_idle_primary_over_io_uring,
        an_idle_primary_over_io_uring_zero_copy
    );

    /// A primary that sends nothing for the link timeout is dropped; heartbeats keep an idle link up.
    fn idle_primary(io: LinkIo) {
        init_tracing();
        let mut rng = Rng(15);
        let mut model = Model::new(&mut rng, MIB, 256 << 10);
        let disk = TempPath::new("idle");
        let mut cfg = receiver_config(&model, &disk);
        cfg.link_timeout = Duration::from_millis(300);
        let backup = BackupReceiver::bind(cfg).unwrap();
        let mut t = connect_io(backup.local_addr(), &model, io);
        let token = full_sync(&mut t, &mut model, EpochId(0));
        wait(&t, token);
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(100));
            t.heartbeat().unwrap();
        }
        assert!(backup.stats().connected.is_some(), "heartbeats kept the link up");
        let before = backup.stats();
        let s = wait_stats(&backup, "the idle session to be dropped", |s| s.connected.is_none());
        assert!(s.last_error.unwrap_or_default().contains("I/O failed"));
        assert_eq!((s.committed, s.epochs_discarded), (Some(EpochId(0)), before.epochs_discarded));
        let err = t.wait_ack(token, Instant::now() + Duration::from_secs(5));
        assert_eq!(err.unwrap(), EpochId(0), "an old token still reads the last acknowledgement");
        // The primary learns of it too (its acknowledgement thread sees the link close).
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.heartbeat().is_ok() {
            assert!(Instant::now() < deadline, "the primary never noticed the dropped link");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A primary whose memory or disk size differs from the standby's is stopped at connect.
    #[test]
    fn size_mismatches_are_caught_at_connect() {
        init_tracing();
        let mut rng = Rng(12);
        let model = Model::new(&mut rng, MIB, 256 << 10);
        let (backup, _disk) = start_backup(&model, "sizes");
        let mut opts = options(&model);
        opts.memory_bytes = Some(2 * MIB as u64);
        let err = TcpTransport::connect(backup.local_addr(), SECRET, &opts).unwrap_err();
        assert!(matches!(err, ConnectError::MemoryMismatch { .. }), "{err}");
        wait_stats(&backup, "the session to end", |s| s.connected.is_none());
        let mut opts = options(&model);
        opts.disk_bytes = Some(512);
        let err = TcpTransport::connect(backup.local_addr(), SECRET, &opts).unwrap_err();
        assert!(matches!(err, ConnectError::DiskMismatch { .. }), "{err}");
    }

    /// A backup whose KVM lacks a CPU feature the guest sees (here: SSE2 masked off this host's
    /// capabilities, the test knob of `ftvm backup`) cannot resume the guest: it is refused at
    /// connect with the reason, for good; the same backup without the mask pairs.
    #[test]
    fn a_backup_lacking_a_cpu_feature_is_refused_at_connect() {
        use ftvm_proto::cpu::{CpuidReg, CpuidWord, Incompatibility};
        init_tracing();
        let mut rng = Rng(16);
        let mut model = Model::new(&mut rng, MIB, 256 << 10);
        let needs = ftvm_vmm::compat::guest_cpu_needs().unwrap();
        let mut opts = options(&model);
        opts.cpu_needs = Some(needs);

        let sse2 = CpuidWord::new(1, 0, CpuidReg::Edx);
        let disk = TempPath::new("cpu-masked");
        let mut cfg = receiver_config(&model, &disk);
        let mut caps = ftvm_vmm::compat::host_cpu_caps().unwrap();
        caps.mask_bit(sse2, 26);
        cfg.cpu_caps = Some(caps);
        let backup = BackupReceiver::bind(cfg).unwrap();
        let err = TcpTransport::connect(backup.local_addr(), SECRET, &opts).unwrap_err();
        assert!(
            matches!(err, ConnectError::CpuIncompatible(Incompatibility::CpuidBit { word, bit: 26 }) if word == sse2),
            "{err:?}"
        );
        assert!(!err.is_transient(), "retrying will not help");
        let text = ftvm_repl::ErrorChain(&err).to_string();
        assert!(text.contains("CPUID.01H:EDX bit 26 (sse2) is not offered by the backup's KVM"), "{text}");
        drop(backup);

        // The same host unmasked: compatible, it pairs and takes epochs.
        let (backup, _disk) = start_backup(&model, "cpu-whole");
        let mut t = TcpTransport::connect(backup.local_addr(), SECRET, &opts).unwrap();
        let token = full_sync(&mut t, &mut model, EpochId(0));
        assert_eq!(wait(&t, token), EpochId(0));
    }

    /// A backup of an older build speaking protocol 1.`minor` by hand: it answers the lease term
    /// with its standby information (and, from 1.3, default CPU capabilities), then returns the
    /// kinds of every frame it gets until the link closes.
    fn spawn_old_backup(
        model: &Model,
        minor: u8,
    ) -> (std::net::SocketAddr, ftvm_proto::epoch::StandbyInfo, std::thread::JoinHandle<Vec<ftvm_proto::frame::FrameKind>>) {
        use ftvm_proto::frame::FrameKind;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let info = ftvm_proto::epoch::StandbyInfo {
            committed: None,
            restorable: false,
            memory_bytes: model.mem.len() as u64,
            disk_bytes: model.disk.len() as u64,
        };
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut io = &stream;
            let mut s = ftvm_proto::handshake::respond_with_minor(&mut io, SECRET, minor).unwrap();
            assert_eq!(s.minor, minor);
            assert_eq!(s.opener.read(&mut io).unwrap().header.kind, FrameKind::LeaseTerm);
            s.sealer.write(&mut io, FrameKind::StandbyInfo, 0, 0, &[&info.encode()]).unwrap();
            if minor >= 3 {
                let caps = ftvm_proto::cpu::HostCpuCaps::default().encode();
                s.sealer.write(&mut io, FrameKind::HostCpu, 0, 0, &[&caps]).unwrap();
            }
            if minor >= 5 {
                let marks = ftvm_proto::epoch::DiskMarks::unknown(1 << 20).encode();
                s.sealer.write(&mut io, FrameKind::DiskMarks, 0, 0, &[&marks]).unwrap();
                s.sealer.write(&mut io, FrameKind::StandbyDigest, 0, 0, &[&[0u8; 32]]).unwrap();
            }
            let mut kinds = Vec::new();
            while let Ok(f) = s.opener.read(&mut io) {
                kinds.push(f.header.kind);
            }
            kinds
        });
        (addr, info, thread)
    }

    /// A 1.2 backup sends no CPU capabilities: the primary cannot check, warns, and pairs; a 1.2
    /// primary gets the standby information alone from this build's backup.
    #[test]
    fn a_protocol_1_2_peer_still_pairs() {
        use ftvm_proto::frame::FrameKind;
        use ftvm_proto::handshake;
        init_tracing();
        let mut rng = Rng(17);
        let model = Model::new(&mut rng, MIB, 256 << 10);
        let mut opts = options(&model);
        opts.cpu_needs = Some(ftvm_vmm::compat::guest_cpu_needs().unwrap());

        let (addr, info, old_backup) = spawn_old_backup(&model, 2);
        let t = TcpTransport::connect(addr, SECRET, &opts).unwrap();
        assert_eq!(t.peer_standby(), info);
        drop(t);
        old_backup.join().unwrap();

        // This build's backup answers a 1.2 primary with its standby information, then waits for
        // epochs (no HostCpu frame, which a 1.2 primary would not know).
        let (backup, _disk) = start_backup(&model, "old-primary");
        let stream = std::net::TcpStream::connect(backup.local_addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut io = &stream;
        let s = handshake::initiate_with_version(&mut io, SECRET, ftvm_proto::frame::PROTOCOL_MAJOR, 2).unwrap();
        assert_eq!(s.minor, 2);
        let (mut sealer, mut opener) = (s.sealer, s.opener);
        sealer.write(&mut io, FrameKind::LeaseTerm, 0, 0, &[&0u64.to_le_bytes()]).unwrap();
        assert_eq!(opener.read(&mut io).unwrap().header.kind, FrameKind::StandbyInfo);
        assert!(opener.read(&mut io).is_err(), "nothing follows the standby information in 1.2");
    }

    /// A 1.3 backup pairs with this build (the lower minor wins), and a switchover to it is refused
    /// before anything is sent: 1.3 has no handover.
    #[test]
    fn a_protocol_1_3_backup_pairs_and_a_switchover_to_it_is_refused() {
        use ftvm_proto::frame::FrameKind;
        use ftvm_repl::transport::HandOverError;
        init_tracing();
        let mut rng = Rng(19);
        let model = Model::new(&mut rng, MIB, 256 << 10);
        let (addr, _info, old_backup) = spawn_old_backup(&model, 3);
        let mut t = TcpTransport::connect(addr, SECRET, &options(&model)).unwrap();
        let err = t.hand_over(EpochId(7)).unwrap_err();
        assert!(matches!(err, HandOverError::Unsupported(3)), "{err}");
        assert_eq!(err.to_string(), "The backup speaks protocol 1.3, which has no switchover (1.4 and later)");
        drop(t);
        assert!(!old_backup.join().unwrap().contains(&FrameKind::Handover));
    }

    /// A 1.4 backup sends no write-intent marks: it pairs, and the primary knows to copy it the
    /// whole disk; this build's backup sends its marks to a 1.5 primary.
    #[test]
    fn a_protocol_1_4_backup_pairs_without_marks_and_a_1_5_one_sends_them() {
        init_tracing();
        let mut rng = Rng(23);
        let model = Model::new(&mut rng, MIB, 256 << 10);
        let (addr, _info, old_backup) = spawn_old_backup(&model, 4);
        let t = TcpTransport::connect(addr, SECRET, &options(&model)).unwrap();
        assert_eq!(t.peer_disk_marks(), None, "a 1.4 backup gets the whole disk");
        drop(t);
        old_backup.join().unwrap();

        let (addr, _info, backup) = spawn_old_backup(&model, 5);
        let t = TcpTransport::connect(addr, SECRET, &options(&model)).unwrap();
        assert_eq!(t.peer_disk_marks(), Some(ftvm_proto::epoch::DiskMarks::unknown(1 << 20)));
        drop(t);
        backup.join().unwrap();
    }

    /// A receiver started from the VM its host handed over holds that epoch, restorable, and names
    /// its state's digest and its disk's marks to the primary; the memory it kept is the standby's.
    #[test]
    fn a_receiver_keeping_a_handed_over_vm_announces_it() {
        use ftvm_repl::backup::standby::{KeptStandby, StandbyMemory};
        init_tracing();
        let mut rng = Rng(29);
        let model = Model::new(&mut rng, MIB, 256 << 10);
        let disk = TempPath::new("kept");
        let mut memory = StandbyMemory::new(model.mem.len()).unwrap();
        memory.as_mut_slice().copy_from_slice(&model.mem);
        let state = b"the final epoch's machine state".to_vec();
        let kept = KeptStandby { epoch: EpochId(41), state: state.clone(), memory };
        let backup = BackupReceiver::bind_keeping(receiver_config(&model, &disk), Some(kept)).unwrap();
        let t = connect(backup.local_addr(), &model);
        let info = t.peer_standby();
        assert_eq!((info.committed, info.restorable), (Some(EpochId(41)), true));
        assert_eq!(t.peer_standby_digest(), Some(*blake3::hash(&state).as_bytes()));
        drop(t);
        let view = backup.committed().expect("a restorable standby");
        assert_eq!(view.epoch(), EpochId(41));
        assert_eq!(view.memory(), &model.mem[..]);
        drop(view);

        // Kept memory of another size is not used: the standby starts blank.
        let other = StandbyMemory::new(model.mem.len() / 2).unwrap();
        let kept = KeptStandby { epoch: EpochId(41), state, memory: other };
        let disk2 = TempPath::new("kept-other");
        let backup = BackupReceiver::bind_keeping(receiver_config(&model, &disk2), Some(kept)).unwrap();
        let t = connect(backup.local_addr(), &model);
        assert_eq!((t.peer_standby().committed, t.peer_standby_digest()), (None, None));
    }

    #[test]
    fn the_receiver_does_not_listen_everywhere_by_default() {
        let disk = TempPath::new("unspecified");
        let cfg = ReceiverConfig::new("0.0.0.0:0".parse().unwrap(), SECRET, 1 << 20, disk.0.clone(), 1 << 20);
        assert!(matches!(BackupReceiver::bind(cfg.clone()), Err(BindError::Unspecified(_))));
        let cfg = ReceiverConfig { listen: "127.0.0.1:0".parse().unwrap(), secret: b"short".to_vec(), ..cfg };
        assert!(matches!(BackupReceiver::bind(cfg.clone()), Err(BindError::WeakSecret)));
        let cfg = ReceiverConfig { secret: SECRET.to_vec(), memory_bytes: 1000, ..cfg };
        assert!(matches!(BackupReceiver::bind(cfg), Err(BindError::MemorySize(1000))));
    }

    over_each_link_io!(
        lost_backup => a_lost_backup_is_an_error_not_a_hang,
        a_lost_backup_over_io_uring_is_an_error_not_a_hang,
        a_lost_backup_over_io_uring_zero_copy_is_an_error_not_a_hang
    );

    /// The backup going away is an error the primary sees promptly, on every path: never a hang.
    fn lost_backup(io: LinkIo) {
        init_tracing();
        let mut rng = Rng(13);
        let mut model = Model::new(&mut rng, MIB, 256 << 10);
        let mut disks = MemoryDiskReplicator::new(model.disk.len() as u64, 64 * MIB as u64);
        // A backup that takes everything and acknowledges nothing, then dies.
        let fake = FakeBackup::start(&model, true);
        let mut t = connect_io(fake.addr, &model, io);
        let down = Arc::new(Mutex::new(None));
        {
            let down = Arc::clone(&down);
            t.set_ack_listener(Box::new(move |e| {
                if let AckEvent::LinkDown { reason } = e {
                    *down.lock().unwrap() = Some(reason);
                }
            }));
        }
        let sync = full_sync(&mut t, &mut model, EpochId(0));
        model.run(&mut rng, 10, 1, &mut disks);
        let token = send_epoch(&mut t, &mut model, &mut disks, EpochId(1));
        let err = t.wait_ack(token, Instant::now() + Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, WaitAckError::TimedOut { .. }), "{err}");
        fake.vanish();
        let started = Instant::now();
        let err = t.wait_ack(sync, Instant::now() + Duration::from_secs(10)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "noticed in {:?}", started.elapsed());
        assert!(matches!(err, WaitAckError::Link { epoch: EpochId(0), .. }), "{err}");
        assert!(down.lock().unwrap().is_some(), "the listener heard about it");
        // The engine requeues the unacknowledged writes; nothing is lost.
        assert_eq!(disks.requeue_unacked(), 1);
        // Every later call fails at once.
        let begin = EpochBegin { epoch: EpochId(2), state_len: 1, ..EpochBegin::default() };
        assert!(matches!(t.begin_epoch(&begin), Err(BeginEpochError::Link(_))));
    }

    over_each_link_io!(
        stopped_reader => a_backup_that_stops_reading_makes_writes_time_out,
        a_backup_that_stops_reading_makes_io_uring_writes_time_out,
        a_backup_that_stops_reading_makes_io_uring_zero_copy_writes_time_out
    );

    /// A backup that stops reading: the primary's write times out instead of blocking forever.
    fn stopped_reader(io: LinkIo) {
        init_tracing();
        let mut rng = Rng(14);
        let mut model = Model::new(&mut rng, 64 * MIB, 256 << 10);
        let fake = FakeBackup::start(&model, false);
        let mut opts = options_io(&model, io);
        opts.write_timeout = Duration::from_millis(200);
        let mut t = TcpTransport::connect(fake.addr, SECRET, &opts).unwrap();
        let begin = EpochBegin { epoch: EpochId(0), page_count: model.pages(), initial_sync: true, ..EpochBegin::default() };
        t.begin_epoch(&begin).unwrap();
        let mut all = PageRangeSet::new();
        all.insert(0, model.pages());
        let started = Instant::now();
        let err = t.send_pages(&all, &FlatMemory(&model.mem)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "gave up after {:?}", started.elapsed());
        assert!(matches!(err, SendPagesError::Link(LinkError::WriteTimedOut)), "{err}");
        assert!(matches!(t.commit(EpochId(0)), Err(CommitError::Incomplete { .. }) | Err(CommitError::Link(_))));
        model.dirty.clear();
        fake.vanish();
    }

    over_each_link_io!(
        pages_changed_after_commit => pages_may_change_once_commit_returns,
        pages_may_change_once_an_io_uring_commit_returns,
        pages_may_change_once_a_zero_copy_commit_returns
    );

    /// The zero-copy invariant ends when `commit` returns: an epoch far larger than the socket
    /// buffers, whose every page is overwritten the moment `commit` returns, still reaches the
    /// backup as it was sealed (a zero-copy commit waits until the kernel is done with the pages;
    /// were it not to, the kernel would send the new bytes, and the backup would refuse the frame).
    fn pages_changed_after_commit(io: LinkIo) {
        let SyncedPair { mut rng, mut model, mut disks, backup, mut t, disk: _disk } = synced_pair(31, 64 * MIB, MIB, "after-commit", io);
        for e in 1..=3u64 {
            // Half of memory, new contents, in one epoch: 32 MiB against 4 MiB socket buffers.
            let half = model.pages() / 2;
            model.dirty.insert(0, half);
            let sent = rng.bytes(half as usize * PAGE_SIZE);
            model.mem[..sent.len()].copy_from_slice(&sent);
            let token = send_epoch(&mut t, &mut model, &mut disks, EpochId(e));
            // The guest runs again at once, writing every page the epoch carried (one memset:
            // faster than the link drains, so pages still queued in the kernel would be hit).
            model.mem[..sent.len()].fill(0xa5);
            assert_eq!(wait(&t, token), EpochId(e));
            model.mem[..sent.len()].copy_from_slice(&sent);
            assert_standby(&backup, &model, EpochId(e));
        }
    }

    /// Figures, printed (run with --nocapture; meaningful in release builds), for each way of
    /// writing to the link: throughput of a full synchronisation, then epochs of 1000 scattered
    /// dirty pages of a flat 64 MiB memory (1000 epochs in release builds, 200 in debug): time,
    /// round trip, and CPU per epoch of the sending thread and of the whole process (which also
    /// runs the backup).
    #[test]
    fn measure_loopback_throughput_and_epoch_round_trip() {
        init_tracing();
        let epochs = if cfg!(debug_assertions) { 200 } else { 1000 };
        for io in ALL_IO {
            measure_link(io, epochs);
        }
    }

    fn measure_link(io: LinkIo, epochs: u64) {
        let mut rng = Rng(99);
        let mut model = Model::new(&mut rng, 64 * MIB, MIB);
        let disk = TempPath::new("measure");
        let mut cfg = receiver_config(&model, &disk);
        cfg.disk_sync = DiskSync::NoSync;
        let backup = BackupReceiver::bind(cfg).unwrap();
        let mut t = connect_io(backup.local_addr(), &model, io);
        let name = io.name();

        let started = Instant::now();
        let token = full_sync(&mut t, &mut model, EpochId(0));
        wait(&t, token);
        let sync = started.elapsed();
        let mb = (model.mem.len() + model.disk.len()) as f64 / 1e6;
        println!("[{name}] full sync: {mb:.0} MB in {:.1} ms = {:.0} MB/s", sync.as_secs_f64() * 1e3, mb / sync.as_secs_f64());

        let mut disks = MemoryDiskReplicator::new(model.disk.len() as u64, 64 * MIB as u64);
        let mut rtts = Vec::with_capacity(epochs as usize);
        let mut bytes = 0u64;
        let (thread_before, process_before) = cpu_times();
        let total = Instant::now();
        for e in 1..=epochs {
            // 1000 scattered pages; the page contents are not changed here, so the figure is the link's.
            let mut dirty = PageRangeSet::new();
            while dirty.page_count() < 1000 {
                dirty.insert(rng.below(model.pages()), 1);
            }
            model.dirty = dirty;
            let started = Instant::now();
            let token = send_epoch(&mut t, &mut model, &mut disks, EpochId(e));
            wait(&t, token);
            rtts.push(started.elapsed());
            bytes += 1000 * PAGE_SIZE as u64;
        }
        let total = total.elapsed();
        let (thread_after, process_after) = cpu_times();
        rtts.sort();
        let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
        let per_epoch = |d: Duration| d.as_secs_f64() * 1e3 / epochs as f64;
        println!(
            "[{name}] 1000 dirty pages/epoch, {epochs} epochs in {:.2} s: {:.0} epochs/s, {:.0} MB/s of pages; round trip p50 {:?} p99 {:?} max {:?}; CPU per epoch: sender thread {:.3} ms, process {:.3} ms",
            total.as_secs_f64(),
            epochs as f64 / total.as_secs_f64(),
            bytes as f64 / total.as_secs_f64() / 1e6,
            pct(50),
            pct(99),
            rtts[rtts.len() - 1],
            per_epoch(thread_after - thread_before),
            per_epoch(process_after - process_before),
        );
        let stats = backup.stats();
        assert_eq!(stats.committed, Some(EpochId(epochs)));

        // The floor: epochs that carry only a 300-byte machine state.
        let mut floor = Vec::with_capacity(200);
        for e in epochs + 1..=epochs + 200 {
            let started = Instant::now();
            let token = send_epoch(&mut t, &mut model, &mut disks, EpochId(e));
            wait(&t, token);
            floor.push(started.elapsed());
        }
        floor.sort();
        println!(
            "[{name}] state-only epochs: round trip p50 {:?} p99 {:?}",
            floor[floor.len() / 2],
            floor[(floor.len() * 99 / 100).min(floor.len() - 1)]
        );
    }

    /// CPU time (user and system) used so far by the calling thread, and by the whole process.
    fn cpu_times() -> (Duration, Duration) {
        let used = |who: libc::c_int| {
            // SAFETY: all-zero is a valid rusage (integers and timevals).
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: getrusage writes one rusage into `u`, which lives across the call.
            assert_eq!(unsafe { libc::getrusage(who, &mut u) }, 0);
            let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
            tv(u.ru_utime) + tv(u.ru_stime)
        };
        (used(libc::RUSAGE_THREAD), used(libc::RUSAGE_SELF))
    }
}
