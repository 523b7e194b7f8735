//! `ftvm run`: one unprotected VM on this host.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use ftvm_vmm::devices::{BlockConfig, DeviceConfig, NetConfig};
use ftvm_vmm::machine::{BootParams, Machine, MachineExit, VmConfig};

use crate::cli::RunArgs;
use crate::console::ConsoleTee;
use crate::{netns, signals};

pub fn run(args: RunArgs) -> Result<ExitCode> {
    // Before any thread exists: the signal mask and the namespace are inherited by every thread
    // the VMM starts (vCPU, device I/O).
    signals::block_stop_signals()?;
    if let Some(name) = &args.netns {
        netns::enter(name)?;
    }
    let guest = guest_elf(&args.guest)?;
    prepare_disk(&args.disk, args.disk_size)?;
    let console = ConsoleTee::new(args.console_log.as_deref()).with_context(|| {
        format!("cannot open console log {}", args.console_log.as_deref().unwrap_or(Path::new("")).display())
    })?;

    let config = VmConfig {
        mem_size: args.memory,
        guest_elf: guest,
        boot: BootParams {
            mac: args.mac,
            ipv4: args.ip.0,
            ipv4_prefix_len: args.ip.1,
            ipv4_gateway: args.gateway,
            kv_port: args.port,
            dirty_pages_per_ms: args.dirty_pages_per_ms,
            dirty_region_pages: args.dirty_region_pages,
        },
        devices: DeviceConfig {
            net: Some(NetConfig { tap_name: args.tap.clone(), mac: args.mac, host_ipv4: args.host_ip }),
            block: Some(BlockConfig { path: args.disk.clone() }),
        },
        console: Box::new(console),
        // An unprotected VM tracks nothing; the checkpoint engine chooses a tracker for FT.
        dirty_tracking: ftvm_vmm::dirty::DirtyTracking::Off,
    };
    let mut machine = Machine::create(config)?;
    let handle = machine.handle();
    signals::on_stop_signal(move |signal| {
        tracing::info!(signal, "stop requested; flushing the disk and stopping the VM");
        handle.stop();
    })?;
    tracing::info!(
        guest_ip = %args.ip.0,
        port = args.port,
        tap = %args.tap,
        netns = args.netns.as_deref().unwrap_or("-"),
        "VM started (unprotected)"
    );
    match machine.run()? {
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
fn prepare_disk(path: &Path, size: u64) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => bail!("disk {} is not a regular file", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if size == 0 || size % 512 != 0 {
                bail!("disk size {size} is not a positive multiple of 512 bytes");
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("cannot create disk {}", path.display()))?;
            file.set_len(size).with_context(|| format!("cannot size disk {}", path.display()))?;
            tracing::info!(disk = %path.display(), mib = size >> 20, "created a new empty disk");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot open disk {}", path.display())),
    }
}
