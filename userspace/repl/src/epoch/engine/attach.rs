//! A backup joining a VM that runs alone: its link goes from whoever connected it (the host's
//! rejoin thread) to the engine's thread, which takes it at its next simplex turn.

use std::sync::{Arc, Mutex};

use crate::lock;
use crate::transport::CheckpointTransport;

/// The link waiting for the engine; a newer one replaces an older one not yet taken.
#[derive(Default)]
pub(super) struct BackupSlot(Mutex<Option<Box<dyn CheckpointTransport>>>);

impl BackupSlot {
    pub(super) fn take(&self) -> Option<Box<dyn CheckpointTransport>> {
        lock(&self.0).take()
    }
}

impl std::fmt::Debug for BackupSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if lock(&self.0).is_some() { "BackupSlot(waiting)" } else { "BackupSlot(empty)" })
    }
}

/// Hands a connected backup's link to a running engine. An engine that runs alone takes it within
/// a few milliseconds and synchronises that backup; a protected engine takes it only once it has
/// lost its backup (connect a new backup only to an engine that runs alone).
#[derive(Clone, Debug)]
pub struct BackupAttacher(pub(super) Arc<BackupSlot>);

impl BackupAttacher {
    /// Hands `link` over.
    pub fn attach(&self, link: Box<dyn CheckpointTransport>) {
        *lock(&self.0 .0) = Some(link);
    }

    /// Whether a link handed over has not been taken yet.
    pub fn pending(&self) -> bool {
        lock(&self.0 .0).is_some()
    }
}
