//! Promotion: the backup becomes the primary.
//!
//! [`promote`] turns a stopped receiver's [`Standby`] into a running-ready [`Machine`]: it decodes
//! the committed machine state, restores it into a fresh KVM VM whose RAM is the standby memory
//! image itself (its memfd is mapped into the new VM, not copied: see
//! [`MemoryImage::Adopt`]), the standby disk becomes the VM's disk, and it starts announcing the
//! guest's MAC/IP on the business network with gratuitous ARP.
//!
//! Adopting the memfd is safe because nothing else writes it any more: the receiver's threads,
//! which filled it, are joined before [`crate::backup::BackupReceiver::stop`] hands the standby
//! over, and [`promote`] consumes the standby (its own mapping of the pages is only unmapped,
//! a second later, on a helper thread).
//!
//! Nothing uncommitted can leak: the VM starts from the last committed epoch, the backup never
//! held guest output, and the restored virtio-net transmits directly (the hold belonged to the
//! dead primary).
//!
//! The announcement goes into the VM's own TAP: a frame written to a TAP fd is *received* by the
//! host side of the TAP, so it enters the bridge and leaves on the business port, exactly as if
//! the guest had sent it. The TAP is single-queue and owned by the VM's device, so the announcer
//! writes to a duplicate of the device's fd (a dup shares the queue; writes are whole frames), with
//! the zeroed 12-byte virtio-net header the TAP expects (`IFF_VNET_HDR`).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_proto::EpochId;
use ftvm_vmm::boot::BootParams;
use ftvm_vmm::devices::{BlockConfig, DeviceConfig, DiskWriteIntent, NetConfig};
use ftvm_vmm::dirty::DirtyTracking;
use ftvm_vmm::machine::{CheckpointSource, CheckpointSourceError, Machine, MachineRestoreError, MemoryImage, VmConfig};
use ftvm_vmm::state::{MachineState, StateDecodeError};

use super::standby::Standby;
use crate::disk::intent::SharedIntent;

/// Length of the virtio-net header in front of every frame on the VMM's TAP.
pub const VNET_HDR_LEN: usize = 12;
/// A gratuitous ARP frame: Ethernet header and ARP request, padded to the Ethernet minimum.
pub const GARP_FRAME_LEN: usize = 60;

/// When the announcements go out, counted from the start of the announcer: several, at growing
/// intervals, because one frame can be lost and switches may be slow to relearn.
pub const DEFAULT_ANNOUNCE_SCHEDULE: [Duration; 4] =
    [Duration::ZERO, Duration::from_millis(10), Duration::from_millis(50), Duration::from_millis(200)];

/// How long after a promotion the standby's own mapping of the memory image is released (see
/// [`promote`]).
const STANDBY_RELEASE_DELAY: Duration = Duration::from_secs(1);

/// The guest's network identity on the business network, and how to reach its TAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromoteNet {
    /// The TAP the restored VM uses on this host (created if it does not exist).
    pub tap_name: String,
    /// The guest's MAC (the same as on the primary: the guest's drivers know it).
    pub mac: [u8; 6],
    /// The guest's IPv4 address, announced by gratuitous ARP.
    pub guest_ipv4: Ipv4Addr,
    /// Address to give the TAP on the host, if any.
    pub host_ipv4: Option<(Ipv4Addr, u8)>,
    /// Announcement times, counted from the restore (see [`DEFAULT_ANNOUNCE_SCHEDULE`]).
    pub announce: Vec<Duration>,
}

/// What the restored VM gets on this host. Guest memory size, the guest program and its boot
/// information all come from the standby (the state and the memory image), not from here.
pub struct PromoteConfig {
    /// The network device, when the guest has one (it must, when the state has one).
    pub net: Option<PromoteNet>,
    /// Whether the guest has a disk; if so, it is the standby disk.
    pub block: bool,
    /// Where guest console output goes.
    pub console: Box<dyn std::io::Write + Send>,
    /// The dirty tracker of the new VM (on, if it is to be protected again later).
    pub dirty_tracking: DirtyTracking,
    /// The standby disk's write-intent record, which the restored guest's block device marks
    /// before every write (the backup daemon sets it from its receiver's).
    pub disk_intent: Option<Arc<SharedIntent>>,
}

