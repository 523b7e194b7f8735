//! Which pages a KVM dirty bitmap harvest leaves writable: the guest's hot pages.
//!
//! Every first write to a write-protected page after a harvest is a fault into KVM, which costs
//! 6–8 µs under this machine's nested KVM (no page-modification logging for a nested
//! hypervisor; AMD hosts log with faults too; Intel's PML logs without them, and there the
//! tracker leaves nothing writable, see `KvmBitmap::with_hot_pages`). A request-serving guest writes the same few dozen pages in every epoch (its
//! stack, its network rings and buffers, its connection state), so protecting them again at each
//! harvest costs more guest time than sending them does. With KVM's manual dirty-log protection
//! (`KVM_CLEAR_DIRTY_LOG`), the harvest chooses which reported pages to write-protect again; a
//! page left writable stays set in KVM's bitmap and is reported (and sent) by every harvest until
//! it is protected.
//!
//! The policy, per page:
//! - a page seen written in two harvests out of the last [`PROVE_WINDOW`] (six; each time after
//!   it had been write-protected) becomes hot: it is left writable, up to [`HotPages::MAX_PAGES`];
//! - every [`HotPages::COOL_EVERY`] harvests, and when the owner says the guest went quiet
//!   ([`HotPages::cool`]), every hot page is write-protected again and counts as written in that
//!   harvest: those the guest still writes become hot again at their next write, within the
//!   window.
//!
//! Why two writes in six harvests, when stop 19 asked for six in a row: a guest serving many
//! clients spreads them over several epochs (each epoch carries the answers ready at its pause),
//! so most of its pages (a connection's buffers, its state) are written in one epoch of every
//! few, never in six in a row. Under `redis-benchmark -c 50` only 8–11 pages were hot, and the
//! guest took about 3 write faults per GET, each about 16 µs of guest time here: 56 µs of vCPU
//! time per GET against 10 µs unprotected, and 254 epochs a second. With two writes in six, 0.4
//! faults per GET and 22 µs of vCPU time, most of the faults the second proof of every hot page
//! after each cooling (every 32 harvests then); with the cooling's credit and a cooling every 128
//! harvests, 0.07 faults and 14 µs. Six in a row had been chosen for the A-Link's bytes (a hot
//! page the guest did not write was sent whole); since pages sent again go as their difference
//! from the backup's copy, such a page costs a few bytes and the copy into the staging buffer,
//! about 0.3 µs, against a fault's 16.
//!
//! Never a matter of safety: a hot page is in every harvest, whether it was written or not, so a
//! checkpoint never lacks a page the guest wrote. It only costs link bytes and copies for hot
//! pages the guest did not write in that epoch, which the cooling bounds. How many that is, is
//! measured: the harvest after each periodic cooling sees which of the cooled pages the guest
//! wrote again in one epoch ([`HotPages::samples`]).

/// Harvests looked at for a page's second write: a page written (while protected) in this
/// harvest and in one of the `PROVE_WINDOW - 1` before it becomes hot.
pub const PROVE_WINDOW: usize = 6;

/// The hot-page policy's state over a VM's memory slots (bit `i` of word `w` of slot `s`: page
/// `64 * w + i` of slot `s`, as in KVM's bitmap).
#[derive(Debug, Default)]
pub struct HotPages {
    /// Pages left writable at the last harvest, per slot.
    hot: Vec<Vec<u64>>,
    /// Pages seen written (after a write-protection) at each of the last harvests, per slot, in
    /// no particular order (a page becomes hot when it is in one of them and written again).
    seen: [Vec<Vec<u64>>; PROVE_WINDOW - 1],
    /// The entry of `seen` the next harvest replaces: the oldest. A ring, so that a harvest
    /// writes one entry instead of moving all of them down.
    oldest: usize,
    /// Pages in `hot`, all slots.
    hot_count: u64,
    /// Harvests since the last cooling.
    since_cool: u32,
    /// The next harvest protects every page again.
    cool_next: bool,
    /// The hot pages a periodic cooling protected, to be looked for in the next harvest.
    probe_next: Option<Vec<Vec<u64>>>,
    /// The hot pages the last cooling protected, looked for in this harvest.
    probe: Option<Vec<Vec<u64>>>,
    /// Hot pages sampled that way, and of those, written again within one epoch.
    sampled: (u64, u64),
}

/// What [`HotPages::plan`] decided for one slot.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// The pages to write-protect again (`KVM_CLEAR_DIRTY_LOG`'s bitmap).
    pub protect: Vec<u64>,
    /// Reported pages left writable: hot pages, written or not.
    pub kept_writable: u64,
}

