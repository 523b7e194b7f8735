//! Handing a host's eBPF programs to its lease watchdog, a child process that outlives the daemon.
//!
//! A BPF link lives as long as any file descriptor to it, so a program stays attached while the
//! watchdog holds a duplicate of its link. The daemon passes the watchdog duplicates of the links
//! and maps, inherited across `exec` (no bpffs pins: nothing to clean up when both die, and no
//! dependence on a mounted bpffs). The descriptors close with the last process holding them.
//!
//! - The **heartbeat responder** ([`ResponderHandoff`], [`InheritedResponder`]): once the daemon
//!   died, the watchdog says so in the replies ([`DaemonState::Dead`]), which needs the responder
//!   still answering.
//! - The **fencing gate** ([`GateHandoff`], [`InheritedGate`]): when the daemon's process held
//!   the gate's only links, its death detached the gate, and that detach holds the kernel's rtnl
//!   lock for milliseconds (RCU synchronisation) exactly when the backup takes over and opens its
//!   TAP, which needs the same lock (measured on the one-machine site: the backup's device restore
//!   went from 0.2 ms to 8–19 ms). Held by the watchdog, the gate is detached only when the
//!   watchdog exits, after the takeover. The watchdog closes it first (every entry inactive): the
//!   dead daemon's permission to emit its guest's frames ends now, not at the lease's expiry.
//!
//! A child takes each handoff with the `from_inherited` of its kind, given the argument that
//! [`spawn_inheriting`] appended for it (`fd,fd,...`).
//!
//! [`DaemonState::Dead`]: ftvm_ebpf_common::heartbeat::DaemonState::Dead

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use aya::maps::{Array, HashMap, Map, MapData, MapError, MapType};
use ftvm_ebpf_common::gate::{GateState, MacKey};

use crate::gate::GateError;
use crate::mac::format_mac;
use crate::responder::{ResponderControl, ResponderError};

/// What `/proc/self/fd/N` links to for a BPF map and a BPF link.
const MAP: &str = "anon_inode:bpf-map";
const LINK: &str = "anon_inode:bpf_link";

/// Duplicates of BPF descriptors (close-on-exec in this process), ready for a child process to
/// inherit through [`spawn_inheriting`].
pub trait Handoff: std::fmt::Debug {
    /// The descriptors, in the order the child's argument lists them.
    fn descriptors(&self) -> &[OwnedFd];
}

/// Duplicates of a responder's maps and link: `responder,peer,link`.
#[derive(Debug)]
pub struct ResponderHandoff {
    fds: Vec<OwnedFd>,
}

/// Duplicates of a gate's map and links: `gate map,ingress link,egress link`.
#[derive(Debug)]
pub struct GateHandoff {
    fds: Vec<OwnedFd>,
}

impl Handoff for ResponderHandoff {
    fn descriptors(&self) -> &[OwnedFd] {
        &self.fds
    }
}

impl Handoff for GateHandoff {
    fn descriptors(&self) -> &[OwnedFd] {
        &self.fds
    }
}

fn duplicate(fds: &[&OwnedFd]) -> io::Result<Vec<OwnedFd>> {
    fds.iter().map(|fd| fd.as_fd().try_clone_to_owned()).collect()
}

impl ResponderHandoff {
    pub(crate) fn duplicate(responder: &OwnedFd, peer: &OwnedFd, link: &OwnedFd) -> Result<Self, ResponderError> {
        Ok(Self { fds: duplicate(&[responder, peer, link]).map_err(ResponderError::Duplicate)? })
    }
}

impl GateHandoff {
    pub(crate) fn duplicate(map: &OwnedFd, ingress_link: &OwnedFd, egress_link: &OwnedFd) -> Result<Self, GateError> {
        Ok(Self { fds: duplicate(&[map, ingress_link, egress_link]).map_err(GateError::Duplicate)? })
    }
}

