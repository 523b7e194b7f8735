//! `cargo xtask fetch-test-kernel`: a real Debian bzImage for the Linux loader's tests.
//!
//! No Linux guest can run on the development machines (their KVM emulates guest ring 0), so the
//! loader is tested by parsing and loading a real kernel image without running it. The image
//! comes from Debian's own package, fetched with Debian's own tools: `apt-cache` finds the current
//! cloud kernel package behind the `linux-image-cloud-amd64` meta-package, `apt-get download`
//! fetches the .deb (no install), `dpkg-deb -x` unpacks it into a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The meta-package that always depends on the current cloud kernel image.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

pub fn fetch() -> Result<PathBuf> {
    let dest = crate::workspace_root().join("target/fixtures/vmlinuz");
    if dest.is_file() {
        return Ok(dest);
    }
    let package = match kernel_package() {
        Ok(p) => p,
        Err(first) => {
            // A fresh machine may have no package lists yet.
            eprintln!("{first:#}; running apt-get update");
            run(Command::new("apt-get").arg("update"))?;
            kernel_package()?
        }
    };
    eprintln!("fetching {package}");

    let work = std::env::temp_dir().join(format!("ftvm-kernel-{}", std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let result = fetch_into(&package, &work, &dest);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(dest)
}

fn fetch_into(package: &str, work: &Path, dest: &Path) -> Result<()> {
    // apt-get download writes into the current directory; it needs no root, but when run as root
    // the _apt sandbox user must be able to write there, so keep the directory world-writable.
    set_mode(work, 0o777)?;
    run(Command::new("apt-get")
        .arg("download")
        .arg(package)
        .current_dir(work))?;
    let deb = std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                work.display()
            )
        })?;
    let root = work.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/ directory", deb.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{} has no boot/vmlinuz-*", deb.display()))?;
    std::fs::create_dir_all(dest.parent().expect("dest has a parent"))?;
    // Copy to a temporary name first so an interrupted copy never looks like a fixture.
    let partial = dest.with_extension("partial");
    std::fs::copy(&vmlinuz, &partial)
        .with_context(|| format!("copying {} to {}", vmlinuz.display(), partial.display()))?;
    std::fs::rename(&partial, dest)?;
    eprintln!("{} -> {}", vmlinuz.display(), dest.display());
    Ok(())
}

/// The real package name behind [`META_PACKAGE`], e.g. `linux-image-6.1.0-56-cloud-amd64`.
fn kernel_package() -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", META_PACKAGE])
        .output()
        .context("running apt-cache (is this a Debian machine?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "apt-cache depends {META_PACKAGE} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| {
            d.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .find(|d| d.starts_with("linux-image-") && !d.ends_with("-dbg"))
        .with_context(|| format!("apt-cache depends {META_PACKAGE} names no kernel image package"))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
