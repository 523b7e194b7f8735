//! Device models. `bus` dispatches MMIO exits; `virtio` holds the virtio-mmio devices (net on a
//! TAP, block on a raw file through io_uring); `io_thread` runs their host-side events;
//! `persist` saves and restores their state.
//! [`DeviceManager`] builds them from a [`DeviceConfig`], puts them on the bus and runs them,
//! and for fault tolerance pauses them, saves their state and rebuilds them from it.
//!
//! # Pause
//! [`DeviceManager::pause`] takes microseconds: it raises each transport's pause flag, then
//! takes each transport's lock (waiting at most for the one frame or completion batch the I/O
//! thread is handling) and marks it paused. All device work on guest memory and queues runs
//! under that lock and checks the mark, so nothing touches them after `pause` returns; there is
//! no handshake with the I/O thread, which keeps running and simply does nothing: received
//! frames stay in the TAP, block completions stay in the io_uring completion queue, a transmit
//! retry waits. [`DeviceManager::resume`] clears the marks, handles notifications that came
//! meanwhile, and kicks the I/O thread to catch up. Disk I/O already submitted keeps running in
//! the kernel while paused (waiting for it would cost milliseconds): a read may land in guest
//! memory during the pause, but its pages are marked dirty only when the completion is reaped
//! after the resume, and a saved state lists it as in flight, so a restore reads it again.

pub mod bus;
mod io_thread;
pub mod persist;
pub mod virtio;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ftvm_guest_abi::{MMIO_DEVICE_SIZE, MMIO_WINDOW_GPA};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemory;
use crate::wake::GuestWake;
use bus::lock;
use io_thread::{BlockEvents, IoThread, NetEvents};
use persist::{DevicesState, Persist, VirtioDeviceState};
use virtio::block::{Block, BlockArgs, BlockOpenError, BlockRestoreError, DiskWriteObserver};
pub use virtio::block::{DiskWriteIntent, WriteIntentHook};
use virtio::net::{
    Net, NetArgs, NetRestoreError, RxMirror, Tap, TapAddressError, TapOpenError, TapUpError, TxMode,
    TxModeError,
};
use virtio::persist::{MmioTransportArgs, TransportRestoreError};
use virtio::MmioTransport;

/// The network device: a TAP on the host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP interface name; created if it does not exist.
    pub tap_name: String,
    /// The guest's MAC address (virtio-net config space).
    pub mac: [u8; 6],
    /// Address and prefix length to give the TAP on the host, if any.
    pub host_ipv4: Option<(Ipv4Addr, u8)>,
}

/// The block device: a raw disk file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The disk file (or block device); must exist.
    pub path: PathBuf,
    /// Told of every write before it is issued, for as long as the device lives (restored
    /// in-flight writes included).
    pub intent: Option<WriteIntentHook>,
}

impl BlockConfig {
    /// The disk at `path`, with nobody told of writes in advance.
    pub fn new(path: PathBuf) -> Self {
        Self { path, intent: None }
    }

    /// The same disk, with `intent` told of every write before it is issued.
    pub fn with_intent(mut self, intent: std::sync::Arc<dyn DiskWriteIntent>) -> Self {
        self.intent = Some(WriteIntentHook(intent));
        self
    }
}

/// Which devices the VM gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// virtio-net, if any.
    pub net: Option<NetConfig>,
    /// virtio-blk, if any.
    pub block: Option<BlockConfig>,
}

/// What the replication layer plugs into the devices. The default is an unprotected VM:
/// frames go straight to the TAP and nobody watches disk writes.
#[derive(Clone, Default)]
pub struct DeviceHooks {
    /// Where guest transmit frames go.
    pub tx_mode: TxMode,
    /// Who sees every guest disk write at submission.
    pub disk_write_observer: Option<Arc<dyn DiskWriteObserver>>,
}

impl fmt::Debug for DeviceHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceHooks")
            .field("tx_mode", &self.tx_mode)
            .field("disk_write_observer", &self.disk_write_observer.is_some())
            .finish()
    }
}

/// Guest physical bases of the devices' MMIO windows (for the boot info).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceBases {
    /// virtio-net base, if present.
    pub net: Option<u64>,
    /// virtio-blk base, if present.
    pub block: Option<u64>,
}

