//! Disk replication, primary side: every guest write is recorded when the guest submits it, and the
//! writes of an epoch travel with that epoch. The backup keeps them in a per-epoch journal and applies
//! them when the epoch commits (see [`crate::backup::journal`]).
//!
//! A write's completion reaches the guest only through output commit, so the backup never lacks a
//! write that the guest was told is done.

pub mod intent;

use std::collections::VecDeque;

use ftvm_proto::EpochId;

use ftvm_proto::limits::{MAX_DISK_WRITE_BYTES, SECTOR_SIZE};

pub use ftvm_proto::epoch::DiskWrite;

/// Why a write could not be recorded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Empty, or not a whole number of sectors.
    #[error("Disk write of {0} bytes is empty or not whole sectors")]
    Unaligned(usize),
    /// Past the end of the disk.
    #[error("Disk write at sector {sector} of {len} bytes lies outside the disk")]
    OutsideDisk {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: usize,
    },
    /// Too many bytes wait for an epoch: checkpoint sooner, or the backup is gone (see
    /// [`DiskReplicator::discard_all`]).
    #[error("Disk replication backlog is full ({0} bytes)")]
    Full(u64),
}

/// Why an epoch's writes could not be sealed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// Epochs are sealed in increasing order.
    #[error("Epoch {epoch} sealed after epoch {last}")]
    OutOfOrder {
        /// The epoch asked for.
        epoch: EpochId,
        /// The last epoch sealed.
        last: EpochId,
    },
}

/// Why an acknowledgement could not be recorded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskCommitError {
    /// No sealed epoch has that number.
    #[error("Epoch {0} was not sealed")]
    NotSealed(EpochId),
}

/// The primary's record of guest disk writes, cut into epochs.
///
/// The engine calls [`record`](Self::record) at guest write submission, [`seal`](Self::seal) when it
/// checkpoints (the writes recorded since the previous seal belong to that epoch and go to the
/// transport), [`commit`](Self::commit) when the backup acknowledges an epoch, and
/// [`requeue_unacked`](Self::requeue_unacked) when the A-Link fails, so that no write of a failed
/// epoch is lost.
pub trait DiskReplicator: Send + std::fmt::Debug {
    /// Records a guest write (a whole number of sectors). Writes larger than one wire entry are
    /// split.
    fn record(&mut self, sector: u64, data: &[u8]) -> Result<(), RecordError>;
    /// Closes the current epoch: returns its writes, in submission order, and keeps them until the
    /// epoch is committed or requeued.
    fn seal(&mut self, epoch: EpochId) -> Result<Vec<DiskWrite>, SealError>;
    /// The backup acknowledged `epoch` (and so every epoch before it): forgets their writes.
    fn commit(&mut self, epoch: EpochId) -> Result<(), DiskCommitError>;
    /// The A-Link failed: every sealed, unacknowledged write goes back in front of the writes not yet
    /// sealed, in order, to be sent again with the next epoch (whose number may again be the last
    /// committed + 1). Returns the number of writes moved.
    fn requeue_unacked(&mut self) -> usize;
    /// The backup is gone for good (it will need a full disk resynchronisation): forgets everything.
    fn discard_all(&mut self);
    /// Bytes recorded and not yet acknowledged.
    fn backlog_bytes(&self) -> u64;
}

/// A [`DiskReplicator`] that keeps the writes in memory.
#[derive(Debug)]
pub struct MemoryDiskReplicator {
    disk_bytes: u64,
    max_backlog: u64,
    backlog: u64,
    pending: Vec<DiskWrite>,
    sealed: VecDeque<(EpochId, Vec<DiskWrite>)>,
    last_sealed: Option<EpochId>,
    last_committed: Option<EpochId>,
}

impl MemoryDiskReplicator {
    /// A replicator for a disk of `disk_bytes` that refuses to hold more than `max_backlog` bytes.
    pub fn new(disk_bytes: u64, max_backlog: u64) -> Self {
        Self {
            disk_bytes,
            max_backlog,
            backlog: 0,
            pending: Vec::new(),
            sealed: VecDeque::new(),
            last_sealed: None,
            last_committed: None,
        }
    }

    /// Writes recorded since the last seal.
    pub fn pending(&self) -> &[DiskWrite] {
        &self.pending
    }
}

