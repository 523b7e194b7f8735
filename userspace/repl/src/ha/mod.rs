//! High availability: the two hosts' lifecycles, noticing that the primary is gone, and becoming
//! the primary.
//!
//! * [`primary`]: the [`primary::PrimaryHost`], which runs the VM under the epoch engine,
//!   supervises the engine, and claims and releases the lease;
//! * [`failover`]: the [`failover::BackupDaemon`], which runs the receiver, watches the
//!   detector and promotes the standby (see [`crate::backup::activate`]);
//! * [`fence`]: how either host closes its copy off the network for good ([`fence::Fence`]);
//! * [`heartbeat`]: the link activity stamp the receiver keeps, and the primary's idle heartbeat;
//! * [`detector`]: the [`detector::FailureDetector`] trait and a timeout detector;
//! * [`quorum`]: the [`quorum::QuorumClient`] asked before a host runs the VM alone, its lease
//!   rules and backends;
//! * [`lease`]: a host's hold on the lease ([`lease::Lease`]), renewed in the background;
//! * [`term`]: the lease term stored with a copy of the disk;
//! * [`probe`]: asking the primary's host (its XDP responder) whether its daemon lives;
//! * [`rejoin`]: a VM running alone looking for its backup again ([`rejoin::Rejoiner`]).

pub mod detector;
pub mod failover;
pub mod fence;
pub mod heartbeat;
pub mod lease;
pub mod primary;
pub mod probe;
pub mod quorum;
pub mod rejoin;
pub mod term;
