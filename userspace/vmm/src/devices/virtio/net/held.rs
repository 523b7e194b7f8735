//! Transmit into a hold that someone else owns ([`super::TxMode::Held`]).
//!
//! The device knows nothing about epochs or replication: it hands each transmitted frame (virtio
//! header first) to a [`FrameHold`] and completes the descriptor once the hold took it. When the
//! hold is full, the frame stays in the guest's avail ring (backpressure, nothing is dropped)
//! until the hold writes the space waker. The hold lets frames out through the output handle the
//! device gives it, whenever its owner decides (the replication layer's output commit, in
//! `ftvm-repl`'s `output` module).

use std::fmt;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::handler::{FrameSink, TxSink, TxVerdict};

/// Why [`FrameHold::append`] did not take a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// No room until the hold lets frames out; the space waker is written when it does.
    #[error("the output hold is full")]
    Full,
    /// Not a frame: shorter than the virtio-net header or longer than any frame.
    #[error("a {len}-byte frame cannot be held")]
    BadLength {
        /// The frame's length.
        len: usize,
    },
}

/// Where transmitted frames wait while the device is in [`super::TxMode::Held`].
pub trait FrameHold: Send + Sync + fmt::Debug {
    /// Takes one frame, virtio-net header first.
    fn append(&self, frame: &[u8]) -> Result<(), AppendError>;
    /// The handle on the network backend that held frames leave on.
    fn attach_output(&self, output: Box<dyn FrameSink + Send>);
    /// Written when room frees after [`AppendError::Full`] (none: nobody to wake).
    fn set_space_waker(&self, waker: Option<Arc<EventFd>>);
}

/// Frames into a [`FrameHold`].
#[derive(Debug)]
pub struct HeldTx<'a>(pub &'a dyn FrameHold);

impl TxSink for HeldTx<'_> {
    fn transmit(&mut self, frame: &[u8]) -> TxVerdict {
        match self.0.append(frame) {
            Ok(()) => TxVerdict::Sent,
            Err(AppendError::Full) => TxVerdict::Full,
            // read_tx_frame only passes frames of a valid length; anything else is dropped.
            Err(AppendError::BadLength { .. }) => TxVerdict::Dropped,
        }
    }
}

/// A plain hold for the device's own tests: frames wait in a list until [`TestHold::release`].
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EventFd;

    use super::{AppendError, FrameHold};
    use crate::devices::virtio::net::handler::{FrameSink, MAX_FRAME_LEN, VNET_HDR_LEN};

    #[derive(Default)]
    struct Inner {
        frames: Vec<Vec<u8>>,
        output: Option<Box<dyn FrameSink + Send>>,
        waker: Option<Arc<EventFd>>,
    }

    /// Holds up to `capacity` bytes of frames.
    pub(crate) struct TestHold {
        capacity: usize,
        inner: Mutex<Inner>,
    }

    impl std::fmt::Debug for TestHold {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TestHold").field("capacity", &self.capacity).finish_non_exhaustive()
        }
    }

    impl TestHold {
        pub(crate) fn new(capacity: usize) -> Arc<Self> {
            Arc::new(Self { capacity, inner: Mutex::new(Inner::default()) })
        }

        /// Sends every held frame on the attached output, in order, and wakes the device.
        /// Returns the frames sent.
        pub(crate) fn release(&self) -> usize {
            let mut inner = self.inner.lock().unwrap();
            let frames = std::mem::take(&mut inner.frames);
            let out = inner.output.as_mut().expect("an output is attached");
            for f in &frames {
                out.send_frame(f).unwrap();
            }
            if let Some(w) = &inner.waker {
                w.write(1).unwrap();
            }
            frames.len()
        }

        /// Frames waiting.
        pub(crate) fn held(&self) -> usize {
            self.inner.lock().unwrap().frames.len()
        }
    }

    impl FrameHold for TestHold {
        fn append(&self, frame: &[u8]) -> Result<(), AppendError> {
            if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&frame.len()) {
                return Err(AppendError::BadLength { len: frame.len() });
            }
            let mut inner = self.inner.lock().unwrap();
            let used: usize = inner.frames.iter().map(Vec::len).sum();
            if used + frame.len() > self.capacity {
                return Err(AppendError::Full);
            }
            inner.frames.push(frame.to_vec());
            Ok(())
        }

        fn attach_output(&self, output: Box<dyn FrameSink + Send>) {
            self.inner.lock().unwrap().output = Some(output);
        }

        fn set_space_waker(&self, waker: Option<Arc<EventFd>>) {
            self.inner.lock().unwrap().waker = waker;
        }
    }
}
