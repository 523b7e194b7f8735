//! High availability on the backup: noticing that the primary is gone, and becoming the primary.
//!
//! * [`heartbeat`]: the link activity stamp the receiver keeps, and the primary's idle heartbeat;
//! * [`detector`]: the [`detector::FailureDetector`] trait and a timeout detector;
//! * [`failover`]: the [`failover::BackupDaemon`], which runs the receiver, watches the
//!   detector and promotes the standby (see [`crate::backup::activate`]);
//! * [`quorum`]: the [`quorum::QuorumClient`] asked before a host runs the VM alone, its lease
//!   rules and backends;
//! * [`lease`]: a host's hold on the lease ([`lease::Lease`]), renewed in the background;
//! * [`term`]: the lease term stored with a copy of the disk;
//! * [`probe`]: asking the primary's host (its XDP responder) whether its daemon lives.

pub mod detector;
pub mod failover;
pub mod heartbeat;
pub mod lease;
pub mod probe;
pub mod quorum;
pub mod term;
