//! The lease term stored with a host's copy of the disk: `<disk>.term`, next to it.
//!
//! It says for which term the copy is current. A host writes it after the quorum granted it a new
//! term (never before: a refused claim must not leave a term this copy never had), and a backup
//! writes the term of the primary whose epoch made its standby. A host that comes back names it
//! in its claim; the quorum refuses an older one, so a stale copy never serves. Term 0 means "not
//! current for any term" (a new disk, or one in the middle of a synchronisation).
//!
//! ```text
//! ftvm-term 1
//! <vm id> <term>
//! ```
//! Written atomically (temporary file, sync, rename, sync the directory), 0600, never through a
//! symbolic link.

use std::fs;
use std::path::{Path, PathBuf};

use crate::durable::FileError;

const HEADER: &str = "ftvm-term 1";

/// Why the term file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TermFileError {
    /// File system trouble.
    #[error(transparent)]
    Io(#[from] FileError),
    /// Not a term file.
    #[error("{path} is not a term file: {why}")]
    Corrupt {
        /// Where.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The copy belongs to another VM.
    #[error("The disk's term file {path} is for VM {found:?}, not {expected:?}")]
    OtherVm {
        /// Where.
        path: PathBuf,
        /// The VM it names.
        found: String,
        /// The VM expected.
        expected: String,
    },
}

/// The term file of one disk.
#[derive(Clone, Debug)]
pub struct TermFile {
    path: PathBuf,
    vm: String,
}

impl TermFile {
    /// The term file of `disk`, for VM `vm`.
    pub fn for_disk(disk: &Path, vm: &str) -> Self {
        let mut name = disk.as_os_str().to_os_string();
        name.push(".term");
        Self { path: PathBuf::from(name), vm: vm.to_string() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored term (0 when there is no file).
    pub fn read(&self) -> Result<u64, TermFileError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(FileError::at("read", &self.path)(e).into()),
        };
        let corrupt = |why: &str| TermFileError::Corrupt { path: self.path.clone(), why: why.to_string() };
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(corrupt("bad first line"));
        }
        let line = lines.next().ok_or_else(|| corrupt("no term line"))?;
        let (vm, term) = line.split_once(' ').ok_or_else(|| corrupt("bad term line"))?;
        let term: u64 = term.parse().map_err(|_| corrupt("bad term"))?;
        if vm != self.vm {
            return Err(TermFileError::OtherVm { path: self.path.clone(), found: vm.to_string(), expected: self.vm.clone() });
        }
        Ok(term)
    }

    /// Stores `term` durably.
    pub fn write(&self, term: u64) -> Result<(), TermFileError> {
        crate::durable::replace_file(&self.path, format!("{HEADER}\n{} {term}\n", self.vm).as_bytes())
            .map_err(TermFileError::Io)
    }

}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn terms_are_stored_privately_and_checked() {
        let dir = std::env::temp_dir().join(format!("ftvm-term-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("vm.img");
        let t = TermFile::for_disk(&disk, "vm1");
        assert_eq!(t.path(), dir.join("vm.img.term"));
        assert_eq!(t.read().unwrap(), 0);
        t.write(7).unwrap();
        assert_eq!(t.read().unwrap(), 7);
        t.write(8).unwrap();
        assert_eq!(t.read().unwrap(), 8);
        assert_eq!(fs::metadata(t.path()).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(TermFile::for_disk(&disk, "vm2").read(), Err(TermFileError::OtherVm { .. })));
        fs::write(t.path(), "junk").unwrap();
        assert!(matches!(t.read(), Err(TermFileError::Corrupt { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
