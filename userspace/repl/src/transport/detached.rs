//! The transport of a primary with no backup: a VM that runs alone from its start (a backup host
//! that took over) has an engine before it has a peer. Every operation fails as a link that is
//! down; the engine, simplex, never calls one until a real link replaces it.

use std::time::Instant;

use ftvm_proto::epoch::{DiskWrite, EpochBegin, StandbyInfo};
use ftvm_proto::pages::PageRangeSet;
use ftvm_proto::EpochId;

use super::{
    AckListener, AckToken, BeginEpochError, CheckpointTransport, CommitError, HandOverError, LinkError, PageSource,
    SendDiskImageError, SendDiskWritesError, SendOutputError, SendPagesError, SendStateError, WaitAckError,
};

/// No backup yet. See the module documentation.
#[derive(Debug, Default)]
pub struct Detached;

fn down() -> LinkError {
    LinkError::Down { reason: "no backup is connected".into() }
}

impl CheckpointTransport for Detached {
    fn peer_standby(&self) -> StandbyInfo {
        StandbyInfo { committed: None, restorable: false, memory_bytes: 0, disk_bytes: 0 }
    }

    fn set_ack_listener(&mut self, _listener: AckListener) {}

    fn begin_epoch(&mut self, _begin: &EpochBegin) -> Result<(), BeginEpochError> {
        Err(BeginEpochError::Link(down()))
    }

    fn send_pages(&mut self, _pages: &PageRangeSet, _source: &dyn PageSource) -> Result<u64, SendPagesError> {
        Err(SendPagesError::Link(down()))
    }

    fn send_state(&mut self, _state: &[u8]) -> Result<(), SendStateError> {
        Err(SendStateError::Link(down()))
    }

    fn send_disk_writes(&mut self, _writes: &[DiskWrite]) -> Result<(), SendDiskWritesError> {
        Err(SendDiskWritesError::Link(down()))
    }

    fn send_output(&mut self, _frames: &[&[u8]]) -> Result<u64, SendOutputError> {
        Err(SendOutputError::Link(down()))
    }

    fn send_disk_image(&mut self, _offset: u64, _data: &[u8]) -> Result<(), SendDiskImageError> {
        Err(SendDiskImageError::Link(down()))
    }

    fn commit(&mut self, _epoch: EpochId) -> Result<AckToken, CommitError> {
        Err(CommitError::Link(down()))
    }

    fn wait_ack(&self, token: AckToken, _deadline: Instant) -> Result<EpochId, WaitAckError> {
        Err(WaitAckError::Link { epoch: token.epoch, source: down() })
    }

    fn acked(&self) -> Option<EpochId> {
        None
    }

    fn io_name(&self) -> &'static str {
        "none"
    }

    fn heartbeat(&mut self) -> Result<(), LinkError> {
        Err(down())
    }

    fn abandon(&mut self, _reason: &str) {}

    fn hand_over(&mut self, _epoch: EpochId) -> Result<(), HandOverError> {
        Err(HandOverError::Link(down()))
    }
}
