//! The witness's durable state: every VM's term, holder and release state, one line each, in
//! `<state dir>/leases`, replaced atomically (write, sync, rename, sync the directory). Root-only:
//! the directory is made 0700 and the file 0600.
//!
//! ```text
//! ftvm-witness-leases 1
//! <vm> <term> <owner> <-|stopped|holder-died>
//! ```

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::durable::FileError;
use crate::ha::quorum::rules::{is_valid_name, LeaseRecord};
use crate::ha::quorum::ReleaseReason;

const HEADER: &str = "ftvm-witness-leases 1";
const FILE: &str = "leases";
/// The largest state file read back (a sanity bound: about 10 000 VMs).
const MAX_STATE_BYTES: u64 = 4 << 20;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system trouble.
    #[error(transparent)]
    Io(#[from] FileError),
    /// The file is not one this version wrote.
    #[error("{path} is not a witness state file (line {line}): {why}")]
    Corrupt {
        /// Where.
        path: PathBuf,
        /// The line.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// Where the state lives.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let at = FileError::at(what, path);
    move |source| StoreError::Io(at(source))
}

impl StateStore {
    /// Creates the directory (0700) if needed; refuses one that others can read.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("create", dir))?;
        let meta = fs::metadata(dir).map_err(io("read", dir))?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io("restrict", dir))?;
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The records saved last (none for a new directory).
    pub fn load(&self) -> Result<Vec<(String, LeaseRecord)>, StoreError> {
        let path = self.path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("open", &path)(e)),
        };
        let len = file.metadata().map_err(io("read", &path))?.len();
        if len > MAX_STATE_BYTES {
            return Err(StoreError::Corrupt { path, line: 0, why: format!("{len} bytes is too large") });
        }
        let text = fs::read_to_string(&path).map_err(io("read", &path))?;
        parse(&text).map_err(|(line, why)| StoreError::Corrupt { path, line, why })
    }

    /// Replaces the saved records atomically.
    pub fn save<'a>(&self, records: impl Iterator<Item = (&'a String, &'a LeaseRecord)>) -> Result<(), StoreError> {
        let mut text = format!("{HEADER}\n");
        for (vm, r) in records {
            let released = match r.released {
                None => "-",
                Some(ReleaseReason::Stopped) => "stopped",
                Some(ReleaseReason::HolderDied) => "holder-died",
            };
            text.push_str(&format!("{vm} {} {} {released}\n", r.term, r.owner));
        }
        crate::durable::replace_file(&self.path(), text.as_bytes())
            .map_err(StoreError::Io)
    }
}

fn parse(text: &str) -> Result<Vec<(String, LeaseRecord)>, (usize, String)> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, HEADER)) => {}
        _ => return Err((1, format!("the first line must be {HEADER:?}"))),
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        let f: Vec<&str> = line.split(' ').collect();
        let [vm, term, owner, released] = f[..] else {
            return Err((i + 1, "expected 4 fields".into()));
        };
        if !is_valid_name(vm) || !is_valid_name(owner) {
            return Err((i + 1, "invalid name".into()));
        }
        let term: u64 = term.parse().map_err(|_| (i + 1, format!("invalid term {term:?}")))?;
        let released = match released {
            "-" => None,
            "stopped" => Some(ReleaseReason::Stopped),
            "holder-died" => Some(ReleaseReason::HolderDied),
            other => return Err((i + 1, format!("invalid release state {other:?}"))),
        };
        out.push((vm.to_string(), LeaseRecord { term, owner: owner.to_string(), expires_us: 0, released }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_save_and_a_load_and_the_files_are_private() {
        let dir = std::env::temp_dir().join(format!("ftvm-witness-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = StateStore::open(&dir).unwrap();
        assert!(store.load().unwrap().is_empty());
        let a = LeaseRecord { term: 7, owner: "a".into(), expires_us: 99, released: None };
        let b = LeaseRecord { term: 2, owner: "host-b".into(), expires_us: 5, released: Some(ReleaseReason::HolderDied) };
        let records = [("vm1".to_string(), a.clone()), ("vm2".to_string(), b.clone())];
        store.save(records.iter().map(|(k, v)| (k, v))).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!((loaded[0].1.term, loaded[0].1.owner.as_str(), loaded[0].1.released), (7, "a", None));
        assert_eq!((loaded[1].1.term, loaded[1].1.released), (2, Some(ReleaseReason::HolderDied)));
        assert_eq!(fs::metadata(dir.join(FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_are_refused_with_the_line() {
        assert!(parse("garbage\n").is_err());
        assert_eq!(parse(&format!("{HEADER}\nvm 1 a\n")).unwrap_err().0, 2);
        assert!(parse(&format!("{HEADER}\nvm x a -\n")).is_err());
        assert!(parse(&format!("{HEADER}\nv/m 1 a -\n")).is_err());
        assert!(parse(&format!("{HEADER}\nvm 1 a maybe\n")).is_err());
        assert_eq!(parse(&format!("{HEADER}\n")).unwrap().len(), 0);
    }
}