impl HotPages {
    /// Most pages left writable at once (2 MiB): a guest writing more than this per epoch is
    /// moving data, not serving from a hot working set, and its faults are a small part of the
    /// epoch.
    pub const MAX_PAGES: u64 = 512;

    /// Harvests between two coolings: a page the guest stopped writing is sent for at most this
    /// many epochs, and a page that stays hot costs one fault per this many epochs.
    pub const COOL_EVERY: u32 = 128;

    /// A policy over `slots` memory slots, nothing hot.
    pub fn new(slots: usize) -> Self {
        Self { hot: vec![Vec::new(); slots], seen: std::array::from_fn(|_| vec![Vec::new(); slots]), ..Self::default() }
    }

    /// Forgets everything (dirty logging restarted: all of memory is write-protected again).
    pub fn reset(&mut self) {
        let slots = self.hot.len();
        let sampled = self.sampled;
        *self = Self::new(slots);
        self.sampled = sampled;
    }

    /// The next harvest write-protects every page again (the guest went quiet: its hot pages
    /// must not keep every idle check busy).
    pub fn cool(&mut self) {
        self.cool_next = true;
    }

    /// Pages left writable now, all slots.
    pub fn hot_count(&self) -> u64 {
        self.hot_count
    }

    /// The pages of slot `slot` left writable now, as KVM's bitmap words (empty for a slot not
    /// harvested yet or not known).
    pub fn slot_words(&self, slot: usize) -> &[u64] {
        self.hot.get(slot).map_or(&[], Vec::as_slice)
    }

    /// Hot pages sampled at the harvests after periodic coolings, and how many of them the guest
    /// had written again within that one epoch: the share of hot pages' bytes that are written
    /// bytes. (Coolings for a quiet guest are not sampled: it writes nothing.)
    pub fn samples(&self) -> (u64, u64) {
        self.sampled
    }

    /// Starts a harvest: whether it cools (every hot page is protected again in this harvest).
    pub fn begin_harvest(&mut self) -> bool {
        self.oldest = (self.oldest + 1) % self.seen.len();
        self.since_cool += 1;
        self.probe = self.probe_next.take();
        let periodic = self.since_cool >= Self::COOL_EVERY;
        let cool = self.cool_next || periodic;
        if cool {
            if periodic && !self.cool_next && self.hot_count > 0 {
                self.sampled.0 += self.hot_count;
                self.probe_next = Some(self.hot.clone());
            }
            self.cool_next = false;
            self.since_cool = 0;
        }
        cool
    }

