//! When the next checkpoint is due, and what each checkpoint was for.
//!
//! A checkpoint is due when guest output waits (at least [`EngineConfig::min_epoch_gap`] after the
//! last one began), when the pages the guest dirtied without answering anyone pass a bound, and at
//! the latest [`EngineConfig::epoch_interval`] after the last one. At that interval a checkpoint is
//! skipped when nothing changed: no page written, no output, no disk write (the backup's copy is
//! then the VM as it is, and an idle pair costs heartbeats only).
//!
//! The dirty bound: while no output waits, the engine harvests the dirty pages every
//! [`EngineConfig::dirty_probe_interval`] with the VM running (the pages go with the next
//! checkpoint) and checkpoints early once they would take longer than
//! [`EngineConfig::dirty_send_budget`] to send at the link's measured rate. So the epoch that
//! carries the guest's next answer never has to send a long backlog first, whatever the link.

use std::time::{Duration, Instant};

use ftvm_proto::pages::PageRangeSet;

use super::EngineConfig;
use crate::PAGE_SIZE;

/// The dirty bound when the link's rate is not known yet.
pub(super) const DEFAULT_BOUND_PAGES: u64 = 1024;
/// The bound never goes below this (a slow link still gets epochs worth their pause).
const MIN_BOUND_PAGES: u64 = 64;
/// Nor above this (1 GiB): a bound is a bound.
const MAX_BOUND_PAGES: u64 = 1 << 18;

/// When the next checkpoint is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Now.
    Now,
    /// After this long, whatever happens.
    After(Duration),
    /// As soon as guest output waits, at the latest after this long.
    OnOutputOr(Duration),
}

/// Why a checkpoint was taken (or skipped), counted in status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointCounts {
    /// Guest output waited.
    pub output: u64,
    /// The dirty pages passed the bound.
    pub dirty: u64,
    /// The interval passed (or a first checkpoint).
    pub interval: u64,
    /// The interval passed and nothing had changed: no checkpoint.
    pub skipped: u64,
}

/// The engine's schedule state.
#[derive(Debug)]
pub(super) struct Schedule {
    /// Pages harvested while the VM ran; the next checkpoint carries them.
    pub pending: PageRangeSet,
    next_probe: Instant,
    /// The dirty bound, in pages.
    pub bound_pages: u64,
    /// The link's rate over the last epochs, bytes per second of sending.
    pub link_rate: Option<f64>,
    /// The pending pages passed the bound.
    pub over_bound: bool,
    pub counts: CheckpointCounts,
}

impl Schedule {
    pub(super) fn new(cfg: &EngineConfig) -> Self {
        Self {
            pending: PageRangeSet::new(),
            next_probe: Instant::now() + cfg.dirty_probe_interval,
            bound_pages: DEFAULT_BOUND_PAGES,
            link_rate: None,
            over_bound: false,
            counts: CheckpointCounts::default(),
        }
    }

    /// Forgets the pending pages (tracking starts over, or stops).
    pub(super) fn forget(&mut self) {
        self.pending.clear();
        self.over_bound = false;
    }

    /// Hands the pending pages to a checkpoint.
    pub(super) fn take_pending(&mut self) -> PageRangeSet {
        self.over_bound = false;
        std::mem::take(&mut self.pending)
    }

    /// How long until the next look at the dirty pages (zero: now); `None` without a bound.
    pub(super) fn until_probe(&self, cfg: &EngineConfig, now: Instant) -> Option<Duration> {
        cfg.dirty_send_budget.map(|_| self.next_probe.saturating_duration_since(now))
    }

    /// Whether a look at the dirty pages is due; if so, the next one is scheduled.
    pub(super) fn probe_due(&mut self, cfg: &EngineConfig, now: Instant) -> bool {
        if cfg.dirty_send_budget.is_none() || now < self.next_probe {
            return false;
        }
        self.next_probe = now + cfg.dirty_probe_interval;
        true
    }

    /// Notes the pending pages after a look at `now`: over the bound or not. When the guest wrote
    /// nothing at all, the next look waits for the interval: an idle guest is looked at once per
    /// interval (to skip its checkpoint), not every probe interval.
    pub(super) fn looked(&mut self, cfg: &EngineConfig, now: Instant) {
        self.over_bound = self.pending.page_count() >= self.bound_pages;
        if self.pending.is_empty() {
            self.next_probe = self.next_probe.max(now + cfg.epoch_interval);
        }
    }

    /// The link sent `bytes` in `sending` over the last epochs, carrying `page_bytes` of dirty
    /// pages: the bound follows the pages sent per second of sending, not the bytes (pages sent
    /// as deltas take a fraction of theirs on the link).
    pub(super) fn link_measured(&mut self, cfg: &EngineConfig, bytes: u64, page_bytes: u64, sending: Duration) {
        let Some(budget) = cfg.dirty_send_budget else { return };
        if bytes == 0 || sending.is_zero() {
            return;
        }
        self.link_rate = Some(bytes as f64 / sending.as_secs_f64());
        if page_bytes > 0 {
            self.bound_pages = bound_for(page_bytes as f64 / sending.as_secs_f64(), budget);
        }
    }
}

