//! Small files that must survive a crash whole: replaced atomically and durably.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// File system trouble with one of these files: what was being done, to which file, and why.
#[derive(Debug, thiserror::Error)]
#[error("Cannot {what} {path}")]
pub struct FileError {
    /// What was being done.
    pub what: &'static str,
    /// To which file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// The error of doing `what` to `path`, for `map_err`.
    pub(crate) fn at(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
        let path = path.to_path_buf();
        move |source| FileError { what, path, source }
    }
}

/// Replaces `path` with `contents`: a temporary file beside it (0600, never through a symbolic
/// link), synced, renamed over it, and the directory synced, so that after a crash the file is
/// either the old one or the new one, whole.
pub(crate) fn replace_file(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    let fail = FileError::at;
    let mut tmp_name = path.as_os_str().to_os_string();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(fail("create", &tmp))?;
    f.write_all(contents).map_err(fail("write", &tmp))?;
    f.sync_all().map_err(fail("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(fail("replace", path))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(fail("sync", dir))
}
