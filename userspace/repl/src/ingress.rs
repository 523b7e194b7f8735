//! Guest input sent ahead to the backup, so that a takeover loses no request the primary had taken.
//!
//! A request that reaches the primary's VM after a checkpoint lives only in the primary until the
//! next checkpoint commits. If the primary dies first, the backup resumes a VM that never saw it,
//! and the client, which got no reply (output commit held it), must retransmit: on Linux not before
//! its 200 ms minimum retransmission timeout. To spare that, every frame the VM takes in from the
//! network is copied, tagged with the epoch whose checkpoint will include it, and forwarded to the
//! backup as soon as the device's receive pass that took it ends, the pass's frames together
//! ([`IngressForwarder`]). The backup keeps the frames of epochs it has not
//! committed, drops them as their epochs commit, and a takeover delivers the rest to the restored VM
//! before anything from the network (`ftvm_vmm`'s `Net::replay_rx`). Each frame then reaches the
//! restored VM exactly once: it was taken after the checkpoint the backup resumes.
//!
//! The tag is exact because the device takes frames only while it runs: the engine moves the tag
//! on in each checkpoint's pause, with the devices stopped ([`IngressForwarder::epoch_paused`]).
//!
//! Best effort, and never a safety matter: a frame still queued here when the primary dies is
//! lost as before (the client retransmits), unless a [`TakenRing`] keeps it for the primary's
//! watchdog, and none of this releases output. The queue is bounded; past it frames are not
//! forwarded, and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use ftvm_proto::epoch::encode_output_frame;
use ftvm_proto::frame::{HEADER_LEN, TAG_LEN};
use ftvm_proto::limits::{MAX_CHUNK_BYTES, MAX_GUEST_FRAME};
use ftvm_vmm::devices::virtio::net::RxMirror;

use crate::taken_ring::TakenRing;
use crate::transport::IngressLink;
use crate::{lock, ErrorChain};

/// Most bytes waiting to be forwarded; frames past it are not forwarded (a backup far behind
/// gains little from them, and the guest's receive path must not wait).
const QUEUE_BYTES: usize = 4 << 20;

/// What the forwarder has done, for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressStats {
    /// Frames sent to the backup.
    pub frames_forwarded: u64,
    /// The A-Link bytes they took: the frames (virtio-net headers included), their lengths, and
    /// each Ingress frame's header and tag.
    pub link_bytes: u64,
    /// Frames taken in while a backup that takes them was connected, but not forwarded: the queue
    /// was full, or the link failed.
    pub frames_not_forwarded: u64,
}

/// The A-Link bytes of an Ingress frame whose payload is `payload` bytes.
fn link_bytes(payload: usize) -> u64 {
    (HEADER_LEN + payload + TAG_LEN) as u64
}

/// One A-Link frame's worth of input, all of one epoch.
#[derive(Debug)]
struct Batch {
    epoch: u64,
    payload: Vec<u8>,
    frames: u64,
    /// The ring's number of the batch's last frame kept there.
    last_kept: Option<u64>,
}

#[derive(Debug, Default)]
struct Queue {
    batches: VecDeque<Batch>,
    /// The payload bytes of `batches`.
    bytes: usize,
    /// The forwarder thread is sending batches it took: a batch sent directly now would pass them.
    forwarding: bool,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    /// The epoch frames taken in now belong to.
    epoch: AtomicU64,
    /// A link is set: frames are worth copying.
    linked: AtomicBool,
    link: Mutex<Option<Arc<dyn IngressLink>>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    forwarded: AtomicU64,
    bytes: AtomicU64,
    not_forwarded: AtomicU64,
    /// Where each frame is kept until sent, for the watchdog.
    ring: Option<Arc<TakenRing>>,
}