    /// For slot `slot`, given KVM's bitmap `reported` (written since protected, plus the pages
    /// left writable, whose bits stay set): which pages to protect again, and updates the hot set.
    /// `cooling`: what [`Self::begin_harvest`] said for this harvest.
    ///
    /// # Panics
    /// If `slot` is not below the number of slots given to [`Self::new`].
    pub fn plan(&mut self, slot: usize, reported: &[u64], cooling: bool) -> SlotPlan {
        if let Some(probed) = self.probe.as_ref().and_then(|p| p.get(slot)) {
            self.sampled.1 += reported.iter().zip(probed).map(|(r, p)| u64::from((r & p).count_ones())).sum::<u64>();
        }
        let hot = &mut self.hot[slot];
        hot.resize(reported.len(), 0);
        for seen in &mut self.seen {
            seen[slot].resize(reported.len(), 0);
        }
        let mut protect = vec![0u64; reported.len()];
        let mut kept_writable = 0;
        // This harvest's written pages replace the oldest harvest's, which still counts for
        // the promotion below: taken out of the ring meanwhile.
        let oldest = self.oldest;
        let mut newest = std::mem::take(&mut self.seen[oldest][slot]);
        for (w, &bits) in reported.iter().enumerate() {
            let was_hot = hot[w];
            if bits == 0 && was_hot == 0 {
                // Most of memory: not written, not hot; only its oldest record goes.
                newest[w] = 0;
                continue;
            }
            // A hot page's bit is set whether the guest wrote it or not: no evidence either way.
            let written = bits & !was_hot;
            let kept = if cooling { 0 } else { was_hot & bits };
            self.hot_count -= u64::from((was_hot & !kept).count_ones());
            let mut keep = kept;
            if !cooling && written != 0 {
                // Written in one of the harvests before too (the oldest among them).
                let before = self.seen.iter().enumerate().filter(|&(age, _)| age != oldest).fold(newest[w], |b, (_, seen)| b | seen[slot][w]);
                let mut promote = written & before;
                while promote != 0 && self.hot_count < Self::MAX_PAGES {
                    let lowest = promote & promote.wrapping_neg();
                    keep |= lowest;
                    promote &= !lowest;
                    self.hot_count += 1;
                }
            }
            // A cooled page counts as written in this harvest: if the guest still writes it, its
            // next write proves it again (one fault per cooling, not two).
            newest[w] = if cooling { written | was_hot } else { written };
            hot[w] = keep;
            protect[w] = bits & !keep;
            kept_writable += u64::from(keep.count_ones());
        }
        self.seen[oldest][slot] = newest;
        SlotPlan { protect, kept_writable }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn harvest(p: &mut HotPages, reported: u64) -> SlotPlan {
        let cooling = p.begin_harvest();
        p.plan(0, &[reported], cooling)
    }

    /// Enough harvests reporting `reported` for its pages to become hot.
    fn make_hot(p: &mut HotPages, reported: u64) {
        for _ in 0..2 {
            harvest(p, reported);
        }
    }

    #[test]
    fn a_page_written_twice_within_the_window_is_left_writable() {
        let mut p = HotPages::new(1);
        // Page 1 written now and again at the end of the window; page 2 now and once the window
        // has passed; page 0 in no two harvests of any window.
        assert_eq!(harvest(&mut p, 0b0110).protect, vec![0b0110], "first sight: protect both");
        for n in 2..PROVE_WINDOW {
            assert_eq!(harvest(&mut p, 0).protect, vec![0], "harvest {n}: nothing written");
        }
        let plan = harvest(&mut p, 0b0011);
        assert_eq!(plan.protect, vec![0b0001], "page 1 was written twice in {PROVE_WINDOW} harvests: left writable");
        assert_eq!(plan.kept_writable, 1);
        assert_eq!(p.hot_count(), 1);
        let plan = harvest(&mut p, 0b0110);
        assert_eq!(plan.protect, vec![0b0100], "page 2's first write has left the window");
        // Still reported (KVM keeps its bit set), and still left writable.
        let plan = harvest(&mut p, 0b0010);
        assert_eq!(plan.protect, vec![0]);
        assert_eq!(plan.kept_writable, 1);
    }

    #[test]
    fn a_page_written_once_per_window_stays_protected() {
        let mut p = HotPages::new(1);
        for i in 0..5 * PROVE_WINDOW {
            let reported = if i % PROVE_WINDOW == 0 { 0b0101 } else { 0 };
            assert_eq!(harvest(&mut p, reported).protect, vec![reported], "harvest {i}");
        }
        assert_eq!(p.hot_count(), 0);
    }

    #[test]
    fn cooling_protects_every_hot_page_and_hot_ones_come_back() {
        let mut p = HotPages::new(1);
        make_hot(&mut p, 0b11);
        assert_eq!(p.hot_count(), 2);
        p.cool();
        assert_eq!(harvest(&mut p, 0b11).protect, vec![0b11], "a cooling harvest protects all it reports");
        assert_eq!(p.hot_count(), 0);
        // A cooled page counts as written at its cooling: written again within the window, it is
        // hot again at once; written only after the window, it needs two writes.
        assert_eq!(harvest(&mut p, 0b01).protect, vec![0], "page 0 written again: hot again");
        assert_eq!(p.hot_count(), 1);
        for _ in 1..PROVE_WINDOW {
            harvest(&mut p, 0b01);
        }
        assert_eq!(harvest(&mut p, 0b11).protect, vec![0b10], "page 1's cooling has left the window");
        assert_eq!(harvest(&mut p, 0b11).protect, vec![0], "page 1's second write");
        assert_eq!(p.hot_count(), 2);
    }

    #[test]
    fn cooling_comes_on_its_own_every_so_many_harvests() {
        let mut p = HotPages::new(1);
        let cooled = (0..2 * HotPages::COOL_EVERY)
            .filter(|_| {
                let before = p.hot_count();
                let plan = harvest(&mut p, 0b1);
                before == 1 && plan.protect == vec![0b1]
            })
            .count();
        assert_eq!(cooled, 2);
    }

    /// The harvest after a periodic cooling counts which cooled pages were written again.
    #[test]
    fn periodic_coolings_sample_how_many_hot_pages_are_written() {
        let mut p = HotPages::new(1);
        harvest(&mut p, 0b111);
        // Pages 0..=2 hot; then only pages 0 and 1 keep being written (page 2 still reported:
        // KVM keeps the bit of a page left writable).
        while p.since_cool + 1 < HotPages::COOL_EVERY {
            harvest(&mut p, 0b111);
        }
        assert_eq!(p.hot_count(), 3);
        assert_eq!(harvest(&mut p, 0b111).protect, vec![0b111], "the periodic cooling");
        assert_eq!(p.samples(), (3, 0));
        harvest(&mut p, 0b011);
        assert_eq!(p.samples(), (3, 2), "two of the three cooled pages were written again");
        // A cooling for a quiet guest is not sampled.
        p.cool();
        harvest(&mut p, 0b011);
        harvest(&mut p, 0);
        assert_eq!(p.samples(), (3, 2));
    }

    #[test]
    fn the_hot_set_is_bounded() {
        let words = (HotPages::MAX_PAGES as usize) / 64 + 2;
        let mut p = HotPages::new(2);
        let all = vec![u64::MAX; words];
        let cooling = p.begin_harvest();
        p.plan(0, &all, cooling);
        p.plan(1, &all, cooling);
        let cooling = p.begin_harvest();
        let first = p.plan(0, &all, cooling);
        let second = p.plan(1, &all, cooling);
        assert_eq!(p.hot_count(), HotPages::MAX_PAGES);
        assert_eq!(first.kept_writable + second.kept_writable, HotPages::MAX_PAGES);
        let protected: u64 = first.protect.iter().chain(&second.protect).map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(protected, 2 * 64 * words as u64 - HotPages::MAX_PAGES, "every other page is protected");
    }

    /// The policy page by page, as the module comment states it: a page written (and not hot) in
    /// a harvest and in one of the [`PROVE_WINDOW`] - 1 before becomes hot, a cooling protects
    /// every hot page and counts it as written.
    #[derive(Default)]
    struct PageByPage {
        hot: Vec<bool>,
        /// Harvests since the page was last seen written (and not hot); `None`: never.
        since_written: Vec<Option<usize>>,
    }

    impl PageByPage {
        fn plan(&mut self, reported: &[u64], cooling: bool) -> SlotPlan {
            let pages = reported.len() * 64;
            self.hot.resize(pages, false);
            self.since_written.resize(pages, None);
            let mut plan = SlotPlan { protect: vec![0; reported.len()], kept_writable: 0 };
            for page in 0..pages {
                let bit = reported[page / 64] >> (page % 64) & 1 == 1;
                let written = bit && !self.hot[page];
                let since = self.since_written[page].map(|n| n + 1);
                let proven = written && since.is_some_and(|n| n < PROVE_WINDOW);
                let cooled = cooling && self.hot[page];
                self.since_written[page] = if written || cooled { Some(0) } else { since };
                let keep = !cooling && ((self.hot[page] && bit) || proven);
                self.hot[page] = keep;
                plan.kept_writable += u64::from(keep);
                if bit && !keep {
                    plan.protect[page / 64] |= 1 << (page % 64);
                }
            }
            plan
        }
    }

    #[test]
    fn the_word_wise_plan_is_the_page_by_page_policy() {
        // Two slots of 8 words; each page written with a probability that changes by page and
        // over time, so that gaps of every length between writes happen and pages come and go.
        let mut p = HotPages::new(2);
        let mut model = [PageByPage::default(), PageByPage::default()];
        let mix = |x: u64| (x ^ (x >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17);
        let mut kept = 0;
        for harvest in 0..400u64 {
            let cooling = p.begin_harvest();
            for (slot, model) in model.iter_mut().enumerate() {
                let reported: Vec<u64> = (0..8u64)
                    .map(|w| {
                        let r = mix(harvest * 1000 + slot as u64 * 100 + w);
                        // Mostly the same pages (the first words of each slot), some at random.
                        let steady = if w < 3 { !0u64 >> (harvest / 50) } else { 0 };
                        (steady & (r | mix(r))) | (r & mix(r + 1) & mix(r + 2))
                    })
                    .collect();
                let want = model.plan(&reported, cooling);
                kept += want.kept_writable;
                let got = p.plan(slot, &reported, cooling);
                assert_eq!(got, want, "harvest {harvest}, slot {slot}");
            }
        }
        assert!(kept > 1000, "pages became hot: {kept} kept writable in all");
        assert!(p.hot_count() < HotPages::MAX_PAGES, "the bound is the other test's");
    }

    #[test]
    fn reset_forgets_the_hot_pages() {
        let mut p = HotPages::new(1);
        make_hot(&mut p, 0b1);
        assert_eq!(p.hot_count(), 1);
        p.reset();
        assert_eq!(p.hot_count(), 0);
        assert_eq!(harvest(&mut p, 0b1).protect, vec![0b1]);
    }
}
