//! Time keeping, the memory-dirtying load's pacing, and the idle wait's timeout.

/// The guest's clock: the TSC, turned into microseconds with the frequency from the boot info.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    tsc_khz: u64,
    origin: u64,
}

impl Clock {
    /// A clock whose zero is the TSC value `origin`; `tsc_khz` 0 is treated as 1 GHz.
    pub fn new(tsc_khz: u64, origin: u64) -> Self {
        Self {
            tsc_khz: if tsc_khz == 0 { 1_000_000 } else { tsc_khz },
            origin,
        }
    }

    /// Microseconds since the origin for the TSC value `tsc`.
    pub fn micros(&self, tsc: u64) -> u64 {
        (tsc.saturating_sub(self.origin) as u128 * 1000 / self.tsc_khz as u128) as u64
    }
}

/// Longest idle wait while anything is scheduled, in microseconds.
pub const MAX_WAIT_US: u64 = 100_000;
/// Ticks of dirtying the load catches up at most after a long pause (more are dropped).
pub const MAX_CATCH_UP_TICKS: u64 = 10;
/// One tick of the dirtying load: it dirties `pages_per_ms` pages once per millisecond.
pub const TICK_US: u64 = 1000;

/// Paces the dirtying load: `pages_per_ms` pages per 1 ms tick.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirtyPacer {
    next_tick_us: Option<u64>,
}

impl DirtyPacer {
    /// A pacer with no load running.
    pub const fn new() -> Self {
        Self { next_tick_us: None }
    }

    /// Pages to dirty now, at time `now_us`, for a load of `pages_per_ms`.
    pub fn due(&mut self, now_us: u64, pages_per_ms: u32) -> u64 {
        if pages_per_ms == 0 {
            self.next_tick_us = None;
            return 0;
        }
        let next = match self.next_tick_us {
            None => now_us,
            Some(t) => t,
        };
        if now_us < next {
            return 0;
        }
        let ticks = ((now_us - next) / TICK_US + 1).min(MAX_CATCH_UP_TICKS);
        let mut new_next = next + ticks * TICK_US;
        if new_next <= now_us {
            // Fell behind by more than the catch-up limit: drop the rest.
            new_next = now_us + TICK_US;
        }
        self.next_tick_us = Some(new_next);
        ticks * pages_per_ms as u64
    }

    /// When the next tick is due, if a load is running.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next_tick_us
    }
}

/// Walks the dirtying region round-robin.
#[derive(Clone, Copy, Debug, Default)]
pub struct PageCursor {
    pages: usize,
    next: usize,
}

impl PageCursor {
    /// A cursor over `pages` pages.
    pub const fn new(pages: usize) -> Self {
        Self { pages, next: 0 }
    }

    /// Calls `f` with the indices of the next `n` pages (wrapping; nothing if the region is empty).
    pub fn advance(&mut self, n: u64, mut f: impl FnMut(usize)) {
        if self.pages == 0 {
            return;
        }
        for _ in 0..n {
            f(self.next);
            self.next += 1;
            if self.next == self.pages {
                self.next = 0;
            }
        }
    }
}

/// The timeout for the idle wait, given what is scheduled (each a delay from now in µs, `None`
/// for nothing): `None` means wait for a device event only (`WAIT_FOREVER`); otherwise the
/// earliest delay, capped at [`MAX_WAIT_US`].
pub fn wait_timeout(delays: &[Option<u64>]) -> Option<u32> {
    delays
        .iter()
        .flatten()
        .min()
        .map(|&d| d.min(MAX_WAIT_US) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn clock_converts_tsc() {
        let c = Clock::new(2_000_000, 1000);
        assert_eq!(c.micros(1000), 0);
        assert_eq!(c.micros(1000 + 2_000_000_000), 1_000_000);
        assert_eq!(c.micros(0), 0);
        let huge = Clock::new(3_000_000, 0);
        assert_eq!(
            huge.micros(u64::MAX),
            (u64::MAX as u128 * 1000 / 3_000_000) as u64
        );
    }

    #[test]
    fn pacer_dirties_per_tick_and_caps_catch_up() {
        let mut p = DirtyPacer::new();
        assert_eq!(p.due(0, 0), 0);
        assert_eq!(p.next_deadline(), None);
        assert_eq!(p.due(5000, 100), 100, "starts at once");
        assert_eq!(p.next_deadline(), Some(6000));
        assert_eq!(p.due(5500, 100), 0);
        assert_eq!(p.due(6000, 100), 100);
        assert_eq!(p.due(9100, 100), 300, "ticks 7000, 8000 and 9000");
        assert_eq!(p.next_deadline(), Some(10000));
        // A long pause catches up at most MAX_CATCH_UP_TICKS ticks.
        assert_eq!(p.due(1_000_000, 10), 10 * MAX_CATCH_UP_TICKS);
        assert!(p.next_deadline().unwrap() > 1_000_000);
        // Load switched off.
        assert_eq!(p.due(2_000_000, 0), 0);
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn cursor_wraps() {
        let mut c = PageCursor::new(3);
        let mut seen = Vec::new();
        c.advance(7, |i| seen.push(i));
        assert_eq!(seen, [0, 1, 2, 0, 1, 2, 0]);
        let mut empty = PageCursor::new(0);
        empty.advance(5, |_| panic!());
    }

    #[test]
    fn wait_timeout_picks_the_earliest_and_caps() {
        assert_eq!(wait_timeout(&[None, None]), None);
        assert_eq!(wait_timeout(&[Some(500), None, Some(200)]), Some(200));
        assert_eq!(wait_timeout(&[Some(5_000_000)]), Some(MAX_WAIT_US as u32));
        assert_eq!(wait_timeout(&[Some(0)]), Some(0));
    }
}
