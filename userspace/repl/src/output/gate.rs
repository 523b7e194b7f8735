//! The output gate: where the guest's network output waits until the backup holds the epoch that
//! produced it.
//!
//! The engine drives a gate through [`OutputGate`] only: hold the guest's transmit before the first
//! checkpoint, seal the frames of each epoch while the VM is paused (with a copy for the backup to
//! replay at a takeover), release them when the epoch's acknowledgement comes, and let everything
//! out when holding ends. [`HoldGate`], the userspace gate, keeps the frames in an [`OutputHold`]
//! ring that the guest's virtio-net transmit appends to; a gate in the kernel (eBPF on the TAP's
//! egress) is the next one.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_vmm::devices::virtio::net::{TxMode, TxModeError};

use super::hold::{OutputHold, ReleaseError, SealError};
use ftvm_vmm::devices::DeviceManager;

/// Why a gate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Sealing was refused (epochs must increase).
    #[error("Cannot seal the guest's output")]
    Seal(#[from] SealError),
    /// Releasing failed.
    #[error("Cannot release the guest's output")]
    Release(#[from] ReleaseError),
}

/// Where guest output waits for its epoch's acknowledgement. See the module documentation.
pub trait OutputGate: Send + Sync + std::fmt::Debug {
    /// Starts holding the guest's transmit (once, before the first checkpoint's pause).
    fn hold(&self, devices: &DeviceManager) -> Result<(), TxModeError>;

    /// Lets the guest's transmit go out directly again (the VM paused, after
    /// [`OutputGate::release_all`]).
    fn pass(&self, devices: &DeviceManager) -> Result<(), TxModeError>;

    /// Closes the frames held since the last seal as `epoch` (the VM paused), and appends a copy of
    /// them to `out`, one range per frame in `frames`. Returns how many there were.
    fn seal(&self, epoch: u64, out: &mut Vec<u8>, frames: &mut Vec<Range<usize>>) -> Result<u64, GateError>;

    /// The backup holds every epoch up to `epoch`: their frames go out, in order.
    fn release_through(&self, epoch: u64) -> Result<(), GateError>;

    /// Holding ends: what is still open is sealed as `next_epoch` (or later), then every frame goes
    /// out, in order.
    fn release_all(&self, next_epoch: u64) -> Result<(), GateError>;

    /// Frames that entered the gate so far (the engine compares it with the frames it sealed to
    /// see output waiting for a checkpoint).
    fn frames_in(&self) -> u64;

    /// Waits until more than `beyond` frames entered the gate, or `timeout`; returns whether they
    /// did. The default looks every 100 µs; a gate that can be woken should be.
    fn wait_for_output(&self, beyond: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.frames_in() > beyond {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(Duration::from_micros(100)));
        }
    }
}

/// The userspace gate: an [`OutputHold`] the guest's transmit appends to.
#[derive(Clone, Debug)]
pub struct HoldGate(pub Arc<OutputHold>);

impl OutputGate for HoldGate {
    fn hold(&self, devices: &DeviceManager) -> Result<(), TxModeError> {
        devices.set_tx_mode(TxMode::Held(self.0.clone()))
    }

    fn pass(&self, devices: &DeviceManager) -> Result<(), TxModeError> {
        devices.set_tx_mode(TxMode::Direct)
    }

    fn seal(&self, epoch: u64, out: &mut Vec<u8>, frames: &mut Vec<Range<usize>>) -> Result<u64, GateError> {
        Ok(self.0.seal_copying(epoch, out, frames)?)
    }

    fn release_through(&self, epoch: u64) -> Result<(), GateError> {
        self.0.release_through(epoch)?;
        Ok(())
    }

    fn release_all(&self, next_epoch: u64) -> Result<(), GateError> {
        let last = self.0.last_sealed().map_or(0, |l| l + 1).max(next_epoch);
        // A refused seal only means `last` was sealed already; what is open stays held then, and
        // the release below lets out everything sealed.
        let _ = self.0.seal(last);
        self.0.release_all()?;
        Ok(())
    }

    fn frames_in(&self) -> u64 {
        self.0.stats().appended
    }

    fn wait_for_output(&self, beyond: u64, timeout: Duration) -> bool {
        self.0.wait_appended(beyond, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_vmm::devices::virtio::net::FrameSink;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Clone, Default)]
    struct Count(Arc<AtomicU64>);

    impl FrameSink for Count {
        fn send_frame(&mut self, _frame: &[u8]) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn the_hold_gate_seals_releases_by_epoch_and_releases_all() {
        let hold = Arc::new(OutputHold::new(1 << 20).unwrap());
        let sink = Count::default();
        hold.attach_output(Box::new(sink.clone()));
        let gate: Box<dyn OutputGate> = Box::new(HoldGate(hold.clone()));
        hold.append(&[1u8; 64]).unwrap();
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        assert_eq!(gate.seal(1, &mut out, &mut frames).unwrap(), 1);
        assert_eq!(frames, vec![0..64]);
        hold.append(&[2u8; 64]).unwrap();
        assert_eq!(gate.frames_in(), 2);
        gate.release_through(0).unwrap();
        assert_eq!(sink.0.load(Ordering::Relaxed), 0);
        gate.release_through(1).unwrap();
        assert_eq!(sink.0.load(Ordering::Relaxed), 1);
        // The open frame is sealed and let out.
        gate.release_all(2).unwrap();
        assert_eq!(sink.0.load(Ordering::Relaxed), 2);
        assert!(gate.seal(1, &mut out, &mut frames).is_err(), "epochs must increase");
    }
}
