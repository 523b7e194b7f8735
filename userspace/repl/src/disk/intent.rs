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
//! - a mark is **cleared** only when the peer acknowledged every write to that region, and
//!   lazily, the way md clears its bitmap: [`WriteIntent::clear_untouched`] runs every few seconds
//!   while the pair is protected and clears the regions not written since its previous run, once
//!   the epochs that were open at that run are acknowledged. A region the guest keeps writing
//!   (a log's tail) stays marked instead of being cleared and marked again at every epoch (each
//!   new mark is a durable file update on the guest's write path). A stale record only has more
//!   marks, which costs copying, never correctness;
//! - a record that does not know the past (a new file beside an existing disk, an unreadable
//!   file, another region size) is **incomplete**, and an incomplete record asks for a full copy.
//!   A record becomes complete only when both copies are known equal: on the receiving side
//!   when a synchronisation commits ([`WriteIntent::in_sync`]), on the sending side at the first
//!   clearing pass after it was acknowledged. A host about to receive a full copy marks its record
//!   incomplete first ([`WriteIntent::begin_full_copy`]): a copy cut halfway knows nothing.
//!
//! Marks are rare (the first write to a region since its last clear), so each is one atomic
//! replace of the file (temporary file, sync, rename, sync the directory), like the term file.
//!
//! The record names the disk file it describes (device and inode): a disk replaced by another file
//! makes it incomplete. (A disk overwritten in place is not noticed: remove its record then, as
//! `ftvm` does when it creates a new disk.)
//!
//! ```text
//! ftvm-intent 2
//! <vm id> <region bytes> <disk bytes> <disk file dev:ino> complete|incomplete
//! <the marks: one hex digit per 4 regions, region 0 in the low bit of the first digit>
//! ```

use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ftvm_vmm::devices::DiskWriteIntent;

use crate::durable::FileError;

pub use ftvm_proto::epoch::DiskMarks;

const HEADER: &str = "ftvm-intent 2";

/// Bytes per region by default: a sequential writer marks (and syncs the record) once per
/// 256 KiB, and a rejoin copies at most that much more than was written, per written stretch.
pub const DEFAULT_REGION_BYTES: u64 = 256 << 10;

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

/// The write-intent record of one disk.
#[derive(Debug)]
pub struct WriteIntent {
    path: PathBuf,
    vm: String,
    /// The disk file's device and inode when the record was opened ("-" if unreadable).
    disk_file: String,
    region_bytes: u64,
    disk_bytes: u64,
    complete: bool,
    /// One bit per region; set: the region may differ from the peer's copy.
    marks: Vec<u64>,
    /// One bit per region written since the last clearing pass (in memory only).
    touched: Vec<u64>,
}

/// The device and inode of the disk file, which tell a replaced disk from the one recorded.
fn disk_file_id(disk: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(disk).map_or_else(|_| "-".to_string(), |m| format!("{}:{}", m.dev(), m.ino()))
}

