//! The whole VM: KVM VM and memory, the loaded guest, devices, vCPU threads, and the handle the
//! operator (or the checkpoint engine) uses to pause, resume and stop it.
//!
//! Order of creation: VM and memory (with the dirty ring, if chosen: it must precede the vCPUs)
//! → guest image, page tables, GDT → devices on the MMIO bus → vCPUs (CPUID, TSC frequency,
//! registers) → boot info (it needs the TSC frequency and the device addresses) → vCPU threads,
//! Paused. [`Machine::run`] starts the device I/O thread, resumes the vCPUs and waits for the
//! first of them to end.
//!
//! # Checkpoints
//! [`Machine::checkpoint_source`] hands the checkpoint engine a [`CheckpointSource`] (Send): it
//! pauses and resumes the machine (vCPUs, then devices), and between the two,
//! [`CheckpointSource::capture`] harvests the dirty pages and reads every vCPU's and device's
//! state into a [`MachineState`]; the engine copies the pages from
//! [`CheckpointSource::guest_memory`]. Capture refuses to run unless the machine is paused.
//!
//! # Failover
//! [`Machine::restore`] builds a fresh KVM VM from a memory image and a [`MachineState`]; its
//! [`Machine::run`] resumes the guest exactly where the state was captured. The image is copied,
//! or, on the backup, adopted: the standby's memfd becomes the new VM's RAM
//! ([`MemoryImage::Adopt`]), so the restore takes the same time whatever the memory size.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_guest_abi::{BootInfo, GuestStatus};
use ftvm_proto::pages::PageRangeSet;
use kvm_bindings::{kvm_clock_data, CpuId};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::boot::{self, BootSetupError, DeviceAddrs, EntryPoint};
use crate::cpuid::{self, CpuidError};
use crate::devices::bus::{lock, BusOverlapError, MmioBus};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::MmioTransport;
use crate::devices::{
    DeviceConfig, DeviceCreateError, DeviceManager, DeviceRestoreError, DeviceSaveError,
    DeviceShutdownError, DeviceStartError,
};
use crate::dirty::kvm_ring::RingMapError;
use crate::dirty::{
    DirtyRings, DirtyTracker, DirtyTracking, HarvestError, HarvestStats, KvmBitmap, KvmRing,
    TrackStartError, TrackStopError, TrackerKind, UffdWp,
};
use crate::memory::{adopt_guest_memory, AdoptMemoryError, GuestMemory};
use crate::state::{ClockState, MachineState};
use crate::uffd::UffdError;
use crate::vcpu::state::StateProbeError;
use crate::vcpu::{
    Console, DirtyRingFullHandler, StateConfig, StatusCell, Vcpu, VcpuContext, VcpuControlError,
    VcpuExitReason, VcpuExitReport, VcpuHandle, VcpuRestoreError, VcpuRunError, VcpuSaveError,
    VcpuStartError, VcpuStopper,
};
use crate::vm::{VcpuFdCreateError, Vm, VmCreateError};
use crate::wake::GuestWake;

pub use crate::boot::BootParams;

/// Everything needed to build a [`Machine`].
pub struct VmConfig {
    /// Bytes of guest RAM (a multiple of 2 MiB, 16 MiB to [`ftvm_guest_abi::MAX_MEM_SIZE`]).
    pub mem_size: u64,
    /// The guest ELF (not read by [`Machine::restore`]: the guest is in the memory image).
    pub guest_elf: PathBuf,
    /// What the guest learns through its boot info (not used by [`Machine::restore`]: the state
    /// carries the boot info the guest was given).
    pub boot: BootParams,
    /// Which devices to attach.
    pub devices: DeviceConfig,
    /// Where guest console output goes (flushed line by line).
    pub console: Box<dyn Write + Send>,
    /// Which dirty tracker the VM is built with ([`DirtyTracking::Off`] for an unprotected VM).
    pub dirty_tracking: DirtyTracking,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("mem_size", &self.mem_size)
            .field("guest_elf", &self.guest_elf)
            .field("boot", &self.boot)
            .field("dirty_tracking", &self.dirty_tracking)
            .finish_non_exhaustive()
    }
}

/// How a machine's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineExit {
    /// The guest wrote this code to its exit port.
    GuestExit(u32),
    /// [`MachineHandle::stop`] ended it.
    Stopped,
}

