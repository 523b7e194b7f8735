//! [`HeartbeatResponder`]: the XDP heartbeat responder on the A-Link port, and
//! [`ResponderControl`], which publishes what its replies carry.
//!
//! The responder answers probes from the kernel, so a daemon that is busy or stopped still
//! answers; what the answers *say* (generation, committed epoch, progress time, daemon state) is
//! what the daemon last published. Replies never wait for userspace.
//!
//! On veth, a reply sent with `XDP_TX` reaches the peer end only if that end has an XDP program
//! too; each host attaches this responder to its own A-Link end, which covers it (and lets the
//! replies to *its* probes pass up to its prober).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{Array, MapData, MapError};
use aya::programs::Xdp;
use aya::Ebpf;
use ftvm_ebpf_common::heartbeat::{self, DaemonState, PeerProbe, ResponderState};

use crate::handoff::ResponderHandoff;
use crate::object::{self, ObjectError};
use crate::link::{self, XdpMode};

/// Why the responder could not be attached, published to, or handed off.
#[derive(Debug, thiserror::Error)]
pub enum ResponderError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("Cannot find interface {ifname}")]
    Interface {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot attach {} to {ifname}", heartbeat::PROGRAM)]
    Attach {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write the responder's state")]
    Publish(#[source] MapError),
    #[error("Cannot read the peer's last probe")]
    Peer(#[source] MapError),
    #[error("Cannot duplicate the responder's file descriptors for a child process")]
    Duplicate(#[source] std::io::Error),
    #[error("Inherited responder descriptors {spec:?} are not usable: {reason}")]
    Inherited { spec: String, reason: String },
}

/// The responder attached to one port. Dropping it detaches the program, unless a watchdog still
/// holds a [`ResponderHandoff`] of it.
#[derive(Debug)]
pub struct HeartbeatResponder {
    control: ResponderControl,
    ifname: String,
    mode: XdpMode,
    link: OwnedFd,
    /// Our own duplicates of the two map fds (aya's typed maps do not expose theirs), from which
    /// hand-offs are duplicated.
    responder_map: OwnedFd,
    peer_map: OwnedFd,
    _ebpf: Ebpf,
}

/// Publishes what the responder's replies carry. Cheap to clone, usable from any thread.
///
/// The map is written as a whole (one syscall); the XDP program may read it meanwhile and mix an
/// older and a newer field in one reply. Every field is a separate observation that only moves
/// forward, so a mixed reply is still true of a moment in the recent past.
#[derive(Clone, Debug)]
pub struct ResponderControl {
    inner: Arc<Mutex<ControlMaps>>,
}

struct ControlMaps {
    responder: Array<MapData, ResponderState>,
    peer: Array<MapData, PeerProbe>,
    /// What was last written (this process is the map's only writer while it lives).
    current: ResponderState,
}

impl std::fmt::Debug for ControlMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlMaps").field("current", &self.current).finish_non_exhaustive()
    }
}

impl HeartbeatResponder {
    /// Loads the object at `object_path` and attaches the responder to `ifname` (in the calling
    /// thread's network namespace). Replies say [`DaemonState::Unknown`] until the daemon sets
    /// its state.
    pub fn attach(object_path: &std::path::Path, ifname: &str) -> Result<HeartbeatResponder, ResponderError> {
        let ifindex = link::ifindex(ifname)
            .map_err(|source| ResponderError::Interface { ifname: ifname.to_string(), source })?;
        let mut ebpf = object::load(object_path)?;
        let responder: Array<MapData, ResponderState> = object::take_map(&mut ebpf, heartbeat::RESPONDER_MAP)?;
        let peer: Array<MapData, PeerProbe> = object::take_map(&mut ebpf, heartbeat::PEER_MAP)?;
        let responder_map = object::dup_map_fd(&responder, heartbeat::RESPONDER_MAP)?;
        let peer_map = object::dup_map_fd(&peer, heartbeat::PEER_MAP)?;
        let control = ResponderControl::new(responder, peer)?;
        let program: &mut Xdp = object::load_program(&mut ebpf, heartbeat::PROGRAM)?;
        let (link, mode) = link::attach_xdp(program, ifname, ifindex)
            .map_err(|source| ResponderError::Attach { ifname: ifname.to_string(), source })?;
        Ok(HeartbeatResponder {
            control,
            ifname: ifname.to_string(),
            mode,
            link,
            responder_map,
            peer_map,
            _ebpf: ebpf,
        })
    }

    /// The handle that publishes the replies' contents.
    pub fn control(&self) -> ResponderControl {
        self.control.clone()
    }

    /// Duplicates of the responder's link and maps, for a watchdog child process (see
    /// [`ResponderHandoff`]).
    pub fn handoff(&self) -> Result<ResponderHandoff, ResponderError> {
        ResponderHandoff::duplicate(&self.responder_map, &self.peer_map, &self.link)
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// How the program runs on the port.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }
}

impl ResponderControl {
    /// A control over the two maps; starts from what the responder map holds now (all zero for a
    /// fresh program, the daemon's last values for an inherited one).
    pub(crate) fn new(
        responder: Array<MapData, ResponderState>,
        peer: Array<MapData, PeerProbe>,
    ) -> Result<Self, ResponderError> {
        let current = responder.get(&0, 0).map_err(ResponderError::Publish)?;
        Ok(Self { inner: Arc::new(Mutex::new(ControlMaps { responder, peer, current })) })
    }

    fn maps(&self) -> MutexGuard<'_, ControlMaps> {
        // Each map write is one syscall: a panic elsewhere cannot leave it half done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, change: impl FnOnce(&mut ResponderState)) -> Result<(), ResponderError> {
        let mut maps = self.maps();
        let mut next = maps.current;
        change(&mut next);
        maps.responder.set(0, next, 0).map_err(ResponderError::Publish)?;
        maps.current = next;
        Ok(())
    }

    /// What replies carry from now on: this host's generation (term), its last committed epoch,
    /// and the [`crate::monotonic_ns`] time of the daemon's last progress.
    pub fn publish(&self, generation: u64, committed_epoch: u64, progress_ns: u64) -> Result<(), ResponderError> {
        self.write(|s| {
            s.generation = generation;
            s.committed_epoch = committed_epoch;
            s.daemon_progress_ns = progress_ns;
        })
    }

    /// The daemon's state, as replies report it.
    pub fn set_daemon_state(&self, state: DaemonState) -> Result<(), ResponderError> {
        self.write(|s| s.daemon_state = state as u32)
    }

    /// What replies carry now.
    pub fn current(&self) -> ResponderState {
        self.maps().current
    }

    /// The peer's last probe, if one came.
    pub fn last_peer_probe(&self) -> Result<Option<PeerProbe>, ResponderError> {
        let probe = self.maps().peer.get(&0, 0).map_err(ResponderError::Peer)?;
        Ok((probe.answered > 0).then_some(probe))
    }
}
