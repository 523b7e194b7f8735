//! Device models. `bus` dispatches MMIO exits; `virtio` holds the virtio-mmio devices (net on a
//! TAP, block on a raw file through io_uring); `io_thread` runs their host-side events.
//! [`DeviceManager`] builds them from a [`DeviceConfig`], puts them on the bus and runs them.

pub mod bus;
mod io_thread;
pub mod virtio;

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ftvm_guest_abi::{MMIO_DEVICE_SIZE, MMIO_WINDOW_GPA};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemory;
use crate::wake::GuestWake;
use bus::lock;
use io_thread::{BlockEvents, IoThread, NetEvents};
use virtio::block::{Block, BlockOpenError};
use virtio::net::{Net, Tap, TapAddressError, TapOpenError, TapUpError};
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
}

/// Which devices the VM gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// virtio-net, if any.
    pub net: Option<NetConfig>,
    /// virtio-blk, if any.
    pub block: Option<BlockConfig>,
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

/// The VM's devices and their I/O thread.
#[derive(Debug)]
pub struct DeviceManager {
    mem: GuestMemory,
    net: Option<Arc<Mutex<MmioTransport<Net>>>>,
    block: Option<Arc<Mutex<MmioTransport<Block>>>>,
    kick: Arc<EventFd>,
    io_thread: Option<IoThread>,
}

impl DeviceManager {
    /// Opens the TAP (creating it if needed, bringing it up, setting host_ipv4) and the disk file.
    pub fn new(
        mem: GuestMemory,
        wake: Arc<GuestWake>,
        cfg: &DeviceConfig,
    ) -> Result<Self, DeviceCreateError> {
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DeviceCreateError::EventFd)?);
        let net = match &cfg.net {
            Some(n) => {
                let tap = Tap::open(&n.tap_name)?;
                tap.set_up()?;
                if let Some((addr, prefix)) = n.host_ipv4 {
                    tap.set_ipv4(addr, prefix)?;
                }
                let dev = Net::new(n.mac, Box::new(tap), kick.clone());
                Some(Arc::new(Mutex::new(MmioTransport::new(dev, mem.clone(), wake.clone()))))
            }
            None => None,
        };
        let block = match &cfg.block {
            Some(b) => {
                let dev = Block::open(&b.path)?;
                Some(Arc::new(Mutex::new(MmioTransport::new(dev, mem.clone(), wake.clone()))))
            }
            None => None,
        };
        Ok(Self { mem, net, block, kick, io_thread: None })
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

    /// Starts the I/O thread (RX, block completions). Calling it again while it runs does
    /// nothing.
    pub fn start(&mut self) -> Result<(), DeviceStartError> {
        if self.io_thread.is_some() {
            return Ok(());
        }
        let net = self.net.as_ref().map(|t| NetEvents {
            transport: t.clone(),
            backend_fd: lock(t).device().backend_fd(),
            kick: self.kick.clone(),
        });
        let block = self.block.as_ref().map(|t| BlockEvents {
            transport: t.clone(),
            completion_fd: lock(t).device().completion_fd(),
        });
        self.io_thread = Some(IoThread::spawn(net, block)?);
        Ok(())
    }

    /// Stops the I/O thread, waits for in-flight block I/O, and fdatasyncs the disk. Idempotent.
    ///
    /// Stop the vCPUs first: a guest that keeps notifying would submit new requests.
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
    use crate::devices::virtio::test_utils::*;
    use std::os::fd::AsRawFd;
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
            block: Some(BlockConfig { path: "/nonexistent/x/y".into() }),
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
        let cfg = DeviceConfig { net: None, block: Some(BlockConfig { path: path.clone() }) };
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
            block: Some(BlockConfig { path: path.into() }),
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
        let mut got_reply = false;
        while !got_reply {
            assert!(std::time::Instant::now() < deadline, "no ARP reply reached the guest");
            wait_readable(wake.as_raw_fd(), 100);
            while let Some((id, len)) = rxq.next_used() {
                let mut buf = vec![0u8; len as usize];
                mem.read_slice(&mut buf, GuestAddress(0x8_0000 + u64::from(id) * 0x1000)).unwrap();
                assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
                let eth = &buf[12..];
                got_reply |= eth.len() >= 22
                    && eth[..6] == mac
                    && eth[12..14] == [0x08, 0x06]
                    && eth[20..22] == [0, 2];
            }
        }
        let stats = lock(dm.net().unwrap()).device().stats();
        assert_eq!(stats.tx_frames, 1);
        assert!(stats.rx_frames >= 1);
        dm.shutdown().unwrap();
    }
}
