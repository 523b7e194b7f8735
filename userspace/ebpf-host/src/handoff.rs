//! Handing the heartbeat responder to a watchdog child process.
//!
//! The daemon's lease watchdog outlives the daemon. When the daemon dies, the watchdog must be
//! able to say so in the responder's replies ([`DaemonState::Dead`]), and the responder must keep
//! answering, which needs its BPF link open somewhere: a link lives as long as any file
//! descriptor to it. So the daemon passes the watchdog duplicates of the link and of the two map
//! descriptors, inherited across `exec` (no bpffs pins: nothing to clean up when both die, and no
//! dependence on a mounted bpffs). The descriptors close with the last process holding them.
//!
//! [`DaemonState::Dead`]: ftvm_ebpf_common::heartbeat::DaemonState::Dead

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use aya::maps::{Array, Map, MapData};

use crate::responder::{ResponderControl, ResponderError};

/// Duplicates of a responder's link and maps, ready to pass to a child process.
#[derive(Debug)]
pub struct ResponderHandoff {
    responder: OwnedFd,
    peer: OwnedFd,
    link: OwnedFd,
}

/// The responder as a child process inherited it: holds the link (the program stays attached
/// while this lives, even after the parent died) and controls the replies' contents.
#[derive(Debug)]
pub struct InheritedResponder {
    control: ResponderControl,
    _link: OwnedFd,
}

impl ResponderHandoff {
    pub(crate) fn duplicate(responder: &OwnedFd, peer: &OwnedFd, link: &OwnedFd) -> Result<Self, ResponderError> {
        let dup = |fd: &OwnedFd| fd.as_fd().try_clone_to_owned().map_err(ResponderError::Duplicate);
        Ok(Self { responder: dup(responder)?, peer: dup(peer)?, link: dup(link)? })
    }

    /// The value that tells the child where its descriptors are: `responder,peer,link`.
    fn spec(&self) -> String {
        format!("{},{},{}", self.responder.as_raw_fd(), self.peer.as_raw_fd(), self.link.as_raw_fd())
    }

    /// Spawns `cmd` with `flag <spec>` appended to its arguments; the child inherits the three
    /// descriptors (only that child: they stay close-on-exec in this process) and takes them with
    /// [`InheritedResponder::from_inherited`].
    pub fn spawn(&self, cmd: &mut Command, flag: &str) -> io::Result<Child> {
        let fds = [self.responder.as_raw_fd(), self.peer.as_raw_fd(), self.link.as_raw_fd()];
        cmd.arg(flag).arg(self.spec());
        // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
        // async-signal-safe; it allocates nothing and touches no lock. The descriptors are open
        // in the parent at fork time (`self` is borrowed for the whole call), so they are open
        // in the child.
        unsafe {
            cmd.pre_exec(move || {
                for fd in fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
        cmd.spawn()
    }
}

impl InheritedResponder {
    /// Takes the descriptors named by `spec` (the argument that [`ResponderHandoff::spawn`]
    /// passed) after checking that they are a BPF link and two BPF array maps of the responder's
    /// types; marks them close-on-exec again.
    ///
    /// # Safety
    /// The process must have been spawned by [`ResponderHandoff::spawn`] with this `spec`, and
    /// nothing else in the process may own (or close) the three descriptors: this takes
    /// ownership of them. Call it once.
    pub unsafe fn from_inherited(spec: &str) -> Result<InheritedResponder, ResponderError> {
        let bad = |reason: String| ResponderError::Inherited { spec: spec.to_string(), reason };
        let fds: Vec<RawFd> = spec
            .split(',')
            .map(|s| s.trim().parse::<RawFd>().map_err(|e| bad(format!("{s:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        let [responder, peer, link] = fds[..] else {
            return Err(bad(format!("expected 3 descriptors, got {}", fds.len())));
        };
        for (fd, kind) in [(responder, "bpf-map"), (peer, "bpf-map"), (link, "bpf_link")] {
            // stdio never carries these; refusing 0..=2 also keeps a mistyped spec from taking
            // them.
            if fd <= 2 {
                return Err(bad(format!("descriptor {fd} is stdio")));
            }
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map_err(|e| bad(format!("descriptor {fd} is not open: {e}")))?;
            if target.to_string_lossy() != format!("anon_inode:{kind}") {
                return Err(bad(format!("descriptor {fd} is {}, not a {kind}", target.display())));
            }
        }
        // SAFETY: each descriptor is open and is a BPF object (checked above), and the caller
        // guarantees that nothing else in this process owns it.
        let [responder, peer, link] = [responder, peer, link].map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        for fd in [&responder, &peer, &link] {
            // SAFETY: fcntl on a descriptor we own.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                return Err(bad(format!("cannot set close-on-exec: {}", io::Error::last_os_error())));
            }
        }
        let array = |fd: OwnedFd, what: &str| -> Result<Map, ResponderError> {
            let data = MapData::from_fd(fd).map_err(|e| bad(format!("{what}: {e}")))?;
            Ok(Map::Array(data))
        };
        let responder = Array::try_from(array(responder, "responder map")?).map_err(|e| bad(format!("responder map: {e}")))?;
        let peer = Array::try_from(array(peer, "peer map")?).map_err(|e| bad(format!("peer map: {e}")))?;
        Ok(InheritedResponder { control: ResponderControl::new(responder, peer)?, _link: link })
    }

    /// The handle that publishes the replies' contents.
    pub fn control(&self) -> ResponderControl {
        self.control.clone()
    }
}
