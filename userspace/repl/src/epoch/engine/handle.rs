//! The engine on its own thread, and how its owner stops it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::attach::BackupAttacher;
use super::status::EngineStatus;
use super::{EngineError, EngineReport};
use crate::output::hold::OutputHold;

/// A [`PrimaryEngine`](super::PrimaryEngine) running on its own thread.
#[derive(Debug)]
pub struct EngineHandle {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) status: Arc<EngineStatus>,
    pub(super) hold: Option<Arc<OutputHold>>,
    pub(super) attacher: BackupAttacher,
    pub(super) thread: JoinHandle<Result<EngineReport, EngineError>>,
}

/// Why [`EngineHandle::stop`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineStopError {
    /// The engine ended with an error.
    #[error("The epoch engine failed")]
    Engine(#[from] EngineError),
    /// The engine thread panicked.
    #[error("The epoch engine thread panicked")]
    Panicked,
}

impl EngineHandle {
    /// The engine's status.
    pub fn status(&self) -> Arc<EngineStatus> {
        self.status.clone()
    }

    /// The default gate's output-commit hold (none when another gate replaced it).
    pub fn output_hold(&self) -> Option<Arc<OutputHold>> {
        self.hold.clone()
    }

    /// Hands a new backup's link to the engine while the VM runs alone (see [`BackupAttacher`]).
    pub fn attacher(&self) -> BackupAttacher {
        self.attacher.clone()
    }

    /// Whether the engine thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops the engine (no final checkpoint) and waits for it.
    pub fn stop(self) -> Result<EngineReport, EngineStopError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| EngineStopError::Panicked)?.map_err(EngineStopError::Engine)
    }
}