/// Where the record of `disk` is kept.
pub fn path_for(disk: &Path) -> PathBuf {
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
            disk_file: disk_file_id(disk),
            region_bytes,
            disk_bytes,
            complete: false,
            marks: vec![0; words],
            touched: vec![0; words],
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
        let [vm, region, disk, disk_file, state] = fields[..] else { return None };
        let matches = vm == self.vm
            && disk_file == self.disk_file
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

    /// Whether the record knows every region written since the copies were last equal.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Marks the regions of a write of `len` bytes at `offset`; returns once the marks are durable
    /// (at once if they were already set). Call it before the write is issued.
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<(), IntentError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.disk_bytes && len > 0);
        let Some(end) = end else {
            return Err(IntentError::Invalid(format!("write of {len} bytes at {offset} outside a disk of {}", self.disk_bytes)));
        };
        let mut new = false;
        for region in offset / self.region_bytes..end.div_ceil(self.region_bytes) {
            let (word, bit) = ((region / 64) as usize, 1u64 << (region % 64));
            self.touched[word] |= bit;
            if self.marks[word] & bit == 0 {
                self.marks[word] |= bit;
                new = true;
            }
        }
        if new {
            self.store()?;
        }
        Ok(())
    }

    /// Starts a clearing period: regions written from now on are the ones
    /// [`WriteIntent::clear_untouched`] keeps. Call it when a synchronisation starts.
    pub fn forget_touched(&mut self) {
        self.touched.iter_mut().for_each(|w| *w = 0);
    }

    /// The peer holds every write made before the previous pass (or the synchronisation's
    /// start): clears the regions not written since, makes the record complete, and starts the
    /// next period. Returns the number of regions cleared.
    pub fn clear_untouched(&mut self) -> Result<u64, IntentError> {
        let mut cleared = 0u64;
        for (m, t) in self.marks.iter_mut().zip(self.touched.iter_mut()) {
            cleared += u64::from((*m & !*t).count_ones());
            *m &= *t;
            *t = 0;
        }
        if cleared > 0 || !self.complete {
            self.complete = true;
            self.store()?;
        }
        Ok(cleared)
    }

    /// A full copy is about to overwrite this disk: until it commits, the record knows nothing.
    pub fn begin_full_copy(&mut self) -> Result<(), IntentError> {
        self.complete = false;
        self.store()
    }

    /// Both copies are equal now (a synchronisation to this disk committed): no marks, and the
    /// record is complete from here on.
    pub fn in_sync(&mut self) -> Result<(), IntentError> {
        self.marks.iter_mut().for_each(|w| *w = 0);
        self.touched.iter_mut().for_each(|w| *w = 0);
        self.complete = true;
        self.store()
    }

    /// Regions marked now.
    pub fn marked_regions(&self) -> u64 {
        self.marks.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Bytes per region.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// This record's marks, for the peer.
    pub fn marks(&self) -> DiskMarks {
        let regions = self.complete.then(|| (0..self.regions()).filter(|&r| self.is_marked(r)).collect());
        DiskMarks { region_bytes: self.region_bytes, regions }
    }

    /// What a rejoin copies between this copy and the peer's (whose marks are `peer`): the union
    /// of both sides' marked regions, or everything if either record is incomplete or they count
    /// regions differently.
    pub fn copy_plan(&self, peer: &DiskMarks) -> CopyPlan {
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
        let text = format!("{HEADER}\n{} {} {} {} {state}\n{hex}\n", self.vm, self.region_bytes, self.disk_bytes, self.disk_file);
        crate::durable::replace_file(&self.path, text.as_bytes())
            .map_err(IntentError::Io)?;
        Ok(())
    }
}

/// A disk's record, shared by its device (which marks before every guest write, on the vCPU
/// thread) and the replication layer (which clears, copies and reports).
#[derive(Debug)]
pub struct SharedIntent(Mutex<WriteIntent>);

impl SharedIntent {
    /// Shares `record`.
    pub fn new(record: WriteIntent) -> Arc<Self> {
        Arc::new(Self(Mutex::new(record)))
    }