impl RxMirror for Shared {
    fn frame_taken(&self, frame: &[u8]) {
        if !self.linked.load(Ordering::Acquire) {
            return;
        }
        if frame.is_empty() || frame.len() > MAX_GUEST_FRAME {
            // The device never takes such a frame; nothing the backup could replay.
            return;
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        // First, where it outlives this process.
        let kept = self.ring.as_ref().and_then(|r| r.record(frame));
        let mut q = lock(&self.queue);
        let encoded = 4 + frame.len();
        if q.bytes + encoded > QUEUE_BYTES {
            drop(q);
            self.not_forwarded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.bytes += encoded;
        let fits = |b: &Batch| b.epoch == epoch && b.payload.len() + encoded <= MAX_CHUNK_BYTES;
        match q.batches.back_mut() {
            Some(b) if fits(b) => {
                encode_output_frame(frame, &mut b.payload);
                b.frames += 1;
                b.last_kept = kept.or(b.last_kept);
            }
            _ => {
                let mut payload = Vec::with_capacity(encoded);
                encode_output_frame(frame, &mut payload);
                q.batches.push_back(Batch { epoch, payload, frames: 1, last_kept: kept });
            }
        }
    }

    /// The device's receive pass ended: what it took goes now, together, from this thread when
    /// the link takes it at once, else from the forwarder thread (in order either way).
    fn taken_all(&self) {
        let mut q = lock(&self.queue);
        if q.batches.is_empty() {
            return;
        }
        if !q.forwarding {
            if let Some(link) = lock(&self.link).clone() {
                while let Some(b) = q.batches.front() {
                    let Some(sent) = link.try_send_ingress(b.epoch, &b.payload) else { break };
                    let Some(b) = q.batches.pop_front() else { break };
                    q.bytes -= b.payload.len();
                    self.account(&b, sent);
                }
            }
        }
        let left = !q.batches.is_empty();
        drop(q);
        if left {
            self.wake.notify_one();
        }
    }
}

impl Shared {
    /// Counts a batch sent (or refused by a failed link).
    fn account(&self, b: &Batch, sent: Result<(), crate::transport::LinkError>) {
        match sent {
            Ok(()) => {
                self.forwarded.fetch_add(b.frames, Ordering::Relaxed);
                self.bytes.fetch_add(link_bytes(b.payload.len()), Ordering::Relaxed);
                if let (Some(ring), Some(last)) = (&self.ring, b.last_kept) {
                    ring.mark_sent(last + 1);
                }
            }
            Err(e) => {
                // The engine learns of the failed link from its own next call.
                tracing::debug!(error = %ErrorChain(&e), "forwarding guest input failed");
                self.not_forwarded.fetch_add(b.frames, Ordering::Relaxed);
            }
        }
    }
}

/// Forwards what the VM takes in to the backup (see the module documentation). Install
/// [`Self::mirror`] on the network device, keep [`Self::set_link`] in step with the engine's
/// transport, and call [`Self::epoch_paused`] in every checkpoint's pause.
#[derive(Debug)]
pub struct IngressForwarder {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Default for IngressForwarder {
    fn default() -> Self {
        Self::new(None)
    }
}

impl IngressForwarder {
    /// A forwarder with no link: frames are not copied until one is set. With `ring`, each frame
    /// is kept there too until sent (see [`crate::taken_ring`]).
    pub fn new(ring: Option<Arc<TakenRing>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                epoch: AtomicU64::new(0),
                linked: AtomicBool::new(false),
                link: Mutex::new(None),
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                forwarded: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                not_forwarded: AtomicU64::new(0),
                ring,
            }),
            thread: None,
        }
    }

    /// The observer to install on the network device.
    pub fn mirror(&self) -> Arc<dyn RxMirror> {
        Arc::clone(&self.shared) as Arc<dyn RxMirror>
    }

    /// In a checkpoint's pause (devices stopped), or before the first: frames taken in from now
    /// on belong to `epoch` (the checkpoint after the one being taken).
    pub fn epoch_paused(&self, epoch: u64) {
        self.shared.epoch.store(epoch, Ordering::Release);
    }

    /// Forwards on `link` from now on (`None`: no backup, or one that does not take input).
    /// What is queued for an earlier link is dropped: its backup is gone.
    pub fn set_link(&mut self, link: Option<Arc<dyn IngressLink>>) {
        let linked = link.is_some();
        *lock(&self.shared.link) = link;
        {
            let mut q = lock(&self.shared.queue);
            q.batches.clear();
            q.bytes = 0;
        }
        self.shared.linked.store(linked, Ordering::Release);
        if linked && self.thread.is_none() {
            let shared = Arc::clone(&self.shared);
            match std::thread::Builder::new().name("ftvm-ingress".into()).spawn(move || forward(&shared)) {
                Ok(t) => self.thread = Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the ingress forwarder: a takeover will wait for clients to retransmit");
                    self.shared.linked.store(false, Ordering::Release);
                }
            }
        }
    }

    /// What has been forwarded so far.
    pub fn stats(&self) -> IngressStats {
        IngressStats {
            frames_forwarded: self.shared.forwarded.load(Ordering::Relaxed),
            link_bytes: self.shared.bytes.load(Ordering::Relaxed),
            frames_not_forwarded: self.shared.not_forwarded.load(Ordering::Relaxed),
        }
    }
}

