//! Saving and restoring device state, Firecracker style.
//!
//! Each component has a plain serde `*State` struct (no fds, no pointers, no host addresses)
//! and implements [`Persist`]: `save` reads the live object into its state, `restore` builds a
//! new live object from the state plus the host resources it cannot carry
//! ([`Persist::ConstructorArgs`]: guest memory, an open TAP, a disk path). The pieces:
//!
//! * [`crate::devices::virtio::persist`]: the virtio-mmio transport and its queues;
//! * [`crate::devices::virtio::net::persist`]: virtio-net (receive starvation, the frame held
//!   back for want of a buffer, transmit backpressure);
//! * [`crate::devices::virtio::block::persist`]: virtio-blk (the requests in flight, which
//!   restore submits again);
//! * [`DevicesState`]: everything [`crate::devices::DeviceManager::save_state`] captures.
//!
//! State is only consistent while the devices are paused
//! ([`crate::devices::DeviceManager::pause`]): the manager refuses to save otherwise.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::persist::BlockState;
use crate::devices::virtio::net::persist::NetState;
use crate::devices::virtio::persist::MmioTransportState;

/// A component whose state can be saved and rebuilt elsewhere (the backup host, a fresh
/// process after failover).
pub trait Persist: Sized {
    /// The saved state: plain data.
    type State: Serialize + DeserializeOwned;
    /// What `restore` needs besides the state (guest memory, host fds).
    type ConstructorArgs;
    /// Why `restore` refused the state.
    type Error;

    /// Captures the component's state. The caller makes sure nothing changes it meanwhile
    /// (devices paused).
    fn save(&self) -> Self::State;

    /// Builds a live component from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// One virtio device: its transport (registers, queues) and the device model's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState<S> {
    /// Transport registers and queue positions.
    pub transport: MmioTransportState,
    /// The device model.
    pub device: S,
}

/// Every device of a VM, as [`crate::devices::DeviceManager::save_state`] captures it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// virtio-net, if the VM has one.
    pub net: Option<VirtioDeviceState<NetState>>,
    /// virtio-blk, if the VM has one.
    pub block: Option<VirtioDeviceState<BlockState>>,
}
