//! ftvm-repl: everything about keeping a backup in step with the primary.
//!
//! * [`epoch`]: the primary's checkpoint engine (the epochs' wire format is
//!   [`ftvm_proto::epoch`]);
//! * [`transport`]: the primary's side of the A-Link ([`transport::CheckpointTransport`], over TCP
//!   in [`transport::tcp`]);
//! * [`backup`]: the backup's side: [`backup::BackupReceiver`] stages each epoch and applies it
//!   atomically at its commit; [`backup::journal`] is the per-epoch disk write log;
//! * [`disk`]: the primary's disk write capture ([`disk::DiskReplicator`]);
//! * [`output`]: output commit (the hold the guest's transmit goes to, released per epoch);
//! * [`ingress`]: the guest's input, sent ahead to the backup for a takeover to deliver again;
//! * [`late_input`]: the guest's input that reached a dead primary, forwarded by its watchdog;
//! * [`taken_ring`]: the last input the VM took in, where the watchdog can read it after a death;
//! * [`ha`]: failure detection, the quorum lease and failover;
//! * [`witness`]: the built-in quorum service (`ftvm witness`).
//!
//! The machine itself stays abstract here: pages come from a [`transport::PageSource`], the machine
//! state is an opaque blob, disk writes are `(sector, bytes)`.

pub mod backup;
pub mod disk;
pub mod durable;
pub mod epoch;
pub mod ha;
pub mod ingress;
pub mod late_input;
pub mod output;
pub mod taken_ring;
pub mod transport;
pub mod witness;

pub use ftvm_proto::limits::{PAGE_SIZE, SECTOR_SIZE};

/// Locks a mutex. A thread that panicked while holding one left plain data behind (every critical
/// section in this crate leaves its data consistent before anything that could panic), so the data
/// is still usable: a poisoned lock is not a reason to stop replicating.
pub(crate) fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Formats an error with its chain of sources, `a: b: c`, for logs and status.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        // Bounded: error chains are short, but a cyclic one must not loop forever.
        let mut depth = 0;
        while let Some(s) = source {
            if depth == 16 {
                break;
            }
            write!(f, ": {s}")?;
            source = s.source();
            depth += 1;
        }
        Ok(())
    }
}
