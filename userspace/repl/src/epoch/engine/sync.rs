//! The initial synchronisation: all of guest memory and the disk image, streamed as one epoch while
//! the VM runs.

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
use super::status::{EngineState, SyncProgress};
use super::{PrimaryEngine, SendError, SYNC_CHUNK_PAGES};
use crate::PAGE_SIZE;

impl PrimaryEngine {
    /// Streams all of guest memory and the disk image as one initial-sync epoch while the VM runs.
    pub(super) fn initial_sync(&mut self, stop: &AtomicBool) -> Result<(), SendError> {
        // After everything this engine numbered before (a backup that joins later gets the next
        // number, so that the output hold's epochs only increase).
        let epoch = self.transport.peer_standby().committed.map_or(0, |c| c.0 + 1).max(self.next_epoch);
        let mem = self.source.guest_memory();
        let regions: Vec<(u64, u64)> =
            mem.iter().map(|r| (r.start_addr().0 / PAGE_SIZE as u64, r.len() / PAGE_SIZE as u64)).collect();
        let pages_total: u64 = regions.iter().map(|r| r.1).sum();
        let disk_total = self.disk_source.as_ref().map_or(0, |d| d.bytes);
        let mut progress = SyncProgress { pages_total, disk_bytes_total: disk_total, ..SyncProgress::default() };
        self.status.update(|s| s.state = EngineState::Syncing(progress));
        self.ack.sync_epoch.store(epoch, Ordering::Release);
        let span = tracing::info_span!("initial_sync", epoch, pages = pages_total, disk_bytes = disk_total);
        let _e = span.enter();
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
            let mut buf = vec![0u8; MAX_CHUNK_BYTES.min(d.bytes as usize).max(512)];
            let mut off = 0u64;
            while off < d.bytes {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let n = (d.bytes - off).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], off).map_err(SendError::DiskRead)?;
                self.transport.send_disk_image(off, &buf[..n])?;
                off += n as u64;
                progress.disk_bytes_sent = off;
                progress.elapsed = t0.elapsed();
                self.status.update(|s| s.state = EngineState::Syncing(progress));
                if last_log.elapsed() >= Duration::from_secs(1) {
                    last_log = Instant::now();
                    log_progress(&progress);
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
        self.status.update(|s| s.last_sent = Some(EpochId(epoch)));
        // The epoch rate counts checkpoints, not the sync.
        self.rate = (Instant::now(), 0);
        let elapsed = t0.elapsed();
        let mib_per_s = progress.bytes_total() as f64 / (1 << 20) as f64 / elapsed.as_secs_f64().max(1e-6);
        tracing::info!(elapsed_ms = elapsed.as_millis() as u64, bytes = progress.bytes_total(), mib_per_s = mib_per_s.round(), "initial synchronisation sent");
        Ok(())
    }
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
