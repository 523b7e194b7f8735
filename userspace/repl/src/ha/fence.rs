//! Fencing: what a host does so that its copy of the VM can never emit again.
//!
//! A host's copy must go silent for good when another copy answers for the VM (this host was
//! fenced: the backup took over, or the quorum gave the lease to the other host) or when this
//! copy can no longer be protected (its engine or takeover failed). Stopping the VM is not enough
//! on its own: frames already in the host's network path, or a VM that is slow to stop, must not
//! reach the clients. The host's fencing gate (an eBPF program in the `ftvm` binary, kept out of
//! this crate so that it stays free of aya) closes for good; this trait is how the host types
//! here ([`super::primary::PrimaryHost`], [`super::failover::BackupDaemon::supervise`]) ask for it.

/// Closes this host's copy of the VM off the network for good.
pub trait Fence: Send + Sync {
    /// Called from a supervising thread, again at every look while the copy must stay fenced:
    /// it must be idempotent, and must not block for long.
    fn fence(&self);
}

/// No gate to close: for hosts without one (and for tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFence;

impl Fence for NoFence {
    fn fence(&self) {}
}
