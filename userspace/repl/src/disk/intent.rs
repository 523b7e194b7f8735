//! The write-intent record of a host's copy of the disk: `<disk>.intent`, next to it.
//!
//! When a host comes back after a failure, its copy of the disk differs from the survivor's only
//! in the regions that either side wrote since the copies were last known equal: the survivor's
//! writes while it ran alone, and the returning host's writes that never reached the survivor
//! (the epochs it wrote locally but that were not acknowledged when it died). Each host keeps
//! this record of its own copy, so that a rejoin copies the union of the two instead of the whole
//! disk (the way md's write-intent bitmap resynchronises a RAID 1 mirror).
//!
//! The rules that make it safe:
//! - a region is **marked durably before** any write to it reaches the disk ([`WriteIntent::mark`]
//!   returns only once the record is on stable storage), so a crash never leaves a written region
//!   unmarked;
//! - a mark is **cleared** only when the peer acknowledged every write to that region
//!   ([`WriteIntent::acknowledged`]), and clears reach the file lazily: a stale file only has more
//!   marks, which costs copying, never correctness;
//! - a record that does not know the past (a new file beside an existing disk, an unreadable
//!   file, another region size) is **incomplete**, and an incomplete record asks for a full copy.
//!   A record becomes complete only when both copies are known equal ([`WriteIntent::in_sync`]:
//!   after a full synchronisation was acknowledged).
//!
//! Marks are rare (the first write to a region since its last clear), so each is one atomic
//! replace of the file (temporary file, sync, rename, sync the directory), like the term file.
//!
//! ```text
//! ftvm-intent 1
//! <vm id> <region bytes> <disk bytes> complete|incomplete
//! <the marks: one hex digit per 4 regions, region 0 in the low bit of the first digit>
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::durable::FileError;

const HEADER: &str = "ftvm-intent 1";

/// Bytes per region by default: a sequential writer marks (and syncs the record) once per MiB.
pub const DEFAULT_REGION_BYTES: u64 = 1 << 20;

/// Why the record could not be opened or stored.
#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    /// File system trouble.
    #[error(transparent)]
    Io(#[from] FileError),
    /// A region size that is zero or not a power of two, or a write outside the disk.
    #[error("Invalid write-intent request: {0}")]
    Invalid(String),
}

/// What a rejoin must copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyPlan {
    /// The whole disk (a record does not know the past).
    Full,
    /// These byte ranges of the disk (sorted, disjoint, merged); empty: the copies are equal.
    Ranges(Vec<Range<u64>>),
}

impl CopyPlan {
    /// Bytes to copy of a disk of `disk_bytes`.
    pub fn bytes(&self, disk_bytes: u64) -> u64 {
        match self {
            Self::Full => disk_bytes,
            Self::Ranges(r) => r.iter().map(|r| r.end - r.start).sum(),
        }
    }
}

/// The marks of one host's copy, as the other host sends them at a rejoin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marks {
    /// Bytes per region.
    pub region_bytes: u64,
    /// `None`: the record does not know the past (a full copy).
    pub regions: Option<Vec<u64>>,
}

/// The write-intent record of one disk.
#[derive(Debug)]
pub struct WriteIntent {
    path: PathBuf,
    vm: String,
    region_bytes: u64,
    disk_bytes: u64,
    complete: bool,
    /// One bit per region; set: the region may differ from the peer's copy.
    marks: Vec<u64>,
    /// The last epoch that wrote each marked region (in memory: after a restart the file's marks
    /// stay until the next [`WriteIntent::in_sync`]).
    last_epoch: BTreeMap<u64, u64>,
    /// Clears made in memory and not yet stored.
    clears_pending: bool,
}

fn path_for(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_os_string();
    name.push(".intent");
    PathBuf::from(name)
}

