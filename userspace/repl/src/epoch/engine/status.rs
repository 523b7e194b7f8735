//! What the engine tells its owner: the state of protection and the figures of the last epochs.

use std::sync::Mutex;
use std::time::Duration;

use ftvm_proto::EpochId;

use super::super::context::{EpochMetrics, EpochWindowStats, Percentiles};
use crate::{lock, PAGE_SIZE};

/// How far the initial synchronisation is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncProgress {
    /// Pages sent.
    pub pages_sent: u64,
    /// Pages to send: all of guest memory, or only those written since the VM resumed.
    pub pages_total: u64,
    /// Pages of guest memory.
    pub memory_pages: u64,
    /// Only the pages written since the VM resumed from the epoch the backup holds are sent (a
    /// planned switchover's old primary); otherwise all of memory.
    pub memory_incremental: bool,
    /// Disk image bytes sent.
    pub disk_bytes_sent: u64,
    /// Disk bytes to send: the whole disk, or only its regions that may differ.
    pub disk_bytes_total: u64,
    /// The disk's size.
    pub disk_size: u64,
    /// Only the disk's regions that may differ are sent (both hosts' write-intent records knew
    /// them); otherwise the whole disk.
    pub disk_incremental: bool,
    /// Since the synchronisation began.
    pub elapsed: Duration,
}

impl SyncProgress {
    /// Memory and disk bytes sent.
    pub fn bytes_sent(&self) -> u64 {
        self.pages_sent.saturating_mul(PAGE_SIZE as u64).saturating_add(self.disk_bytes_sent)
    }

    /// Memory and disk bytes to send in all.
    pub fn bytes_total(&self) -> u64 {
        self.pages_total.saturating_mul(PAGE_SIZE as u64).saturating_add(self.disk_bytes_total)
    }

    /// Percent sent (0 to 100).
    pub fn percent(&self) -> u8 {
        match self.bytes_total() {
            0 => 100,
            total => (u128::from(self.bytes_sent()) * 100 / u128::from(total)).min(100) as u8,
        }
    }

    /// Bytes per second so far; `None` before a tenth of a second has passed (too early to say).
    pub fn rate(&self) -> Option<u64> {
        (self.elapsed >= Duration::from_millis(100)).then(|| (self.bytes_sent() as f64 / self.elapsed.as_secs_f64()) as u64)
    }

    /// Time left at the rate so far; `None` while the rate is unknown or zero.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate().filter(|&r| r > 0)?;
        Some(Duration::from_secs_f64(self.bytes_total().saturating_sub(self.bytes_sent()) as f64 / rate as f64))
    }
}

/// Whether the VM is protected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// The initial synchronisation (and the first checkpoint) are under way.
    Syncing(SyncProgress),
    /// The backup holds a restorable checkpoint and receives epochs.
    Protected,
    /// No backup: the VM runs unprotected.
    Simplex {
        /// Why, for status.
        reason: String,
    },
    /// Another copy runs this VM (the backup took over, or the quorum gave the other side the
    /// right to run it): this copy is paused, its held output dropped, and must stop.
    Fenced {
        /// Why.
        reason: String,
    },
    /// The engine failed (it could not capture, copy or resume the machine, or it panicked): the
    /// VM is paused and must stop, nothing unacknowledged is released and the backup is not told
    /// goodbye, so that it resumes the VM from the last committed epoch.
    Failed {
        /// Why.
        reason: String,
    },
    /// The VM was handed over to the backup at `epoch` (a planned switchover): this copy is
    /// paused, its output all released, the lease given up; its owner stops it.
    HandedOver {
        /// The final epoch, the one the backup resumes from.
        epoch: EpochId,
    },
    /// The engine ended (stopped, or its machine did).
    Stopped,
}

