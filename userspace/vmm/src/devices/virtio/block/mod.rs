//! virtio-blk on a raw file: `device` (features, config, activation, queue events), `handler`
//! (pure request parsing), `engine` (io_uring and the in-flight table), `persist` (saved state).

pub mod device;
pub mod engine;
pub mod handler;
pub mod persist;

pub use device::{Block, BlockOpenError, DiskWriteIntent, DiskWriteObserver, WriteIntentHook, BLOCK_FEATURES};
pub use engine::{InflightTable, IoEngine};
pub use handler::{Request, RequestType, Segment};
pub use persist::{BlockArgs, BlockRestoreError, BlockState, InflightRequestState, SegmentState};
