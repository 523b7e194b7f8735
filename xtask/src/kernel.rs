//! Placeholder until its owner lands it; fails loudly rather than pretending.

use std::path::PathBuf;

pub fn fetch() -> anyhow::Result<PathBuf> {
    anyhow::bail!("xtask kernel: not written yet")
}
