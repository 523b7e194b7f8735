//! Shared secrets (the A-Link's, the witness's), read from files the operator keeps private.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Reads a secret: the file's bytes without a trailing newline. A file that group or others may
/// read is refused: the secret is the whole of the link's security.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read secret file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "secret file {} is readable by group or others (mode {:o}): `chmod 600` it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let mut secret = std::fs::read(path).with_context(|| format!("cannot read secret file {}", path.display()))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < ftvm_proto::handshake::MIN_SECRET_LEN {
        bail!(
            "secret file {} holds {} bytes; the A-Link needs at least {}",
            path.display(),
            secret.len(),
            ftvm_proto::handshake::MIN_SECRET_LEN
        );
    }
    Ok(secret)
}