/// Why [`Machine::create`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineCreateError {
    /// The KVM VM or its memory.
    #[error(transparent)]
    Vm(#[from] VmCreateError),
    /// Loading the guest or writing its boot tables.
    #[error(transparent)]
    Boot(#[from] BootSetupError),
    /// The wake-up eventfd.
    #[error("cannot create the guest wake-up eventfd")]
    Wake(#[source] std::io::Error),
    /// A device could not be created.
    #[error("cannot create the devices")]
    Devices(#[source] DeviceCreateError),
    /// Two devices claim the same MMIO range.
    #[error("cannot place the devices on the MMIO bus")]
    Bus(#[source] BusOverlapError),
    /// A vCPU fd.
    #[error(transparent)]
    VcpuFd(#[from] VcpuFdCreateError),
    /// CPUID set-up.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// The initial registers.
    #[error(transparent)]
    Registers(#[from] boot::VcpuBootError),
    /// What vCPU state can be saved on this host.
    #[error(transparent)]
    StateProbe(#[from] StateProbeError),
    /// The dirty rings could not be mapped.
    #[error(transparent)]
    DirtyRings(#[from] RingMapError),
    /// The userfaultfd dirty tracker could not be set up (a kernel older than 6.7).
    #[error("cannot set up the userfaultfd dirty tracker (it needs Linux 6.7 or later)")]
    UffdTracker(#[source] UffdError),
    /// A vCPU thread.
    #[error(transparent)]
    VcpuStart(#[from] VcpuStartError),
}

/// Why [`Machine::restore`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineRestoreError {
    /// The configuration's memory size is not the state's.
    #[error("the state has {state:#x} bytes of guest memory, the configuration {config:#x}")]
    MemSize {
        /// From the state.
        state: u64,
        /// From the configuration.
        config: u64,
    },
    /// The memory image is not the size of guest memory.
    #[error("the memory image has {image:#x} bytes, guest memory {mem:#x}")]
    ImageSize {
        /// Bytes in the image.
        image: u64,
        /// Bytes of guest memory.
        mem: u64,
    },
    /// The state's vCPU count is not this VMM's.
    #[error("the state has {0} vCPUs; this VMM runs {VCPUS}")]
    VcpuCount(usize),
    /// The state holds no valid boot info.
    #[error("the state's boot info is missing or invalid")]
    BootInfo,
    /// The restored devices landed at other MMIO addresses than the guest knows.
    #[error("the devices would be at {got:?}, but the guest uses {want:?}")]
    DeviceAddrs {
        /// Where the guest's drivers expect them.
        want: DeviceAddrs,
        /// Where they are now.
        got: DeviceAddrs,
    },
    /// The KVM VM or its memory.
    #[error(transparent)]
    Vm(#[from] VmCreateError),
    /// Copying the memory image failed.
    #[error("cannot copy the memory image into guest memory")]
    CopyMemory(#[source] vm_memory::GuestMemoryError),
    /// The adopted memory image cannot become guest memory.
    #[error("cannot adopt the memory image as guest memory")]
    AdoptMemory(#[source] AdoptMemoryError),
    /// `KVM_SET_CLOCK` failed.
    #[error("cannot set the VM clock")]
    Clock(#[source] std::io::Error),
    /// The wake-up eventfd.
    #[error("cannot create the guest wake-up eventfd")]
    Wake(#[source] std::io::Error),
    /// The devices could not be rebuilt from their state.
    #[error("cannot restore the devices")]
    Devices(#[source] DeviceRestoreError),
    /// Two devices claim the same MMIO range.
    #[error("cannot place the devices on the MMIO bus")]
    Bus(#[source] BusOverlapError),
    /// A vCPU fd.
    #[error(transparent)]
    VcpuFd(#[from] VcpuFdCreateError),
    /// What vCPU state can be restored on this host.
    #[error(transparent)]
    StateProbe(#[from] StateProbeError),
    /// The dirty rings could not be mapped.
    #[error(transparent)]
    DirtyRings(#[from] RingMapError),
    /// The userfaultfd dirty tracker could not be set up (a kernel older than 6.7).
    #[error("cannot set up the userfaultfd dirty tracker (it needs Linux 6.7 or later)")]
    UffdTracker(#[source] UffdError),
    /// A vCPU thread.
    #[error(transparent)]
    VcpuStart(#[from] VcpuStartError),
    /// A vCPU refused its state.
    #[error("cannot restore vCPU {id}")]
    Vcpu {
        /// The vCPU.
        id: u32,
        /// Why.
        #[source]
        source: VcpuRestoreError,
    },
}

/// Why [`Machine::run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineRunError {
    /// `run` was called a second time.
    #[error("the machine has already run")]
    AlreadyRan,
    /// The device I/O thread did not start.
    #[error("cannot start the devices")]
    DeviceStart(#[source] DeviceStartError),
    /// A vCPU failed (the guest crashed, or KVM refused it).
    #[error("vCPU {id} failed")]
    Vcpu {
        /// The vCPU.
        id: u32,
        /// What happened.
        #[source]
        source: VcpuRunError,
    },
    /// The devices did not shut down cleanly (the disk may not be flushed).
    #[error("device shutdown failed")]
    DeviceShutdown(#[source] DeviceShutdownError),
}

/// Why [`MachineHandle::pause`] or [`MachineHandle::resume`] failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the machine")]
pub struct MachineControlError {
    /// "pause" or "resume".
    pub action: &'static str,
    /// The vCPU that refused.
    #[source]
    pub source: VcpuControlError,
}

/// Why [`Machine::checkpoint_source`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointSourceError {
    /// There is only one source per machine (it owns the dirty tracker).
    #[error("the machine's checkpoint source was already taken")]
    AlreadyTaken,
}

/// Why [`CheckpointSource::capture`] failed. When pages had already been harvested, they are
/// pending again: the next harvest returns them.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The machine is not paused ([`CheckpointSource::pause`] first).
    #[error("the machine must be paused to capture its state")]
    NotPaused,
    /// The machine was built with [`DirtyTracking::Off`]: there are no dirty pages to harvest.
    #[error("the machine has no dirty tracking")]
    NoDirtyTracking,
    /// Harvesting the dirty pages failed.
    #[error(transparent)]
    Harvest(#[from] HarvestError),
    /// A vCPU's state could not be read.
    #[error("cannot save vCPU {id}")]
    Vcpu {
        /// The vCPU.
        id: u32,
        /// Why.
        #[source]
        source: VcpuSaveError,
    },
    /// The devices' state could not be read.
    #[error("cannot save the devices")]
    Devices(#[source] DeviceSaveError),
    /// `KVM_GET_CLOCK` failed.
    #[error("cannot read the VM clock")]
    Clock(#[source] std::io::Error),
}

/// Why [`CheckpointSource::start_tracking`] or [`CheckpointSource::stop_tracking`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackingControlError {
    /// The machine was built with [`DirtyTracking::Off`].
    #[error("the machine has no dirty tracking")]
    NoDirtyTracking,
    /// Starting failed.
    #[error("cannot start dirty tracking")]
    Start(#[source] TrackStartError),
    /// Stopping failed.
    #[error("cannot stop dirty tracking")]
    Stop(#[source] TrackStopError),
    /// Harvesting failed.
    #[error("cannot harvest the dirty pages")]
    Harvest(#[source] HarvestError),
}

/// The vCPU handles, and whether a pause of everything has completed since the last resume.
#[derive(Debug)]
struct VcpuSet {
    handles: Vec<VcpuHandle>,
    /// True after [`MachineHandle::pause`] succeeded for every vCPU and the devices, until the
    /// next resume starts. Capture requires it.
    paused: bool,
}

#[derive(Debug)]
struct Shared {
    /// pause/resume/capture go through here, one request at a time. Lock order: `vcpus`, then
    /// `devices`.
    vcpus: Mutex<VcpuSet>,
    devices: Mutex<DeviceManager>,
    /// stop needs no lock: it must work while a pause is waiting.
    stoppers: Vec<VcpuStopper>,
    stop_requested: AtomicBool,
    status: Arc<StatusCell>,
}

impl Shared {
    /// Pauses every vCPU, then the devices. With `save`, each vCPU reads its own state right
    /// after pausing (see [`VcpuHandle::pause_and_save`]).
    fn pause_with(&self, save: bool) -> Result<(), MachineControlError> {
        let mut set = lock(&self.vcpus);
        set.paused = false;
        for v in set.handles.iter_mut() {
            let r = if save { v.pause_and_save() } else { v.pause() };
            r.map_err(|source| MachineControlError {
                action: "pause",
                source,
            })?;
        }
        // vCPUs first: a device must not change guest memory or queues after the vCPUs have
        // stopped looking (the devices remember notifications that still come, see
        // `DeviceManager::pause`).
        lock(&self.devices).pause();
        set.paused = true;
        Ok(())
    }

    fn pause(&self) -> Result<(), MachineControlError> {
        self.pause_with(false)
    }

    fn synced_saves(&self) -> u64 {
        lock(&self.vcpus).handles.iter().map(VcpuHandle::synced_saves).sum()
    }

    fn resume(&self) -> Result<(), MachineControlError> {
        let mut set = lock(&self.vcpus);
        set.paused = false;
        lock(&self.devices).resume();
        for v in set.handles.iter_mut() {
            v.resume().map_err(|source| MachineControlError {
                action: "resume",
                source,
            })?;
        }
        Ok(())
    }
}

/// Controls a [`Machine`] from other threads. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MachineHandle {
    shared: Arc<Shared>,
}

impl MachineHandle {
    /// Asks the machine to stop (Ctrl-C, SIGTERM); returns at once. [`Machine::run`] then
    /// returns [`MachineExit::Stopped`] after shutting the devices down.
    pub fn stop(&self) {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        for s in &self.shared.stoppers {
            s.stop();
        }
    }

    /// Pauses every vCPU, then the devices; returns once all are paused.
    pub fn pause(&self) -> Result<(), MachineControlError> {
        self.shared.pause()
    }

    /// Resumes the devices, then every vCPU.
    pub fn resume(&self) -> Result<(), MachineControlError> {
        self.shared.resume()
    }

    /// Whether the last [`Self::pause`] completed and no resume followed.
    pub fn is_paused(&self) -> bool {
        lock(&self.shared.vcpus).paused
    }

    /// How many vCPU states were read from the registers the pausing `KVM_RUN` stored
    /// (`KVM_CAP_SYNC_REGS`) rather than through the register ioctls.
    pub fn synced_state_reads(&self) -> u64 {
        self.shared.synced_saves()
    }

    /// The last boot milestone the guest reported.
    pub fn guest_status(&self) -> Option<GuestStatus> {
        self.shared.status.get()
    }

    /// The network device, if the machine has one (to queue input for it from another thread,
    /// [`crate::devices::virtio::net::Net::replay_rx`]).
    pub fn net_device(&self) -> Option<Arc<Mutex<MmioTransport<Net>>>> {
        lock(&self.shared.devices).net().cloned()
    }

    /// The network device's backend fd (its TAP), if it has one: valid while the machine lives.
    pub fn net_backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.net_device().and_then(|n| lock(&n).device().backend_fd())
    }
}

/// Where [`CheckpointSource::capture`] spent its time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureTimings {
    /// Harvesting the dirty pages (KVM and VMM).
    pub harvest: Duration,
    /// Reading every vCPU's state (through the vCPU threads).
    pub vcpus: Duration,
    /// Reading the devices' state and the VM clock.
    pub devices: Duration,
    /// The whole capture.
    pub total: Duration,
}

/// What a checkpoint engine needs from a machine: pause and resume, dirty pages, state and
/// memory. Send, so the engine can run on its own thread while [`Machine::run`] blocks on
/// another.
pub struct CheckpointSource {
    shared: Arc<Shared>,
    tracker: Option<Box<dyn DirtyTracker>>,
    mem: GuestMemory,
    vm: Arc<VmFd>,
    clock: bool,
    mem_size: u64,
    tsc_khz: u32,
    boot_info: BootInfo,
    last: CaptureTimings,
    last_harvest: HarvestStats,
}

impl std::fmt::Debug for CheckpointSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSource")
            .field("tracker", &self.tracker)
            .field("mem_size", &self.mem_size)
            .finish_non_exhaustive()
    }
}

impl CheckpointSource {
    /// Pauses every vCPU, then the devices, like [`MachineHandle::pause`]; each vCPU thread then
    /// reads its own state at once, so that [`Self::capture`] finds it ready (or nearly): the
    /// state ioctls overlap the dirty-page harvest instead of following it.
    pub fn pause(&self) -> Result<(), MachineControlError> {
        self.shared.pause_with(true)
    }

    /// Resumes the devices, then every vCPU ([`MachineHandle::resume`]).
    pub fn resume(&self) -> Result<(), MachineControlError> {
        self.shared.resume()
    }

    /// A handle on the same machine.
    pub fn handle(&self) -> MachineHandle {
        MachineHandle {
            shared: self.shared.clone(),
        }
    }

    /// The dirty tracker's kind, `None` for [`DirtyTracking::Off`].
    pub fn tracker_kind(&self) -> Option<TrackerKind> {
        self.tracker.as_ref().map(|t| t.kind())
    }

    /// The dirty tracker's name as it runs ([`DirtyTracker::name`]), `None` without tracking.
    pub fn tracker_name(&self) -> Option<&'static str> {
        self.tracker.as_ref().map(|t| t.name())
    }

    /// Starts dirty tracking; every page written from now on is in the next harvest. Copy all of
    /// guest memory after this (the initial synchronisation).
    pub fn start_tracking(&mut self) -> Result<(), TrackingControlError> {
        let t = self
            .tracker
            .as_mut()
            .ok_or(TrackingControlError::NoDirtyTracking)?;
        t.start().map_err(TrackingControlError::Start)
    }

    /// Stops dirty tracking (the guest's writes cost nothing extra again).
    pub fn stop_tracking(&mut self) -> Result<(), TrackingControlError> {
        let t = self
            .tracker
            .as_mut()
            .ok_or(TrackingControlError::NoDirtyTracking)?;
        t.stop().map_err(TrackingControlError::Stop)
    }

    /// Adds to `out` the pages written since tracking started or the last harvest, while the
    /// machine runs: a page written during the harvest is in this one or the next (each bit is
    /// taken and cleared atomically, and a write after that sets it again).
    pub fn harvest_running(&mut self, out: &mut PageRangeSet) -> Result<HarvestStats, TrackingControlError> {
        let t = self
            .tracker
            .as_mut()
            .ok_or(TrackingControlError::NoDirtyTracking)?;
        t.harvest(out).map_err(TrackingControlError::Harvest)
    }

    /// The guest went quiet: the next harvest write-protects every page it reports, the hot pages
    /// a tracker leaves writable included ([`DirtyTracker::cool`]), so that the harvest after it
    /// finds nothing if the guest stays idle. Nothing to do without tracking.
    pub fn cool_tracking(&mut self) {
        if let Some(t) = self.tracker.as_mut() {
            t.cool();
        }
    }

    /// The tracker's samples of the pages it leaves writable: `(sampled, written)` (see
    /// [`DirtyTracker::hot_samples`]).
    pub fn hot_page_samples(&self) -> (u64, u64) {
        self.tracker.as_ref().map_or((0, 0), |t| t.hot_samples())
    }

    /// The pages the tracker leaves writable now ([`DirtyTracker::writable_pages`]).
    pub fn writable_pages(&self) -> PageRangeSet {
        let mut out = PageRangeSet::new();
        if let Some(t) = self.tracker.as_ref() {
            t.writable_pages(&mut out);
        }
        out
    }

    /// Gives back pages that a failed epoch could not deliver: the next capture returns them.
    pub fn remark(&mut self, pages: &PageRangeSet) -> Result<(), TrackingControlError> {
        let t = self
            .tracker
            .as_mut()
            .ok_or(TrackingControlError::NoDirtyTracking)?;
        t.remark(pages);
        Ok(())
    }

    /// Runs `f` on the machine's devices, under their lock: for the replication layer's hooks
    /// ([`DeviceManager::set_tx_mode`] for the output-commit hold,
    /// [`DeviceManager::set_disk_write_observer`] for disk replication). `f` must not pause,
    /// resume or capture the machine (that takes the same lock).
    pub fn with_devices<R>(&self, f: impl FnOnce(&DeviceManager) -> R) -> R {
        f(&lock(&self.shared.devices))
    }

    /// Guest memory, to copy the dirty pages from (reads do not mark pages dirty).
    pub fn guest_memory(&self) -> GuestMemory {
        self.mem.clone()
    }

    /// Time spent in the parts of the last successful capture.
    pub fn last_timings(&self) -> CaptureTimings {
        self.last
    }

    /// What the last successful harvest found.
    pub fn last_harvest(&self) -> HarvestStats {
        self.last_harvest
    }

    /// Harvests the pages dirtied since the last capture into `pages` (adds to it) and reads the
    /// machine's state. Only between [`Self::pause`] and [`Self::resume`]: returns
    /// [`CaptureError::NotPaused`] otherwise (and resume waits until a capture is done). If the
    /// state cannot be read after the harvest, the harvested pages are pending again.
    pub fn capture(&mut self, pages: &mut PageRangeSet) -> Result<MachineState, CaptureError> {
        if self.tracker.is_none() {
            return Err(CaptureError::NoDirtyTracking);
        }
        self.capture_inner(Some(pages))
    }

    /// Reads the machine's state without harvesting (a full snapshot, or a machine without
    /// dirty tracking). Same pause rule as [`Self::capture`].
    pub fn capture_state(&mut self) -> Result<MachineState, CaptureError> {
        self.capture_inner(None)
    }

    fn capture_inner(
        &mut self,
        mut pages: Option<&mut PageRangeSet>,
    ) -> Result<MachineState, CaptureError> {
        let span = tracing::debug_span!("capture", pages = tracing::field::Empty);
        let _enter = span.enter();
        let t0 = Instant::now();
        // Held throughout: no resume can start until the state is complete.
        let mut set = lock(&self.shared.vcpus);
        if !set.paused {
            return Err(CaptureError::NotPaused);
        }
        let mut timings = CaptureTimings::default();
        let mut harvest = HarvestStats::default();
        if let (Some(out), Some(tracker)) = (pages.as_deref_mut(), self.tracker.as_mut()) {
            harvest = tracker.harvest(out)?;
            span.record("pages", out.page_count());
        }
        timings.harvest = t0.elapsed();
        let result = self.read_state(&mut set.handles, &mut timings);
        drop(set);
        match result {
            Ok(state) => {
                timings.total = t0.elapsed();
                self.last = timings;
                self.last_harvest = harvest;
                tracing::debug!(
                    harvest_us = timings.harvest.as_micros() as u64,
                    vcpus_us = timings.vcpus.as_micros() as u64,
                    devices_us = timings.devices.as_micros() as u64,
                    "captured"
                );
                Ok(state)
            }
            Err(e) => {
                if let (Some(out), Some(tracker)) = (pages, self.tracker.as_mut()) {
                    // No page may be lost: the caller will drop `out` with the error.
                    tracker.remark(out);
                }
                Err(e)
            }
        }
    }

    fn read_state(
        &self,
        handles: &mut [VcpuHandle],
        timings: &mut CaptureTimings,
    ) -> Result<MachineState, CaptureError> {
        let t = Instant::now();
        let mut vcpus = Vec::with_capacity(handles.len());
        for h in handles.iter_mut() {
            vcpus.push(
                h.save_state()
                    .map_err(|source| CaptureError::Vcpu { id: h.id(), source })?,
            );
        }
        timings.vcpus = t.elapsed();
        let t = Instant::now();
        let devices = lock(&self.shared.devices)
            .save_state()
            .map_err(CaptureError::Devices)?;
        let clock = if self.clock {
            let c = self
                .vm
                .get_clock()
                .map_err(|e| CaptureError::Clock(e.into()))?;
            Some(ClockState {
                clock: c.clock,
                flags: c.flags,
            })
        } else {
            None
        };
        timings.devices = t.elapsed();
        Ok(MachineState {
            mem_size: self.mem_size,
            tsc_khz: self.tsc_khz,
            boot_info: self.boot_info.as_bytes().to_vec(),
            vcpus,
            devices,
            clock,
        })
    }
}

/// A full image of guest memory for [`Machine::restore`]: copied into the new VM's RAM, or adopted
/// as that RAM.
#[derive(Debug)]
pub enum MemoryImage<'a> {
    /// Guest memory as one byte slice, address 0 first (copied).
    Bytes(&'a [u8]),
    /// Another guest memory of the same size (copied).
    Memory(&'a GuestMemory),
    /// A memfd holding guest memory, address 0 at offset 0, exactly the guest's size, created
    /// with `MFD_ALLOW_SEALING` or already sealed with `F_SEAL_SHRINK`: it becomes the new VM's
    /// RAM through a fresh `MAP_SHARED` mapping, nothing is copied (the failover path, with the
    /// backup's standby image; see [`crate::memory::adopt_guest_memory`]). The restore seals it
    /// against shrinking. The caller must not write the file afterwards, and must treat any
    /// mapping of it it still holds as guest memory that changes under it.
    Adopt(OwnedFd),
}

impl MemoryImage<'_> {
    /// Bytes in a copied image (0 for an adopted one: its size is the file's, checked when it
    /// is mapped).
    fn copy_len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Memory(m) => m.iter().map(|r| r.len()).sum(),
            Self::Adopt(_) => 0,
        }
    }

    /// Copies the image into `dst`, which must be fresh (all zero): all-zero pages of the image
    /// are skipped, so guest RAM the guest never used is not faulted in (on the failover path,
    /// faulting in fresh memory costs more than reading the image). An adopted image has nothing
    /// to copy.
    fn copy_into(&self, dst: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
        const PAGE: usize = crate::memory::PAGE_SIZE as usize;
        static ZERO: [u8; PAGE] = [0; PAGE];
        // A slice comparison is a memcmp: many GB/s, where a byte loop would make the scan cost
        // more than the copy it saves.
        let is_zero = |p: &[u8]| p == &ZERO[..p.len()];
        match self {
            Self::Bytes(b) => {
                for (i, page) in b.chunks(PAGE).enumerate() {
                    if !is_zero(page) {
                        dst.write_slice(page, GuestAddress((i * PAGE) as u64))?;
                    }
                }
                Ok(())
            }
            Self::Memory(src) => {
                let mut page = vec![0u8; PAGE];
                for r in src.iter() {
                    let (start, len) = (r.start_addr().0, r.len());
                    for off in (0..len).step_by(PAGE) {
                        let n = (len - off).min(PAGE as u64) as usize;
                        let at = GuestAddress(start + off);
                        src.read_slice(&mut page[..n], at)?;
                        if !is_zero(&page[..n]) {
                            dst.write_slice(&page[..n], at)?;
                        }
                    }
                }
                Ok(())
            }
            Self::Adopt(_) => Ok(()),
        }
    }
}

/// A VM ready to run.
pub struct Machine {
    vm: Vm,
    devices_down: bool,
    console: Arc<Console>,
    boot_info: BootInfo,
    tsc_khz: u32,
    shared: Arc<Shared>,
    exits: Receiver<VcpuExitReport>,
    ran: bool,
    tracker: Option<Box<dyn DirtyTracker>>,
    source_taken: bool,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vm", &self.vm)
            .field("boot_info", &self.boot_info)
            .finish_non_exhaustive()
    }
}

/// Number of vCPUs. The reference guest uses one; the code below does not assume it.
const VCPUS: u32 = 1;

/// What [`Machine::create`] and [`Machine::restore`] hand to the common assembly.
struct Parts {
    vm: Vm,
    devices: DeviceManager,
    bus: MmioBus,
    wake: Arc<GuestWake>,
    fds: Vec<VcpuFd>,
    state_cfg: StateConfig,
    boot_info: BootInfo,
    tsc_khz: u32,
    console: Box<dyn Write + Send>,
    tracking: DirtyTracking,
}

/// Why the common assembly failed (mapped into each constructor's error).
enum AssembleError {
    Rings(RingMapError),
    Uffd(UffdError),
    Start(VcpuStartError),
}

impl Machine {
    /// Builds the VM described by `cfg`, with its vCPU threads started and paused.
    pub fn create(cfg: VmConfig) -> Result<Machine, MachineCreateError> {
        Self::create_with_bus(cfg, MmioBus::default())
    }

    /// Like [`Machine::create`], with extra devices already on `bus` (tests, debugging aids).
    pub fn create_with_bus(cfg: VmConfig, mut bus: MmioBus) -> Result<Machine, MachineCreateError> {
        let vm = Vm::create(cfg.mem_size, cfg.dirty_tracking.ring_entries())?;
        let mem = vm.memory().clone();
        let image = boot::load_guest(&mem, cfg.mem_size, &cfg.guest_elf)?;

        let wake = Arc::new(GuestWake::new().map_err(MachineCreateError::Wake)?);
        let devices = DeviceManager::new(mem.clone(), wake.clone(), &cfg.devices)
            .map_err(MachineCreateError::Devices)?;
        let bases = devices
            .register(&mut bus)
            .map_err(MachineCreateError::Bus)?;

        let supported = cpuid::supported_cpuid(vm.kvm())?;
        let mut fds = Vec::new();
        let mut tsc_khz = 0;
        for id in 0..VCPUS {
            let fd = vm.create_vcpu(u64::from(id))?;
            if id == 0 {
                tsc_khz = cpuid::tsc_khz(&fd);
            }
            let features = cpuid::configure_cpuid(&fd, &supported, id, tsc_khz)?;
            if id == 0 {
                let entry = EntryPoint {
                    rip: image.entry,
                    rsp: cfg.mem_size,
                };
                boot::configure_vcpu(&fd, &features, entry)?;
            }
            fds.push(fd);
        }
        let table = cpuid::build_cpuid(&supported, 0, tsc_khz)?;
        let state_cfg = StateConfig::probe(vm.kvm(), vm.fd(), &table, vm.has_irqchip())?;

        let devices_addrs = DeviceAddrs {
            net: bases.net,
            block: bases.block,
        };
        let boot_info = boot::boot_info(
            &cfg.boot,
            cfg.mem_size,
            &image,
            VCPUS,
            tsc_khz,
            devices_addrs,
        );
        boot::write_boot_info(&mem, &boot_info)?;
        tracing::debug!(
            ?image,
            tsc_khz,
            irqchip = vm.has_irqchip(),
            ?state_cfg,
            "guest loaded"
        );

        Self::assemble(Parts {
            vm,
            devices,
            bus,
            wake,
            fds,
            state_cfg,
            boot_info,
            tsc_khz,
            console: cfg.console,
            tracking: cfg.dirty_tracking,
        })
        .map_err(|e| match e {
            AssembleError::Rings(e) => MachineCreateError::DirtyRings(e),
            AssembleError::Uffd(e) => MachineCreateError::UffdTracker(e),
            AssembleError::Start(e) => MachineCreateError::VcpuStart(e),
        })
    }

    /// Builds a fresh VM from `state` and a full image of guest memory (`image`, copied or
    /// adopted): the failover path. `cfg` gives the devices' host resources (TAP, disk), the
    /// console and the dirty tracker; its memory size must be the state's; its guest ELF and boot
    /// parameters are not used (the guest is in the image, its boot info in the state).
    /// [`Machine::run`] then resumes the guest exactly where the state was captured.
    pub fn restore(
        cfg: VmConfig,
        image: MemoryImage<'_>,
        state: &MachineState,
    ) -> Result<Machine, MachineRestoreError> {
        Self::restore_with_bus(cfg, MmioBus::default(), image, state)
    }

    /// Like [`Machine::restore`], with extra devices already on `bus`.
    pub fn restore_with_bus(
        cfg: VmConfig,
        mut bus: MmioBus,
        image: MemoryImage<'_>,
        state: &MachineState,
    ) -> Result<Machine, MachineRestoreError> {
        let t0 = Instant::now();
        if state.mem_size != cfg.mem_size {
            return Err(MachineRestoreError::MemSize {
                state: state.mem_size,
                config: cfg.mem_size,
            });
        }
        if state.vcpus.len() != VCPUS as usize {
            return Err(MachineRestoreError::VcpuCount(state.vcpus.len()));
        }
        let boot_info = state.boot_info().ok_or(MachineRestoreError::BootInfo)?;
        // Each phase's time, for the log line (the failover's critical path).
        let mut lap_start = t0;
        let mut lap = || {
            let now = Instant::now();
            let d = now - lap_start;
            lap_start = now;
            d.as_secs_f64() * 1e3
        };
        let ring = cfg.dirty_tracking.ring_entries();
        let adopted = matches!(image, MemoryImage::Adopt(_));
        let (vm, t_vm) = match image {
            MemoryImage::Adopt(fd) => {
                let mem = adopt_guest_memory(fd, state.mem_size)
                    .map_err(MachineRestoreError::AdoptMemory)?;
                (Vm::create_with_memory(mem, ring)?, lap())
            }
            MemoryImage::Bytes(_) | MemoryImage::Memory(_) => {
                let len = image.copy_len();
                if len != state.mem_size {
                    return Err(MachineRestoreError::ImageSize {
                        image: len,
                        mem: state.mem_size,
                    });
                }
                let vm = Vm::create(state.mem_size, ring)?;
                let t_vm = lap();
                image
                    .copy_into(vm.memory())
                    .map_err(MachineRestoreError::CopyMemory)?;
                (vm, t_vm)
            }
        };
        let mem = vm.memory().clone();
        let t_mem = lap();
        if let Some(c) = state.clock {
            if vm.fd().check_extension(Cap::AdjustClock) {
                // Only the value: the flags read at capture (TSC_STABLE, ...) describe the
                // source host and are not all accepted by KVM_SET_CLOCK.
                let clock = kvm_clock_data {
                    clock: c.clock,
                    ..Default::default()
                };
                vm.fd()
                    .set_clock(&clock)
                    .map_err(|e| MachineRestoreError::Clock(e.into()))?;
            }
        }

        let wake = Arc::new(GuestWake::new().map_err(MachineRestoreError::Wake)?);
        let devices =
            DeviceManager::restore(mem.clone(), wake.clone(), &cfg.devices, &state.devices)
                .map_err(MachineRestoreError::Devices)?;
        let bases = devices
            .register(&mut bus)
            .map_err(MachineRestoreError::Bus)?;
        let want = DeviceAddrs {
            net: (boot_info.virtio_net_base != 0).then_some(boot_info.virtio_net_base),
            block: (boot_info.virtio_blk_base != 0).then_some(boot_info.virtio_blk_base),
        };
        let got = DeviceAddrs {
            net: bases.net,
            block: bases.block,
        };
        if want != got {
            return Err(MachineRestoreError::DeviceAddrs { want, got });
        }
        let t_devices = lap();

        let mut fds = Vec::new();
        for (id, vs) in state.vcpus.iter().enumerate() {
            let fd = vm.create_vcpu(id as u64)?;
            if let Some(khz) = vs.tsc_khz {
                match fd.get_tsc_khz() {
                    Ok(here) if here == khz => {}
                    here => {
                        // Without TSC scaling the guest's clock runs at this host's rate.
                        if let Err(e) = fd.set_tsc_khz(khz) {
                            tracing::warn!(vcpu = id, ?here, saved = khz, error = %e,
                                "cannot set the saved TSC frequency; guest time will drift");
                        }
                    }
                }
            }
            fds.push(fd);
        }
        let t_vcpus = lap();
        let cpuid =
            CpuId::from_entries(&state.vcpus[0].cpuid).map_err(|_| MachineRestoreError::Vcpu {
                id: 0,
                source: VcpuRestoreError::Cpuid(state.vcpus[0].cpuid.len()),
            })?;
        let state_cfg = StateConfig::probe(vm.kvm(), vm.fd(), &cpuid, vm.has_irqchip())?;
        let t_probe = lap();
        // Here, before the vCPU threads take the fds (KVM takes vCPU state from any thread until
        // the first KVM_RUN): a request to a vCPU thread that was just spawned waits until it is
        // first scheduled, up to 10 ms here on a busy host.
        for (id, (fd, vs)) in (0u32..).zip(fds.iter().zip(&state.vcpus)) {
            crate::vcpu::state::restore_state(fd, &state_cfg, vs)
                .map_err(|source| MachineRestoreError::Vcpu { id, source })?;
        }
        let t_vcpu_state = lap();
        let machine = Self::assemble(Parts {
            vm,
            devices,
            bus,
            wake,
            fds,
            state_cfg,
            boot_info,
            tsc_khz: state.tsc_khz,
            console: cfg.console,
            tracking: cfg.dirty_tracking,
        })
        .map_err(|e| match e {
            AssembleError::Rings(e) => MachineRestoreError::DirtyRings(e),
            AssembleError::Uffd(e) => MachineRestoreError::UffdTracker(e),
            AssembleError::Start(e) => MachineRestoreError::VcpuStart(e),
        })?;
        let t_threads = lap();
        // vm: KVM VM and the guest memory mapping; memory: the copy (none when adopted);
        // devices: the VM clock, the devices' state, host resources (TAP, disk) and the bus;
        // vcpus: vCPU fds and TSC frequency; probe: which vCPU state this host restores;
        // vcpu_state: registers, MSRs, LAPIC, ... set into the vCPUs; threads: dirty tracker
        // and vCPU threads.
        tracing::info!(
            adopted,
            vm_ms = t_vm,
            memory_ms = t_mem,
            devices_ms = t_devices,
            vcpus_ms = t_vcpus,
            probe_ms = t_probe,
            vcpu_state_ms = t_vcpu_state,
            threads_ms = t_threads,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "machine restored"
        );
        Ok(machine)
    }

    /// The common tail of create and restore: dirty tracker, vCPU threads (Paused), handles.
    fn assemble(p: Parts) -> Result<Machine, AssembleError> {
        let mem = p.vm.memory().clone();
        let mut ring_handler: Option<Arc<dyn DirtyRingFullHandler>> = None;
        let tracker: Option<Box<dyn DirtyTracker>> = match p.tracking {
            DirtyTracking::Off => None,
            DirtyTracking::KvmBitmap => Some(Box::new(KvmBitmap::with_hot_pages(&p.vm))),
            DirtyTracking::KvmBitmapExact => Some(Box::new(KvmBitmap::new(&p.vm))),
            DirtyTracking::KvmRing { .. } => {
                let fds: Vec<&VcpuFd> = p.fds.iter().collect();
                let rings = Arc::new(DirtyRings::new(&p.vm, &fds).map_err(AssembleError::Rings)?);
                ring_handler = Some(rings.clone());
                Some(Box::new(KvmRing::new(rings, mem.clone())))
            }
            // No KVM dirty logging: the slots keep their flags.
            DirtyTracking::Uffd => Some(Box::new(
                UffdWp::new(mem.clone()).map_err(AssembleError::Uffd)?,
            )),
        };
        let console = Arc::new(Console::new(p.console));
        let status = Arc::new(StatusCell::default());
        let ctx = VcpuContext {
            mem,
            bus: Arc::new(p.bus),
            wake: p.wake,
            console: console.clone(),
            status: status.clone(),
            state: Arc::new(p.state_cfg),
            dirty_ring: ring_handler,
        };
        let (exit_tx, exit_rx) = channel();
        let mut handles = Vec::new();
        for (id, fd) in p.fds.into_iter().enumerate() {
            handles.push(
                Vcpu::start(id as u32, fd, ctx.clone(), exit_tx.clone())
                    .map_err(AssembleError::Start)?,
            );
        }
        let stoppers = handles.iter().map(VcpuHandle::stopper).collect();
        let shared = Arc::new(Shared {
            vcpus: Mutex::new(VcpuSet {
                handles,
                paused: false,
            }),
            devices: Mutex::new(p.devices),
            stoppers,
            stop_requested: AtomicBool::new(false),
            status,
        });
        Ok(Machine {
            vm: p.vm,
            devices_down: false,
            console,
            boot_info: p.boot_info,
            tsc_khz: p.tsc_khz,
            shared,
            exits: exit_rx,
            ran: false,
            tracker,
            source_taken: false,
        })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> MachineHandle {
        MachineHandle {
            shared: self.shared.clone(),
        }
    }

    /// The checkpoint engine's access to this machine (once per machine: it takes the dirty
    /// tracker along).
    pub fn checkpoint_source(&mut self) -> Result<CheckpointSource, CheckpointSourceError> {
        if self.source_taken {
            return Err(CheckpointSourceError::AlreadyTaken);
        }
        self.source_taken = true;
        Ok(CheckpointSource {
            shared: self.shared.clone(),
            tracker: self.tracker.take(),
            mem: self.vm.memory().clone(),
            vm: self.vm.shared_fd(),
            clock: self.vm.fd().check_extension(Cap::AdjustClock),
            mem_size: self.vm.mem_size(),
            tsc_khz: self.tsc_khz,
            boot_info: self.boot_info,
            last: CaptureTimings::default(),
            last_harvest: HarvestStats::default(),
        })
    }

    /// The KVM VM (memory slots, dirty logging).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The KVM VM, mutably (dirty logging).
    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// The boot info given to the guest.
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot_info
    }

    /// Starts the devices, runs the vCPUs until the guest exits, fails, or is stopped, then
    /// stops the vCPUs and shuts the devices down (flushing the disk).
    pub fn run(&mut self) -> Result<MachineExit, MachineRunError> {
        if self.ran {
            return Err(MachineRunError::AlreadyRan);
        }
        self.ran = true;
        let outcome = self.run_inner();
        self.stop_vcpus();
        self.console.flush();
        let shutdown = self.shutdown_devices();
        match (outcome, shutdown) {
            (Ok(exit), Ok(())) => Ok(exit),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), shutdown) => {
                if let Err(s) = shutdown {
                    tracing::error!(error = %s, "device shutdown failed after a vCPU failure");
                }
                Err(e)
            }
        }
    }

    fn run_inner(&mut self) -> Result<MachineExit, MachineRunError> {
        if self.shared.stop_requested.load(Ordering::SeqCst) {
            return Ok(MachineExit::Stopped);
        }
        lock(&self.shared.devices)
            .start()
            .map_err(MachineRunError::DeviceStart)?;
        {
            let mut set = lock(&self.shared.vcpus);
            set.paused = false;
            {
                let devices = lock(&self.shared.devices);
                if devices.is_paused() {
                    devices.resume();
                }
            }
            for v in set.handles.iter_mut() {
                // A vCPU already stopped (stop() raced with run()) reports Stopped below.
                if let Err(e) = v.resume() {
                    tracing::debug!(error = %e, "vCPU did not resume");
                }
            }
        }
        // The first report decides; the others follow from stopping the rest.
        let first = match self.exits.recv() {
            Ok(r) => r,
            // Every vCPU thread is gone without a report: nothing left to run.
            Err(_) => return Ok(MachineExit::Stopped),
        };
        match first.reason {
            VcpuExitReason::GuestExit(code) => Ok(MachineExit::GuestExit(code)),
            VcpuExitReason::Stopped => Ok(MachineExit::Stopped),
            VcpuExitReason::Failed(source) => Err(MachineRunError::Vcpu {
                id: first.id,
                source,
            }),
        }
    }

    fn stop_vcpus(&mut self) {
        let mut set = lock(&self.shared.vcpus);
        set.paused = false;
        for v in set.handles.iter_mut() {
            let _ = v.stop();
        }
    }

    fn shutdown_devices(&mut self) -> Result<(), MachineRunError> {
        if self.devices_down {
            return Ok(());
        }
        self.devices_down = true;
        lock(&self.shared.devices)
            .shutdown()
            .map_err(MachineRunError::DeviceShutdown)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop_vcpus();
        if let Err(e) = self.shutdown_devices() {
            tracing::error!(error = %e, "device shutdown failed");
        }
    }
}