impl Drop for IngressForwarder {
    fn drop(&mut self) {
        self.shared.linked.store(false, Ordering::Release);
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The forwarder thread: sends each batch as it comes, until stopped.
fn forward(shared: &Shared) {
    loop {
        let batches = {
            let mut q = lock(&shared.queue);
            while q.batches.is_empty() && !q.stop {
                q = shared.wake.wait(q).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if q.stop {
                return;
            }
            q.bytes = 0;
            q.forwarding = true;
            std::mem::take(&mut q.batches)
        };
        let link = lock(&shared.link).clone();
        let mut failed = link.is_none();
        for b in batches {
            match link.as_ref().filter(|_| !failed) {
                Some(l) => {
                    let sent = l.send_ingress(b.epoch, &b.payload);
                    failed = sent.is_err();
                    shared.account(&b, sent);
                }
                None => {
                    shared.not_forwarded.fetch_add(b.frames, Ordering::Relaxed);
                }
            }
        }
        lock(&shared.queue).forwarding = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::LinkError;
    use ftvm_proto::epoch::decode_output;

    /// Records what it is given; fails when told to; takes frames at once when told to.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<Vec<u8>>)>>, AtomicBool, AtomicBool);

    impl IngressLink for Recorder {
        fn send_ingress(&self, epoch: u64, payload: &[u8]) -> Result<(), LinkError> {
            if self.1.load(Ordering::SeqCst) {
                return Err(LinkError::Down { reason: "test".into() });
            }
            let frames = decode_output(payload).unwrap().into_iter().map(<[u8]>::to_vec).collect();
            lock(&self.0).push((epoch, frames));
            Ok(())
        }

        fn try_send_ingress(&self, epoch: u64, payload: &[u8]) -> Option<Result<(), LinkError>> {
            self.2.load(Ordering::SeqCst).then(|| self.send_ingress(epoch, payload))
        }
    }

    /// A link that takes a frame at once gets it from the taking thread, before the call returns.
    #[test]
    fn a_free_link_gets_the_frame_from_the_taking_thread() {
        let mut f = IngressForwarder::new(None);
        let link = Arc::new(Recorder::default());
        link.2.store(true, Ordering::SeqCst);
        f.epoch_paused(7);
        f.set_link(Some(link.clone() as Arc<dyn IngressLink>));
        let mirror = f.mirror();
        mirror.frame_taken(b"x");
        mirror.frame_taken(b"w");
        assert!(lock(&link.0).is_empty(), "nothing goes before the pass ends");
        mirror.taken_all();
        assert_eq!(*lock(&link.0), vec![(7, vec![b"x".to_vec(), b"w".to_vec()])], "one frame for the pass");
        assert_eq!(f.stats().frames_forwarded, 2);
        // Busy: queued for the forwarder thread, still in order.
        link.2.store(false, Ordering::SeqCst);
        mirror.frame_taken(b"y");
        mirror.taken_all();
        wait_for(|| f.stats().frames_forwarded == 3);
        link.2.store(true, Ordering::SeqCst);
        mirror.frame_taken(b"z");
        mirror.taken_all();
        wait_for(|| f.stats().frames_forwarded == 4);
        let got: Vec<Vec<u8>> = lock(&link.0).iter().flat_map(|(_, fs)| fs.clone()).collect();
        assert_eq!(got, vec![b"x".to_vec(), b"w".to_vec(), b"y".to_vec(), b"z".to_vec()]);
    }

    /// With a ring, what is taken is kept there until sent: the watchdog would find exactly the
    /// frames the backup did not get.
    #[test]
    fn the_ring_keeps_what_was_not_sent_ahead() {
        let ring = Arc::new(TakenRing::create().unwrap());
        let mut f = IngressForwarder::new(Some(Arc::clone(&ring)));
        let link = Arc::new(Recorder::default());
        link.2.store(true, Ordering::SeqCst);
        f.set_link(Some(link.clone() as Arc<dyn IngressLink>));
        let mirror = f.mirror();
        mirror.frame_taken(b"sent");
        assert_eq!(ring.unsent(), vec![b"sent".to_vec()], "kept as it is taken, before the pass ends");
        mirror.taken_all();
        assert!(ring.unsent().is_empty());
        // The link fails: what it could not take stays kept.
        link.1.store(true, Ordering::SeqCst);
        mirror.frame_taken(b"lost on the link");
        mirror.taken_all();
        wait_for(|| f.stats().frames_not_forwarded == 1);
        mirror.frame_taken(b"taken, not yet sent");
        assert_eq!(ring.unsent(), vec![b"lost on the link".to_vec(), b"taken, not yet sent".to_vec()]);
    }

    fn wait_for(f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Frames are forwarded in order, each with the epoch of its moment; nothing is copied
    /// without a link; a failed link counts what it could not send.
    #[test]
    fn frames_go_in_order_with_their_epoch() {
        let mut f = IngressForwarder::new(None);
        let mirror = f.mirror();
        mirror.frame_taken(b"before any link");
        let link = Arc::new(Recorder::default());
        f.epoch_paused(5);
        f.set_link(Some(link.clone() as Arc<dyn IngressLink>));
        mirror.frame_taken(b"a");
        mirror.frame_taken(b"b");
        f.epoch_paused(6);
        mirror.frame_taken(b"c");
        mirror.taken_all();
        wait_for(|| f.stats().frames_forwarded == 3);
        let got: Vec<(u64, Vec<u8>)> =
            lock(&link.0).iter().flat_map(|(e, fs)| fs.iter().map(move |x| (*e, x.clone()))).collect();
        assert_eq!(got, vec![(5, b"a".to_vec()), (5, b"b".to_vec()), (6, b"c".to_vec())]);
        // Three one-byte frames with their lengths, in two A-Link frames (one per epoch).
        let bytes = f.stats().link_bytes;
        assert_eq!(bytes, link_bytes(10) + link_bytes(5));

        link.1.store(true, Ordering::SeqCst);
        mirror.frame_taken(b"d");
        mirror.taken_all();
        wait_for(|| f.stats().frames_not_forwarded == 1);
        f.set_link(None);
        mirror.frame_taken(b"e");
        mirror.taken_all();
        assert_eq!(f.stats(), IngressStats { frames_forwarded: 3, link_bytes: bytes, frames_not_forwarded: 1 });
    }
}