    /// The record (a poisoned lock still holds a usable record: every change is made whole
    /// before it is stored).
    pub fn lock(&self) -> MutexGuard<'_, WriteIntent> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl DiskWriteIntent for SharedIntent {
    fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lock().mark(offset, len).map_err(io::Error::other)
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
        let empty = DiskMarks { region_bytes: MIB, regions: Some(vec![]) };
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
        w.mark(3 * MIB + 512, 4096).unwrap();
        w.mark(10 * MIB - 512, 1024).unwrap(); // straddles regions 9 and 10
        // "Crash": the process forgets everything but the file.
        drop(w);
        let w = WriteIntent::open(&d.disk(), "vm1", 64 * MIB, MIB).unwrap();
        assert_eq!(w.marks().regions, Some(vec![3, 9, 10]));
        let none = DiskMarks { region_bytes: MIB, regions: Some(vec![]) };
        assert_eq!(ranges(w.copy_plan(&none)), vec![3 * MIB..4 * MIB, 9 * MIB..11 * MIB]);
    }

    #[test]
    fn a_pass_clears_only_the_regions_not_written_since_the_previous_one() {
        let d = Dir::new("pass");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        w.mark(0, 512).unwrap();
        w.mark(MIB, 512).unwrap();
        // The first pass after these writes keeps both: they may not be acknowledged yet.
        assert_eq!(w.clear_untouched().unwrap(), 0);
        w.mark(0, 512).unwrap(); // region 0 written again (a log's tail)
        assert_eq!(w.clear_untouched().unwrap(), 1);
        assert_eq!(w.marks().regions, Some(vec![0]));
        // Cleared on file too: a restart sees what the last pass left.
        drop(w);
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        assert_eq!(w.marks().regions, Some(vec![0]));
        // A restart forgets what was touched: the next pass may clear region 0 (its writes
        // were all made before the restart, so before the pass's period began).
        assert_eq!(w.clear_untouched().unwrap(), 1);
        assert_eq!(w.marked_regions(), 0);
    }

    #[test]
    fn a_full_copy_cut_halfway_leaves_an_incomplete_record() {
        let d = Dir::new("fullcopy");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        w.begin_full_copy().unwrap();
        drop(w);
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        assert!(!w.is_complete());
        assert_eq!(w.marks().regions, None);
        w.in_sync().unwrap();
        assert!(w.is_complete());
    }

    #[test]
    fn a_sender_becomes_complete_at_its_first_pass_after_a_sync() {
        let d = Dir::new("sender");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        assert!(!w.is_complete());
        w.forget_touched(); // the synchronisation starts
        w.mark(2 * MIB, 512).unwrap(); // the guest writes while it runs
        w.clear_untouched().unwrap(); // the sync and the epochs open at its start are acknowledged
        assert!(w.is_complete());
        assert_eq!(w.marks().regions, Some(vec![2]), "written during the sync: maybe not acknowledged yet");
    }

    #[test]
    fn the_shared_record_marks_before_a_write_and_refuses_one_outside_the_disk() {
        let d = Dir::new("shared");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        let shared = SharedIntent::new(w);
        shared.before_write(5 * MIB, 4096).unwrap();
        assert!(shared.before_write(8 * MIB, 512).is_err());
        assert_eq!(shared.lock().marks().regions, Some(vec![5]));
        let on_disk = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        assert_eq!(on_disk.marks().regions, Some(vec![5]));
    }

    #[test]
    fn a_rejoin_copies_the_union_of_both_sides_marks() {
        let d = Dir::new("union");
        let mut w = WriteIntent::open(&d.disk(), "vm1", 10 * MIB + 4096, MIB).unwrap();
        w.in_sync().unwrap();
        w.mark(MIB, 512).unwrap();
        w.mark(10 * MIB, 4096).unwrap(); // the short last region
        let peer = DiskMarks { region_bytes: MIB, regions: Some(vec![2, 5]) };
        assert_eq!(ranges(w.copy_plan(&peer)), vec![MIB..3 * MIB, 5 * MIB..6 * MIB, 10 * MIB..10 * MIB + 4096]);
        assert_eq!(w.copy_plan(&peer).bytes(10 * MIB + 4096), 3 * MIB + 4096);
        // A peer that does not know its past, counts other regions, or names one past the disk.
        assert_eq!(w.copy_plan(&DiskMarks { region_bytes: MIB, regions: None }), CopyPlan::Full);
        assert_eq!(w.copy_plan(&DiskMarks { region_bytes: 2 * MIB, regions: Some(vec![]) }), CopyPlan::Full);
        assert_eq!(w.copy_plan(&DiskMarks { region_bytes: MIB, regions: Some(vec![11]) }), CopyPlan::Full);
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
        for garbage in ["", "ftvm-intent 2\nvm1 1048576 8388608 - complete\n0z\n", "ftvm-intent 2\nvm1 1048576 8388608 - complete\n000\n"] {
            fs::write(path_for(&d.disk()), garbage).unwrap();
            assert!(!WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap().is_complete(), "{garbage:?}");
        }
    }

    #[test]
    fn a_disk_replaced_by_another_file_gets_a_full_copy() {
        let d = Dir::new("replaced");
        fs::write(d.disk(), [0u8; 4096]).unwrap();
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        w.in_sync().unwrap();
        drop(w);
        assert!(WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap().is_complete());
        // A new file moved over the old one (a new inode): the record knows nothing of it.
        let other = d.0.join("other.img");
        fs::write(&other, [0u8; 4096]).unwrap();
        fs::rename(&other, d.disk()).unwrap();
        assert!(!WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap().is_complete());
    }

    #[test]
    fn bad_requests_are_errors() {
        let d = Dir::new("bad");
        assert!(WriteIntent::open(&d.disk(), "vm1", 8 * MIB, 3000).is_err());
        let mut w = WriteIntent::open(&d.disk(), "vm1", 8 * MIB, MIB).unwrap();
        assert!(w.mark(8 * MIB, 512).is_err());
        assert!(w.mark(u64::MAX, 512).is_err());
        assert!(w.mark(0, 0).is_err());
    }
}
