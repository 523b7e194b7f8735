//! virtio-net: `device` (features, config, activation), `handler` (pure queue logic), `tap`
//! (the TAP backend).

pub mod device;
pub mod handler;
pub mod tap;

pub use device::{Net, NetBackend, NET_FEATURES, RX_QUEUE, TX_QUEUE};
pub use handler::{FrameSink, FrameSource, NetStats, RxPoll};
pub use tap::{Tap, TapAddressError, TapOpenError, TapUpError};
