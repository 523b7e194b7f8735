//! Per-epoch metrics as a typed state machine: an epoch is [`Paused`], then [`Captured`] (dirty
//! pages harvested, state read, output and disk writes sealed, pages staged), then [`Resumed`],
//! then [`Sent`] (committed on the link, waiting for its acknowledgement). Each transition records
//! the time and figures of its step, so a metric cannot be read before the step that makes it
//! exists (the pause length is only known once resumed, the bytes only once sent).

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use ftvm_proto::EpochId;
use ftvm_vmm::machine::CaptureTimings;

/// The vCPUs and devices are paused for the epoch.
#[derive(Debug)]
pub enum Paused {}
/// Pages harvested, state read, output and disk writes sealed, pages copied out.
#[derive(Debug)]
pub enum Captured {}
/// The machine runs again.
#[derive(Debug)]
pub enum Resumed {}
/// Committed on the A-Link; the acknowledgement is pending.
#[derive(Debug)]
pub enum Sent {}

/// What one epoch cost. Fields are filled in as the epoch advances; see [`EpochContext`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochMetrics {
    /// The epoch.
    pub epoch: EpochId,
    /// Dirty pages it carries.
    pub pages: u64,
    /// Of those, pages the dirty tracker had left writable (the guest's hot pages: reported
    /// whether written or not, see `ftvm_vmm::dirty::hot_pages`).
    pub hot_pages: u64,
    /// Disk writes it carries.
    pub disk_writes: u64,
    /// Guest frames sealed with it (held until its acknowledgement).
    pub frames: u64,
    /// Asking every vCPU and the devices to stop, until they had.
    pub pause_wait: Duration,
    /// Where the capture spent its time (harvest, vCPU state, devices).
    pub capture: CaptureTimings,
    /// Copying the dirty pages into the staging buffer, in the pause; for a copy-on-write epoch,
    /// write-protecting them instead.
    pub copy: Duration,
    /// A copy-on-write epoch's copy, after the resume (zero for stop-and-copy).
    pub copy_after_resume: Duration,
    /// Writes that waited for a copy-on-write epoch's copy of their page.
    pub write_faults: u64,
    /// Pages a copy-on-write epoch write-protected and copied after the resume (the others were
    /// copied in the pause).
    pub copied_later_pages: u64,
    /// Resuming the devices and vCPUs.
    pub resume: Duration,
    /// From the pause request to the machine running again: what the guest lost.
    pub pause: Duration,
    /// Bytes put on the A-Link for the epoch (pages and framing; state and disk writes added).
    pub link_bytes: u64,
    /// Bytes of machine state.
    pub state_bytes: u64,
    /// Sending the epoch, from resume to the end of commit.
    pub send: Duration,
}

impl EpochMetrics {
    /// Bytes of dirty guest memory the epoch carries.
    pub fn dirty_bytes(&self) -> u64 {
        self.pages * crate::PAGE_SIZE as u64
    }
}

/// One epoch in state `S`.
#[derive(Debug)]
pub struct EpochContext<S> {
    started: Instant,
    mark: Instant,
    metrics: EpochMetrics,
    _state: PhantomData<S>,
}

impl EpochContext<Paused> {
    /// The pause for `epoch` was asked for at `started` and completed now.
    pub fn paused(epoch: EpochId, started: Instant) -> Self {
        let now = Instant::now();
        Self {
            started,
            mark: now,
            metrics: EpochMetrics { epoch, pause_wait: now - started, ..EpochMetrics::default() },
            _state: PhantomData,
        }
    }

    /// Capture, seals and the staging copy are done.
    pub fn captured(
        mut self,
        pages: u64,
        hot_pages: u64,
        disk_writes: u64,
        frames: u64,
        capture: CaptureTimings,
        copy: Duration,
    ) -> EpochContext<Captured> {
        self.metrics.pages = pages;
        self.metrics.hot_pages = hot_pages;
        self.metrics.disk_writes = disk_writes;
        self.metrics.frames = frames;
        self.metrics.capture = capture;
        self.metrics.copy = copy;
        self.mark = Instant::now();
        self.into_state()
    }
}

impl EpochContext<Captured> {
    /// The machine runs again.
    pub fn resumed(mut self) -> EpochContext<Resumed> {
        let now = Instant::now();
        self.metrics.resume = now - self.mark;
        self.metrics.pause = now - self.started;
        self.mark = now;
        self.into_state()
    }
}

impl EpochContext<Resumed> {
    /// From the pause request to the resume.
    pub fn pause(&self) -> Duration {
        self.metrics.pause
    }

    /// A copy-on-write epoch's pages were copied after the resume, in `took`, `faults` writers
    /// waiting for theirs.
    pub fn copied_after_resume(&mut self, took: Duration, pages: u64, faults: u64) {
        self.metrics.copy_after_resume = took;
        self.metrics.copied_later_pages = pages;
        self.metrics.write_faults = faults;
    }

    /// The epoch was committed on the link with `link_bytes` bytes (state included).
    pub fn sent(mut self, link_bytes: u64, state_bytes: u64) -> EpochContext<Sent> {
        self.metrics.link_bytes = link_bytes;
        self.metrics.state_bytes = state_bytes;
        self.metrics.send = self.mark.elapsed();
        self.into_state()
    }
}