/// A copy of the engine's status.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusSnapshot {
    /// Protected or not.
    pub state: EngineState,
    /// Epochs the backup acknowledged (the initial synchronisation not counted).
    pub epochs_committed: u64,
    /// Epochs sent per second, over the last quarter second or so.
    pub epochs_per_sec: f64,
    /// The last epoch sent.
    pub last_sent: Option<EpochId>,
    /// The last epoch the backup acknowledged.
    pub last_acked: Option<EpochId>,
    /// The last epoch's figures (pause and its parts, pages, bytes).
    pub last_epoch: EpochMetrics,
    /// Percentiles of the pause and its parts over the last epochs, refreshed a few times a second.
    pub recent: EpochWindowStats,
    /// Percentiles of the acknowledgement round trip over the last epochs.
    pub recent_ack: Percentiles,
    /// The last acknowledgement's round trip (commit to ack).
    pub last_ack_round_trip: Option<Duration>,
    /// Bytes on the A-Link and dirty bytes, over all incremental epochs.
    pub link_bytes: u64,
    /// Dirty guest memory bytes over all incremental epochs.
    pub dirty_bytes: u64,
    /// Of those, the bytes of pages the dirty tracker had left writable (sent written or not).
    pub hot_bytes: u64,
    /// The tracker's samples of those pages: `(sampled, written within an epoch)`.
    pub hot_samples: (u64, u64),
    /// A guest disk write could not be recorded (backlog full): the backup's disk lacks it, and
    /// only a new initial synchronisation makes it whole again.
    pub disk_replication_lost: bool,
    /// The VM runs alone and is paused because its lease ran out (the quorum cannot be reached).
    pub paused_for_lease: bool,
    /// Why the peer host refused to be the backup at the last try, while the VM runs alone (a
    /// wrong secret or version, other sizes, a CPU that cannot resume this guest); see
    /// [`crate::ha::rejoin`].
    pub backup_refused: Option<String>,
    /// Why protection last ended (the VM went on alone), kept after a backup joins again.
    pub last_unprotected: Option<String>,
    /// Why the last switchover asked for was refused (the VM ran on here).
    pub switchover_refused: Option<String>,
    /// The figures of the last synchronisation sent in full (kept after it).
    pub last_sync: Option<SyncProgress>,
    /// How checkpoints copy the dirty pages (copy-on-write falls back to stop-and-copy when it
    /// cannot be armed).
    pub copy: super::CheckpointCopy,
    /// Checkpoints taken for output, for the dirty bound and at the interval, and skipped.
    pub checkpoints: super::CheckpointCounts,
    /// The dirty bound now, in pages (see `schedule`).
    pub dirty_bound_pages: u64,
    /// The link's measured rate, in bytes per second of sending (none before any epoch).
    pub link_bytes_per_sec: Option<f64>,
    /// How the link writes (see [`crate::transport::CheckpointTransport::io_name`]).
    pub transport: &'static str,
    /// How the dirty pages are found (see `ftvm_vmm::dirty::DirtyTracker::name`; empty before
    /// the first protection).
    pub tracker: &'static str,
    /// Heartbeats sent between checkpoints: with the epochs sent, the engine's progress.
    pub heartbeats_sent: u64,
    /// The guest's input sent ahead to the backup (see [`crate::ingress`]).
    pub ingress: crate::ingress::IngressStats,
    /// Pages the current link sent as deltas from the backup's copy.
    pub page_deltas: crate::transport::PageDeltaStats,
}

impl StatusSnapshot {
    /// Epochs sent and not acknowledged.
    pub fn lag_epochs(&self) -> u64 {
        match (self.last_sent, self.last_acked) {
            (Some(s), Some(a)) => s.0.saturating_sub(a.0),
            (Some(s), None) => s.0 + 1,
            _ => 0,
        }
    }

    /// A-Link bytes per dirty byte (framing, state and disk writes make it > 1).
    pub fn link_per_dirty_byte(&self) -> Option<f64> {
        (self.dirty_bytes > 0).then(|| self.link_bytes as f64 / self.dirty_bytes as f64)
    }

    /// The share of the pages left writable that the guest writes in an epoch (sampled).
    pub fn hot_written_share(&self) -> Option<f64> {
        (self.hot_samples.0 > 0).then(|| self.hot_samples.1 as f64 / self.hot_samples.0 as f64)
    }

