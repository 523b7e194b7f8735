//! `cargo xtask build-ebpf`: builds the eBPF workspace (`ebpf/`) for `bpfel-unknown-none` and
//! copies the object to `target/ebpf/ftvm-ebpf`.
//!
//! The recipe is the one in TOOLCHAIN.md ("Building eBPF programs in Rust (aya) here"): rustup's
//! cargo drives the build, but every crate is compiled by Debian's `/usr/bin/rustc`, which ships a
//! prebuilt `core` for the BPF targets (no `-Z build-std`, no `rust-src`), and linked by
//! `bpf-linker`. The eBPF workspace has its own target directory (`ebpf/target`) so that artefacts
//! of the two compilers never mix.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Debian's rustc (package `rustc-web`).
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// Where Debian's `core` for the eBPF target lives (package `libstd-rust-web-dev-bpf`).
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";
const TARGET: &str = "bpfel-unknown-none";
/// The `[[bin]]` of `ebpf/programs`.
const OBJECT_NAME: &str = "ftvm-ebpf";

/// Environment variables of the outer cargo/rustup that must not leak into the nested build:
/// they would pick another toolchain, another target directory, or override `RUSTFLAGS`.
const SCRUBBED_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
];

pub fn build() -> Result<PathBuf> {
    check_toolchain()?;

    let root = crate::workspace_root();
    let ebpf_dir = root.join("ebpf");
    let target_dir = ebpf_dir.join("target");

    // `CARGO` is the cargo that runs xtask (rustup's, resolved to the real toolchain binary);
    // plain `cargo` from PATH otherwise. Never Debian's /usr/bin/cargo by accident: rustup's
    // ~/.cargo/bin precedes /usr/bin on PATH.
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--package",
            OBJECT_NAME,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "-C linker=bpf-linker");
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    let status = cmd.status().with_context(|| {
        format!(
            "running {} build in {}",
            cargo.to_string_lossy(),
            ebpf_dir.display()
        )
    })?;
    if !status.success() {
        bail!("building the eBPF programs failed ({status}); see the cargo output above");
    }

    let built = target_dir.join(TARGET).join("release").join(OBJECT_NAME);
    let out_dir = root.join("target").join("ebpf");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join(OBJECT_NAME);
    // Copy to a temporary name and rename, so a reader never sees a half-written object.
    let tmp = out_dir.join(format!(".{OBJECT_NAME}.tmp"));
    fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    fs::rename(&tmp, &out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(out)
}

/// Fails with an actionable message if a piece of the eBPF toolchain is missing.
fn check_toolchain() -> Result<()> {
    const HINT: &str = "run the install step: see README";
    if !Path::new(DEBIAN_RUSTC).is_file() {
        bail!("{DEBIAN_RUSTC} not found (Debian package rustc-web); {HINT}");
    }
    if !Path::new(DEBIAN_BPF_CORE).is_dir() {
        bail!("{DEBIAN_BPF_CORE} not found (Debian package libstd-rust-web-dev-bpf); {HINT}");
    }
    if find_in_path("bpf-linker").is_none() {
        bail!("bpf-linker not found on PATH (cargo install bpf-linker --no-default-features --features llvm-22); {HINT}");
    }
    Ok(())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
