//! Small files that must survive a crash whole: replaced atomically and durably.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A step of [`replace_file`] that failed.
#[derive(Debug)]
pub(crate) struct ReplaceError {
    /// What was being done.
    pub what: &'static str,
    /// To which file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// Replaces `path` with `contents`: a temporary file beside it (0600, never through a symbolic
/// link), synced, renamed over it, and the directory synced, so that after a crash the file is
/// either the old one or the new one, whole.
pub(crate) fn replace_file(path: &Path, contents: &[u8]) -> Result<(), ReplaceError> {
    let fail = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplaceError { what, path, source }
    };
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