    /// A-Link bytes per byte the guest wrote: as [`Self::link_per_dirty_byte`], the bytes of the
    /// pages left writable counted at their sampled written share. `None` when no page was left
    /// writable or none sampled yet.
    pub fn link_per_written_byte(&self) -> Option<f64> {
        let share = self.hot_written_share().filter(|_| self.hot_bytes > 0)?;
        let written = self.dirty_bytes as f64 - self.hot_bytes as f64 * (1.0 - share);
        (written > 0.0).then(|| self.link_bytes as f64 / written)
    }

    /// The same with the guest input sent ahead counted as A-Link bytes too.
    pub fn link_with_input_per_dirty_byte(&self) -> Option<f64> {
        (self.dirty_bytes > 0).then(|| (self.link_bytes + self.ingress.link_bytes) as f64 / self.dirty_bytes as f64)
    }
}

/// The engine's status, shared with whoever reports it. Reading costs one short lock.
#[derive(Debug)]
pub struct EngineStatus {
    inner: Mutex<StatusSnapshot>,
}

impl EngineStatus {
    pub(crate) fn new() -> Self {
        Self {
            inner: Mutex::new(StatusSnapshot {
                state: EngineState::Syncing(SyncProgress::default()),
                epochs_committed: 0,
                epochs_per_sec: 0.0,
                last_sent: None,
                last_acked: None,
                last_epoch: EpochMetrics::default(),
                recent: EpochWindowStats::default(),
                recent_ack: Percentiles::default(),
                last_ack_round_trip: None,
                link_bytes: 0,
                dirty_bytes: 0,
                hot_bytes: 0,
                hot_samples: (0, 0),
                disk_replication_lost: false,
                paused_for_lease: false,
                backup_refused: None,
                last_unprotected: None,
                switchover_refused: None,
                last_sync: None,
                copy: super::CheckpointCopy::default(),
                checkpoints: super::CheckpointCounts::default(),
                dirty_bound_pages: super::schedule::DEFAULT_BOUND_PAGES,
                link_bytes_per_sec: None,
                transport: "none",
                tracker: "",
                heartbeats_sent: 0,
                ingress: crate::ingress::IngressStats::default(),
                page_deltas: crate::transport::PageDeltaStats::default(),
            }),
        }
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> StatusSnapshot {
        lock(&self.inner).clone()
    }

    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut StatusSnapshot) -> R) -> R {
        f(&mut lock(&self.inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_progress_gives_percent_rate_and_time_left() {
        let mut p = SyncProgress { pages_total: 256, disk_bytes_total: 1 << 20, ..SyncProgress::default() };
        assert_eq!((p.bytes_total(), p.percent(), p.rate(), p.eta()), (2 << 20, 0, None, None));
        p.pages_sent = 256;
        p.elapsed = Duration::from_secs(2);
        assert_eq!((p.bytes_sent(), p.percent(), p.rate()), (1 << 20, 50, Some(1 << 19)));
        assert_eq!(p.eta(), Some(Duration::from_secs(2)));
        p.disk_bytes_sent = 1 << 20;
        assert_eq!((p.percent(), p.eta()), (100, Some(Duration::ZERO)));
        assert_eq!(SyncProgress::default().percent(), 100, "nothing to send");
    }

    #[test]
    fn lag_and_link_ratio() {
        let mut s = EngineStatus::new().snapshot();
        assert_eq!(s.lag_epochs(), 0);
        assert_eq!(s.link_per_dirty_byte(), None);
        s.last_sent = Some(EpochId(9));
        s.last_acked = Some(EpochId(6));
        s.link_bytes = 150;
        s.dirty_bytes = 100;
        assert_eq!(s.lag_epochs(), 3);
        assert_eq!(s.link_per_dirty_byte(), Some(1.5));
        assert_eq!((s.hot_written_share(), s.link_per_written_byte()), (None, None), "no hot pages");
        // 60 of the 100 dirty bytes were hot pages, and half the hot pages sampled were written:
        // 70 bytes written.
        s.hot_bytes = 60;
        s.hot_samples = (10, 5);
        assert_eq!(s.hot_written_share(), Some(0.5));
        assert_eq!(s.link_per_written_byte(), Some(150.0 / 70.0));
    }
}