impl std::fmt::Debug for PromoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromoteConfig")
            .field("net", &self.net)
            .field("block", &self.block)
            .field("dirty_tracking", &self.dirty_tracking)
            .finish_non_exhaustive()
    }
}

/// Why [`promote`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// No epoch with a machine state was ever committed: there is nothing to resume.
    #[error("the standby is not restorable (committed epoch {0:?}, no machine state)")]
    NotRestorable(Option<EpochId>),
    /// The committed state blob does not decode.
    #[error("cannot decode the committed machine state of epoch {epoch:?}")]
    State {
        /// The committed epoch.
        epoch: EpochId,
        /// Why.
        #[source]
        source: StateDecodeError,
    },
    /// The standby's memfd could not be duplicated for the new VM.
    #[error("cannot duplicate the standby memory's memfd")]
    MemoryFd(#[source] std::io::Error),
    /// The restore into a fresh VM failed.
    #[error("cannot restore epoch {epoch:?} into a fresh VM")]
    Restore {
        /// The committed epoch.
        epoch: EpochId,
        /// Why.
        #[source]
        source: MachineRestoreError,
    },
    /// The restored machine gave no checkpoint source.
    #[error("cannot get the restored machine's checkpoint source")]
    Source(#[source] CheckpointSourceError),
    /// The TAP fd could not be duplicated for the announcer.
    #[error("cannot duplicate the TAP fd for the announcement")]
    TapFd(#[source] std::io::Error),
    /// The announcer thread could not start.
    #[error("cannot start the announcer thread")]
    Announcer(#[source] std::io::Error),
}

/// How long each part of a promotion took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    /// Decoding the state.
    pub decode: Duration,
    /// `Machine::restore` (VM, adoption of the standby memory, devices, vCPUs; its log line
    /// `machine restored` has the parts).
    pub restore: Duration,
    /// Handing the standby (its mapping of the memory image, the state blob) to a thread that
    /// releases it once the takeover is done.
    pub release: Duration,
    /// Taking the restored machine's checkpoint source.
    pub source: Duration,
    /// Starting the gratuitous ARP announcer (zero without a network device).
    pub announce: Duration,
    /// The whole of [`promote`].
    pub total: Duration,
}

/// A promoted standby: the restored VM, ready to [`Machine::run`].
pub struct Promoted {
    /// The VM; its vCPUs start when it runs.
    pub machine: Machine,
    /// Its checkpoint source (taken here to reach the TAP; kept for re-protection later).
    pub source: CheckpointSource,
    /// The epoch it was restored from.
    pub epoch: EpochId,
    /// The gratuitous ARP sender, if the guest has a network device.
    pub announcer: Option<Announcer>,
    /// Frames of guest input the dead primary had taken in and never committed, queued for the
    /// restored VM ahead of the network (see [`crate::ingress`]).
    pub ingress_replayed: usize,
    /// Timings.
    pub timings: RestoreTimings,
}

impl std::fmt::Debug for Promoted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Promoted").field("epoch", &self.epoch).field("timings", &self.timings).finish_non_exhaustive()
    }
}

