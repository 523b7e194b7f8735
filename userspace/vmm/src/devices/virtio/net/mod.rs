//! virtio-net: `device` (features, config, activation), `handler` (pure queue logic), `tap`
//! (the TAP backend), `held` (transmit into a hold someone else owns), `persist` (saved state).

pub mod device;
pub mod handler;
pub mod held;
pub mod persist;
pub mod tap;

pub use device::{Net, NetBackend, RxMirror, TxMode, TxModeError, NET_FEATURES, RX_QUEUE, TX_QUEUE};
pub use handler::{FrameSink, FrameSource, NetStats, RxPoll, TxSink, TxVerdict};
pub use held::{AppendError, FrameHold};
pub use persist::{NetArgs, NetRestoreError, NetState};
pub use tap::{Tap, TapAddressError, TapOpenError, TapUpError};
