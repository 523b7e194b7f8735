//! [`FenceGate`]: the fencing gate on a host's business port.
//!
//! The egress half is a tc classifier attached through **tcx** (`BPF_TCX_EGRESS`, a BPF link),
//! which this kernel has (Linux ≥ 6.6; the development machines run 6.18). Chosen over a classic
//! `clsact` qdisc + `cls_bpf` filter because a tcx link belongs to its file descriptors: the gate
//! goes away with the last process that holds them (no filter left behind on the port by a
//! crashed daemon and its watchdog, whose VM is gone with them anyway), it needs no qdisc set-up,
//! and tcx's ordering puts the gate *first* on the port, before any other program that could
//! redirect guest frames past it. The ingress half is XDP (driver mode where the interface has
//! it). Both links are created by us (`crate::link`), so that a [`GateHandoff`] can pass them to
//! the lease watchdog, which keeps the gate attached (and closes it) once the daemon died; see
//! `crate::handoff` for why.
//!
//! Until [`GateControl::set`] names a guest MAC, the gate lets that MAC's frames through (it knows
//! nothing about it); [`FenceGate::attach_with`] writes the initial entries before the programs
//! are attached, so that no frame slips through in between.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use aya::programs::{SchedClassifier, Xdp};
use aya::Ebpf;
use ftvm_ebpf_common::gate::{self, GateState, MacKey};

use crate::handoff::GateHandoff;
use crate::link::{self, XdpMode};
use crate::mac::{format_mac, Mac};
use crate::object::{self, ObjectError};