/// Restores the committed standby into a fresh VM and starts the announcement. The caller runs
/// the machine at once (the announcer's first frame goes out immediately; the guest's own traffic
/// follows as soon as its vCPUs run).
pub fn promote(mut standby: Standby, cfg: PromoteConfig) -> Result<Promoted, PromoteError> {
    let t0 = Instant::now();
    let epoch = standby.committed().filter(|_| !standby.state().is_empty());
    let Some(epoch) = epoch else {
        return Err(PromoteError::NotRestorable(standby.committed()));
    };
    let state = MachineState::from_bytes(standby.state()).map_err(|source| PromoteError::State { epoch, source })?;
    let decode = t0.elapsed();

    let devices = DeviceConfig {
        net: cfg.net.as_ref().map(|n| NetConfig { tap_name: n.tap_name.clone(), mac: n.mac, host_ipv4: n.host_ipv4 }),
        block: cfg.block.then(|| {
            let block = BlockConfig::new(standby.disk_path().to_path_buf());
            match &cfg.disk_intent {
                Some(intent) => block.with_intent(Arc::clone(intent) as Arc<dyn DiskWriteIntent>),
                None => block,
            }
        }),
    };
    let vm_cfg = VmConfig {
        mem_size: state.mem_size,
        // Not read by restore: the guest is in the memory image.
        guest_elf: Default::default(),
        // Not used by restore: the boot info is in the state.
        boot: BootParams::default(),
        devices,
        console: cfg.console,
        dirty_tracking: cfg.dirty_tracking,
    };
    let t1 = Instant::now();
    // The new VM's RAM is the standby's memfd (see the module documentation): no copy.
    let memfd = standby.memory().fd().try_clone_to_owned().map_err(PromoteError::MemoryFd)?;
    let mut machine = Machine::restore(vm_cfg, MemoryImage::Adopt(memfd), &state)
        .map_err(|source| PromoteError::Restore { epoch, source })?;
    let restore = t1.elapsed();
    let t2 = Instant::now();
    let source = machine.checkpoint_source().map_err(PromoteError::Source)?;
    let source_time = t2.elapsed();
    // Before the VM runs: the restored guest takes these in first, as the dead primary's did.
    let ingress = std::mem::take(&mut standby.replay_ingress);
    let ingress_replayed = if ingress.is_empty() { 0 } else { source.with_devices(|d| d.replay_rx(ingress)) };
    if ingress_replayed > 0 {
        tracing::info!(frames = ingress_replayed, "the restored VM gets the input the dead primary had taken in after the committed epoch");
    }

    let t3 = Instant::now();
    let announcer = match &cfg.net {
        Some(net) => {
            let fd = source.with_devices(|d| {
                d.net().and_then(|n| n.lock().unwrap_or_else(|e| e.into_inner()).device().backend_fd())
            });
            match fd {
                Some(fd) => {
                    let tap = dup_fd(fd).map_err(PromoteError::TapFd)?;
                    let schedule =
                        if net.announce.is_empty() { DEFAULT_ANNOUNCE_SCHEDULE.to_vec() } else { net.announce.clone() };
                    let replay = std::mem::take(&mut standby.unreleased_output);
                    Some(Announcer::start(tap, net.mac, net.guest_ipv4, schedule, replay).map_err(PromoteError::Announcer)?)
                }
                None => {
                    tracing::warn!("the restored VM has no TAP fd: no gratuitous ARP");
                    None
                }
            }
        }
        None => None,
    };
    let announce = t3.elapsed();

    // The pages are the VM's now; the standby's own mapping of them can go, but not yet: tearing
    // down the page tables of a large mapping holds the process's mmap lock for milliseconds
    // (about 18 ms for 256 MiB here, even in steps: see `StandbyMemory`'s Drop), and the threads
    // the takeover starts next (the VM's run and device threads) must map their stacks. So a
    // helper thread lets the takeover finish first. The pages themselves stay: the VM's mapping
    // holds the memfd.
    let t4 = Instant::now();
    // Should no thread start, spawn drops the closure, and with it the standby, right here.
    let _ = std::thread::Builder::new().name("ftvm-standby-free".into()).spawn(move || {
        std::thread::sleep(STANDBY_RELEASE_DELAY);
        drop(standby);
    });
    let release = t4.elapsed();
    let timings = RestoreTimings { decode, restore, release, source: source_time, announce, total: t0.elapsed() };
    tracing::info!(?epoch, ?timings, "standby promoted");
    Ok(Promoted { machine, source, epoch, announcer, ingress_replayed, timings })
}

fn dup_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and touches no memory; a bad fd gives EBADF.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `r` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// A gratuitous ARP frame (RFC 5227 "ARP announcement": a broadcast request whose sender and
/// target IP are both the announced address), padded to 60 bytes.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; GARP_FRAME_LEN] {
    let mut f = [0u8; GARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]); // destination: broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address: zero (unknown), as in an announcement.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends gratuitous ARP frames into a TAP on a schedule, from its own thread.
#[derive(Debug)]
pub struct Announcer {
    thread: Option<JoinHandle<()>>,
    stop: Option<mpsc::Sender<()>>,
    sent: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
}