impl DiskReplicator for MemoryDiskReplicator {
    fn record(&mut self, sector: u64, data: &[u8]) -> Result<(), RecordError> {
        if data.is_empty() || !(data.len() as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(RecordError::Unaligned(data.len()));
        }
        let inside = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|o| o.checked_add(data.len() as u64))
            .is_some_and(|end| end <= self.disk_bytes);
        if !inside {
            return Err(RecordError::OutsideDisk { sector, len: data.len() });
        }
        if self.backlog + data.len() as u64 > self.max_backlog {
            return Err(RecordError::Full(self.backlog));
        }
        // MAX_DISK_WRITE_BYTES is a whole number of sectors, so every piece is too.
        let per_piece = (MAX_DISK_WRITE_BYTES as u64) / SECTOR_SIZE;
        for (i, piece) in data.chunks(MAX_DISK_WRITE_BYTES).enumerate() {
            self.pending.push(DiskWrite::new(sector + i as u64 * per_piece, piece));
        }
        self.backlog += data.len() as u64;
        Ok(())
    }

    fn seal(&mut self, epoch: EpochId) -> Result<Vec<DiskWrite>, SealError> {
        if let Some(last) = self.last_sealed.filter(|&l| epoch <= l) {
            return Err(SealError::OutOfOrder { epoch, last });
        }
        self.last_sealed = Some(epoch);
        let writes = std::mem::take(&mut self.pending);
        // Cloning shares the bytes (Arc): the kept copy costs a vector of handles.
        self.sealed.push_back((epoch, writes.clone()));
        Ok(writes)
    }

    fn commit(&mut self, epoch: EpochId) -> Result<(), DiskCommitError> {
        if !self.sealed.iter().any(|(e, _)| *e == epoch) {
            return Err(DiskCommitError::NotSealed(epoch));
        }
        while let Some((e, writes)) = self.sealed.pop_front() {
            if e > epoch {
                self.sealed.push_front((e, writes));
                break;
            }
            self.backlog -= writes.iter().map(|w| w.data.len() as u64).sum::<u64>();
        }
        self.last_committed = Some(epoch);
        Ok(())
    }

    fn requeue_unacked(&mut self) -> usize {
        let mut again: Vec<DiskWrite> = self.sealed.drain(..).flat_map(|(_, w)| w).collect();
        let moved = again.len();
        again.append(&mut self.pending);
        self.pending = again;
        // The failed epochs' numbers are free again: the next link resumes after the last committed.
        self.last_sealed = self.last_committed;
        moved
    }

    fn discard_all(&mut self) {
        self.pending.clear();
        self.sealed.clear();
        self.backlog = 0;
        self.last_sealed = None;
        self.last_committed = None;
    }

    fn backlog_bytes(&self) -> u64 {
        self.backlog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sectors(w: &[DiskWrite]) -> Vec<u64> {
        w.iter().map(|w| w.sector).collect()
    }

    #[test]
    fn writes_are_cut_into_epochs_in_order() {
        let mut r = MemoryDiskReplicator::new(1 << 20, 1 << 20);
        r.record(1, &[1; 512]).unwrap();
        r.record(2, &[2; 1024]).unwrap();
        assert_eq!(sectors(&r.seal(EpochId(1)).unwrap()), vec![1, 2]);
        r.record(3, &[3; 512]).unwrap();
        assert_eq!(sectors(&r.seal(EpochId(2)).unwrap()), vec![3]);
        assert!(r.seal(EpochId(3)).unwrap().is_empty());
        assert_eq!(r.backlog_bytes(), 2048);
        r.commit(EpochId(1)).unwrap();
        assert_eq!(r.backlog_bytes(), 512);
        r.commit(EpochId(3)).unwrap();
        assert_eq!(r.backlog_bytes(), 0);
        assert_eq!(r.commit(EpochId(3)), Err(DiskCommitError::NotSealed(EpochId(3))));
        assert_eq!(r.seal(EpochId(3)), Err(SealError::OutOfOrder { epoch: EpochId(3), last: EpochId(3) }));
    }

    #[test]
    fn a_failed_link_loses_no_write() {
        let mut r = MemoryDiskReplicator::new(1 << 20, 1 << 20);
        r.record(1, &[1; 512]).unwrap();
        r.seal(EpochId(1)).unwrap();
        r.record(2, &[2; 512]).unwrap();
        r.seal(EpochId(2)).unwrap();
        r.commit(EpochId(1)).unwrap();
        r.record(3, &[3; 512]).unwrap();
        // Epoch 2 was in flight when the link failed; the next link starts again at epoch 2.
        assert_eq!(r.requeue_unacked(), 1);
        assert_eq!(sectors(&r.seal(EpochId(2)).unwrap()), vec![2, 3]);
        assert_eq!(r.backlog_bytes(), 1024);
        r.discard_all();
        assert_eq!(r.backlog_bytes(), 0);
        assert!(r.pending().is_empty());
    }

    #[test]
    fn bad_writes_and_a_full_backlog_are_refused() {
        let mut r = MemoryDiskReplicator::new(4096, 2048);
        assert_eq!(r.record(0, &[]), Err(RecordError::Unaligned(0)));
        assert_eq!(r.record(0, &[0; 100]), Err(RecordError::Unaligned(100)));
        assert_eq!(r.record(7, &[0; 1024]), Err(RecordError::OutsideDisk { sector: 7, len: 1024 }));
        assert!(matches!(r.record(u64::MAX, &[0; 512]), Err(RecordError::OutsideDisk { .. })));
        r.record(0, &[0; 2048]).unwrap();
        assert_eq!(r.record(4, &[0; 512]), Err(RecordError::Full(2048)));
    }

    #[test]
    fn large_writes_are_split_into_wire_entries() {
        let mut r = MemoryDiskReplicator::new(16 << 20, 16 << 20);
        let data: Vec<u8> = (0..MAX_DISK_WRITE_BYTES * 2 + 512).map(|i| (i / 512) as u8).collect();
        r.record(10, &data).unwrap();
        let w = r.seal(EpochId(0)).unwrap();
        let per = (MAX_DISK_WRITE_BYTES / 512) as u64;
        assert_eq!(sectors(&w), vec![10, 10 + per, 10 + 2 * per]);
        assert_eq!(w.iter().flat_map(|w| w.data.iter().copied()).collect::<Vec<_>>(), data);
    }
}
