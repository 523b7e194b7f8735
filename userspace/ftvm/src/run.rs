//! `ftvm run`: one unprotected VM on this host.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use ftvm_vmm::devices::{BlockConfig, DeviceConfig, NetConfig};
use ftvm_vmm::dirty::DirtyTracking;
use ftvm_vmm::machine::{BootParams, Machine, MachineExit, MachineHandle, VmConfig};

use crate::cli::RunArgs;
use crate::console::ConsoleTee;
use crate::{netns, signals};

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let config = prepare_vm(&args, DirtyTracking::Off)?;
    let mut machine = Machine::create(config)?;
    let _stop = stop_on_signal(machine.handle())?;
    tracing::info!(
        guest_ip = %args.net.ip.0,
        port = args.port,
        tap = %args.net.tap,
        netns = args.net.netns.as_deref().unwrap_or("-"),
        "VM started (unprotected)"
    );
    exit_code(machine.run()?)
}

/// Everything before the VM exists: signal mask and namespace (inherited by every thread the VMM
/// starts later, so this must come first), the guest, the disk, the console.
pub fn prepare_vm(args: &RunArgs, dirty_tracking: DirtyTracking) -> Result<VmConfig> {
    enter_process_context(args.net.netns.as_deref())?;
    let guest = guest_elf(&args.guest)?;
    prepare_disk(&args.disk, args.disk_size)?;
    let console = open_console(args.net.console_log.as_deref())?;
    Ok(VmConfig {
        mem_size: args.memory,
        guest_elf: guest,
        boot: BootParams {
            mac: args.net.mac,
            ipv4: args.net.ip.0,
            ipv4_prefix_len: args.net.ip.1,
            ipv4_gateway: args.gateway,
            kv_port: args.port,
            dirty_pages_per_ms: args.dirty_pages_per_ms,
            dirty_region_pages: args.dirty_region_pages,
        },
        devices: DeviceConfig {
            net: Some(NetConfig { tap_name: args.net.tap.clone(), mac: args.net.mac, host_ipv4: args.net.host_ip }),
            block: Some(BlockConfig::new(args.disk.clone())),
        },
        console: Box::new(console),
        dirty_tracking,
    })
}

/// Blocks the stop signals and enters the namespace, before any thread exists.
pub fn enter_process_context(netns: Option<&str>) -> Result<()> {
    signals::block_stop_signals()?;
    if let Some(name) = netns {
        netns::enter(name)?;
    }
    Ok(())
}

/// The guest console: stdout, and the log file if asked.
pub fn open_console(log: Option<&Path>) -> Result<ConsoleTee> {
    ConsoleTee::new(log)
        .with_context(|| format!("cannot open console log {}", log.unwrap_or(Path::new("")).display()))
}

/// Ctrl-C and SIGTERM stop the VM cleanly (disk flushed), while the guard lives.
pub fn stop_on_signal(handle: MachineHandle) -> Result<signals::HandlerGuard> {
    signals::on_stop_signal(move |signal| {
        tracing::info!(signal, "stop requested; flushing the disk and stopping the VM");
        handle.stop();
    })
}

/// The process exit for a machine's end.
pub fn exit_code(exit: MachineExit) -> Result<ExitCode> {
    match exit {
        MachineExit::Stopped => {
            tracing::info!("VM stopped");
            Ok(ExitCode::SUCCESS)
        }
        MachineExit::GuestExit(0) => {
            tracing::info!("guest exited cleanly");
            Ok(ExitCode::SUCCESS)
        }
        MachineExit::GuestExit(code) => bail!("guest exited with code {code}"),
    }
}

/// The guest ELF, with a hint when the default reference guest has not been built yet.
fn guest_elf(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if path == Path::new(crate::cli::DEFAULT_GUEST_ELF) {
        bail!("guest ELF {} not found (build it with `cargo xtask build-guest`)", path.display());
    }
    bail!("guest ELF {} not found", path.display());
}

/// Creates a sparse disk file of `size` bytes when `path` does not exist; leaves an existing one
/// untouched (it holds the guest's data).
pub fn prepare_disk(path: &Path, size: u64) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => bail!("disk {} is not a regular file", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if size == 0 || !size.is_multiple_of(512) {
                bail!("disk size {size} is not a positive multiple of 512 bytes");
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("cannot create disk {}", path.display()))?;
            file.set_len(size).with_context(|| format!("cannot size disk {}", path.display()))?;
            // A new disk has no past: a write-intent record left by an earlier one would make a
            // rejoin copy only part of it.
            let record = ftvm_repl::disk::intent::path_for(path);
            match std::fs::remove_file(&record) {
                Ok(()) => tracing::info!(record = %record.display(), "removed the write-intent record of the disk that was here before"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot remove the stale write-intent record {}", record.display())),
            }
            tracing::info!(disk = %path.display(), mib = size >> 20, "created a new empty disk");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot open disk {}", path.display())),
    }
}