impl WriteIntent {
    /// The record of `disk` (of `disk_bytes`) for VM `vm`. A missing or unusable file (another VM,
    /// region size or disk size, or unreadable) gives an incomplete record, stored at once.
    pub fn open(disk: &Path, vm: &str, disk_bytes: u64, region_bytes: u64) -> Result<Self, IntentError> {
        if region_bytes == 0 || !region_bytes.is_power_of_two() {
            return Err(IntentError::Invalid(format!("region size {region_bytes} is not a power of two")));
        }
        let regions = disk_bytes.div_ceil(region_bytes);
        let words = usize::try_from(regions.div_ceil(64))
            .map_err(|_| IntentError::Invalid(format!("{regions} regions do not fit in memory")))?;
        let mut intent = Self {
            path: path_for(disk),
            vm: vm.to_string(),
            region_bytes,
            disk_bytes,
            complete: false,
            marks: vec![0; words],
            last_epoch: BTreeMap::new(),
            clears_pending: false,
        };
        match fs::read_to_string(&intent.path) {
            Ok(text) => match intent.parse(&text) {
                Some(marks) => {
                    intent.complete = true;
                    intent.marks = marks;
                }
                None => tracing::warn!(path = %intent.path.display(), "the write-intent record does not match this disk: the next rejoin copies it all"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileError::at("read", &intent.path)(e).into()),
        }
        if !intent.complete {
            intent.store()?;
        }
        Ok(intent)
    }

    /// The marks of a complete record that matches this disk, or `None`.
    fn parse(&self, text: &str) -> Option<Vec<u64>> {
        let mut lines = text.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let fields: Vec<&str> = lines.next()?.split(' ').collect();
        let [vm, region, disk, state] = fields[..] else { return None };
        let matches = vm == self.vm
            && region.parse::<u64>().ok()? == self.region_bytes
            && disk.parse::<u64>().ok()? == self.disk_bytes
            && state == "complete";
        if !matches {
            return None;
        }
        let hex = lines.next().unwrap_or("");
        let regions = self.regions();
        if hex.len() as u64 != regions.div_ceil(4) {
            return None;
        }
        let mut marks = vec![0u64; self.marks.len()];
        for (i, c) in hex.chars().enumerate() {
            let nibble = u64::from(c.to_digit(16)?);
            for bit in 0..4u64 {
                let region = i as u64 * 4 + bit;
                if nibble >> bit & 1 == 1 {
                    if region >= regions {
                        return None;
                    }
                    marks[(region / 64) as usize] |= 1 << (region % 64);
                }
            }
        }
        Some(marks)
    }

    fn regions(&self) -> u64 {
        self.disk_bytes.div_ceil(self.region_bytes)
    }

    fn is_marked(&self, region: u64) -> bool {
        self.marks[(region / 64) as usize] >> (region % 64) & 1 == 1
    }

    fn set(&mut self, region: u64, on: bool) {
        let (word, bit) = ((region / 64) as usize, region % 64);
        if on {
            self.marks[word] |= 1 << bit;
        } else {
            self.marks[word] &= !(1 << bit);
        }
    }

    /// Whether the record knows every region written since the copies were last equal.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Marks the regions of a write of `len` bytes at `offset`, made in `epoch`; returns once the
    /// marks are durable (at once if they were already set). Call it before the write is issued.
    pub fn mark(&mut self, offset: u64, len: u64, epoch: u64) -> Result<(), IntentError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.disk_bytes && len > 0);
        let Some(end) = end else {
            return Err(IntentError::Invalid(format!("write of {len} bytes at {offset} outside a disk of {}", self.disk_bytes)));
        };
        let mut new = false;
        for region in offset / self.region_bytes..end.div_ceil(self.region_bytes) {
            if !self.is_marked(region) {
                self.set(region, true);
                new = true;
            }
            self.last_epoch.insert(region, epoch);
        }
        if new {
            self.store()?;
        }
        Ok(())
    }

    /// The peer holds every write of the epochs up to `epoch`: regions last written by them
    /// may be cleared (in memory; [`WriteIntent::store_clears`] stores them).
    pub fn acknowledged(&mut self, epoch: u64) {
        let done: Vec<u64> = self.last_epoch.iter().filter(|(_, &e)| e <= epoch).map(|(&r, _)| r).collect();
        for region in done {
            self.last_epoch.remove(&region);
            self.set(region, false);
            self.clears_pending = true;
        }
    }

    /// Stores the clears made since the last store, if any (a few times a second is plenty).
    pub fn store_clears(&mut self) -> Result<(), IntentError> {
        if self.clears_pending {
            self.store()?;
        }
        Ok(())
    }

    /// Both copies are equal now (a full synchronisation was acknowledged): no marks, and the
    /// record is complete from here on.
    pub fn in_sync(&mut self) -> Result<(), IntentError> {
        self.marks.iter_mut().for_each(|w| *w = 0);
        self.last_epoch.clear();
        self.complete = true;
        self.store()
    }

    /// This record's marks, for the peer.
    pub fn marks(&self) -> Marks {
        let regions = self.complete.then(|| (0..self.regions()).filter(|&r| self.is_marked(r)).collect());
        Marks { region_bytes: self.region_bytes, regions }
    }

    /// What a rejoin copies between this copy and the peer's (whose marks are `peer`): the union
    /// of both sides' marked regions, or everything if either record is incomplete or they count
    /// regions differently.
    pub fn copy_plan(&self, peer: &Marks) -> CopyPlan {
        let (Some(theirs), Some(ours)) = (&peer.regions, self.marks().regions) else { return CopyPlan::Full };
        if peer.region_bytes != self.region_bytes || theirs.iter().any(|&r| r >= self.regions()) {
            return CopyPlan::Full;
        }
        let mut regions: Vec<u64> = ours.into_iter().chain(theirs.iter().copied()).collect();
        regions.sort_unstable();
        regions.dedup();
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for region in regions {
            let start = region * self.region_bytes;
            let end = (start + self.region_bytes).min(self.disk_bytes);
            match ranges.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => ranges.push(start..end),
            }
        }
        CopyPlan::Ranges(ranges)
    }

    /// Replaces the file with the record as it is in memory, durably.
    fn store(&mut self) -> Result<(), IntentError> {
        let regions = self.regions();
        let mut hex = String::with_capacity(regions.div_ceil(4) as usize);
        for nibble in 0..regions.div_ceil(4) {
            let value = (0..4u64)
                .filter(|bit| nibble * 4 + bit < regions && self.is_marked(nibble * 4 + bit))
                .fold(0u32, |v, bit| v | 1 << bit);
            hex.push(char::from_digit(value, 16).unwrap_or('f'));
        }
        let state = if self.complete { "complete" } else { "incomplete" };
        let text = format!("{HEADER}\n{} {} {} {state}\n{hex}\n", self.vm, self.region_bytes, self.disk_bytes);
        crate::durable::replace_file(&self.path, text.as_bytes())
            .map_err(IntentError::Io)?;
        self.clears_pending = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ftvm-intent-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn disk(&self) -> PathBuf {
            self.0.join("vm.img")
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn ranges(plan: CopyPlan) -> Vec<Range<u64>> {
        match plan {
            CopyPlan::Ranges(r) => r,
            CopyPlan::Full => panic!("a full copy"),
        }
    }

    #[test]
    fn a_new_record_knows_nothing_until_the_copies_are_in_sync() {
        let d = Dir::new("new");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 64 * MIB, MIB).unwrap();
        assert!(!w.is_complete());
        let empty = Marks { region_bytes: MIB, regions: Some(vec![]) };
        assert_eq!(w.copy_plan(&empty), CopyPlan::Full);
        w.in_sync().unwrap();
        assert_eq!(w.copy_plan(&empty), CopyPlan::Ranges(vec![]));
        // A restart keeps it complete.
        let w = WriteIntent::open(&d.disk(), "vm1", 64 * MIB, MIB).unwrap();
        assert!(w.is_complete());
    }

    #[test]
    fn marks_are_durable_before_mark_returns_and_survive_a_crash() {
        let d = Dir::new("durable");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 64 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        w.mark(3 * MIB + 512, 4096, 7).unwrap();
        w.mark(10 * MIB - 512, 1024, 8).unwrap(); // straddles regions 9 and 10
        // "Crash": the process forgets everything but the file.
        drop(w);
        let w = WriteIntent::open(&d.disk(), "vm1", 64 * MIB, MIB).unwrap();
        assert_eq!(w.marks().regions, Some(vec![3, 9, 10]));
        let none = Marks { region_bytes: MIB, regions: Some(vec![]) };
        assert_eq!(ranges(w.copy_plan(&none)), vec![3 * MIB..4 * MIB, 9 * MIB..11 * MIB]);
    }

    #[test]
    fn a_region_is_cleared_only_when_its_last_write_is_acknowledged() {
        let d = Dir::new("ack");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        w.mark(0, 512, 5).unwrap();
        w.mark(MIB, 512, 5).unwrap();
        w.mark(0, 512, 6).unwrap(); // region 0 written again in epoch 6
        w.acknowledged(5);
        assert_eq!(w.marks().regions, Some(vec![0]));
        // The clear reaches the file only when stored; until then a restart sees more marks.
        drop(w);
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        assert_eq!(w.marks().regions, Some(vec![0, 1]));
        w.mark(2 * MIB, 512, 9).unwrap();
        w.acknowledged(9);
        w.store_clears().unwrap();
        drop(w);
        let w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        assert_eq!(w.marks().regions, Some(vec![0, 1]), "regions marked before the restart stay until in_sync");
    }

    #[test]
    fn a_rejoin_copies_the_union_of_both_sides_marks() {
        let d = Dir::new("union");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 10 * MIB + 4096, MIB).unwrap();
        w.in_sync().unwrap();
        w.mark(MIB, 512, 1).unwrap();
        w.mark(10 * MIB, 4096, 1).unwrap(); // the short last region
        let peer = Marks { region_bytes: MIB, regions: Some(vec![2, 5]) };
        assert_eq!(ranges(w.copy_plan(&peer)), vec![MIB..3 * MIB, 5 * MIB..6 * MIB, 10 * MIB..10 * MIB + 4096]);
        assert_eq!(w.copy_plan(&peer).bytes(10 * MIB + 4096), 3 * MIB + 4096);
        // A peer that does not know its past, counts other regions, or names one past the disk.
        assert_eq!(w.copy_plan(&Marks { region_bytes: MIB, regions: None }), CopyPlan::Full);
        assert_eq!(w.copy_plan(&Marks { region_bytes: 2 * MIB, regions: Some(vec![]) }), CopyPlan::Full);
        assert_eq!(w.copy_plan(&Marks { region_bytes: MIB, regions: Some(vec![11]) }), CopyPlan::Full);
    }

    #[test]
    fn a_record_of_another_disk_vm_or_a_damaged_file_asks_for_a_full_copy() {
        let d = Dir::new("other");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        drop(w);
        assert!(!WriteIntent::open(&d.disk(), "vm2", 8 * MIB, MIB).unwrap().is_complete());
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        drop(w);
        assert!(!WriteIntent::open(&d.disk(), "vm1", 16 * MIB, MIB).unwrap().is_complete(), "another disk size");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        drop(w);
        for garbage in ["", "ftvm-intent 1\nvm1 1048576 8388608 complete\n0z\n", "ftvm-intent 1\nvm1 1048576 8388608 complete\n000\n"] {
            fs::write(path_for(&d.disk()), garbage).unwrap();
            assert!(!WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap().is_complete(), "{garbage:?}");
        }
    }

    #[test]
    fn bad_requests_are_errors() {
        let d = Dir::new("bad");
        assert!(WriteIntent::open(&d.disk(), "vm1", 8 * MIB, 3000).is_err());
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        assert!(w.mark(8 * MIB, 512, 1).is_err());
        assert!(w.mark(u64::MAX, 512, 1).is_err());
        assert!(w.mark(0, 0, 1).is_err());
    }
}