/// Writes one frame (virtio-net header first) to the TAP; whether all of it went.
fn write_frame(tap: &OwnedFd, frame: &[u8]) -> bool {
    // SAFETY: `frame` is valid for its length; `tap` is an open fd.
    let n = unsafe { libc::write(tap.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    usize::try_from(n).is_ok_and(|n| n == frame.len())
}

impl Announcer {
    /// Starts sending on `tap` (an fd of a TAP with `IFF_VNET_HDR` of 12 bytes), one frame at each
    /// time of `schedule` counted from now.
    ///
    /// `replay` (frames with their virtio-net header) goes out right after the first announcement:
    /// the held output of the last committed epochs, which the dead primary may not have released.
    pub fn start(
        tap: OwnedFd,
        mac: [u8; 6],
        ip: Ipv4Addr,
        schedule: Vec<Duration>,
        replay: Vec<Vec<u8>>,
    ) -> std::io::Result<Self> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let sent = Arc::new(AtomicU32::new(0));
        let failed = Arc::new(AtomicU32::new(0));
        let mut buf = [0u8; VNET_HDR_LEN + GARP_FRAME_LEN];
        buf[VNET_HDR_LEN..].copy_from_slice(&garp_frame(mac, ip));
        let thread = {
            let (sent, failed) = (Arc::clone(&sent), Arc::clone(&failed));
            std::thread::Builder::new().name("ftvm-garp".into()).spawn(move || {
                let start = Instant::now();
                let mut replay = Some(replay);
                for at in schedule {
                    let wait = at.saturating_sub(start.elapsed());
                    match stop_rx.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Stopped, or the owner is gone.
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    if write_frame(&tap, &buf) {
                        sent.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %std::io::Error::last_os_error(), "gratuitous ARP not sent");
                    }
                    if let Some(frames) = replay.take().filter(|f| !f.is_empty()) {
                        let written = frames.iter().filter(|f| write_frame(&tap, f)).count();
                        tracing::info!(frames = frames.len(), written, "replayed the held output of the last committed epochs");
                    }
                }
                tracing::info!(%ip, sent = sent.load(Ordering::Relaxed), "gratuitous ARP announcement done");
            })?
        };
        Ok(Self { thread: Some(thread), stop: Some(stop_tx), sent, failed })
    }

    /// Frames written so far.
    pub fn sent(&self) -> u32 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Writes that failed so far.
    pub fn failed(&self) -> u32 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits for the schedule to finish; returns the frames sent.
    pub fn join(mut self) -> u32 {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.sent()
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        // Stops the schedule early (the stop sender dropping wakes the thread).
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_is_a_broadcast_arp_announcement() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        let f = garp_frame(mac, ip);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &ip.octets());
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &ip.octets());
        assert!(f[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn announcer_writes_each_frame_with_a_vnet_header_and_replays_the_held_output_after_the_first() {
        // A socket pair stands in for the TAP: each write is one datagram.
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let schedule = vec![Duration::ZERO, Duration::from_millis(2), Duration::from_millis(5)];
        let replay = vec![vec![7u8; VNET_HDR_LEN + 70], vec![8u8; VNET_HDR_LEN + 90]];
        let ann = Announcer::start(OwnedFd::from(a), [2, 0, 0, 0, 0, 1], Ipv4Addr::new(192, 0, 2, 1), schedule, replay)
            .unwrap();
        assert_eq!(ann.join(), 3);
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 128];
        let mut lens = Vec::new();
        for i in 0..5 {
            let n = b.recv(&mut buf).unwrap();
            lens.push(n);
            if i == 1 || i == 2 {
                assert!(buf[..n].iter().all(|&x| x == [7, 8][i - 1]), "replayed frame {i}");
                continue;
            }
            assert_eq!(n, VNET_HDR_LEN + GARP_FRAME_LEN);
            assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
            assert_eq!(&buf[VNET_HDR_LEN + 28..VNET_HDR_LEN + 32], &[192, 0, 2, 1]);
        }
        assert_eq!(lens[1..3], [VNET_HDR_LEN + 70, VNET_HDR_LEN + 90]);
        assert!(b.recv(&mut buf).is_err());
    }
}