impl<S> EpochContext<S> {
    /// The epoch.
    pub fn epoch(&self) -> EpochId {
        self.metrics.epoch
    }

    /// When the pause was asked for.
    pub fn started(&self) -> Instant {
        self.started
    }

    fn into_state<T>(self) -> EpochContext<T> {
        EpochContext { started: self.started, mark: self.mark, metrics: self.metrics, _state: PhantomData }
    }
}

impl EpochContext<Sent> {
    /// The figures of a fully sent epoch.
    pub fn metrics(&self) -> &EpochMetrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_fill_in_as_the_epoch_advances() {
        let t0 = Instant::now();
        let ctx = EpochContext::paused(EpochId(7), t0);
        let ctx = ctx.captured(3, 0, 1, 2, CaptureTimings::default(), Duration::from_micros(5));
        let ctx = ctx.resumed();
        let ctx = ctx.sent(5 * 4096, 100);
        let m = ctx.metrics();
        assert_eq!((m.epoch, m.pages, m.disk_writes, m.frames), (EpochId(7), 3, 1, 2));
        assert_eq!(m.dirty_bytes(), 3 * 4096);
        assert!(m.pause >= m.pause_wait);
        assert_eq!(m.link_bytes, 5 * 4096);
    }
}

/// The 50th and 99th percentiles of one figure over recent epochs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

impl Percentiles {
    /// Of `values` (reordered in place); zero when empty.
    pub fn of(values: &mut [Duration]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_unstable();
        let at = |q: usize| values[(values.len() * q / 100).min(values.len() - 1)];
        Self { p50: at(50), p99: at(99) }
    }
}

/// The pause and its parts over the last epochs (what status and the benchmark report).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochWindowStats {
    /// Epochs the figures cover.
    pub epochs: usize,
    /// From the pause request to running again.
    pub pause: Percentiles,
    /// Waiting for the vCPUs and devices to stop.
    pub pause_wait: Percentiles,
    /// Harvesting dirty pages.
    pub harvest: Percentiles,
    /// Reading the vCPUs' and devices' state.
    pub state: Percentiles,
    /// Copying dirty pages out in the pause (copy-on-write: arming the write protection).
    pub copy: Percentiles,
    /// A copy-on-write epoch's copy, after the resume.
    pub copy_after_resume: Percentiles,
    /// Resuming.
    pub resume: Percentiles,
    /// Sending the epoch (after the resume).
    pub send: Percentiles,
    /// Median dirty pages per epoch.
    pub pages_p50: u64,
    /// Median pages per epoch the tracker had left writable (counted in `pages_p50` too).
    pub hot_pages_p50: u64,
}

/// The last epochs' metrics, for [`EpochWindowStats`].
#[derive(Debug, Default)]
pub struct EpochWindow {
    recent: std::collections::VecDeque<EpochMetrics>,
}

impl EpochWindow {
    /// Epochs kept.
    pub const LEN: usize = 1024;

    /// Adds an epoch, forgetting the oldest beyond [`EpochWindow::LEN`].
    pub fn push(&mut self, m: EpochMetrics) {
        if self.recent.len() == Self::LEN {
            self.recent.pop_front();
        }
        self.recent.push_back(m);
    }

    /// Bytes put on the link, bytes of the dirty pages they carried, and time spent sending, over
    /// the epochs kept.
    pub fn link_totals(&self) -> (u64, u64, Duration) {
        self.recent.iter().fold((0, 0, Duration::ZERO), |(b, p, t), m| (b + m.link_bytes, p + m.dirty_bytes(), t + m.send))
    }

    /// Percentiles over the epochs kept.
    pub fn stats(&self) -> EpochWindowStats {
        let of = |f: &dyn Fn(&EpochMetrics) -> Duration| {
            let mut v: Vec<Duration> = self.recent.iter().map(f).collect();
            Percentiles::of(&mut v)
        };
        let median = |f: &dyn Fn(&EpochMetrics) -> u64| {
            let mut v: Vec<u64> = self.recent.iter().map(f).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        EpochWindowStats {
            epochs: self.recent.len(),
            pause: of(&|m| m.pause),
            pause_wait: of(&|m| m.pause_wait),
            harvest: of(&|m| m.capture.harvest),
            state: of(&|m| m.capture.vcpus + m.capture.devices),
            copy: of(&|m| m.copy),
            copy_after_resume: of(&|m| m.copy_after_resume),
            resume: of(&|m| m.resume),
            send: of(&|m| m.send),
            pages_p50: median(&|m| m.pages),
            hot_pages_p50: median(&|m| m.hot_pages),
        }
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn percentiles_of_a_window() {
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
        let mut w = EpochWindow::default();
        for i in 1..=2000u64 {
            w.push(EpochMetrics { pages: i, hot_pages: i / 2, pause: Duration::from_micros(i), ..EpochMetrics::default() });
        }
        let s = w.stats();
        assert_eq!(s.epochs, EpochWindow::LEN);
        // The window holds epochs 977..=2000.
        assert_eq!(s.pause.p50, Duration::from_micros(977 + 512));
        assert_eq!(s.pause.p99, Duration::from_micros(977 + 1013));
        assert_eq!(s.pages_p50, 977 + 512);
        assert_eq!(s.hot_pages_p50, (977 + 512) / 2);
    }
}
