//! The backup's side of the A-Link.
//!
//! [`BackupReceiver`] accepts one authenticated primary at a time, receives each epoch into staging,
//! and applies it to the standby (memory image, machine state blob, disk) only when the epoch's
//! commit checks out. Whatever goes wrong before that (a dropped link, a refused frame, totals that
//! do not add up) leaves the last committed standby exactly as it was.

pub mod activate;
mod ingress;
pub mod journal;
pub mod receiver;
pub mod standby;

pub use receiver::{
    BackupReceiver, BindError, CommittedView, DiskSync, ReceiverConfig, ReceiverStats, SessionError, StopError,
    SyncProgress,
};
pub use standby::{Standby, StandbyMemory};
