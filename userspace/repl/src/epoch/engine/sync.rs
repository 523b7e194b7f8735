//! The initial synchronisation: all of guest memory and the disk image, streamed as one epoch while
//! the VM runs. Of the disk, only the regions that may differ are sent when both hosts' write-intent
//! records know them (see [`crate::disk::intent`]); the whole disk otherwise.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ftvm_proto::epoch::EpochBegin;
use ftvm_proto::limits::MAX_CHUNK_BYTES;
use ftvm_proto::pages::PageRangeSet;
use ftvm_proto::EpochId;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::ack::InFlight;
use crate::disk::intent::CopyPlan;
use crate::ErrorChain;
use super::status::{EngineState, SyncProgress};
use super::{PrimaryEngine, SendError, SYNC_CHUNK_PAGES};
use crate::PAGE_SIZE;

impl PrimaryEngine {
    /// Streams guest memory (all of it, or only `since_resume` when the backup holds the epoch the
    /// VM resumed from) and the disk image as one initial-sync epoch while the VM runs.
    pub(super) fn initial_sync(&mut self, stop: &AtomicBool, since_resume: Option<PageRangeSet>) -> Result<(), SendError> {
        // After everything this engine numbered before (a backup that joins later gets the next
        // number, so that the output hold's epochs only increase).
        let epoch = self.transport.peer_standby().committed.map_or(0, |c| c.0 + 1).max(self.next_epoch);
        let mem = self.source.guest_memory();
        let memory_incremental = since_resume.is_some();
        let regions: Vec<(u64, u64)> = match &since_resume {
            Some(pages) => pages.ranges().iter().map(|r| (r.start, r.len)).collect(),
            None => mem.iter().map(|r| (r.start_addr().0 / PAGE_SIZE as u64, r.len() / PAGE_SIZE as u64)).collect(),
        };
        let pages_total: u64 = regions.iter().map(|r| r.1).sum();
        let memory_pages = mem.iter().map(|r| r.len() / PAGE_SIZE as u64).sum();
        let plan = self.disk_copy_plan();
        let disk_size = self.disk_source.as_ref().map_or(0, |d| d.bytes);
        let disk_total = plan.bytes(disk_size);
        let disk_incremental = matches!(plan, CopyPlan::Ranges(_));
        let mut progress = SyncProgress {
            pages_total,
            memory_pages,
            memory_incremental,
            disk_bytes_total: disk_total,
            disk_size,
            disk_incremental,
            ..SyncProgress::default()
        };
        self.status.update(|s| s.state = EngineState::Syncing(progress));
        self.ack.sync_epoch.store(epoch, Ordering::Release);
        let span = tracing::info_span!("initial_sync", epoch, pages = pages_total, disk_bytes = disk_total);
        let _e = span.enter();
        if memory_incremental {
            tracing::info!(pages = pages_total, memory_pages, "initial synchronisation: of memory, only the pages written since the VM resumed from the epoch the backup holds");
        }
        if disk_incremental {
            tracing::info!(disk_bytes = disk_total, disk_size, "initial synchronisation: of the disk, only the regions written since the copies diverged");
        }
        tracing::info!("initial synchronisation started");
        let t0 = Instant::now();
        self.transport.begin_epoch(&EpochBegin {
            epoch: EpochId(epoch),
            page_count: pages_total,
            state_len: 0,
            disk_write_count: 0,
            disk_image_bytes: disk_total,
            initial_sync: true,
        })?;
        let mut last_log = Instant::now();
        let mut chunk = PageRangeSet::new();
        for (start, len) in regions {
            let mut pfn = start;
            while pfn < start + len {
                if stop.load(Ordering::Relaxed) {
                    // Leave the epoch open: the link is dropped with the engine.
                    return Ok(());
                }
                let n = SYNC_CHUNK_PAGES.min(start + len - pfn);
                chunk.clear();
                chunk.insert(pfn, n);
                // A copy, not the live pages: the guest runs, and the transport hashes a page
                // before the kernel copies it; a change in between would fail the frame's tag.
                // The staging buffer is reused chunk after chunk: the TCP transport is done with
                // the bytes when send_pages returns (a zero-copy transport would need a buffer
                // per chunk until commit; not handled yet).
                self.staging.fill(&chunk, &mem).map_err(SendError::MemoryRead)?;
                self.transport.send_pages(&chunk, &self.staging)?;
                pfn += n;
                progress.pages_sent += n;
                progress.elapsed = t0.elapsed();
                self.status.update(|s| s.state = EngineState::Syncing(progress));
                if last_log.elapsed() >= Duration::from_secs(1) {
                    last_log = Instant::now();
                    log_progress(&progress);
                }
            }
        }
        if let Some(d) = self.disk_source.clone() {
            let file = File::open(&d.path).map_err(SendError::DiskRead)?;
            let ranges = match plan {
                CopyPlan::Full => std::iter::once(0..d.bytes).collect(),
                CopyPlan::Ranges(r) => r,
            };
            let mut buf = vec![0u8; MAX_CHUNK_BYTES.min(d.bytes as usize).max(512)];
            for range in ranges {
                let mut off = range.start;
                while off < range.end {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let n = (range.end - off).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], off).map_err(SendError::DiskRead)?;
                    self.transport.send_disk_image(off, &buf[..n])?;
                    off += n as u64;
                    progress.disk_bytes_sent += n as u64;
                    progress.elapsed = t0.elapsed();
                    self.status.update(|s| s.state = EngineState::Syncing(progress));
                    if last_log.elapsed() >= Duration::from_secs(1) {
                        last_log = Instant::now();
                        log_progress(&progress);
                    }
                }
            }
        }
        self.transport.commit(EpochId(epoch))?;
        self.in_flight.push_back(InFlight {
            epoch,
            committed_at: Instant::now(),
            timeout: self.cfg.sync_ack_timeout,
            span: tracing::Span::none(),
        });
        self.next_epoch = epoch + 1;
        progress.elapsed = t0.elapsed();
        self.status.update(|s| {
            s.last_sent = Some(EpochId(epoch));
            s.last_sync = Some(progress);
        });
        // The write-intent record's clearing period starts with the sync: what the guest writes
        // from here on stays marked until the epochs carrying it are acknowledged. The writes
        // recorded so far (those in flight included) travel with the first epoch after the sync.
        if let Some(intent) = self.disk_source.as_ref().and_then(|d| d.intent.as_ref()) {
            intent.lock().forget_touched();
            self.intent_pass = Some(IntentPass { boundary: epoch + 1, at: Instant::now() });
        }
        // The epoch rate counts checkpoints, not the sync.
        self.rate = (Instant::now(), 0);
        let elapsed = t0.elapsed();
        let mib_per_s = progress.bytes_total() as f64 / (1 << 20) as f64 / elapsed.as_secs_f64().max(1e-6);
        tracing::info!(elapsed_ms = elapsed.as_millis() as u64, bytes = progress.bytes_total(), disk_bytes = progress.disk_bytes_total, disk_incremental, memory_incremental, mib_per_s = mib_per_s.round(), "initial synchronisation sent");
        Ok(())
    }

    /// What of the disk the synchronisation sends: only the union of both records' marks when
    /// this disk has a record and the backup sent its own (minor 5 and later), all of it otherwise.
    fn disk_copy_plan(&self) -> CopyPlan {
        let Some(intent) = self.disk_source.as_ref().and_then(|d| d.intent.as_ref()) else { return CopyPlan::Full };
        let Some(peer) = self.transport.peer_disk_marks() else { return CopyPlan::Full };
        intent.lock().copy_plan(&peer)
    }

    /// Clears the write-intent marks of the regions the backup holds (see
    /// [`crate::disk::intent`]): at most every [`INTENT_PASS_EVERY`], once the epochs open at the
    /// previous pass are acknowledged. Called on the engine thread, between seals, so that the
    /// next seal's number bounds the epochs of every write recorded until now.
    pub(super) fn clear_intent_marks(&mut self, acked: u64) {
        let (Some(pass), Some(intent)) = (self.intent_pass, self.disk_source.as_ref().and_then(|d| d.intent.as_ref())) else {
            return;
        };
        if acked < pass.boundary || pass.at.elapsed() < INTENT_PASS_EVERY {
            return;
        }
        match intent.lock().clear_untouched() {
            Ok(cleared) => tracing::debug!(cleared, "write-intent marks of regions the backup holds cleared"),
            // The marks stay: a later rejoin copies more, never less.
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "cannot store the write-intent record's clears"),
        }
        self.intent_pass = Some(IntentPass { boundary: self.next_epoch, at: Instant::now() });
    }
}

/// How often the write-intent record's marks of acknowledged regions are cleared.
pub(super) const INTENT_PASS_EVERY: Duration = Duration::from_secs(5);

/// The write-intent record's clearing period (see [`PrimaryEngine::clear_intent_marks`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct IntentPass {
    /// Writes recorded before the period began travel in epochs up to this one.
    pub(super) boundary: u64,
    /// When the period began.
    pub(super) at: Instant,
}

/// The once-a-second line of a synchronisation under way.
fn log_progress(p: &SyncProgress) {
    tracing::info!(
        percent = p.percent(),
        pages_sent = p.pages_sent,
        pages_total = p.pages_total,
        disk_bytes_sent = p.disk_bytes_sent,
        disk_bytes_total = p.disk_bytes_total,
        mib_per_s = p.rate().map_or(0, |r| r >> 20),
        eta_s = p.eta().map_or(0, |d| d.as_secs()),
        "initial synchronisation under way"
    );
}