/// Pages that take `budget` to send at `rate` bytes per second, within the bound's limits.
fn bound_for(rate: f64, budget: Duration) -> u64 {
    let pages = rate * budget.as_secs_f64() / PAGE_SIZE as f64;
    (pages as u64).clamp(MIN_BOUND_PAGES, MAX_BOUND_PAGES)
}

/// When the next checkpoint is due, `since` the last one began, given whether output waits and
/// the dirty pages passed the bound (see the module documentation).
pub(super) fn due(cfg: &EngineConfig, since: Duration, output_waiting: bool, over_bound: bool) -> Due {
    let interval = cfg.epoch_interval;
    let Some(to_interval) = interval.checked_sub(since).filter(|d| !d.is_zero()) else {
        return Due::Now;
    };
    let Some(gap) = cfg.min_epoch_gap.filter(|g| *g < interval) else {
        return Due::After(to_interval);
    };
    if let Some(to_gap) = gap.checked_sub(since).filter(|d| !d.is_zero()) {
        return Due::After(to_gap);
    }
    if output_waiting || over_bound {
        return Due::Now;
    }
    Due::OnOutputOr(to_interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn output_and_the_bound_are_due_after_the_gap_and_the_interval_always() {
        let cfg = EngineConfig::default();
        assert_eq!(due(&cfg, Duration::ZERO, true, false), Due::After(Duration::from_micros(200)));
        assert_eq!(due(&cfg, MS, true, false), Due::Now);
        assert_eq!(due(&cfg, MS, false, true), Due::Now);
        assert_eq!(due(&cfg, MS, false, false), Due::OnOutputOr(49 * MS));
        assert_eq!(due(&cfg, 50 * MS, false, false), Due::Now);
        let no_gap = EngineConfig { min_epoch_gap: None, ..EngineConfig::default() };
        assert_eq!(due(&no_gap, MS, true, true), Due::After(49 * MS));
    }

    #[test]
    fn the_bound_follows_the_link() {
        let cfg = EngineConfig::default();
        let mut s = Schedule::new(&cfg);
        assert_eq!(s.bound_pages, DEFAULT_BOUND_PAGES);
        // 1 GB/s and a 1 ms budget: 1 MB, 244 pages.
        s.link_measured(&cfg, 1_000_000, 1_000_000, MS);
        assert_eq!(s.bound_pages, 244);
        s.link_measured(&cfg, 10, 10, Duration::from_secs(1));
        assert_eq!(s.bound_pages, MIN_BOUND_PAGES);
        s.link_measured(&cfg, u64::MAX, u64::MAX, MS);
        assert_eq!(s.bound_pages, MAX_BOUND_PAGES);
        s.link_measured(&cfg, 0, 0, MS);
        assert_eq!(s.bound_pages, MAX_BOUND_PAGES, "nothing measured, nothing changes");
        // Pages sent as deltas: 2 MB of pages in 1 MB of link bytes. The bound counts the pages.
        s.link_measured(&cfg, 1_000_000, 2_000_000, MS);
        assert_eq!(s.bound_pages, 488);
        assert!(s.link_rate.is_some_and(|r| (r - 1e9).abs() < 1.0), "{:?}", s.link_rate);
        s.pending.insert(0, MAX_BOUND_PAGES);
        s.looked(&cfg, Instant::now());
        assert!(s.over_bound);
        assert_eq!(s.take_pending().page_count(), MAX_BOUND_PAGES);
        assert!(!s.over_bound && s.pending.is_empty());
    }

    #[test]
    fn probes_come_at_their_interval_and_not_without_a_budget() {
        let cfg = EngineConfig::default();
        let t0 = Instant::now();
        let mut s = Schedule::new(&cfg);
        assert!(!s.probe_due(&cfg, t0));
        let later = t0 + cfg.dirty_probe_interval + MS;
        assert!(s.probe_due(&cfg, later));
        assert!(!s.probe_due(&cfg, later), "once per interval");
        assert_eq!(s.until_probe(&cfg, later), Some(cfg.dirty_probe_interval));
        // Nothing written: the next look waits for the interval.
        s.looked(&cfg, later);
        assert_eq!(s.until_probe(&cfg, later), Some(cfg.epoch_interval));
        let off = EngineConfig { dirty_send_budget: None, ..EngineConfig::default() };
        assert_eq!(s.until_probe(&off, later), None);
        assert!(!s.probe_due(&off, later + Duration::from_secs(1)));
    }
}
