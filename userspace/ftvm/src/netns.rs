//! Running inside a named network namespace (`ip netns add <name>`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Where iproute2 keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Moves the calling thread into the named network namespace. Call it before any other thread is
/// started: threads created afterwards inherit the namespace, so the TAP, the device I/O thread
/// and the vCPU all live in it.
pub fn enter(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("invalid network namespace name {name:?}");
    }
    let path = PathBuf::from(NETNS_DIR).join(name);
    let file = File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("network namespace {name} not found (create it with `ip netns add {name}`)")
        } else {
            anyhow::anyhow!("cannot open network namespace {}: {e}", path.display())
        }
    })?;
    // SAFETY: setns on a valid open namespace fd; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot enter network namespace {name}"));
    }
    Ok(())
}
