//! ftvm-proto: what crosses the A-Link, and nothing that needs KVM or file descriptors, so any
//! host can test and fuzz it.
//!
//! * [`frame`]: the fixed binary frame header, the frame kinds, and the per-frame authentication
//!   tag and sequence numbers that make a corrupted, truncated, replayed or forged frame an error;
//! * [`handshake`]: the versioned, mutually authenticated handshake that derives a session key from
//!   the shared secret;
//! * [`epoch`]: the payloads of the epoch frames (begin, pages, machine state, disk writes, disk
//!   image, held output, commit, acknowledgement, standby info);
//! * [`late_input`]: the datagrams of guest input a dead primary's watchdog sends the backup;
//! * [`limits`]: every size limit the hosts, the guest's devices and the wire share;
//! * [`witness`]: the requests and replies of the witness, the built-in quorum service;
//! * [`rdma`]: the RDMA A-Link's queue pair exchange and page placement descriptors;
//! * [`pages`]: [`pages::PageRangeSet`], sets of guest page frame numbers kept as sorted ranges;
//! * [`state_delta`], [`page_delta`]: the machine state and guest pages as differences from what
//!   the backup holds, both made of [`xor_runs`];
//! * [`EpochId`]: the number of a checkpoint epoch.

pub mod cpu;
pub mod epoch;
pub mod frame;
pub mod handshake;
pub mod late_input;
pub mod le;
pub mod limits;
pub mod page_delta;
pub mod pages;
pub mod rdma;
pub mod state_delta;
pub mod witness;
pub mod xor_runs;

/// The number of a checkpoint epoch. Epoch 0 is the initial synchronisation; each checkpoint after
/// it takes the next number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EpochId(pub u64);

impl EpochId {
    /// The epoch after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl std::fmt::Display for EpochId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