/// Why the devices could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCreateError {
    /// The TAP could not be opened or created.
    #[error(transparent)]
    Tap(#[from] TapOpenError),
    /// The TAP could not be brought up.
    #[error(transparent)]
    TapUp(#[from] TapUpError),
    /// The host address could not be set on the TAP.
    #[error(transparent)]
    TapAddress(#[from] TapAddressError),
    /// The disk could not be opened.
    #[error(transparent)]
    Disk(#[from] BlockOpenError),
    /// No eventfd for the I/O thread.
    #[error("cannot create an eventfd for the device I/O thread")]
    EventFd(#[source] io::Error),
    /// The transmit mode of the hooks could not be set.
    #[error(transparent)]
    TxMode(#[from] TxModeError),
}

/// Why the device I/O thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStartError {
    /// epoll_create failed.
    #[error("cannot create the device I/O epoll set")]
    Epoll(#[source] io::Error),
    /// An eventfd could not be created or duplicated.
    #[error("cannot create an eventfd for the device I/O thread")]
    EventFd(#[source] io::Error),
    /// A fd could not be added to the epoll set.
    #[error("cannot watch the {what} for device I/O")]
    Watch {
        /// Which fd.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The thread could not be spawned.
    #[error("cannot start the device I/O thread")]
    Spawn(#[source] io::Error),
}

/// Why shutting the devices down did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DeviceShutdownError {
    /// The I/O thread panicked (the devices were still stopped and the disk flushed).
    #[error("the device I/O thread panicked")]
    IoThreadPanicked,
    /// fdatasync of the disk failed: writes the guest saw acknowledged may not be durable.
    #[error("cannot flush disk {}", path.display())]
    SyncDisk {
        /// The disk file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Why the device state could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSaveError {
    /// The devices run: their state could change while it is read.
    #[error("the devices must be paused to save their state")]
    NotPaused,
}

/// Why the devices could not be rebuilt from a saved state.
#[derive(Debug, thiserror::Error)]
pub enum DeviceRestoreError {
    /// The configuration and the state disagree on which devices exist.
    #[error("the saved state {} a {device} device but the configuration {}",
        if *saved { "has" } else { "has no" }, if *saved { "has none" } else { "has one" })]
    Mismatch {
        /// "network" or "block".
        device: &'static str,
        /// Whether the state has it.
        saved: bool,
    },
    /// A host resource (TAP, eventfd, disk) could not be set up.
    #[error(transparent)]
    Create(#[from] DeviceCreateError),
    /// The network device state was refused.
    #[error("cannot restore the network device")]
    Net(#[source] NetRestoreError),
    /// The block device state was refused, or its in-flight requests could not be submitted.
    #[error("cannot restore the block device")]
    Block(#[source] BlockRestoreError),
    /// A transport state was refused.
    #[error("cannot restore the {device} device's virtio-mmio transport")]
    Transport {
        /// "network" or "block".
        device: &'static str,
        /// Why.
        #[source]
        source: TransportRestoreError,
    },
}

/// The VM's devices and their I/O thread.
#[derive(Debug)]
pub struct DeviceManager {
    mem: GuestMemory,
    net: Option<Arc<Mutex<MmioTransport<Net>>>>,
    block: Option<Arc<Mutex<MmioTransport<Block>>>>,
    kick: Arc<EventFd>,
    tx_kick: Arc<EventFd>,
    /// Each transport's pause flag, raised before its lock is taken.
    pause_flags: Vec<Arc<AtomicBool>>,
    paused: AtomicBool,
    /// Started while paused: the first resume does the start's catch-up.
    catch_up_on_resume: AtomicBool,
    io_thread: Option<IoThread>,
}

/// Opens TAP `n.tap_name`, brings it up and gives it `n.host_ipv4`.
fn open_tap(n: &NetConfig) -> Result<Tap, DeviceCreateError> {
    let tap = Tap::open(&n.tap_name)?;
    tap.set_up()?;
    if let Some((addr, prefix)) = n.host_ipv4 {
        tap.set_ipv4(addr, prefix)?;
    }
    Ok(tap)
}

fn eventfd() -> Result<Arc<EventFd>, DeviceCreateError> {
    Ok(Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DeviceCreateError::EventFd)?))
}

impl DeviceManager {
    /// Opens the TAP (creating it if needed, bringing it up, setting host_ipv4) and the disk file.
    pub fn new(
        mem: GuestMemory,
        wake: Arc<GuestWake>,
        cfg: &DeviceConfig,
    ) -> Result<Self, DeviceCreateError> {
        Self::new_with_hooks(mem, wake, cfg, DeviceHooks::default())
    }

    /// [`Self::new`] with the replication layer's hooks in place from the start.
    pub fn new_with_hooks(
        mem: GuestMemory,
        wake: Arc<GuestWake>,
        cfg: &DeviceConfig,
        hooks: DeviceHooks,
    ) -> Result<Self, DeviceCreateError> {
        let kick = eventfd()?;
        let tx_kick = eventfd()?;
        let net = match &cfg.net {
            Some(n) => {
                let dev = Net::new(n.mac, Box::new(open_tap(n)?), kick.clone());
                Some(MmioTransport::new(dev, mem.clone(), wake.clone()))
            }
            None => None,
        };
        let block = match &cfg.block {
            Some(b) => {
                let mut dev = Block::open(&b.path)?;
                dev.set_write_intent(b.intent.clone());
                Some(MmioTransport::new(dev, mem.clone(), wake.clone()))
            }
            None => None,
        };
        Self::assemble(mem, kick, tx_kick, net, block, hooks)
    }

    /// Wires the transports to the I/O thread's eventfds and applies the hooks.
    fn assemble(
        mem: GuestMemory,
        kick: Arc<EventFd>,
        tx_kick: Arc<EventFd>,
        net: Option<MmioTransport<Net>>,
        block: Option<MmioTransport<Block>>,
        hooks: DeviceHooks,
    ) -> Result<Self, DeviceCreateError> {
        let mut pause_flags = Vec::new();
        let net = match net {
            Some(mut t) => {
                t.device_mut().set_tx_kick(tx_kick.clone());
                t.device_mut().set_tx_mode(hooks.tx_mode)?;
                pause_flags.push(t.pause_flag());
                Some(Arc::new(Mutex::new(t)))
            }
            None => None,
        };
        let block = match block {
            Some(mut t) => {
                t.device_mut().set_write_observer(hooks.disk_write_observer, &mem);
                pause_flags.push(t.pause_flag());
                Some(Arc::new(Mutex::new(t)))
            }
            None => None,
        };
        Ok(Self {
            mem,
            net,
            block,
            kick,
            tx_kick,
            pause_flags,
            paused: AtomicBool::new(false),
            catch_up_on_resume: AtomicBool::new(false),
            io_thread: None,
        })
    }

    /// Rebuilds the devices from `state` on `mem` (the backup's copy of guest memory), with the
    /// TAP and disk of `cfg`, which must name the same devices as the state. Nothing is written
    /// into guest memory; the block device's in-flight requests are submitted again (their
    /// completions wait in io_uring for [`Self::start`]). The manager is not paused; like
    /// [`Self::new`], it does nothing until [`Self::register`] and [`Self::start`].
    pub fn restore(
        mem: GuestMemory,
        wake: Arc<GuestWake>,
        cfg: &DeviceConfig,
        state: &DevicesState,
    ) -> Result<Self, DeviceRestoreError> {
        Self::restore_with_hooks(mem, wake, cfg, DeviceHooks::default(), state)
    }

    /// [`Self::restore`] with hooks in place before anything runs (the disk write observer then
    /// also sees the re-submitted writes).
    pub fn restore_with_hooks(
        mem: GuestMemory,
        wake: Arc<GuestWake>,
        cfg: &DeviceConfig,
        hooks: DeviceHooks,
        state: &DevicesState,
    ) -> Result<Self, DeviceRestoreError> {
        let kick = eventfd()?;
        let tx_kick = eventfd()?;
        let net = match (&cfg.net, &state.net) {
            (Some(n), Some(s)) => {
                let args = NetArgs { backend: Box::new(open_tap(n)?), kick: kick.clone() };
                let dev = Net::restore(args, &s.device).map_err(DeviceRestoreError::Net)?;
                let args = MmioTransportArgs { device: dev, mem: mem.clone(), wake: wake.clone() };
                Some(MmioTransport::restore(args, &s.transport).map_err(|source| {
                    DeviceRestoreError::Transport { device: "network", source }
                })?)
            }
            (None, None) => None,
            (_, s) => {
                return Err(DeviceRestoreError::Mismatch { device: "network", saved: s.is_some() })
            }
        };
        let block = match (&cfg.block, &state.block) {
            (Some(b), Some(s)) => {
                let args = BlockArgs {
                    path: b.path.clone(),
                    mem: mem.clone(),
                    observer: hooks.disk_write_observer.clone(),
                    intent: b.intent.clone(),
                };
                let dev = Block::restore(args, &s.device).map_err(DeviceRestoreError::Block)?;
                let args = MmioTransportArgs { device: dev, mem: mem.clone(), wake: wake.clone() };
                Some(
                    MmioTransport::restore(args, &s.transport).map_err(|source| {
                        DeviceRestoreError::Transport { device: "block", source }
                    })?,
                )
            }
            (None, None) => None,
            (_, s) => {
                return Err(DeviceRestoreError::Mismatch { device: "block", saved: s.is_some() })
            }
        };
        Ok(Self::assemble(mem, kick, tx_kick, net, block, hooks)?)
    }

    /// Puts each device on the bus at ftvm_guest_abi::MMIO_WINDOW_GPA + i * MMIO_DEVICE_SIZE (net first, then block).
    pub fn register(&self, bus: &mut bus::MmioBus) -> Result<DeviceBases, bus::BusOverlapError> {
        let mut bases = DeviceBases::default();
        let mut next = MMIO_WINDOW_GPA;
        if let Some(net) = &self.net {
            bus.insert(next, MMIO_DEVICE_SIZE, net.clone())?;
            bases.net = Some(next);
            next += MMIO_DEVICE_SIZE;
        }
        if let Some(block) = &self.block {
            bus.insert(next, MMIO_DEVICE_SIZE, block.clone())?;
            bases.block = Some(next);
        }
        Ok(bases)
    }

    /// Starts the I/O thread (RX, block completions, transmit retries). Calling it again while
    /// it runs does nothing. A restored manager's devices then pick up where the state left
    /// them: notifications saved as pending are handled, and the thread looks at the TAP, the
    /// transmit queue and the completions of the re-submitted requests.
    pub fn start(&mut self) -> Result<(), DeviceStartError> {
        if self.io_thread.is_some() {
            return Ok(());
        }
        let net = self.net.as_ref().map(|t| NetEvents {
            transport: t.clone(),
            backend_fd: lock(t).device().backend_fd(),
            kick: self.kick.clone(),
            tx_kick: self.tx_kick.clone(),
        });
        let block = self.block.as_ref().map(|t| BlockEvents {
            transport: t.clone(),
            completion_fd: lock(t).device().completion_fd(),
        });
        self.io_thread = Some(IoThread::spawn(net, block)?);
        if self.is_paused() {
            self.catch_up_on_resume.store(true, Ordering::SeqCst);
        } else {
            self.catch_up();
        }
        Ok(())
    }

    /// Stops all device work on guest memory and queues (see the module documentation).
    /// Returns once nothing touches them; takes microseconds. Pause the vCPUs first (a
    /// QueueNotify that comes anyway is remembered, saved, and handled at resume). Idempotent.
    pub fn pause(&self) {
        // Raise every flag first, so each lock holder cuts its work short while we wait for
        // the previous lock.
        for flag in &self.pause_flags {
            flag.store(true, Ordering::SeqCst);
        }
        if let Some(t) = &self.net {
            lock(t).pause();
        }
        if let Some(t) = &self.block {
            lock(t).pause();
        }
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Lets the devices work again: handles notifications that came while paused and, if the
    /// I/O thread turned events away meanwhile, kicks it to deliver waiting frames, reap
    /// completions and retry transmit. (A pause with no host event costs the I/O thread
    /// nothing.) Idempotent.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        if let Some(t) = &self.net {
            let mut t = lock(t);
            t.device_mut().close_read_ahead();
            if t.resume() {
                drop(t);
                self.kick_net();
            }
        }
        if let Some(t) = &self.block {
            let mut t = lock(t);
            if t.resume() {
                t.device().signal_completion_event();
            }
        }
        if self.catch_up_on_resume.swap(false, Ordering::SeqCst) {
            self.catch_up();
        }
    }

    /// While paused, once the state a checkpoint takes is fixed: lets the I/O thread read the
    /// network backend ahead until the resume ([`Net::open_read_ahead`]), so that frames arriving
    /// in the pause reach the receive mirror at once instead of after it. Nothing without a
    /// network device, or when not paused.
    pub fn open_read_ahead(&self) {
        let Some(t) = &self.net else { return };
        let mut t = lock(t);
        if !t.is_paused() {
            return;
        }
        t.device_mut().open_read_ahead();
        drop(t);
        // Only fails on counter overflow, and then the thread wakes anyway.
        let _ = self.kick.write(1);
    }

    /// True between [`Self::pause`] and [`Self::resume`].
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Handles pending notifications and makes the I/O thread look at everything (a restored
    /// manager's first start).
    fn catch_up(&self) {
        if let Some(t) = &self.net {
            lock(t).replay_pending_notify();
            self.kick_net();
        }
        if let Some(t) = &self.block {
            let mut t = lock(t);
            t.replay_pending_notify();
            t.device().signal_completion_event();
        }
    }

    /// Makes the I/O thread re-arm and read the TAP, and retry transmit.
    fn kick_net(&self) {
        // Only fail on counter overflow, and then the thread wakes anyway.
        let _ = self.kick.write(1);
        let _ = self.tx_kick.write(1);
    }

    /// The state of every device. Only while paused: the state must not change as it is read.
    pub fn save_state(&self) -> Result<DevicesState, DeviceSaveError> {
        if !self.is_paused() {
            return Err(DeviceSaveError::NotPaused);
        }
        let net = self.net.as_ref().map(|t| {
            let t = lock(t);
            VirtioDeviceState { transport: t.save(), device: t.device().save() }
        });
        let block = self.block.as_ref().map(|t| {
            let t = lock(t);
            VirtioDeviceState { transport: t.save(), device: t.device().save() }
        });
        Ok(DevicesState { net, block })
    }

    /// Chooses where guest transmit frames go from now on ([`TxMode::Direct`] without a
    /// network device is accepted and does nothing).
    pub fn set_tx_mode(&self, mode: TxMode) -> Result<(), TxModeError> {
        match (&self.net, mode) {
            (Some(t), mode) => lock(t).device_mut().set_tx_mode(mode),
            (None, TxMode::Direct) => Ok(()),
            (None, TxMode::Held(_)) => Err(TxModeError::NoNetDevice),
        }
    }

    /// Sets (or removes) the observer of received frames; nothing happens without a network
    /// device.
    pub fn set_rx_mirror(&self, mirror: Option<Arc<dyn RxMirror>>) {
        if let Some(t) = &self.net {
            lock(t).device_mut().set_rx_mirror(mirror);
        }
    }

    /// Queues frames to be received ahead of the backend's ([`Net::replay_rx`]); returns how many
    /// were queued (none without a network device).
    pub fn replay_rx(&self, frames: Vec<Vec<u8>>) -> usize {
        self.net.as_ref().map_or(0, |t| lock(t).device_mut().replay_rx(frames))
    }

    /// Sets (or removes) the observer of guest disk writes; nothing happens without a disk.
    pub fn set_disk_write_observer(&self, observer: Option<Arc<dyn DiskWriteObserver>>) {
        if let Some(t) = &self.block {
            lock(t).device_mut().set_write_observer(observer, &self.mem);
        }
    }

    /// Stops the I/O thread, waits for in-flight block I/O, and fdatasyncs the disk. Idempotent.
    ///
    /// Stop the vCPUs first: a guest that keeps notifying would submit new requests. Requests in
    /// flight are completed into the used ring when the device runs; when it is paused (its
    /// state may have been saved with them in flight) they are only waited for.
    pub fn shutdown(&mut self) -> Result<(), DeviceShutdownError> {
        let mut result = Ok(());
        if let Some(thread) = self.io_thread.take() {
            if thread.stop().is_err() {
                result = Err(DeviceShutdownError::IoThreadPanicked);
            }
        }
        if let Some(block) = &self.block {
            let mut t = lock(block);
            // Complete what is in flight into the used ring when the device runs (the state a
            // later checkpoint sees stays consistent); otherwise just wait for it.
            if t.process(|dev, ctx| dev.complete_all(ctx)).is_none() {
                t.device_mut().drain(&self.mem);
            }
            let dev = t.device();
            dev.sync().map_err(|source| DeviceShutdownError::SyncDisk {
                path: dev.path().into(),
                source,
            })?;
        }
        result
    }

    /// The network device's transport, if any.
    pub fn net(&self) -> Option<&Arc<Mutex<MmioTransport<Net>>>> {
        self.net.as_ref()
    }

    /// The block device's transport, if any.
    pub fn block(&self) -> Option<&Arc<Mutex<MmioTransport<Block>>>> {
        self.block.as_ref()
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("device shutdown: {}", virtio::mmio::error_chain(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::MmioBus;
    use std::sync::atomic::AtomicUsize;
    use crate::devices::virtio::test_utils::*;
    use std::os::fd::AsRawFd;
    use virtio::net::TxMode;
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, GuestAddress};

    fn disk(tag: &str, sectors: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ftvm-dm-{}-{tag}.img", std::process::id()));
        std::fs::write(&path, vec![0x5a; (sectors * 512) as usize]).unwrap();
        path
    }

    /// MMIO helpers going through the bus at an absolute address, as the vCPU thread does.
    struct BusDev<'a> {
        bus: &'a MmioBus,
        base: u64,
    }

    impl bus::MmioDevice for BusDev<'_> {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            assert!(self.bus.read(self.base + offset, data));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            assert!(self.bus.write(self.base + offset, data));
        }
    }

    #[test]
    fn missing_disk_is_reported_with_its_path() {
        let cfg = DeviceConfig {
            net: None,
            block: Some(BlockConfig::new("/nonexistent/x/y".into())),
        };
        let err = DeviceManager::new(test_memory(), Arc::new(GuestWake::new().unwrap()), &cfg)
            .unwrap_err();
        assert_eq!(
            virtio::mmio::error_chain(&err),
            "cannot open disk /nonexistent/x/y: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn block_only_machine_registers_serves_and_shuts_down() {
        let path = disk("blockonly", 8);
        let mem = test_memory();
        let wake = Arc::new(GuestWake::new().unwrap());
        let cfg = DeviceConfig { net: None, block: Some(BlockConfig::new(path.clone())) };
        let mut dm = DeviceManager::new(mem.clone(), wake.clone(), &cfg).unwrap();
        let mut bus = MmioBus::default();
        let bases = dm.register(&mut bus).unwrap();
        assert_eq!(bases, DeviceBases { net: None, block: Some(MMIO_WINDOW_GPA) });
        // Registering twice overlaps.
        assert!(dm.register(&mut bus).is_err());
        dm.start().unwrap();
        dm.start().unwrap();

        let mut dev = BusDev { bus: &bus, base: MMIO_WINDOW_GPA };
        assert_eq!(r32(&mut dev, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        negotiate(&mut dev, u64::MAX);
        let mut q = TestQueue::new(&mem, 0x1_0000, 16);
        q.program(&mut dev, 0);
        driver_ok(&mut dev);

        // A read, completed by the I/O thread, which wakes the "guest".
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&2u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x8_0000)).unwrap();
        q.add_chain(&[(0x8_0000, 16, false), (0x9_0000, 512, true), (0x8_1000, 1, true)]);
        w32(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(wait_readable(wake.as_raw_fd(), 5000), "the completion wakes the guest");
        assert_eq!(q.next_used(), Some((0, 513)));
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x9_0000)).unwrap();
        assert_eq!(got, [0x5a; 512]);

        // A write left in flight is finished by shutdown.
        mem.write_slice(&[0x77; 512], GuestAddress(0xa_0000)).unwrap();
        h[..4].copy_from_slice(&1u32.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x8_0000)).unwrap();
        q.add_chain(&[(0x8_0000, 16, false), (0xa_0000, 512, false), (0x8_1000, 1, true)]);
        w32(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        dm.shutdown().unwrap();
        dm.shutdown().unwrap();
        assert!(lock(dm.block().unwrap()).device().inflight().is_empty());
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[1024..1536], &[0x77; 512][..]);
        drop(dm);
        std::fs::remove_file(&path).unwrap();
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn net_and_block_on_a_tap_in_a_fresh_namespace() {
        if !is_root() {
            eprintln!("skipped: needs root and CAP_NET_ADMIN");
            return;
        }
        let path = disk("netblock", 8);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace;
                // the I/O thread spawned from here inherits it, and all of it ends with the test.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
                net_and_block(&path)
            })
            .join()
        });
        std::fs::remove_file(&path).unwrap();
        result.unwrap();
    }

    fn net_and_block(path: &std::path::Path) {
        let mem = test_memory();
        let wake = Arc::new(GuestWake::new().unwrap());
        // `lo` exists in every namespace and is not a TAP: a clear one-line refusal.
        let lo = DeviceConfig {
            net: Some(NetConfig {
                tap_name: "lo".into(),
                mac: [2, 0, 0, 0, 0, 1],
                host_ipv4: None,
            }),
            block: None,
        };
        let err = DeviceManager::new(mem.clone(), wake.clone(), &lo).unwrap_err();
        assert_eq!(virtio::mmio::error_chain(&err), "interface lo exists and is not a TAP device");
        let name = format!("ftvmd{}", std::process::id() % 10_000);
        let cfg = DeviceConfig {
            net: Some(NetConfig {
                tap_name: name.clone(),
                mac: [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc],
                host_ipv4: Some((Ipv4Addr::new(10, 79, 0, 1), 24)),
            }),
            block: Some(BlockConfig::new(path.into())),
        };
        let mut dm = DeviceManager::new(mem.clone(), wake.clone(), &cfg).unwrap();
        let mut bus = MmioBus::default();
        let bases = dm.register(&mut bus).unwrap();
        assert_eq!(bases.net, Some(MMIO_WINDOW_GPA));
        assert_eq!(bases.block, Some(MMIO_WINDOW_GPA + MMIO_DEVICE_SIZE));
        dm.start().unwrap();

        let mut dev = BusDev { bus: &bus, base: MMIO_WINDOW_GPA };
        negotiate(&mut dev, u64::MAX);
        let mut rxq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut txq = TestQueue::new(&mem, 0x4_0000, 16);
        rxq.program(&mut dev, 0);
        txq.program(&mut dev, 1);
        driver_ok(&mut dev);
        for i in 0..8 {
            rxq.add_chain(&[(0x8_0000 + i * 0x1000, 2048, true)]);
        }
        w32(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        // The guest (10.79.0.2) asks who has 10.79.0.1; the host answers through the TAP and
        // the I/O thread delivers the reply into a receive buffer.
        let mac = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[10, 79, 0, 2]);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&[10, 79, 0, 1]);
        mem.write_slice(&frame, GuestAddress(0x7_0000)).unwrap();
        txq.add_chain(&[(0x7_0000, frame.len() as u32, false)]);
        w32(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(txq.next_used(), Some((0, 0)));

        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        wait_for_frame(&mut rxq, &mem, &wake, deadline, "no ARP reply reached the guest", |buf| {
            let eth = &buf[12..];
            eth.len() >= 22 && eth[..6] == mac && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2]
        });
        let stats = lock(dm.net().unwrap()).device().stats();
        assert_eq!(stats.tx_frames, 1);
        assert!(stats.rx_frames >= 1);

        read_ahead_in_a_pause(&dm, &mem, &wake, &mut rxq);
        dm.shutdown().unwrap();
    }

    /// Waits until `deadline` (failing with `missing`) for a frame that `wanted` accepts in the
    /// guest's receive ring, whose chains are the buffers at 0x8_0000 + id * 0x1000; every frame
    /// delivered meanwhile says one buffer (num_buffers).
    fn wait_for_frame(
        rxq: &mut TestQueue<'_>,
        mem: &GuestMemory,
        wake: &GuestWake,
        deadline: std::time::Instant,
        missing: &str,
        wanted: impl Fn(&[u8]) -> bool,
    ) {
        let mut found = false;
        while !found {
            assert!(std::time::Instant::now() < deadline, "{missing}");
            wait_readable(wake.as_raw_fd(), 100);
            while let Some((id, len)) = rxq.next_used() {
                let mut buf = vec![0u8; len as usize];
                mem.read_slice(&mut buf, GuestAddress(0x8_0000 + u64::from(id) * 0x1000)).unwrap();
                assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
                found |= wanted(&buf);
            }
        }
    }

    /// Frames seen by the receive mirror, and the receive passes it was told of.
    #[derive(Debug, Default)]
    struct Mirrored(Mutex<Vec<Vec<u8>>>, AtomicUsize);

    impl virtio::net::RxMirror for Mirrored {
        fn frame_taken(&self, frame: &[u8]) {
            lock(&self.0).push(frame.to_vec());
        }

        fn taken_all(&self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Paused, with reading ahead open: a datagram the host sends the guest is read by the I/O
    /// thread and mirrored during the pause, reaches the guest's ring only after the resume, and
    /// is mirrored once; the I/O thread ends each receive pass with the mirror.
    fn read_ahead_in_a_pause(dm: &DeviceManager, mem: &GuestMemory, wake: &GuestWake, rxq: &mut TestQueue<'_>) {
        const PAYLOAD: &[u8] = b"read ahead in the pause";
        let carries = |f: &[u8]| f.windows(PAYLOAD.len()).any(|w| w == PAYLOAD);
        let mirror = Arc::new(Mirrored::default());
        dm.set_rx_mirror(Some(mirror.clone() as Arc<dyn virtio::net::RxMirror>));
        while rxq.next_used().is_some() {}
        dm.pause();
        dm.open_read_ahead();
        // The guest answered ARP for 10.79.0.2 above: the datagram goes straight out the TAP.
        let sock = std::net::UdpSocket::bind("10.79.0.1:0").unwrap();
        sock.send_to(PAYLOAD, "10.79.0.2:9").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !lock(&mirror.0).iter().any(|f| carries(f)) {
            assert!(std::time::Instant::now() < deadline, "the datagram was not read ahead in the pause");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(rxq.next_used(), None, "nothing reaches the guest's ring while paused");
        let passes = mirror.1.load(Ordering::SeqCst);
        dm.resume();
        wait_for_frame(rxq, mem, wake, deadline, "the datagram read ahead never reached the guest", carries);
        assert_eq!(lock(&mirror.0).iter().filter(|f| carries(f)).count(), 1, "mirrored once, when read ahead");
        // The pass that delivered it ends with the mirror, just after the guest is told.
        while mirror.1.load(Ordering::SeqCst) == passes {
            assert!(std::time::Instant::now() < deadline, "the delivering receive pass never ended with the mirror");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        dm.set_rx_mirror(None);
    }

    /// A block-only manager with its queue set up through the bus (not started).
    fn block_machine(
        mem: &GuestMemory,
        path: &std::path::Path,
    ) -> (DeviceManager, MmioBus, Arc<GuestWake>) {
        let wake = Arc::new(GuestWake::new().unwrap());
        let cfg = DeviceConfig { net: None, block: Some(BlockConfig::new(path.into())) };
        let dm = DeviceManager::new(mem.clone(), wake.clone(), &cfg).unwrap();
        let mut bus = MmioBus::default();
        dm.register(&mut bus).unwrap();
        (dm, bus, wake)
    }

    /// Queues a block request and notifies; `slot` picks its header (0x8_0000 + slot * 0x100)
    /// and status byte (0x8_1000 + slot).
    fn block_request(
        dev: &mut BusDev<'_>,
        mem: &GuestMemory,
        q: &mut TestQueue<'_>,
        t: u32,
        sector: u64,
        slot: u64,
        data: (u64, u32, bool),
    ) {
        let (hdr, status) = (0x8_0000 + slot * 0x100, 0x8_1000 + slot);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        q.add_chain(&[(hdr, 16, false), data, (status, 1, true)]);
        w32(dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    #[test]
    fn pause_holds_completions_and_notifications_until_resume() {
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
        let path = disk("pause", 8);
        let mem = test_memory();
        let (mut dm, bus, wake) = block_machine(&mem, &path);
        let mut dev = BusDev { bus: &bus, base: MMIO_WINDOW_GPA };
        negotiate(&mut dev, u64::MAX);
        let mut q = TestQueue::new(&mem, 0x1_0000, 16);
        q.program(&mut dev, 0);
        driver_ok(&mut dev);
        assert!(matches!(dm.save_state(), Err(DeviceSaveError::NotPaused)));

        // A read submitted before the pause; the I/O thread starts while paused.
        block_request(&mut dev, &mem, &mut q, VIRTIO_BLK_T_IN, 1, 0, (0x9_0000, 512, true));
        dm.pause();
        dm.pause();
        dm.start().unwrap();
        // A notification that should not happen (vCPUs are paused first) is deferred.
        block_request(&mut dev, &mem, &mut q, VIRTIO_BLK_T_IN, 2, 1, (0xa_0000, 512, true));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(q.used_idx(), 0, "no completion reaches the guest while paused");
        let state = dm.save_state().unwrap();
        let block = state.block.as_ref().unwrap();
        assert_eq!(block.device.inflight.len(), 1, "the first read is in flight");
        assert_eq!(block.transport.pending_notify, 1, "the second waits for resume");
        assert_eq!(dm.save_state().unwrap(), state, "nothing moves while paused");

        dm.resume();
        dm.resume();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut used = Vec::new();
        while used.len() < 2 {
            assert!(std::time::Instant::now() < deadline, "completions after resume");
            wait_readable(wake.as_raw_fd(), 100);
            while let Some(u) = q.next_used() {
                used.push(u);
            }
        }
        used.sort_unstable();
        assert_eq!(used, [(0, 513), (3, 513)]);
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0xa_0000)).unwrap();
        assert_eq!(got, [0x5a; 512]);
        dm.shutdown().unwrap();
        drop(dm);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn pause_and_resume_take_microseconds() {
        let path = disk("pausecost", 8);
        let mem = test_memory();
        let (mut dm, bus, _wake) = block_machine(&mem, &path);
        let mut dev = BusDev { bus: &bus, base: MMIO_WINDOW_GPA };
        negotiate(&mut dev, u64::MAX);
        TestQueue::new(&mem, 0x1_0000, 16).program(&mut dev, 0);
        driver_ok(&mut dev);
        dm.start().unwrap();
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            let t0 = std::time::Instant::now();
            dm.pause();
            let t1 = std::time::Instant::now();
            dm.resume();
            let t2 = std::time::Instant::now();
            pause.push(t1 - t0);
            resume.push(t2 - t1);
        }
        pause.sort_unstable();
        resume.sort_unstable();
        eprintln!(
            "pause p50 {:?} p99 {:?} max {:?}; resume p50 {:?} p99 {:?} max {:?}",
            pause[500], pause[990], pause[999], resume[500], resume[990], resume[999]
        );
        // Loose: this is a debug build on a shared 2-core machine.
        assert!(pause[500] < std::time::Duration::from_micros(200), "{:?}", pause[500]);
        assert!(resume[500] < std::time::Duration::from_micros(500), "{:?}", resume[500]);
        dm.shutdown().unwrap();
        drop(dm);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_write_in_flight_completes_once_on_a_restored_manager() {
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
        let path = disk("restore-primary", 8);
        let replica = disk("restore-replica", 8);
        let mem = test_memory();
        let (dm, bus, _wake) = block_machine(&mem, &path);
        let mut dev = BusDev { bus: &bus, base: MMIO_WINDOW_GPA };
        negotiate(&mut dev, u64::MAX);
        let mut q = TestQueue::new(&mem, 0x1_0000, 16);
        q.program(&mut dev, 0);
        driver_ok(&mut dev);
        // Submitted, never completed: the primary's I/O thread does not run.
        mem.write_slice(&[0x66; 1024], GuestAddress(0x9_0000)).unwrap();
        block_request(&mut dev, &mem, &mut q, VIRTIO_BLK_T_OUT, 3, 0, (0x9_0000, 1024, false));
        dm.pause();
        let state = dm.save_state().unwrap();
        assert_eq!(state.block.as_ref().unwrap().device.inflight.len(), 1);

        // Configuration and state must agree.
        let wake = Arc::new(GuestWake::new().unwrap());
        let none = DeviceConfig::default();
        let err = DeviceManager::restore(mem.clone(), wake.clone(), &none, &state).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the saved state has a block device but the configuration has none"
        );

        let copy = copy_memory(&mem);
        let cfg = DeviceConfig { net: None, block: Some(BlockConfig::new(replica.clone())) };
        let mut b = DeviceManager::restore(copy.clone(), wake.clone(), &cfg, &state).unwrap();
        let mut bbus = MmioBus::default();
        b.register(&mut bbus).unwrap();
        b.start().unwrap();
        let mut bq = q.on(copy);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while bq.used_idx() == 0 {
            assert!(std::time::Instant::now() < deadline, "no completion on the restored side");
            wait_readable(wake.as_raw_fd(), 100);
        }
        assert_eq!(bq.next_used(), Some((0, 1)));
        assert_eq!(copy.read_obj::<u8>(GuestAddress(0x8_1000)).unwrap(), 0);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(bq.next_used(), None, "exactly once");
        b.shutdown().unwrap();
        let data = std::fs::read(&replica).unwrap();
        assert_eq!(&data[3 * 512..5 * 512], &[0x66; 1024][..], "the write reached the replica");
        assert_eq!(q.used_idx(), 0, "the primary's memory is untouched");
        // The restored manager saves what it restored, minus the completed request.
        b.pause();
        let again = b.save_state().unwrap();
        assert!(again.block.as_ref().unwrap().device.inflight.is_empty());
        assert_eq!(again.block.unwrap().transport.queues[0].next_used, 1);
        drop(b);
        drop(dm);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&replica).unwrap();
    }

    #[test]
    fn held_frames_leave_the_tap_only_when_released_and_restore_carries_on() {
        if !is_root() {
            eprintln!("skipped: needs root and CAP_NET_ADMIN");
            return;
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace;
                // the I/O threads spawned from here inherit it, and all of it ends with the test.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
                held_and_restored();
            })
            .join()
        })
        .unwrap();
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcd];

    /// An ARP request from 10.80.0.2 (the guest) for 10.80.0.1 (the host), header included.
    fn arp_request() -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&MAC);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&MAC);
        frame.extend_from_slice(&[10, 80, 0, 2]);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&[10, 80, 0, 1]);
        frame
    }

    /// Waits up to `ms` for an ARP reply in `rxq` (buffers at 0x8_0000 + id * 0x1000).
    fn arp_reply(mem: &GuestMemory, rxq: &mut TestQueue<'_>, wake: &GuestWake, ms: u64) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms);
        while std::time::Instant::now() < deadline {
            wait_readable(wake.as_raw_fd(), 20);
            while let Some((id, len)) = rxq.next_used() {
                let mut buf = vec![0u8; len as usize];
                mem.read_slice(&mut buf, GuestAddress(0x8_0000 + u64::from(id) * 0x1000)).unwrap();
                let eth = &buf[12..];
                if eth.len() >= 22
                    && eth[..6] == MAC
                    && eth[12..14] == [8, 6]
                    && eth[20..22] == [0, 2]
                {
                    return true;
                }
            }
        }
        false
    }

    fn held_and_restored() {
        use crate::devices::virtio::net::held::testing::TestHold;
        let mem = test_memory();
        let wake = Arc::new(GuestWake::new().unwrap());
        let net_cfg = |name: &str, ip| NetConfig {
            tap_name: name.into(),
            mac: MAC,
            host_ipv4: Some((Ipv4Addr::new(10, 80, 0, ip), 24)),
        };
        let cfg = DeviceConfig { net: Some(net_cfg("ftvmhold0", 1)), block: None };
        let hold = TestHold::new(1 << 20);
        let hooks = DeviceHooks { tx_mode: TxMode::Held(hold.clone()), ..Default::default() };
        let mut dm = DeviceManager::new_with_hooks(mem.clone(), wake.clone(), &cfg, hooks).unwrap();
        let mut bus = MmioBus::default();
        dm.register(&mut bus).unwrap();
        dm.start().unwrap();
        let mut dev = BusDev { bus: &bus, base: MMIO_WINDOW_GPA };
        negotiate(&mut dev, u64::MAX);
        let mut rxq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut txq = TestQueue::new(&mem, 0x4_0000, 16);
        rxq.program(&mut dev, 0);
        txq.program(&mut dev, 1);
        driver_ok(&mut dev);
        for i in 0..8 {
            rxq.add_chain(&[(0x8_0000 + i * 0x1000, 2048, true)]);
        }
        w32(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        let frame = arp_request();
        mem.write_slice(&frame, GuestAddress(0x7_0000)).unwrap();
        txq.add_chain(&[(0x7_0000, frame.len() as u32, false)]);
        w32(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(txq.next_used(), Some((0, 0)), "completed at once into the hold");
        assert!(!arp_reply(&mem, &mut rxq, &wake, 200), "the request is held: no reply");
        assert_eq!(hold.release(), 1);
        assert!(arp_reply(&mem, &mut rxq, &wake, 5000), "released: the host answers");

        // Checkpoint, and restore on "the backup": a copy of memory, another TAP, Direct mode.
        dm.pause();
        let state = dm.save_state().unwrap();
        let copy = copy_memory(&mem);
        let bwake = Arc::new(GuestWake::new().unwrap());
        let bcfg = DeviceConfig { net: Some(net_cfg("ftvmhold1", 1)), block: None };
        // The primary's TAP holds 10.80.0.1 too; take it down the simple way.
        drop(dm);
        let mut b = DeviceManager::restore(copy.clone(), bwake.clone(), &bcfg, &state).unwrap();
        let mut bbus = MmioBus::default();
        b.register(&mut bbus).unwrap();
        b.start().unwrap();
        let mut bdev = BusDev { bus: &bbus, base: MMIO_WINDOW_GPA };
        let mut brxq = rxq.on(copy);
        let mut btxq = txq.on(copy);
        btxq.add_chain(&[(0x7_0000, frame.len() as u32, false)]);
        w32(&mut bdev, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(btxq.next_used(), Some((1, 0)));
        assert!(arp_reply(copy, &mut brxq, &bwake, 5000), "the restored device serves");
        b.shutdown().unwrap();
    }
}
