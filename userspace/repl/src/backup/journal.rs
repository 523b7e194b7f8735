//! The backup's per-epoch disk journal: the disk writes of the epoch being received, kept apart
//! from the standby disk until the epoch commits. At the commit they are written in order (and made
//! durable, if configured); if the epoch never commits they are dropped, so no write of an
//! uncommitted epoch ever reaches the standby disk.

use std::fs::File;
use std::os::unix::fs::FileExt;

use ftvm_proto::EpochId;

use crate::SECTOR_SIZE;

/// Why a write could not be journalled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AppendError {
    /// No epoch is open in the journal.
    #[error("No epoch is open in the disk journal")]
    NotOpen,
    /// The epoch's writes exceed the journal's limit.
    #[error("Disk journal is full ({max} bytes)")]
    Full {
        /// The limit.
        max: usize,
    },
}

/// Why the journal could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The journal holds another epoch (or none).
    #[error("Disk journal holds epoch {held:?}, not {asked}")]
    WrongEpoch {
        /// The epoch held.
        held: Option<EpochId>,
        /// The epoch asked for.
        asked: EpochId,
    },
    /// A write to the standby disk failed.
    #[error("Writing sector {sector} of the standby disk failed")]
    Write {
        /// The sector.
        sector: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Making the writes durable failed.
    #[error("Syncing the standby disk failed")]
    Sync(#[source] std::io::Error),
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    sector: u64,
    at: usize,
    len: usize,
}

/// The disk writes of one epoch, in arrival order.
#[derive(Debug)]
pub struct DiskJournal {
    epoch: Option<EpochId>,
    entries: Vec<Entry>,
    data: Vec<u8>,
    max_bytes: usize,
}

/// Capacity kept between epochs; a burst larger than this is given back after it is applied.
const KEEP_CAPACITY: usize = 16 << 20;

impl DiskJournal {
    /// An empty journal holding at most `max_bytes` of writes per epoch.
    pub fn new(max_bytes: usize) -> Self {
        Self { epoch: None, entries: Vec::new(), data: Vec::new(), max_bytes }
    }

    /// Opens `epoch`, dropping anything still held.
    pub fn begin(&mut self, epoch: EpochId) {
        self.discard();
        self.epoch = Some(epoch);
    }

    /// The open epoch.
    pub fn epoch(&self) -> Option<EpochId> {
        self.epoch
    }

    /// Writes held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no write is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Adds a write of the open epoch (already checked against the disk's size by the decoder).
    pub fn append(&mut self, sector: u64, data: &[u8]) -> Result<(), AppendError> {
        if self.epoch.is_none() {
            return Err(AppendError::NotOpen);
        }
        if self.data.len() + data.len() > self.max_bytes {
            return Err(AppendError::Full { max: self.max_bytes });
        }
        self.entries.push(Entry { sector, at: self.data.len(), len: data.len() });
        self.data.extend_from_slice(data);
        Ok(())
    }

    /// Writes the epoch's writes to `disk`, in order, then (with `sync`) waits until they are
    /// durable. Returns the bytes written. On success the journal is empty and closed; on failure
    /// the disk may hold part of the writes, and the caller must treat the standby disk as invalid.
    pub fn apply(&mut self, epoch: EpochId, disk: &File, sync: bool) -> Result<u64, ApplyError> {
        if self.epoch != Some(epoch) {
            return Err(ApplyError::WrongEpoch { held: self.epoch, asked: epoch });
        }
        for e in &self.entries {
            let bytes = &self.data[e.at..e.at + e.len];
            disk.write_all_at(bytes, e.sector * SECTOR_SIZE).map_err(|source| ApplyError::Write { sector: e.sector, source })?;
        }
        if sync && !self.entries.is_empty() {
            disk.sync_data().map_err(ApplyError::Sync)?;
        }
        let written = self.data.len() as u64;
        self.discard();
        Ok(written)
    }

    /// Drops the open epoch and its writes. Returns the number of writes dropped.
    pub fn discard(&mut self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        self.data.clear();
        if self.data.capacity() > KEEP_CAPACITY {
            self.data.shrink_to(KEEP_CAPACITY);
        }
        self.epoch = None;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn temp_disk(name: &str, bytes: u64) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("ftvm-journal-{name}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(bytes).unwrap();
        (path, f)
    }

    #[test]
    fn writes_reach_the_disk_only_when_applied_and_in_order() {
        let (path, disk) = temp_disk("order", 8192);
        let mut j = DiskJournal::new(1 << 20);
        assert_eq!(j.append(0, &[1; 512]), Err(AppendError::NotOpen));
        j.begin(EpochId(5));
        j.append(1, &[1; 512]).unwrap();
        j.append(1, &[2; 1024]).unwrap(); // overwrites sector 1, then sector 2
        let mut buf = [0u8; 1536];
        disk.read_exact_at(&mut buf, 512).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "nothing before apply");
        assert!(matches!(j.apply(EpochId(4), &disk, true), Err(ApplyError::WrongEpoch { .. })));
        assert_eq!(j.apply(EpochId(5), &disk, true).unwrap(), 1536);
        disk.read_exact_at(&mut buf, 512).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 2) && buf[1024..].iter().all(|&b| b == 0));
        assert!(j.is_empty() && j.epoch().is_none());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_discarded_epoch_leaves_the_disk_alone() {
        let (path, disk) = temp_disk("discard", 4096);
        let mut j = DiskJournal::new(1024);
        j.begin(EpochId(1));
        j.append(0, &[9; 512]).unwrap();
        assert_eq!(j.append(1, &[9; 1024]), Err(AppendError::Full { max: 1024 }));
        assert_eq!((j.len(), j.bytes()), (1, 512));
        assert_eq!(j.discard(), 1);
        assert!(matches!(j.apply(EpochId(1), &disk, false), Err(ApplyError::WrongEpoch { held: None, .. })));
        let mut buf = [1u8; 512];
        disk.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 512]);
        // A new epoch starts empty.
        j.begin(EpochId(2));
        assert_eq!(j.apply(EpochId(2), &disk, true).unwrap(), 0);
        std::fs::remove_file(path).unwrap();
    }
}