/// Why the gate could not be attached, changed or handed off.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("Cannot find interface {ifname}")]
    Interface {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot attach {program} to {ifname}")]
    Attach {
        program: &'static str,
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot update the gate entry of {mac}")]
    Update {
        mac: String,
        #[source]
        source: MapError,
    },
    #[error("Cannot read the gate counters")]
    Counters(#[source] MapError),
    #[error("Cannot list the gate's entries")]
    Entries(#[source] MapError),
    #[error("Cannot duplicate the gate's file descriptors for a child process")]
    Duplicate(#[source] std::io::Error),
    #[error("Inherited gate descriptors {spec:?} are not usable: {reason}")]
    Inherited { spec: String, reason: String },
}

/// The gate's per-CPU counters, summed over CPUs (see `ftvm_ebpf_common::gate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateCounters {
    /// Protected guests' frames let out.
    pub egress_passed: u64,
    /// Protected guests' frames dropped on the way out: entry not active.
    pub egress_dropped_inactive: u64,
    /// Protected guests' frames dropped on the way out: lease expired.
    pub egress_dropped_expired: u64,
    /// Frames to protected guests dropped on the way in.
    pub ingress_dropped: u64,
}

/// The fencing gate, attached to one port. Dropping it detaches both programs, unless a watchdog
/// still holds a [`GateHandoff`] of it.
#[derive(Debug)]
pub struct FenceGate {
    control: GateControl,
    ifname: String,
    ingress_mode: XdpMode,
    ingress_link: OwnedFd,
    egress_link: OwnedFd,
    /// Our own duplicate of the gate map's fd (aya's typed maps do not hand theirs out), from
    /// which hand-offs are duplicated.
    gate_map: OwnedFd,
    // Declared last: dropped after the links. Holds the programs.
    _ebpf: Ebpf,
}

/// A handle on the gate's maps: cheap to clone, usable from any thread. Outliving the
/// [`FenceGate`] is harmless (writes then change nothing on the port).
#[derive(Clone, Debug)]
pub struct GateControl {
    inner: Arc<Mutex<ControlMaps>>,
}

struct ControlMaps {
    gate: HashMap<MapData, MacKey, GateState>,
    counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for ControlMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlMaps").field("gate", &self.gate).finish_non_exhaustive()
    }
}

impl FenceGate {
    /// Loads the object at `object_path` and attaches the gate to `ifname` (in the calling
    /// thread's network namespace), with no guest protected yet.
    pub fn attach(object_path: &std::path::Path, ifname: &str) -> Result<FenceGate, GateError> {
        Self::attach_with(object_path, ifname, &[])
    }

    /// As [`FenceGate::attach`], with `initial` entries `(mac, active, lease_expiry_ns)` written
    /// before the programs see any frame.
    pub fn attach_with(
        object_path: &std::path::Path,
        ifname: &str,
        initial: &[(Mac, bool, u64)],
    ) -> Result<FenceGate, GateError> {
        let ifindex = link::ifindex(ifname)
            .map_err(|source| GateError::Interface { ifname: ifname.to_string(), source })?;
        let mut ebpf = object::load(object_path)?;
        let map: HashMap<MapData, MacKey, GateState> = object::take_map(&mut ebpf, gate::MAP)?;
        let gate_map = object::dup_map_fd(&map, gate::MAP)?;
        let control = GateControl {
            inner: Arc::new(Mutex::new(ControlMaps { gate: map, counters: object::take_map(&mut ebpf, gate::COUNTERS)? })),
        };
        for &(mac, active, expiry_ns) in initial {
            control.set(mac, active, expiry_ns)?;
        }
        let attach_error = |program: &'static str| {
            move |source| GateError::Attach { program, ifname: ifname.to_string(), source }
        };

        let ingress: &mut Xdp = object::load_program(&mut ebpf, gate::INGRESS_PROGRAM)?;
        let (ingress_link, ingress_mode) =
            link::attach_xdp(ingress, ifname, ifindex).map_err(attach_error(gate::INGRESS_PROGRAM))?;
        let egress: &mut SchedClassifier = object::load_program(&mut ebpf, gate::EGRESS_PROGRAM)?;
        let egress_link = link::attach_tcx_egress_first(egress, ifindex).map_err(attach_error(gate::EGRESS_PROGRAM))?;

        Ok(FenceGate {
            control,
            ifname: ifname.to_string(),
            ingress_mode,
            ingress_link,
            egress_link,
            gate_map,
            _ebpf: ebpf,
        })
    }

    /// Duplicates of the gate's map and links, for a watchdog child process (see
    /// [`GateHandoff`]).
    pub fn handoff(&self) -> Result<GateHandoff, GateError> {
        GateHandoff::duplicate(&self.gate_map, &self.ingress_link, &self.egress_link)
    }

    /// A handle to change the gate's entries and read its counters.
    pub fn control(&self) -> GateControl {
        self.control.clone()
    }

    /// The port the gate is attached to.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// How the ingress XDP program runs.
    pub fn ingress_mode(&self) -> XdpMode {
        self.ingress_mode
    }
}

impl GateControl {
    fn maps(&self) -> MutexGuard<'_, ControlMaps> {
        // A panic while holding the lock cannot leave the maps half-written (each update is one
        // syscall), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Protects `mac`: its frames leave this port only while `active` and before
    /// `lease_expiry_ns` ([`crate::monotonic_ns`] time); frames to it come in only then.
    pub fn set(&self, mac: Mac, active: bool, lease_expiry_ns: u64) -> Result<(), GateError> {
        let state = GateState { active: u32::from(active), _pad: 0, lease_expiry_ns };
        self.maps()
            .gate
            .insert(MacKey::new(mac), state, 0)
            .map_err(|source| GateError::Update { mac: format_mac(&mac), source })
    }

    /// Keeps `mac` protected but inactive: none of its frames pass from now on.
    pub fn deactivate(&self, mac: Mac) -> Result<(), GateError> {
        self.set(mac, false, 0)
    }

    /// The current entry of `mac`, if it is protected.
    pub fn get(&self, mac: Mac) -> Result<Option<GateState>, GateError> {
        match self.maps().gate.get(&MacKey::new(mac), 0) {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(GateError::Update { mac: format_mac(&mac), source }),
        }
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<GateCounters, GateError> {
        let maps = self.maps();
        let read = |index: u32| -> Result<u64, GateError> {
            let values = maps.counters.get(&index, 0).map_err(GateError::Counters)?;
            Ok(values.iter().fold(0u64, |sum, v| sum.wrapping_add(*v)))
        };
        Ok(GateCounters {
            egress_passed: read(gate::EGRESS_PASSED)?,
            egress_dropped_inactive: read(gate::EGRESS_DROPPED_INACTIVE)?,
            egress_dropped_expired: read(gate::EGRESS_DROPPED_EXPIRED)?,
            ingress_dropped: read(gate::INGRESS_DROPPED)?,
        })
    }
}