/// Spawns `cmd` with `flag spec` appended to its arguments for each `(flag, handoff)`; the child
/// inherits the handoffs' descriptors (only that child: they stay close-on-exec in this process)
/// and takes each with the `from_inherited` of its kind, given its `spec`. `cmd` keeps the
/// descriptor numbers: spawn it through this call only, not again later.
pub fn spawn_inheriting(cmd: &mut Command, handoffs: &[(&str, &dyn Handoff)]) -> io::Result<Child> {
    let mut inherited: Vec<RawFd> = Vec::new();
    for (flag, handoff) in handoffs {
        let fds: Vec<RawFd> = handoff.descriptors().iter().map(AsRawFd::as_raw_fd).collect();
        let spec: Vec<String> = fds.iter().map(RawFd::to_string).collect();
        cmd.arg(flag).arg(spec.join(","));
        inherited.extend(fds);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe; it allocates nothing (the list was built before the fork) and touches
    // no lock. The descriptors are open in the parent at fork time (`handoffs` is borrowed for
    // the whole call), so they are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
    cmd.spawn()
}

/// The descriptors named by `spec` (`fd,fd,...`), after checking that there are as many as
/// `kinds`, that none is stdio or named twice, and that each is open and of its kind (what
/// `/proc/self/fd` links to). Takes nothing: the reason of a refusal is for the caller's error.
fn parse_spec<const N: usize>(spec: &str, kinds: [&str; N]) -> Result<[RawFd; N], String> {
    let fds: Vec<RawFd> = spec
        .split(',')
        .map(|s| s.trim().parse::<RawFd>().map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let fds: [RawFd; N] = fds.try_into().map_err(|fds: Vec<RawFd>| format!("expected {N} descriptors, got {}", fds.len()))?;
    for (i, &fd) in fds.iter().enumerate() {
        if fd < 0 {
            return Err(format!("descriptor {fd} is negative"));
        }
        // stdio never carries these; refusing 0..=2 also keeps a mistyped spec from taking them.
        if fd <= 2 {
            return Err(format!("descriptor {fd} is stdio"));
        }
        // Taking one descriptor twice would close it twice.
        if fds[..i].contains(&fd) {
            return Err(format!("descriptor {fd} is named twice"));
        }
    }
    for (&fd, kind) in fds.iter().zip(kinds) {
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|e| format!("descriptor {fd} is not open: {e}"))?;
        if target.as_os_str() != kind {
            return Err(format!("descriptor {fd} is {}, not {kind}", target.display()));
        }
    }
    Ok(fds)
}

/// Takes ownership of the descriptors named by `spec` (checked by [`parse_spec`]) and marks them
/// close-on-exec again.
///
/// # Safety
/// Nothing else in the process may own (or close) the descriptors `spec` names.
unsafe fn take_inherited<const N: usize>(spec: &str, kinds: [&str; N]) -> Result<[OwnedFd; N], String> {
    let fds = parse_spec(spec, kinds)?;
    // SAFETY: each descriptor is open, of the expected kind and named once (checked above), and
    // the caller guarantees that nothing else in this process owns it.
    let fds = fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    for fd in &fds {
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(format!("cannot set close-on-exec: {}", io::Error::last_os_error()));
        }
    }
    Ok(fds)
}

/// The inherited map `fd` (`what` for messages), checked to be of `kind` in the kernel and of
/// `M`'s key and value sizes; `variant` is `kind`'s variant of aya's [`Map`].
fn inherited_map<M>(fd: OwnedFd, what: &str, kind: MapType, variant: fn(MapData) -> Map) -> Result<M, String>
where
    M: TryFrom<Map, Error = MapError>,
{
    let data = MapData::from_fd(fd).map_err(|e| format!("{what}: {e}"))?;
    let actual = data.info().and_then(|info| info.map_type()).map_err(|e| format!("{what}: {e}"))?;
    if actual != kind {
        return Err(format!("{what} is a {actual:?} map, not {kind:?}"));
    }
    M::try_from(variant(data)).map_err(|e| format!("{what}: {e}"))
}

/// The responder as a child process inherited it: holds the link (the program stays attached
/// while this lives, even after the parent died) and controls the replies' contents.
#[derive(Debug)]
pub struct InheritedResponder {
    control: ResponderControl,
    _link: OwnedFd,
}

impl InheritedResponder {
    /// Takes the descriptors named by `spec` (the argument that [`spawn_inheriting`] passed for a
    /// [`ResponderHandoff`]) after checking that they are a BPF link and two BPF array maps of
    /// the responder's types; marks them close-on-exec again.
    ///
    /// # Safety
    /// The process must have been spawned by [`spawn_inheriting`] with this `spec`, and nothing
    /// else in the process may own (or close) the three descriptors: this takes ownership of
    /// them. Call it once.
    pub unsafe fn from_inherited(spec: &str) -> Result<InheritedResponder, ResponderError> {
        let bad = |reason: String| ResponderError::Inherited { spec: spec.to_string(), reason };
        // SAFETY: the caller's contract.
        let [responder, peer, link] = unsafe { take_inherited(spec, [MAP, MAP, LINK]) }.map_err(bad)?;
        let responder: Array<MapData, _> = inherited_map(responder, "responder map", MapType::Array, Map::Array).map_err(bad)?;
        let peer: Array<MapData, _> = inherited_map(peer, "peer map", MapType::Array, Map::Array).map_err(bad)?;
        Ok(InheritedResponder { control: ResponderControl::new(responder, peer)?, _link: link })
    }

