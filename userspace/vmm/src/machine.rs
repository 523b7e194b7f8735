//! The whole VM: KVM VM and memory, the loaded guest, devices, vCPU threads, and the handle the
//! operator (or the checkpoint engine) uses to pause, resume and stop it.
//!
//! Order of creation: VM and memory → guest image, page tables, GDT → devices on the MMIO bus →
//! vCPUs (CPUID, TSC frequency, registers) → boot info (it needs the TSC frequency and the device
//! addresses) → vCPU threads, Paused. [`Machine::run`] starts the device I/O thread, resumes the
//! vCPUs and waits for the first of them to end.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use ftvm_guest_abi::{BootInfo, GuestStatus};

use crate::boot::{self, BootSetupError, DeviceAddrs, EntryPoint};
use crate::cpuid::{self, CpuidError};
use crate::devices::bus::{lock, BusOverlapError, MmioBus};
use crate::vcpu::{
    Console, StatusCell, Vcpu, VcpuContext, VcpuControlError, VcpuExitReason, VcpuExitReport,
    VcpuHandle, VcpuRunError, VcpuStartError, VcpuStopper,
};
use crate::vm::{VcpuFdCreateError, Vm, VmCreateError};
use crate::wake::GuestWake;

pub use crate::boot::BootParams;
use crate::devices::{
    DeviceConfig, DeviceCreateError, DeviceManager, DeviceShutdownError, DeviceStartError,
};

/// Everything needed to build a [`Machine`].
pub struct VmConfig {
    /// Bytes of guest RAM (a multiple of 2 MiB, 16 MiB to [`ftvm_guest_abi::MAX_MEM_SIZE`]).
    pub mem_size: u64,
    /// The guest ELF.
    pub guest_elf: PathBuf,
    /// What the guest learns through its boot info.
    pub boot: BootParams,
    /// Which devices to attach.
    pub devices: DeviceConfig,
    /// Where guest console output goes (flushed line by line).
    pub console: Box<dyn Write + Send>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("mem_size", &self.mem_size)
            .field("guest_elf", &self.guest_elf)
            .field("boot", &self.boot)
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
    /// A vCPU thread.
    #[error(transparent)]
    VcpuStart(#[from] VcpuStartError),
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

#[derive(Debug)]
struct Shared {
    /// pause/resume go through here, one request at a time.
    vcpus: Mutex<Vec<VcpuHandle>>,
    /// stop needs no lock: it must work while a pause is waiting.
    stoppers: Vec<VcpuStopper>,
    stop_requested: AtomicBool,
    status: Arc<StatusCell>,
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

    /// Pauses every vCPU; returns once all are paused.
    pub fn pause(&self) -> Result<(), MachineControlError> {
        let vcpus = lock(&self.shared.vcpus);
        for v in vcpus.iter() {
            v.pause().map_err(|source| MachineControlError {
                action: "pause",
                source,
            })?;
        }
        Ok(())
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), MachineControlError> {
        let vcpus = lock(&self.shared.vcpus);
        for v in vcpus.iter() {
            v.resume().map_err(|source| MachineControlError {
                action: "resume",
                source,
            })?;
        }
        Ok(())
    }

    /// The last boot milestone the guest reported.
    pub fn guest_status(&self) -> Option<GuestStatus> {
        self.shared.status.get()
    }
}

/// A VM ready to run.
pub struct Machine {
    vm: Vm,
    devices: DeviceManager,
    devices_down: bool,
    console: Arc<Console>,
    boot_info: BootInfo,
    shared: Arc<Shared>,
    exits: Receiver<VcpuExitReport>,
    ran: bool,
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

impl Machine {
    /// Builds the VM described by `cfg`, with its vCPU threads started and paused.
    pub fn create(cfg: VmConfig) -> Result<Machine, MachineCreateError> {
        Self::create_with_bus(cfg, MmioBus::default())
    }

    /// Like [`Machine::create`], with extra devices already on `bus` (tests, debugging aids).
    pub fn create_with_bus(cfg: VmConfig, mut bus: MmioBus) -> Result<Machine, MachineCreateError> {
        let vm = Vm::new(cfg.mem_size)?;
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
        tracing::debug!(?image, tsc_khz, irqchip = vm.has_irqchip(), "guest loaded");

        let console = Arc::new(Console::new(cfg.console));
        let status = Arc::new(StatusCell::default());
        let ctx = VcpuContext {
            mem,
            bus: Arc::new(bus),
            wake,
            console: console.clone(),
            status: status.clone(),
        };
        let (exit_tx, exit_rx) = channel();
        let mut handles = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            handles.push(Vcpu::start(id as u32, fd, ctx.clone(), exit_tx.clone())?);
        }
        let stoppers = handles.iter().map(VcpuHandle::stopper).collect();
        let shared = Arc::new(Shared {
            vcpus: Mutex::new(handles),
            stoppers,
            stop_requested: AtomicBool::new(false),
            status,
        });
        Ok(Machine {
            vm,
            devices,
            devices_down: false,
            console,
            boot_info,
            shared,
            exits: exit_rx,
            ran: false,
        })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> MachineHandle {
        MachineHandle {
            shared: self.shared.clone(),
        }
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
        self.devices.start().map_err(MachineRunError::DeviceStart)?;
        {
            let vcpus = lock(&self.shared.vcpus);
            for v in vcpus.iter() {
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
        let mut vcpus = lock(&self.shared.vcpus);
        for v in vcpus.iter_mut() {
            let _ = v.stop();
        }
    }

    fn shutdown_devices(&mut self) -> Result<(), MachineRunError> {
        if self.devices_down {
            return Ok(());
        }
        self.devices_down = true;
        self.devices
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
