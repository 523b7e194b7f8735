//! The RDMA A-Link end to end without a device: a hand-driven primary ([`RawPrimary`] on the TCP
//! control link, [`RdmaPrimary`] for the pages) and a real [`BackupReceiver`] whose staging ring
//! is written by a simulated NIC (the test-only `bind_with_simulated_rdma`). Everything after the
//! queue pair exchange is the production path on both sides: the ring plan, the copy into the
//! mirror, the descriptors, the receiver's checks, the copy out of the ring, the hash check and
//! the apply. And the refusals: a torn write, descriptors outside the ring or overlapping, RDMA
//! frames where they have no place, a backup without RDMA.

mod common;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::common::*;
    use ftvm_proto::epoch::{self as wire, EpochBegin, EpochCommit, EpochDigest};
    use ftvm_proto::frame::FrameKind;
    use ftvm_proto::pages::PageRange;
    use ftvm_proto::rdma::{RdmaEndpoint, RdmaPages};
    use ftvm_proto::EpochId;
    use ftvm_repl::backup::{BackupReceiver, BindError, ReceiverStats};
    use ftvm_repl::disk::{DiskReplicator, DiskWrite, MemoryDiskReplicator};
    use ftvm_repl::transport::rdma::backup::StagingRing;
    use ftvm_repl::transport::rdma::exchange::primary_accepts;
    use ftvm_repl::transport::rdma::plan::WorkRequest;
    use ftvm_repl::transport::rdma::primary::{RdmaPrimary, RemoteWriter};
    use ftvm_repl::transport::rdma::{RdmaIoError, RdmaOptions};
    use ftvm_repl::transport::FlatMemory;
    use ftvm_repl::{ErrorChain, PAGE_SIZE};

    /// 2 MiB of guest memory (512 pages) against a 1 MiB ring (256 pages, the smallest a backup
    /// may grant): epochs wrap around the ring, and one larger than it goes by TCP.
    const MEM: usize = 2 << 20;
    const DISK: usize = 256 << 10;
    const RING: u64 = 1 << 20;
    const GOOD: EpochId = EpochId(3);
    const NEXT: EpochId = EpochId(4);

    /// The NIC of the test: posted writes land in the backup's ring when the primary settles
    /// them, as a real NIC's have completed by then.
    #[derive(Debug)]
    struct SimulatedNic {
        ring: Arc<StagingRing>,
        mirror: Vec<u8>,
        pending: Vec<WorkRequest>,
    }

    impl RemoteWriter for SimulatedNic {
        fn mirror(&mut self) -> &mut [u8] {
            &mut self.mirror
        }
        fn max_sge(&self) -> usize {
            2
        }
        fn post(&mut self, wr: &WorkRequest) -> Result<(), RdmaIoError> {
            self.pending.push(wr.clone());
            Ok(())
        }
        fn settle(&mut self, _timeout: Duration) -> Result<(), RdmaIoError> {
            for wr in self.pending.drain(..) {
                let mut at = wr.remote;
                for s in &wr.segments {
                    let bytes = &self.mirror[s.local as usize..(s.local + s.len) as usize];
                    // SAFETY: the receiver reads the ring only after the epoch's EpochCommit,
                    // which the test sends after this returns.
                    unsafe { self.ring.simulate_nic_write(at, bytes) }.map_err(|_| RdmaIoError::Reservation)?;
                    at += s.len;
                }
            }
            Ok(())
        }
        fn device(&self) -> &str {
            "simulated"
        }
    }

    /// The primary's queue pair as it would announce it (RoCE: no LID, a GID).
    fn primary_endpoint() -> RdmaEndpoint {
        RdmaEndpoint { qpn: 0x77, psn: 5, lid: 0, mtu: 5, gid: [0xfe; 16], ring: None }
    }

    /// A primary on the TCP control link and its RDMA half, after the exchange.
    struct RdmaLink {
        raw: RawPrimary,
        rdma: RdmaPrimary,
        acked: Option<EpochId>,
    }

    impl RdmaLink {
        /// Connects, sends the primary's endpoint and checks the backup's answer as `TcpTransport`
        /// does: the ring the backup granted is the one the simulated NIC writes into.
        fn connect(backup: &BackupReceiver, ring: &Arc<StagingRing>) -> Self {
            let mut raw = RawPrimary::connect(backup.local_addr());
            let local = primary_endpoint();
            let (f, _) = raw.seal(FrameKind::RdmaEndpoint, 0, &[&local.encode()]);
            raw.write(&f);
            let answer = raw.read().expect("the backup's endpoint");
            assert_eq!(answer.header.kind, FrameKind::RdmaEndpoint, "{}", String::from_utf8_lossy(&answer.payload));
            let peer = RdmaEndpoint::decode(&answer.payload).unwrap();
            let (_, grant) = primary_accepts(&local, &peer, 64 << 20).unwrap();
            assert_eq!((grant.addr, grant.bytes), (ring.as_mut_ptr() as u64, ring.bytes()));
            let nic = SimulatedNic { ring: Arc::clone(ring), mirror: vec![0; grant.bytes as usize], pending: Vec::new() };
            Self { raw, rdma: RdmaPrimary::new(Box::new(nic), grant.bytes), acked: None }
        }

        /// The frames of one incremental epoch, its pages through the ring when the ring takes
        /// them (by Pages frames otherwise). `tear` sees the descriptors once the writes have
        /// landed, before the commit is sealed. Returns the bytes and whether RDMA carried the
        /// pages.
        fn epoch(&mut self, epoch: EpochId, model: &Model, writes: &[DiskWrite], tear: impl FnOnce(&[RdmaPages])) -> (Vec<u8>, bool) {
            let e = epoch.0;
            let mut out = Vec::new();
            let mut digest = EpochDigest::new(epoch);
            let mut push = |raw: &mut RawPrimary, kind: FrameKind, pieces: &[&[u8]]| {
                let (f, tag) = raw.seal(kind, e, pieces);
                digest.add_frame(&tag);
                out.extend_from_slice(&f);
            };
            let begin = EpochBegin {
                epoch,
                page_count: model.dirty.page_count(),
                state_len: model.state.len() as u64,
                disk_write_count: writes.len() as u64,
                disk_image_bytes: 0,
                initial_sync: false,
            };
            push(&mut self.raw, FrameKind::EpochBegin, &[&begin.encode()]);
            let by_rdma = self.rdma.begin(&begin, self.acked);
            let mut descs = Vec::new();
            if by_rdma {
                descs = self.rdma.write_pages(&model.dirty, &FlatMemory(&model.mem)).unwrap();
                for d in &descs {
                    push(&mut self.raw, FrameKind::RdmaPages, &[&d.encode()]);
                }
            } else {
                for ranges in wire::page_frames(&model.dirty, 64) {
                    let mut head = Vec::new();
                    wire::encode_pages_head(&ranges, &mut head);
                    let mut pieces: Vec<&[u8]> = vec![&head];
                    for r in &ranges {
                        pieces.push(&model.mem[r.start as usize * PAGE_SIZE..(r.start + r.len) as usize * PAGE_SIZE]);
                    }
                    push(&mut self.raw, FrameKind::Pages, &pieces);
                }
            }
            push(&mut self.raw, FrameKind::MachineState, &[&model.state]);
            if !writes.is_empty() {
                let mut head = Vec::new();
                wire::encode_disk_writes_head(writes, &mut head);
                let mut pieces: Vec<&[u8]> = vec![&head];
                pieces.extend(writes.iter().map(|w| &w.data[..]));
                push(&mut self.raw, FrameKind::DiskWrites, &pieces);
            }
            if by_rdma {
                self.rdma.commit(Duration::from_secs(1)).unwrap();
            }
            tear(&descs);
            let commit = EpochCommit {
                epoch,
                pages: begin.page_count,
                state_bytes: begin.state_len,
                disk_writes: begin.disk_write_count,
                disk_image_bytes: 0,
                digest: digest.finish(),
            };
            let (f, _) = self.raw.seal(FrameKind::EpochCommit, e, &[&commit.encode()]);
            out.extend_from_slice(&f);
            (out, by_rdma)
        }

        /// Sends the frames and waits for their epoch's acknowledgement.
        fn send_acked(&mut self, epoch: EpochId, frames: &[u8]) {
            self.raw.write(frames);
            let f = self.raw.read().expect("an acknowledgement");
            assert_eq!(f.header.kind, FrameKind::EpochAck, "{}", String::from_utf8_lossy(&f.payload));
            assert_eq!(f.header.epoch, epoch.0);
            self.acked = Some(epoch);
        }
    }

    /// A backup with a simulated RDMA ring, synchronised over plain TCP (a receiver with RDMA
    /// takes any primary), its first primary gone.
    struct Scene {
        rng: Rng,
        model: Model,
        disks: MemoryDiskReplicator,
        ring: Arc<StagingRing>,
        backup: BackupReceiver,
        _disk: TempPath,
    }

    impl Scene {
        fn new(tag: &str) -> Self {
            init_tracing();
            let mut rng = Rng(0x5eed ^ tag.len() as u64);
            let mut model = Model::new(&mut rng, MEM, DISK);
            let disks = MemoryDiskReplicator::new(DISK as u64, 64 << 20);
            let disk = TempPath::new(tag);
            let ring = Arc::new(StagingRing::new(RING).unwrap());
            let backup = BackupReceiver::bind_with_simulated_rdma(receiver_config(&model, &disk), Arc::clone(&ring)).unwrap();
            let mut t = connect(backup.local_addr(), &model);
            let token = full_sync(&mut t, &mut model, EpochId(0));
            wait(&t, token);
            drop(t);
            wait_stats(&backup, "the synchronising primary to leave", |s| s.connected.is_none());
            assert_standby(&backup, &model, EpochId(0));
            Self { rng, model, disks, ring, backup, _disk: disk }
        }

        /// Epochs `first..=last` by RDMA (or TCP when the ring cannot take one), each acknowledged
        /// and checked byte for byte. Returns how many went by RDMA.
        fn run_epochs(&mut self, link: &mut RdmaLink, first: u64, last: u64, pages: impl Fn(u64) -> u64) -> u64 {
            let mut by_rdma = 0;
            for e in first..=last {
                let epoch = EpochId(e);
                self.model.run(&mut self.rng, pages(e), 2, &mut self.disks);
                let writes = self.disks.seal(epoch).unwrap();
                let (frames, rdma) = link.epoch(epoch, &self.model, &writes, |_| {});
                link.send_acked(epoch, &frames);
                self.disks.commit(epoch).unwrap();
                self.model.dirty.clear();
                assert_standby(&self.backup, &self.model, epoch);
                by_rdma += u64::from(rdma);
            }
            by_rdma
        }

        /// Up to GOOD by RDMA; the primary leaves.
        fn at_good(tag: &str) -> Self {
            let mut scene = Self::new(tag);
            let mut link = RdmaLink::connect(&scene.backup, &scene.ring);
            assert_eq!(scene.run_epochs(&mut link, 1, GOOD.0, |_| 20), GOOD.0);
            drop(link);
            wait_stats(&scene.backup, "the primary to leave", |s| s.connected.is_none());
            scene
        }

        /// Waits until the receiver dropped the session, checks why, and that nothing of the
        /// epoch was applied.
        fn expect_dropped(&self, before: &ReceiverStats, reason: &str, good: &Model) {
            let s = wait_stats(&self.backup, "the session to be dropped", |s| s.sessions_ended > before.sessions_ended && s.connected.is_none());
            let err = s.last_error.unwrap_or_default();
            assert!(err.contains(reason), "dropped for {err:?}, expected {reason:?}");
            assert_eq!(s.committed, Some(GOOD));
            assert_eq!(s.epochs_committed, before.epochs_committed, "nothing was applied");
            assert_standby(&self.backup, good, GOOD);
        }

        /// A correct primary carries on from GOOD: the refused epoch's pages are still dirty and
        /// its disk writes requeued.
        fn recover(mut self) {
            self.disks.requeue_unacked();
            if self.model.dirty.page_count() == 0 {
                self.model.run(&mut self.rng, 30, 2, &mut self.disks);
            }
            let mut link = RdmaLink::connect(&self.backup, &self.ring);
            let writes = self.disks.seal(NEXT).unwrap();
            let (frames, rdma) = link.epoch(NEXT, &self.model, &writes, |_| {});
            assert!(rdma);
            link.send_acked(NEXT, &frames);
            self.disks.commit(NEXT).unwrap();
            assert_standby(&self.backup, &self.model, NEXT);
        }
    }

    /// The backup's refusal: a goodbye that says why, then the link closes.
    fn expect_goodbye(raw: &mut RawPrimary, reason: &str) {
        let f = raw.read().unwrap_or_else(|e| panic!("the link closed without a goodbye: {e}"));
        let text = String::from_utf8_lossy(&f.payload).into_owned();
        assert_eq!(f.header.kind, FrameKind::Goodbye, "the receiver answered with {:?} ({text})", f.header.kind);
        assert!(text.contains("refused") && text.contains(reason), "goodbye {text:?}, expected {reason:?}");
    }

    #[test]
    fn pages_go_through_the_ring_across_wraps_and_a_large_epoch_goes_by_tcp() {
        let mut scene = Scene::new("rdma-wrap");
        let mut link = RdmaLink::connect(&scene.backup, &scene.ring);
        // 20 to 60 pages an epoch wrap the 256-page ring several times; epoch 9 dirties more
        // pages than the ring holds, so its pages go by Pages frames on the same session.
        let by_rdma = scene.run_epochs(&mut link, 1, 16, |e| if e == 9 { 500 } else { 20 + e * 5 % 41 });
        assert_eq!(by_rdma, 15, "every epoch but the large one by RDMA");
        let st = link.rdma.stats();
        assert_eq!((st.rdma_epochs, st.tcp_epochs), (15, 1));
        assert!(st.bytes > RING, "the ring wrapped: {st:?}");
        let s = scene.backup.stats();
        assert_eq!((s.committed, s.epochs_committed, s.epochs_discarded), (Some(EpochId(16)), 17, 0));
    }

    #[test]
    fn a_torn_write_is_refused_at_the_commit_and_the_standby_is_untouched() {
        let mut scene = Scene::at_good("rdma-torn");
        let good = scene.model.clone();
        scene.model.run(&mut scene.rng, 40, 3, &mut scene.disks);
        let writes = scene.disks.seal(NEXT).unwrap();
        let before = scene.backup.stats();
        let mut link = RdmaLink::connect(&scene.backup, &scene.ring);
        let ring = Arc::clone(&scene.ring);
        let model = &scene.model;
        let (frames, rdma) = link.epoch(NEXT, model, &writes, |descs| {
            // One byte of the last page of the first placement is not what was hashed: a write
            // torn, or overtaken by a late one.
            let d = &descs[0];
            let last = d.ranges.last().unwrap();
            let pfn = last.start + last.len - 1;
            let at = d.ring_offset + (d.page_count() - 1) * PAGE_SIZE as u64 + 100;
            let byte = !model.mem[pfn as usize * PAGE_SIZE + 100];
            // SAFETY: the receiver reads the ring only after the commit, sent after this.
            unsafe { ring.simulate_nic_write(at, &[byte]) }.unwrap();
        });
        assert!(rdma);
        link.raw.write(&frames);
        expect_goodbye(&mut link.raw, "do not match their hash");
        scene.expect_dropped(&before, "torn or stale RDMA write", &good);
        assert_eq!(scene.backup.stats().epochs_discarded, before.epochs_discarded + 1);
        drop(link);
        scene.recover();
    }

    /// One session that begins NEXT (2 pages announced) and sends `descs` as RdmaPages frames.
    fn send_descriptors(scene: &Scene, descs: &[RdmaPages]) -> RawPrimary {
        let mut link = RdmaLink::connect(&scene.backup, &scene.ring);
        let begin = EpochBegin { epoch: NEXT, page_count: 2, state_len: 8, ..EpochBegin::default() };
        let (mut out, _) = link.raw.seal(FrameKind::EpochBegin, NEXT.0, &[&begin.encode()]);
        for d in descs {
            out.extend(link.raw.seal(FrameKind::RdmaPages, NEXT.0, &[&d.encode()]).0);
        }
        link.raw.write(&out);
        link.raw
    }

    #[test]
    fn descriptors_outside_the_ring_overlapping_or_over_announced_are_refused() {
        let scene = Scene::at_good("rdma-desc");
        let good = scene.model.clone();
        let one = |offset: u64, start: u64, len: u64| RdmaPages { ring_offset: offset, hash: [7; 32], ranges: vec![PageRange { start, len }] };
        let cases: [(&str, Vec<RdmaPages>, &str); 4] = [
            ("past the end", vec![one(RING, 1, 1)], "outside the"),
            ("across the end", vec![one(RING - PAGE_SIZE as u64, 1, 2)], "outside the"),
            ("overlapping", vec![one(0, 1, 1), one(0, 5, 1)], "overlap an earlier placement"),
            ("more pages than announced", vec![one(0, 1, 3)], "more pages than the 2 announced"),
        ];
        for (what, descs, reason) in cases {
            let before = scene.backup.stats();
            let mut raw = send_descriptors(&scene, &descs);
            expect_goodbye(&mut raw, reason);
            drop(raw);
            scene.expect_dropped(&before, reason, &good);
            eprintln!("{what}: refused");
        }
        scene.recover();
    }

    #[test]
    fn rdma_frames_out_of_place_are_refused() {
        let scene = Scene::at_good("rdma-place");
        let good = scene.model.clone();
        let desc = RdmaPages { ring_offset: 0, hash: [1; 32], ranges: vec![PageRange { start: 1, len: 1 }] };

        // A descriptor on a session that did no exchange.
        let before = scene.backup.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let begin = EpochBegin { epoch: NEXT, page_count: 1, state_len: 8, ..EpochBegin::default() };
        let (mut out, _) = raw.seal(FrameKind::EpochBegin, NEXT.0, &[&begin.encode()]);
        out.extend(raw.seal(FrameKind::RdmaPages, NEXT.0, &[&desc.encode()]).0);
        raw.write(&out);
        expect_goodbye(&mut raw, "on a link without RDMA");
        drop(raw);
        scene.expect_dropped(&before, "on a link without RDMA", &good);

        // The exchange once an epoch has begun.
        let before = scene.backup.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let (mut out, _) = raw.seal(FrameKind::EpochBegin, NEXT.0, &[&begin.encode()]);
        out.extend(raw.seal(FrameKind::RdmaEndpoint, 0, &[&primary_endpoint().encode()]).0);
        raw.write(&out);
        expect_goodbye(&mut raw, "after the link's set-up");
        drop(raw);
        scene.expect_dropped(&before, "Unexpected RdmaEndpoint", &good);

        // A second exchange.
        let before = scene.backup.stats();
        let mut link = RdmaLink::connect(&scene.backup, &scene.ring);
        let (f, _) = link.raw.seal(FrameKind::RdmaEndpoint, 0, &[&primary_endpoint().encode()]);
        link.raw.write(&f);
        expect_goodbye(&mut link.raw, "after the link's set-up");
        drop(link);
        scene.expect_dropped(&before, "Unexpected RdmaEndpoint", &good);

        // An endpoint from the primary that offers a ring of its own.
        let before = scene.backup.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let mut bad = primary_endpoint();
        bad.ring = Some(ftvm_proto::rdma::RingGrant { addr: 1 << 30, rkey: 1, bytes: RING });
        let (f, _) = raw.seal(FrameKind::RdmaEndpoint, 0, &[&bad.encode()]);
        raw.write(&f);
        expect_goodbye(&mut raw, "The primary sent an endpoint with a staging ring");
        drop(raw);
        scene.expect_dropped(&before, "RDMA set-up failed", &good);

        // A descriptor in an initial synchronisation (its pages go straight into the standby,
        // so they must come by TCP). The standby is given up at the sync's begin, so this one
        // is checked on its own receiver.
        let fresh = Scene::new("rdma-sync");
        let mut link = RdmaLink::connect(&fresh.backup, &fresh.ring);
        let sync = EpochBegin { epoch: EpochId(7), page_count: 1, state_len: 8, initial_sync: true, ..EpochBegin::default() };
        let (mut out, _) = link.raw.seal(FrameKind::EpochBegin, 7, &[&sync.encode()]);
        out.extend(link.raw.seal(FrameKind::RdmaPages, 7, &[&desc.encode()]).0);
        link.raw.write(&out);
        expect_goodbye(&mut link.raw, "in an initial synchronisation");
        drop(link);
        let s = wait_stats(&fresh.backup, "the session to be dropped", |s| s.sessions_ended == 2 && s.connected.is_none());
        assert!(s.last_error.unwrap_or_default().contains("in an initial synchronisation"));
        scene.recover();
    }

    #[test]
    fn a_backup_without_rdma_refuses_a_primary_that_asks_for_it() {
        init_tracing();
        let mut rng = Rng(11);
        let model = Model::new(&mut rng, MEM, DISK);
        let (backup, _disk) = start_backup(&model, "rdma-none");
        let mut raw = RawPrimary::connect(backup.local_addr());
        let (f, _) = raw.seal(FrameKind::RdmaEndpoint, 0, &[&primary_endpoint().encode()]);
        raw.write(&f);
        expect_goodbye(&mut raw, "This backup has no RDMA (--alink-rdma-device)");
        let s = wait_stats(&backup, "the session to be dropped", |s| s.sessions_ended == 1);
        assert!(s.last_error.unwrap_or_default().contains("no RDMA"));
    }

    /// A receiver asked for a device it cannot have does not start: in a build without the
    /// feature it names the feature; with it, on these machines (no RDMA), the missing device.
    #[test]
    fn a_receiver_asked_for_rdma_it_cannot_have_does_not_start() {
        let mut rng = Rng(12);
        let model = Model::new(&mut rng, 1 << 20, DISK);
        let disk = TempPath::new("rdma-bind");
        let mut cfg = receiver_config(&model, &disk);
        cfg.rdma = Some(RdmaOptions::new("mlx5_0"));
        let e = match BackupReceiver::bind(cfg) {
            Err(e) => e,
            Ok(_) => {
                eprintln!("an RDMA device mlx5_0 is present: skipped");
                return;
            }
        };
        assert!(matches!(e, BindError::Rdma { ref device, .. } if device == "mlx5_0"), "{e:?}");
        let text = ErrorChain(&e).to_string();
        if cfg!(feature = "rdma") {
            assert!(text.contains("mlx5_0"), "{text}");
        } else {
            assert!(text.contains("cargo feature `rdma`"), "{text}");
        }
    }
}
