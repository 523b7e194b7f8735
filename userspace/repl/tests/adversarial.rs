//! The backup under attack or breakage: every bad thing a link can carry ends the session, drops the
//! epoch being received, leaves the committed standby exactly at the last good epoch, and the
//! receiver then accepts a fresh, correct primary that continues from there.

mod common;

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{Shutdown, TcpStream};
    use std::time::Duration;

    use crate::common::*;
    use ftvm_proto::frame::{FrameKind, PROTOCOL_MAJOR};
    use ftvm_proto::handshake::{self, HandshakeError};
    use ftvm_proto::EpochId;
    use ftvm_repl::backup::{BackupReceiver, ReceiverStats};
    use ftvm_repl::ha::heartbeat::SessionEnd;
    use ftvm_repl::disk::{DiskReplicator, DiskWrite, MemoryDiskReplicator};
    use ftvm_proto::pages::PageRange;
    use ftvm_proto::epoch::{self as wire, EpochBegin};
    use ftvm_repl::PAGE_SIZE;
    use ftvm_repl::transport::tcp::TcpTransport;
    use ftvm_repl::transport::{CheckpointTransport, ConnectError};

    const GOOD: EpochId = EpochId(2);
    const NEXT: EpochId = EpochId(3);

    /// Runs `$body(uring)` as two tests: the backup reading the A-Link with plain reads (the
    /// test's historical name) and through io_uring. The attacks and their outcome are the same.
    macro_rules! with_each_reader {
        ($body:ident => $socket:ident, $uring:ident) => {
            #[test]
            fn $socket() {
                $body(false)
            }

            #[test]
            fn $uring() {
                $body(true)
            }
        };
    }

    with_each_reader!(a_connection_dying_mid_epoch_leaves_the_last_epoch => a_connection_dying_mid_epoch_leaves_the_last_epoch_reading_the_socket, a_connection_dying_mid_epoch_leaves_the_last_epoch_reading_through_io_uring);
    with_each_reader!(a_corrupted_byte_in_a_pages_frame_is_refused => a_corrupted_byte_in_a_pages_frame_is_refused_reading_the_socket, a_corrupted_byte_in_a_pages_frame_is_refused_reading_through_io_uring);
    with_each_reader!(a_truncated_frame_is_refused => a_truncated_frame_is_refused_reading_the_socket, a_truncated_frame_is_refused_reading_through_io_uring);
    with_each_reader!(replayed_frames_are_refused => replayed_frames_are_refused_reading_the_socket, replayed_frames_are_refused_reading_through_io_uring);
    with_each_reader!(a_handover_for_another_epoch_is_refused_and_the_right_one_answered => a_handover_for_another_epoch_is_refused_and_the_right_one_answered_reading_the_socket, a_handover_for_another_epoch_is_refused_and_the_right_one_answered_reading_through_io_uring);
    with_each_reader!(a_wrong_protocol_major_version_is_refused => a_wrong_protocol_major_version_is_refused_reading_the_socket, a_wrong_protocol_major_version_is_refused_reading_through_io_uring);
    with_each_reader!(a_peer_with_the_wrong_secret_is_refused_and_the_receiver_keeps_waiting => a_peer_with_the_wrong_secret_is_refused_and_the_receiver_keeps_waiting_reading_the_socket, a_peer_with_the_wrong_secret_is_refused_and_the_receiver_keeps_waiting_reading_through_io_uring);
    with_each_reader!(a_state_delta_applies_to_the_state_held_only => a_state_delta_applies_to_the_state_held_only_reading_the_socket, a_state_delta_applies_to_the_state_held_only_reading_through_io_uring);
    with_each_reader!(a_page_delta_applies_to_the_page_held_only => a_page_delta_applies_to_the_page_held_only_reading_the_socket, a_page_delta_applies_to_the_page_held_only_reading_through_io_uring);
    with_each_reader!(a_commit_whose_digest_or_totals_do_not_match_is_refused => a_commit_whose_digest_or_totals_do_not_match_is_refused_reading_the_socket, a_commit_whose_digest_or_totals_do_not_match_is_refused_reading_through_io_uring);
    with_each_reader!(frames_out_of_place_are_refused => frames_out_of_place_are_refused_reading_the_socket, frames_out_of_place_are_refused_reading_through_io_uring);
    with_each_reader!(malformed_input_sent_ahead_is_refused => malformed_input_sent_ahead_is_refused_reading_the_socket, malformed_input_sent_ahead_is_refused_reading_through_io_uring);

    /// A backup holding epoch 2 of a 1 MiB guest with a 256 KiB disk, its primary gone.
    struct Scene {
        rng: Rng,
        model: Model,
        disks: MemoryDiskReplicator,
        backup: BackupReceiver,
        _disk: TempPath,
    }

    impl Scene {
        fn new(tag: &str, uring: bool) -> Self {
            init_tracing();
            let mut rng = Rng(0xfeed ^ tag.len() as u64);
            let mut model = Model::new(&mut rng, 1 << 20, 256 << 10);
            let mut disks = MemoryDiskReplicator::new(model.disk.len() as u64, 64 << 20);
            let (backup, disk) = start_backup_reading(&model, tag, uring);
            let mut t = connect(backup.local_addr(), &model);
            let token = full_sync(&mut t, &mut model, EpochId(0));
            wait(&t, token);
            for e in 1..=GOOD.0 {
                model.run(&mut rng, 30, 3, &mut disks);
                let token = send_epoch(&mut t, &mut model, &mut disks, EpochId(e));
                wait(&t, token);
                disks.commit(EpochId(e)).unwrap();
            }
            assert_standby(&backup, &model, GOOD);
            drop(t);
            wait_stats(&backup, "the first primary to leave", |s| s.connected.is_none());
            Self { rng, model, disks, backup, _disk: disk }
        }

        /// The guest runs on: the next epoch's pages, state and disk writes. Returns the model as the
        /// backup must still hold it, and the writes sealed for the next epoch.
        fn next_epoch(&mut self) -> (Model, Vec<DiskWrite>) {
            let good = self.model.clone();
            self.model.run(&mut self.rng, 40, 4, &mut self.disks);
            let writes = self.disks.seal(NEXT).unwrap();
            (good, writes)
        }

        fn stats(&self) -> ReceiverStats {
            self.backup.stats()
        }

        /// Waits until the receiver has dropped the bad session, and checks why.
        fn expect_dropped(&self, before: &ReceiverStats, reason: &str) {
            // The bad session started after `before` was taken, and has ended.
            let s = wait_stats(&self.backup, "the bad session to be dropped", |s| s.sessions_ended > before.sessions_ended && s.connected.is_none());
            let err = s.last_error.unwrap_or_default();
            assert!(err.contains(reason), "dropped for {err:?}, expected {reason:?}");
            assert_eq!(s.committed, Some(GOOD));
            assert_eq!(s.epochs_committed, before.epochs_committed, "nothing was applied");
            // What the failure detector is told: a primary whose link died may be taken over; one
            // whose frames this side refused goes on alone (it was told), and must not be.
            let link_died = reason.starts_with("Link closed") || reason.contains("truncated");
            let want = if link_died { SessionEnd::Vanished } else { SessionEnd::Refused };
            assert_eq!(self.backup.link_activity().session_end(), want, "after {err:?}");
        }

        /// The last good epoch is intact, and a correct primary carries on from it: the failed epoch's
        /// pages are still dirty on the primary and its disk writes are requeued, so nothing is lost.
        fn recover(mut self, good: &Model) {
            assert_standby(&self.backup, good, GOOD);
            self.disks.requeue_unacked();
            let mut t = connect(self.backup.local_addr(), &self.model);
            assert_eq!(t.peer_standby().committed, Some(GOOD));
            let token = send_epoch(&mut t, &mut self.model, &mut self.disks, NEXT);
            assert_eq!(wait(&t, token), NEXT);
            self.disks.commit(NEXT).unwrap();
            assert_standby(&self.backup, &self.model, NEXT);
        }
    }

    /// The frames of the next epoch, Pages frames of 8 pages, with an honest commit.
    fn honest(raw: &mut RawPrimary, model: &Model, writes: &[DiskWrite]) -> Vec<(FrameKind, Vec<u8>)> {
        raw.epoch_frames(NEXT, model, writes, 8, |_| {})
    }

    fn pages_frames(frames: &[(FrameKind, Vec<u8>)]) -> Vec<usize> {
        frames.iter().enumerate().filter(|(_, (k, _))| *k == FrameKind::Pages).map(|(i, _)| i).collect()
    }

    /// The receiver answers a bad epoch with no acknowledgement: a goodbye that says it refused
    /// the session (so that the primary goes on alone and knows this backup will not take over),
    /// then the link closes.
    fn assert_no_ack(raw: &mut RawPrimary) {
        let mut goodbyes = 0;
        while let Ok(f) = raw.read() {
            let reason = String::from_utf8_lossy(&f.payload).into_owned();
            assert_eq!(f.header.kind, FrameKind::Goodbye, "the receiver answered with {:?} ({reason})", f.header.kind);
            assert!(reason.contains("refused"), "goodbye without the refusal: {reason:?}");
            goodbyes += 1;
            assert!(goodbyes <= 1, "more than one goodbye");
        }
    }

    fn a_connection_dying_mid_epoch_leaves_the_last_epoch(uring: bool) {
        let mut scene = Scene::new("mid-epoch", uring);
        let (good, writes) = scene.next_epoch();
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let frames = honest(&mut raw, &scene.model, &writes);
        let pages = pages_frames(&frames);
        assert!(pages.len() >= 4, "enough Pages frames to stop half-way");
        // Begin, then half of the pages, then the socket goes away.
        for (_, f) in &frames[..pages[pages.len() / 2]] {
            raw.write(f);
        }
        drop(raw);
        scene.expect_dropped(&before, "Link closed in the middle of epoch 3");
        assert_eq!(scene.stats().epochs_discarded, before.epochs_discarded + 1);
        scene.recover(&good);
    }

    fn a_corrupted_byte_in_a_pages_frame_is_refused(uring: bool) {
        let mut scene = Scene::new("corrupt", uring);
        let (good, writes) = scene.next_epoch();
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let mut frames = honest(&mut raw, &scene.model, &writes);
        let victim = pages_frames(&frames)[1];
        let f = &mut frames[victim].1;
        let at = f.len() - 32 - 1000; // inside the page bytes
        f[at] ^= 0x40;
        for (_, f) in &frames {
            raw.write(f);
        }
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before, "failed authentication");
        scene.recover(&good);
    }

    fn a_truncated_frame_is_refused(uring: bool) {
        let mut scene = Scene::new("truncated", uring);
        let (good, writes) = scene.next_epoch();
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let frames = honest(&mut raw, &scene.model, &writes);
        let victim = pages_frames(&frames)[1];
        for (_, f) in &frames[..victim] {
            raw.write(f);
        }
        raw.write(&frames[victim].1[..frames[victim].1.len() / 2]);
        // The primary's end is cut there (its host died while sending); the read side stays open so the
        // receiver's verdict is about the frame, not about a reset.
        raw.stream.shutdown(Shutdown::Write).unwrap();
        scene.expect_dropped(&before, "Frame truncated");
        drop(raw);

        // A frame cut inside its header, in another session.
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let frames = honest(&mut raw, &scene.model, &writes);
        raw.write(&frames[0].1[..10]);
        raw.stream.shutdown(Shutdown::Write).unwrap();
        scene.expect_dropped(&before, "Frame truncated");
        drop(raw);
        scene.recover(&good);
    }

    fn replayed_frames_are_refused(uring: bool) {
        let mut scene = Scene::new("replay", uring);
        let (good, writes) = scene.next_epoch();

        // Within a session: a Pages frame sent twice.
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let frames = honest(&mut raw, &scene.model, &writes);
        let first_pages = pages_frames(&frames)[0];
        for (_, f) in &frames[..=first_pages] {
            raw.write(f);
        }
        raw.write(&frames[first_pages].1);
        for (_, f) in &frames[first_pages + 1..] {
            raw.write(f);
        }
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before, "out of sequence");
        drop(raw);

        // Across sessions: frames recorded from one session, played into a new one, with the right
        // sequence numbers even: the session keys differ, so they do not authenticate.
        let before = scene.stats();
        let mut recorder = RawPrimary::connect(scene.backup.local_addr());
        let recorded = honest(&mut recorder, &scene.model, &writes);
        drop(recorder);
        wait_stats(&scene.backup, "the recording session to end", |s| s.connected.is_none());
        let before_replay = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        for (_, f) in &recorded {
            raw.write(f);
        }
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before_replay, "failed authentication");
        assert_eq!(scene.stats().epochs_committed, before.epochs_committed);
        drop(raw);
        scene.recover(&good);
    }

    /// A handover for an epoch this standby does not hold (a forged or confused primary) is
    /// refused: the session ends as refused, so this host does not take over, and nothing changes.
    /// The right one is answered with the backup's word that it takes over.
    fn a_handover_for_another_epoch_is_refused_and_the_right_one_answered(uring: bool) {
        let scene = Scene::new("handover", uring);
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let (bytes, _) = raw.seal(FrameKind::Handover, GOOD.0 + 1, &[]);
        raw.write(&bytes);
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before, "Handover at epoch 3 refused");
        assert_standby(&scene.backup, &scene.model, GOOD);

        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let (bytes, _) = raw.seal(FrameKind::Handover, GOOD.0, &[]);
        raw.write(&bytes);
        let answer = raw.read().expect("the backup answers the handover");
        assert_eq!(answer.header.kind, FrameKind::TakingOver);
        assert!(String::from_utf8_lossy(&answer.payload).contains("switchover"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while scene.backup.link_activity().session_end() != SessionEnd::HandedOver {
            assert!(std::time::Instant::now() < deadline, "{:?}", scene.backup.link_activity().session_end());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    fn a_wrong_protocol_major_version_is_refused(uring: bool) {
        let mut scene = Scene::new("version", uring);
        let (good, writes) = scene.next_epoch();

        // In the handshake: the peer announces another major and is told why.
        let before = scene.stats();
        let mut s = TcpStream::connect(scene.backup.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let err = handshake::initiate_with_version(&mut s, SECRET, PROTOCOL_MAJOR + 1, 0).unwrap_err();
        assert!(matches!(err, HandshakeError::Refused(ref r) if r.contains("protocol")), "{err}");
        let stats = wait_stats(&scene.backup, "the refusal", |s| s.refused > before.refused);
        assert!(stats.last_error.unwrap_or_default().contains("handshake failed"));

        // Inside a session: a frame whose header claims another major.
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let mut frames = honest(&mut raw, &scene.model, &writes);
        frames[1].1[4] = PROTOCOL_MAJOR + 1;
        for (_, f) in &frames {
            raw.write(f);
        }
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before, "Unsupported protocol version");
        drop(raw);
        scene.recover(&good);
    }

    fn a_peer_with_the_wrong_secret_is_refused_and_the_receiver_keeps_waiting(uring: bool) {
        let mut scene = Scene::new("secret", uring);
        let (good, _writes) = scene.next_epoch();
        let before = scene.stats();
        let err = TcpTransport::connect(scene.backup.local_addr(), b"not the a-link secret at all", &options(&scene.model)).unwrap_err();
        assert!(matches!(err, ConnectError::Handshake(_)), "{err}");
        let stats = wait_stats(&scene.backup, "the refusal", |s| s.refused > before.refused);
        assert!(stats.last_error.unwrap_or_default().contains("failed authentication"));
        // Garbage instead of a handshake is refused the same way.
        let mut s = TcpStream::connect(scene.backup.local_addr()).unwrap();
        s.write_all(&[0x55; 100]).unwrap();
        wait_stats(&scene.backup, "the second refusal", |s| s.refused > before.refused + 1);
        assert_eq!(scene.stats().committed, Some(GOOD));
        scene.recover(&good);
    }

    /// A machine state sent as a delta (A-Link 1.6) applies to the state the backup holds, and to
    /// no other: one made from another state refuses the epoch, nothing applied; the right one
    /// leaves the new state whole in the standby.
    fn a_state_delta_applies_to_the_state_held_only(uring: bool) {
        let mut scene = Scene::new("delta", uring);
        let (good, writes) = scene.next_epoch();
        let mut other = good.state.clone();
        other[0] ^= 1;
        let mut wrong = scene.model.clone();
        ftvm_proto::state_delta::encode(&other, &scene.model.state, &mut wrong.state);
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        for (_, f) in raw.epoch_frames(NEXT, &wrong, &writes, 8, |_| {}) {
            raw.write(&f);
        }
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before, "machine state delta refused");
        assert_standby(&scene.backup, &good, GOOD);
        drop(raw);

        let mut right = scene.model.clone();
        ftvm_proto::state_delta::encode(&good.state, &scene.model.state, &mut right.state);
        assert!(ftvm_proto::state_delta::is_delta(&right.state));
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        for (_, f) in raw.epoch_frames(NEXT, &right, &writes, 8, |_| {}) {
            raw.write(&f);
        }
        let ack = raw.read().expect("the backup acknowledges the epoch");
        assert_eq!((ack.header.kind, ack.header.epoch), (FrameKind::EpochAck, NEXT.0));
        assert_standby(&scene.backup, &scene.model, NEXT);
    }

    /// Pages sent as deltas (1.9) are made from the backup's committed copy: deltas made from
    /// another copy of one page refuse the whole epoch, and deltas from the right one are applied.
    fn a_page_delta_applies_to_the_page_held_only(uring: bool) {
        let mut scene = Scene::new("page-delta", uring);
        let good = scene.model.clone();
        for pfn in [3, 4, 5, 77, 200] {
            scene.model.touch_page(&mut scene.rng, pfn);
        }
        scene.model.state = scene.rng.bytes(300);
        let writes = scene.disks.seal(NEXT).unwrap();

        let before = scene.stats();
        let mut other = good.mem.clone();
        other[77 * PAGE_SIZE + 1000] ^= 1;
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        raw.deltas_from = Some(other);
        for (_, f) in honest(&mut raw, &scene.model, &writes) {
            raw.write(&f);
        }
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before, "page delta is refused");
        assert_standby(&scene.backup, &good, GOOD);
        drop(raw);

        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        raw.deltas_from = Some(good.mem.clone());
        let frames = honest(&mut raw, &scene.model, &writes);
        assert!(frames.iter().any(|(k, f)| *k == FrameKind::PageDeltas && f.len() < 512), "five small deltas in one frame");
        for (_, f) in frames {
            raw.write(&f);
        }
        let ack = raw.read().expect("the backup acknowledges the epoch");
        assert_eq!((ack.header.kind, ack.header.epoch), (FrameKind::EpochAck, NEXT.0));
        assert_standby(&scene.backup, &scene.model, NEXT);
    }

    fn a_commit_whose_digest_or_totals_do_not_match_is_refused(uring: bool) {
        let mut scene = Scene::new("digest", uring);
        let (good, writes) = scene.next_epoch();

        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        for (_, f) in raw.epoch_frames(NEXT, &scene.model, &writes, 8, |c| c.digest[0] ^= 1) {
            raw.write(&f);
        }
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before, "digest does not match");
        drop(raw);

        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        for (_, f) in raw.epoch_frames(NEXT, &scene.model, &writes, 8, |c| c.pages -= 1) {
            raw.write(&f);
        }
        assert_no_ack(&mut raw);
        scene.expect_dropped(&before, "totals do not match");
        drop(raw);
        scene.recover(&good);
    }

    fn frames_out_of_place_are_refused(uring: bool) {
        let mut scene = Scene::new("misuse", uring);
        let (good, _writes) = scene.next_epoch();
        // A well-formed Pages payload: the first 8 pages.
        let ranges = [PageRange { start: 0, len: 8 }];
        let mut pages_payload = Vec::new();
        wire::encode_pages_head(&ranges, &mut pages_payload);
        pages_payload.extend_from_slice(&scene.model.mem[..8 * PAGE_SIZE]);

        // Pages outside any epoch.
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let (f, _) = raw.seal(FrameKind::Pages, NEXT.0, &[&pages_payload]);
        raw.write(&f);
        scene.expect_dropped(&before, "outside an epoch");
        drop(raw);

        // An epoch that does not follow the committed one.
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let begin = EpochBegin { epoch: EpochId(7), state_len: 1, ..EpochBegin::default() };
        let (f, _) = raw.seal(FrameKind::EpochBegin, 7, &[&begin.encode()]);
        raw.write(&f);
        scene.expect_dropped(&before, "cannot follow the committed epoch");
        drop(raw);

        // A Pages frame whose header names another epoch than the open one (authentic, in sequence).
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let begin = EpochBegin { epoch: NEXT, page_count: 8, state_len: 1, ..EpochBegin::default() };
        let (b, _) = raw.seal(FrameKind::EpochBegin, NEXT.0, &[&begin.encode()]);
        let (p, _) = raw.seal(FrameKind::Pages, NEXT.0 + 1, &[&pages_payload]);
        raw.write(&b);
        raw.write(&p);
        scene.expect_dropped(&before, "inside epoch 3");
        drop(raw);

        // More pages than announced.
        let before = scene.stats();
        let mut raw = RawPrimary::connect(scene.backup.local_addr());
        let begin = EpochBegin { epoch: NEXT, page_count: 4, state_len: 1, ..EpochBegin::default() };
        let (b, _) = raw.seal(FrameKind::EpochBegin, NEXT.0, &[&begin.encode()]);
        let (p, _) = raw.seal(FrameKind::Pages, NEXT.0, &[&pages_payload]);
        raw.write(&b);
        raw.write(&p);
        scene.expect_dropped(&before, "more pages than the 4 announced");
        drop(raw);
        scene.recover(&good);
    }

    /// Guest input sent ahead must decode whole: an empty frame, a frame longer than the payload
    /// that carries it, or one over the largest guest frame drops the session; the standby keeps
    /// its last epoch and a correct primary carries on.
    fn malformed_input_sent_ahead_is_refused(uring: bool) {
        use ftvm_proto::limits::MAX_GUEST_FRAME;
        let mut scene = Scene::new("ingress", uring);
        let (good, _writes) = scene.next_epoch();
        let with_len = |len: u32, body: usize| {
            let mut p = len.to_le_bytes().to_vec();
            p.extend(std::iter::repeat_n(0u8, body));
            p
        };
        for payload in [Vec::new(), with_len(0, 0), with_len(100, 10), with_len(MAX_GUEST_FRAME as u32 + 1, MAX_GUEST_FRAME + 1)] {
            let before = scene.stats();
            let mut raw = RawPrimary::connect(scene.backup.local_addr());
            let (f, _) = raw.seal(FrameKind::Ingress, NEXT.0, &[&payload]);
            raw.write(&f);
            scene.expect_dropped(&before, "Malformed Ingress payload");
            assert_eq!(scene.stats().ingress_frames_held, 0);
            drop(raw);
        }
        scene.recover(&good);
    }
}
