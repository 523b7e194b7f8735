//! Output commit: the guest's network output waits until the backup holds the checkpoint that
//! produced it.
//!
//! * [`gate`]: the [`gate::OutputGate`] the engine drives (hold, seal per epoch, release on
//!   acknowledgement, release all when holding ends, discard on failover), and [`gate::HoldGate`],
//!   the userspace gate;
//! * [`hold`]: [`hold::OutputHold`], the ring the virtio-net device appends transmitted frames to
//!   (the device sees it only as a `FrameHold`);
//! * [`trace`]: the optional trace of every append, seal, release and frame sent, for tests that
//!   compare the hold with a packet capture.

pub mod gate;
pub mod hold;
pub mod trace;