    /// The handle that publishes the replies' contents.
    pub fn control(&self) -> ResponderControl {
        self.control.clone()
    }
}

/// The gate as a child process inherited it: holds both links (the programs stay attached while
/// this lives, even after the parent died) and can close the gate.
#[derive(Debug)]
pub struct InheritedGate {
    gate: HashMap<MapData, MacKey, GateState>,
    _links: [OwnedFd; 2],
}

impl InheritedGate {
    /// Takes the descriptors named by `spec` (the argument that [`spawn_inheriting`] passed for a
    /// [`GateHandoff`]) after checking that they are the gate's hash map and two BPF links; marks
    /// them close-on-exec again.
    ///
    /// # Safety
    /// The process must have been spawned by [`spawn_inheriting`] with this `spec`, and nothing
    /// else in the process may own (or close) the three descriptors: this takes ownership of
    /// them. Call it once.
    pub unsafe fn from_inherited(spec: &str) -> Result<InheritedGate, GateError> {
        let bad = |reason: String| GateError::Inherited { spec: spec.to_string(), reason };
        // SAFETY: the caller's contract.
        let [gate, ingress, egress] = unsafe { take_inherited(spec, [MAP, LINK, LINK]) }.map_err(bad)?;
        let gate = inherited_map(gate, "gate map", MapType::Hash, Map::HashMap).map_err(bad)?;
        Ok(InheritedGate { gate, _links: [ingress, egress] })
    }

    /// Closes the gate: every protected guest MAC inactive, so none of their frames pass from now
    /// on (the programs stay attached). Returns how many entries it closed.
    pub fn close(&mut self) -> Result<usize, GateError> {
        // Listed first: writing while walking the keys could skip or repeat some.
        let macs: Vec<MacKey> = self.gate.keys().collect::<Result<_, _>>().map_err(GateError::Entries)?;
        for key in &macs {
            self.gate
                .insert(key, GateState::INACTIVE, 0)
                .map_err(|source| GateError::Update { mac: format_mac(&key.mac), source })?;
        }
        Ok(macs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [&str; 3] = [MAP, LINK, LINK];

    #[test]
    fn malformed_specs_are_refused() {
        for (spec, reason) in [
            ("", "\"\""),
            ("7,8", "expected 3 descriptors, got 2"),
            ("7,8,9,10", "expected 3 descriptors, got 4"),
            ("7,x,9", "\"x\""),
            ("7,-1,9", "negative"),
            ("7,,9", "\"\""),
        ] {
            let e = parse_spec(spec, KINDS).expect_err(spec);
            assert!(e.contains(reason), "{spec:?}: {e}");
        }
    }

    #[test]
    fn stdio_and_repeated_descriptors_are_refused() {
        for spec in ["0,100,101", "100,1,101", "100,101,2"] {
            let e = parse_spec(spec, KINDS).expect_err(spec);
            assert!(e.contains("is stdio"), "{spec}: {e}");
        }
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let fd = file.as_raw_fd();
        let e = parse_spec(&format!("{fd},{fd},{fd}"), [MAP, MAP, MAP]).expect_err("twice");
        assert!(e.contains("named twice"), "{e}");
    }

    #[test]
    fn descriptors_that_are_not_bpf_objects_or_not_open_are_refused() {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let fd = file.as_raw_fd();
        let e = parse_spec(&format!("{fd}"), [MAP]).expect_err("a file is no map");
        assert!(e.contains("/dev/null, not anon_inode:bpf-map"), "{e}");
        // Far above any descriptor this process has open.
        let e = parse_spec(&format!("{}", RawFd::MAX), [LINK]).expect_err("closed");
        assert!(e.contains("is not open"), "{e}");
        // A refused descriptor is not taken: it is still this test's to close.
        drop(file);
    }

    #[test]
    fn a_well_formed_spec_names_the_descriptors_in_order() {
        // Without root there is no BPF object to inherit: the parse alone, with files as kinds.
        let (null, zero) = (std::fs::File::open("/dev/null").expect("null"), std::fs::File::open("/dev/zero").expect("zero"));
        let (n, z) = (null.as_raw_fd(), zero.as_raw_fd());
        assert_eq!(parse_spec(&format!("{z}, {n}"), ["/dev/zero", "/dev/null"]), Ok([z, n]));
        let e = parse_spec(&format!("{n},{z}"), ["/dev/zero", "/dev/null"]).expect_err("swapped");
        assert!(e.contains("/dev/null, not /dev/zero"), "{e}");
    }
}
