//! virtio-net: `device` (features, config, activation), `handler` (pure queue logic), `tap`
//! (the TAP backend), `hold` (the output-commit hold for transmit), `persist` (saved state).

pub mod device;
pub mod handler;
pub mod hold;
pub mod persist;
pub mod tap;

pub use device::{Net, NetBackend, TxMode, TxModeError, NET_FEATURES, RX_QUEUE, TX_QUEUE};
pub use handler::{FrameSink, FrameSource, NetStats, RxPoll, TxSink, TxVerdict};
pub use hold::{
    AppendError, HoldConfigError, HoldEvent, HoldStats, OutputHold, ReleaseError, ReleaseReport,
    SealError, DEFAULT_HOLD_CAPACITY,
};
pub use persist::{NetArgs, NetRestoreError, NetState};
pub use tap::{Tap, TapAddressError, TapOpenError, TapUpError};
