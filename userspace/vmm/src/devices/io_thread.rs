//! The device I/O thread: one epoll over the host-side events of every device.
//!
//! * the network backend (TAP) fd: readable → move frames into the receive queue. While the
//!   guest has no receive buffers the fd is taken out of the epoll set (frames wait in the
//!   kernel) until the driver notifies the receive queue;
//! * the receive "kick" eventfd: written by the vCPU thread when a starved receive queue gets
//!   buffers, on activation, and on a resume after this thread turned an event away;
//! * the transmit kick eventfd: written by the output hold when a release frees room after
//!   transmit stalled on it (and on such a resume) → transmit what the guest queued meanwhile;
//! * the io_uring completion eventfd of the disk → complete block requests (also written on
//!   such a resume, to reap what completed while paused);
//! * a stop eventfd.
//!
//! Guest-initiated work (transmit, block submission) stays on the vCPU thread; this thread only
//! reacts to the host. Each event locks the device's transport, the same lock MMIO exits take,
//! and does nothing while the transport is paused (see `MmioTransport::pause`): the receive fd
//! is then unwatched and block completions stay in the io_uring completion queue until the
//! resume kicks this thread again. The one exception: once a checkpoint's owner opened reading
//! ahead (`DeviceManager::open_read_ahead`), received frames are read into the network device's
//! read-ahead queue, outside its state, during the rest of the pause.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::lock;
use super::virtio::block::Block;
use super::virtio::net::{Net, RxPoll};
use super::virtio::MmioTransport;
use super::DeviceStartError;

const STOP: u64 = 0;
const KICK: u64 = 1;
const NET_BACKEND: u64 = 2;
const BLOCK_COMPLETION: u64 = 3;
const TX_KICK: u64 = 4;

/// What the thread watches for the network device.
pub(crate) struct NetEvents {
    pub transport: Arc<Mutex<MmioTransport<Net>>>,
    pub backend_fd: Option<RawFd>,
    pub kick: Arc<EventFd>,
    pub tx_kick: Arc<EventFd>,
}

/// What the thread watches for the block device.
pub(crate) struct BlockEvents {
    pub transport: Arc<Mutex<MmioTransport<Block>>>,
    pub completion_fd: RawFd,
}

/// A running I/O thread.
#[derive(Debug)]
pub(crate) struct IoThread {
    stop: EventFd,
    handle: JoinHandle<()>,
}

impl IoThread {
    /// Sets up the epoll set here (so errors reach the caller) and starts the thread.
    pub(crate) fn spawn(
        net: Option<NetEvents>,
        block: Option<BlockEvents>,
    ) -> Result<Self, DeviceStartError> {
        let epoll = Epoll::new().map_err(DeviceStartError::Epoll)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DeviceStartError::EventFd)?;
        let watch = |fd: RawFd, token: u64, what: &'static str| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                .map_err(|source| DeviceStartError::Watch { what, source })
        };
        watch(stop.as_raw_fd(), STOP, "stop eventfd")?;
        if let Some(n) = &net {
            watch(n.kick.as_raw_fd(), KICK, "network kick eventfd")?;
            watch(n.tx_kick.as_raw_fd(), TX_KICK, "network transmit kick eventfd")?;
            if let Some(fd) = n.backend_fd {
                watch(fd, NET_BACKEND, "TAP")?;
            }
        }
        if let Some(b) = &block {
            watch(b.completion_fd, BLOCK_COMPLETION, "disk completion eventfd")?;
        }
        let thread_stop = stop.try_clone().map_err(DeviceStartError::EventFd)?;
        let handle = std::thread::Builder::new()
            .name("ftvm-devio".into())
            .spawn(move || {
                let mut worker =
                    Worker { epoll, net, block, backend_armed: true, _stop: thread_stop };
                if let Err(e) = worker.run() {
                    tracing::error!("device I/O thread stopped: epoll_wait failed: {e}");
                }
            })
            .map_err(DeviceStartError::Spawn)?;
        Ok(Self { stop, handle })
    }

    /// Stops the thread and waits for it. `Err` if it panicked.
    pub(crate) fn stop(self) -> Result<(), ()> {
        // Only fails on counter overflow, and then the thread wakes anyway.
        let _ = self.stop.write(1);
        self.handle.join().map_err(|_| ())
    }
}

struct Worker {
    epoll: Epoll,
    net: Option<NetEvents>,
    block: Option<BlockEvents>,
    /// The backend fd is in the epoll set (false while the guest has no receive buffers).
    backend_armed: bool,
    /// Keeps the stop eventfd open for as long as the epoll set watches it.
    _stop: EventFd,
}

impl Worker {
    fn run(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut rx = false;
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return Ok(()),
                    KICK => {
                        if let Some(net) = &self.net {
                            // WouldBlock: already consumed; the kick is level information only.
                            let _ = net.kick.read();
                        }
                        self.arm_backend(true);
                        rx = true;
                    }
                    NET_BACKEND => rx = true,
                    TX_KICK => self.transmit(),
                    BLOCK_COMPLETION => self.block_completions(),
                    _ => {}
                }
            }
            if rx {
                self.receive();
            }
        }
    }

    fn receive(&mut self) {
        let Some(net) = &self.net else { return };
        let mut t = lock(&net.transport);
        let (keep, mirror) = match t.process(|dev, ctx| dev.process_rx(ctx)) {
            Some(poll) => (matches!(poll, RxPoll::Drained | RxPoll::More), t.device().rx_mirror()),
            // Paused: the frames may still be read ahead, into a queue outside the state.
            None if t.is_paused() => (t.device_mut().read_ahead(), None),
            None => (false, None),
        };
        drop(t);
        // The guest is told of the frames and the device is free again (the guest's next
        // notification takes its lock): now the mirror passes them on.
        if let Some(m) = mirror {
            m.taken_all();
        }
        // A device that is not running, or has no buffers, or a paused one that may not read
        // ahead, must not make a level-triggered backend fd spin this thread: stop watching it
        // until the next kick.
        self.arm_backend(keep);
    }

    fn transmit(&mut self) {
        let Some(net) = &self.net else { return };
        // WouldBlock: already consumed. A paused or stopped device ignores the kick; the
        // resume kicks again.
        let _ = net.tx_kick.read();
        lock(&net.transport).process(|dev, ctx| dev.retry_tx(ctx));
    }

    fn arm_backend(&mut self, armed: bool) {
        let Some(fd) = self.net.as_ref().and_then(|n| n.backend_fd) else { return };
        if armed == self.backend_armed {
            return;
        }
        let events = if armed { EventSet::IN } else { EventSet::empty() };
        match self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, NET_BACKEND)) {
            Ok(()) => self.backend_armed = armed,
            Err(e) => tracing::error!("cannot change the TAP's epoll registration: {e}"),
        }
    }

    fn block_completions(&mut self) {
        let Some(block) = &self.block else { return };
        let mut t = lock(&block.transport);
        if t.process(|dev, ctx| dev.process_completions(ctx)).is_none() {
            // Not running: the completions wait for the reset or shutdown that drains them;
            // clear the eventfd so it does not keep this thread busy.
            t.device().clear_completion_event();
        }
    }
}
