//! `cargo xtask build-guest`: builds the reference guest (`guest/vm`, a `#![no_std]` `#![no_main]`
//! crate with its own workspace) for the host target with its own linker script, as in
//! TOOLCHAIN.md ("Building a guest that runs at CPL 3"), then copies the ELF to
//! `target/guest/ftvm-guest` and checks that it is what the VMM's loader expects: a static
//! x86-64 executable whose loadable segments start at `GUEST_LOAD_GPA`.

use std::{env, ffi::OsString, fs, path::PathBuf, process::Command};

use anyhow::{bail, ensure, Context, Result};

/// The host target: no bare-metal target can be installed here, and none is needed.
const TARGET: &str = "x86_64-unknown-linux-gnu";
const BIN: &str = "ftvm-guest";
/// `ftvm_guest_abi::GUEST_LOAD_GPA` (xtask does not depend on the ABI crate for one constant).
const GUEST_LOAD_GPA: u64 = 0x20_0000;

/// Environment of the outer cargo that must not leak into the nested build.
const SCRUBBED_ENV: &[&str] = &[
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
];

pub fn build() -> Result<PathBuf> {
    let root = crate::workspace_root();
    let guest_dir = root.join("guest/vm");
    let link_script = guest_dir.join("link.ld");
    ensure!(link_script.exists(), "{} is missing", link_script.display());
    let target_dir = root.join("target/guest-build");

    // Always with --target, so that the flags reach only the guest, not build scripts.
    let rustflags = format!(
        "-C relocation-model=static -C target-feature=+crt-static -C link-arg=-nostartfiles \
         -C link-arg=-static -C link-arg=-Wl,-T{} -C link-arg=-Wl,--build-id=none",
        link_script.display()
    );
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--target", TARGET, "--bin", BIN]);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", &rustflags);
    let status = cmd
        .status()
        .with_context(|| format!("running {}", cargo.to_string_lossy()))?;
    ensure!(status.success(), "building the guest failed ({status})");

    let built = target_dir.join(TARGET).join("release").join(BIN);
    let out_dir = root.join("target/guest");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join(BIN);
    fs::copy(&built, &out)
        .with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
    check_elf(&fs::read(&out).with_context(|| format!("reading {}", out.display()))?)
        .with_context(|| format!("{} is not a loadable guest", out.display()))?;
    Ok(out)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(
        b.get(at..at + 2).context("truncated ELF")?.try_into()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(
        b.get(at..at + 4).context("truncated ELF")?.try_into()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(
        b.get(at..at + 8).context("truncated ELF")?.try_into()?,
    ))
}

/// A static x86-64 `ET_EXEC` with no interpreter or dynamic section, whose `PT_LOAD` segments
/// start at `GUEST_LOAD_GPA` and contain the entry point.
fn check_elf(elf: &[u8]) -> Result<()> {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    ensure!(elf.get(0..4) == Some(b"\x7fELF"), "no ELF magic");
    ensure!(
        elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not a little-endian ELF64"
    );
    ensure!(u16_at(elf, 16)? == 2, "not an executable (ET_EXEC)");
    ensure!(u16_at(elf, 18)? == 62, "not x86-64");
    let entry = u64_at(elf, 24)?;
    let phoff = u64_at(elf, 32)? as usize;
    let phentsize = u16_at(elf, 54)? as usize;
    let phnum = u16_at(elf, 56)? as usize;
    let mut lowest = u64::MAX;
    let mut entry_loaded = false;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(elf, ph)? {
            PT_LOAD => {
                let vaddr = u64_at(elf, ph + 16)?;
                let memsz = u64_at(elf, ph + 40)?;
                lowest = lowest.min(vaddr);
                entry_loaded |= (vaddr..vaddr + memsz).contains(&entry);
            }
            PT_DYNAMIC | PT_INTERP => bail!("dynamically linked (PT_DYNAMIC/PT_INTERP present)"),
            _ => {}
        }
    }
    ensure!(
        lowest == GUEST_LOAD_GPA,
        "lowest PT_LOAD at {lowest:#x}, expected {GUEST_LOAD_GPA:#x}"
    );
    ensure!(
        entry_loaded,
        "entry point {entry:#x} is not in a PT_LOAD segment"
    );
    Ok(())
}
