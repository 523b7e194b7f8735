//! A host's eBPF programs (`ftvm-ebpf-host`): the fencing gate on its business port and the
//! heartbeat responder on its A-Link port, and the backup's prober of the primary's responder.
//!
//! Only the primary's responder is probed, so a backup attaches its own only when it takes over
//! (after the VM resumed). Until then its A-Link port carries no XDP program: on a veth (the
//! one-machine site, where XDP runs in generic mode) every skb arriving at a port with a program
//! is copied first, and the backup's port receives the whole checkpoint stream (measured here:
//! epoch send p50 305 µs with a program there, 260 µs without, as before the responder existed).
//! The probe replies need no program on the backup's side: generic XDP transmits them as
//! ordinary frames, and a NIC puts them on the wire.
//!
//! Without `--business-port` and `--alink-port`, nothing is attached and status says so.
//!
//! The gate follows the lease: this host's guest frames leave only while it holds the lease, and
//! at the latest until the lease's valid-until instant (converted to `CLOCK_MONOTONIC`
//! nanoseconds, the clock `bpf_ktime_get_ns` reads), written at every renewal. A daemon that is
//! stopped or wedged renews nothing, so the kernel stops its guest's frames at the expiry. One
//! exception keeps the gate in step with the engine's own rule: output that leaves on a fresh
//! acknowledgement alone (the quorum unreachable, the pair still protected; see
//! `ftvm_repl::ha::lease::ACK_AUTHORITY`) extends the expiry to that acknowledgement's authority.
//! With `--quorum none` the primary's gate is active with no expiry (there is no lease to follow:
//! nothing protects that pair from split-brain anyway).

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ftvm_ebpf_host::{
    format_mac, monotonic_ns, DaemonState, FenceGate, GateControl, GateError, GateHandoff, HeartbeatResponder, Mac, Prober,
    ResponderControl, ResponderHandoff,
};
use ftvm_repl::ha::fence::{Fence, NoFence};
use ftvm_repl::ha::lease::{Lease, LeaseView};
use ftvm_repl::ha::probe::{HostProbe, HostReply};

use crate::status::{EbpfStatus, GateStatus, ResponderStatus};

/// How long the backup waits for one reply of the primary's responder (it answers in tens of
/// microseconds; the backup sends a few probes before it believes a silence).
const PROBE_TIMEOUT: Duration = Duration::from_millis(3);
/// How often the primary publishes its progress to its responder.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);
/// Expiry extensions by acknowledgements smaller than this are not written (one map write per
/// epoch would be wasted work: the frames of the next epochs pass anyway).
const ACK_EXTENSION_STEP_NS: u64 = 5_000_000;

/// The eBPF options of `ftvm primary` and `ftvm backup`.
#[derive(Clone, Debug, Args)]
pub struct EbpfArgs {
    /// The eBPF object (`cargo xtask build-ebpf` builds it); by default `ebpf/ftvm-ebpf` in the
    /// target directory this binary was built into.
    #[arg(long)]
    pub ebpf_object: Option<PathBuf>,
    /// This host's business port (the one bridged with the guest's TAP): the fencing gate goes
    /// there. Without it, no gate.
    #[arg(long)]
    pub business_port: Option<String>,
    /// This host's A-Link port: the heartbeat responder goes there (the backup also probes the
    /// primary's through it). Without it, no responder.
    #[arg(long)]
    pub alink_port: Option<String>,
}

impl EbpfArgs {
    fn enabled(&self) -> bool {
        self.business_port.is_some() || self.alink_port.is_some()
    }

    /// The object to load: the option, or the default next to this binary.
    fn object(&self) -> Result<PathBuf> {
        let path = match &self.ebpf_object {
            Some(p) => p.clone(),
            None => {
                let exe = std::env::current_exe().context("cannot find the ftvm binary")?;
                // target/<profile>/ftvm → target/ebpf/ftvm-ebpf
                exe.parent()
                    .and_then(Path::parent)
                    .map(|target| target.join("ebpf").join("ftvm-ebpf"))
                    .context("cannot derive the eBPF object's path from the binary's; give --ebpf-object")?
            }
        };
        if !path.is_file() {
            bail!("the eBPF object {} is missing: build it with `cargo xtask build-ebpf`, or give --ebpf-object", path.display());
        }
        Ok(path)
    }
}

/// The gate's entry for the guest, kept in step with the lease and with acknowledgements.
#[derive(Debug)]
struct GateFollower {
    control: GateControl,
    mac: Mac,
    state: Mutex<GateWanted>,
}

#[derive(Debug, Default)]
struct GateWanted {
    active: bool,
    lease_until_ns: u64,
    ack_until_ns: u64,
    /// Set for good when this host's copy must never emit again (fenced, failed).
    fenced: bool,
}

impl GateFollower {
    fn write(&self, w: &GateWanted) {
        let active = w.active && !w.fenced;
        let expiry = w.lease_until_ns.max(w.ack_until_ns);
        let result = if active { self.control.set(self.mac, true, expiry) } else { self.control.deactivate(self.mac) };
        if let Err(e) = result {
            // The gate then keeps its last entry, which expires by itself.
            tracing::error!(error = %ftvm_repl::ErrorChain(&e), "cannot update the fencing gate");
        }
    }

    fn change(&self, f: impl FnOnce(&mut GateWanted)) {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut w);
        self.write(&w);
    }

    fn on_lease(&self, v: LeaseView) {
        self.change(|w| {
            w.active = v.held;
            w.lease_until_ns = us_to_ns(v.valid_until_us);
        });
    }

    /// A fresh acknowledgement lets output out until `until_us` (monotonic µs).
    fn on_ack_authority(&self, until_us: u64) {
        let until = us_to_ns(until_us);
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if until >= w.ack_until_ns.saturating_add(ACK_EXTENSION_STEP_NS) || w.ack_until_ns == 0 {
            w.ack_until_ns = until;
            self.write(&w);
        }
    }
}

impl Fence for GateFollower {
    fn fence(&self) {
        self.change(|w| w.fenced = true);
    }
}

/// `ftvm_repl::ha::heartbeat::monotonic_us` (µs + 1; `u64::MAX`: for ever) as
/// `CLOCK_MONOTONIC` ns. Rounds down: the gate never outlasts the lease.
fn us_to_ns(us: u64) -> u64 {
    if us == u64::MAX {
        u64::MAX
    } else {
        us.saturating_sub(1).saturating_mul(1_000)
    }
}

/// What the lease watchdog inherits from the primary: each part that is attached.
#[derive(Debug, Default)]
pub struct EbpfHandoff {
    pub responder: Option<ResponderHandoff>,
    pub gate: Option<GateHandoff>,
}

/// What a host attached, and the handles to keep it current.
#[derive(Debug, Default)]
pub struct HostEbpf {
    args: Option<EbpfArgs>,
    gate: Option<(FenceGate, Arc<GateFollower>)>,
    /// The eBPF object, for a responder attached later.
    object: Option<PathBuf>,
    /// Set at most once: at attach on a primary, at takeover on a backup.
    responder: OnceLock<HeartbeatResponder>,
    stop: Arc<AtomicBool>,
    publisher: Option<std::thread::JoinHandle<()>>,
}

/// How long a gate attach waits for a previous holder's programs to go (see [`attach_gate`]).
const GATE_BUSY_WAIT: Duration = Duration::from_secs(10);

/// Attaches the fencing gate to `port`, the guest fenced. A port still busy with the programs of
/// this host's previous service (killed a moment ago: the kernel releases a dead process's links
/// asynchronously) is tried again for a few seconds.
fn attach_gate(object: &Path, port: &str, mac: Mac) -> Result<FenceGate, GateError> {
    let started = std::time::Instant::now();
    // Bounded by GATE_BUSY_WAIT; 50 ms between tries.
    loop {
        match FenceGate::attach_with(object, port, &[(mac, false, 0)]) {
            Err(GateError::Attach { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && started.elapsed() < GATE_BUSY_WAIT =>
            {
                tracing::info!(port, "the port still has a previous gate: waiting for it to go");
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

impl HostEbpf {
    /// Attaches what `args` asks for (in this thread's network namespace), the gate with the
    /// guest `mac` inactive: nothing of the guest passes until [`HostEbpf::activate_for_ever`]
    /// or [`HostEbpf::follow_lease`] says so. For a primary: the responder is attached now.
    pub fn attach(args: &EbpfArgs, mac: Mac) -> Result<Self> {
        let host = Self::attach_standby(args, mac)?;
        host.attach_responder()?;
        Ok(host)
    }

    /// As [`HostEbpf::attach`], for a backup: the gate now, the responder only when this host
    /// takes over ([`HostEbpf::attach_responder`]; see the module documentation for why).
    pub fn attach_standby(args: &EbpfArgs, mac: Mac) -> Result<Self> {
        if !args.enabled() {
            tracing::info!("no --business-port / --alink-port: no eBPF fencing gate or heartbeat responder");
            return Ok(Self::default());
        }
        let object = args.object()?;
        let gate = match &args.business_port {
            Some(port) => {
                let gate = attach_gate(&object, port, mac).with_context(|| format!("cannot attach the fencing gate to {port}"))?;
                let follower = Arc::new(GateFollower { control: gate.control(), mac, state: Mutex::new(GateWanted::default()) });
                tracing::info!(port, mac = %format_mac(&mac), ingress = ?gate.ingress_mode(), "fencing gate attached (guest fenced)");
                Some((gate, follower))
            }
            None => None,
        };
        Ok(Self {
            args: Some(args.clone()),
            gate,
            object: Some(object),
            responder: OnceLock::new(),
            stop: Arc::default(),
            publisher: None,
        })
    }

    /// Attaches the heartbeat responder to the A-Link port, if there is one and it is not
    /// attached yet (in this thread's network namespace), saying the daemon runs.
    pub fn attach_responder(&self) -> Result<()> {
        let (Some(port), Some(object)) = (self.args.as_ref().and_then(|a| a.alink_port.as_deref()), &self.object) else {
            return Ok(());
        };
        if self.responder.get().is_some() {
            return Ok(());
        }
        let r = HeartbeatResponder::attach(object, port)
            .with_context(|| format!("cannot attach the heartbeat responder to {port}"))?;
        r.control().set_daemon_state(DaemonState::Running).context("cannot publish to the heartbeat responder")?;
        tracing::info!(port, mode = ?r.mode(), "heartbeat responder attached");
        // Only this thread attaches (the host's main thread), so the cell was still empty.
        let _ = self.responder.set(r);
        Ok(())
    }

    /// The guest may emit for ever (`--quorum none` on the primary).
    pub fn activate_for_ever(&self) {
        if let Some((_, f)) = &self.gate {
            f.change(|w| {
                w.active = true;
                w.lease_until_ns = u64::MAX;
            });
        }
    }

    /// The guest may emit while `lease` is held, until its valid-until instant; every renewal
    /// moves the expiry.
    pub fn follow_lease(&self, lease: &Lease) {
        if let Some((_, f)) = &self.gate {
            let f = Arc::clone(f);
            lease.subscribe(move |v| f.on_lease(v));
        }
    }

    /// The hook for `PrimaryEngine::with_ack_authority_hook`, if there is a gate.
    pub fn ack_authority_hook(&self) -> Option<ftvm_repl::epoch::engine::AckAuthorityHook> {
        let (_, f) = self.gate.as_ref()?;
        let f = Arc::clone(f);
        Some(Arc::new(move |until_us| f.on_ack_authority(until_us)))
    }

    /// How the host types close this copy off for good (fenced by another host, or failed): the
    /// gate's entry for the guest stays inactive from then on. Without a gate, nothing to close.
    pub fn fence_hook(&self) -> Arc<dyn Fence> {
        match &self.gate {
            Some((_, f)) => Arc::clone(f) as Arc<dyn Fence>,
            None => Arc::new(NoFence),
        }
    }

    /// The responder's control, if there is a responder.
    pub fn responder(&self) -> Option<ResponderControl> {
        self.responder.get().map(HeartbeatResponder::control)
    }

    /// Duplicates of the responder and the gate for the lease watchdog, which holds both when this
    /// process dies: it closes the gate (whose detach would otherwise stall the backup's
    /// takeover, see `ftvm_ebpf_host`'s `handoff` module) and marks the daemon dead in the
    /// responder, which keeps answering. What cannot be handed over just goes with this process.
    pub fn handoff(&self) -> EbpfHandoff {
        fn or_warn<T, E: std::error::Error + 'static>(what: &str, r: Result<T, E>) -> Option<T> {
            r.map_err(|e| tracing::warn!(error = %ftvm_repl::ErrorChain(&e), "cannot hand the {what} to the lease watchdog"))
                .ok()
        }
        EbpfHandoff {
            responder: self.responder.get().and_then(|r| or_warn("heartbeat responder", r.handoff())),
            gate: self.gate.as_ref().and_then(|(g, _)| or_warn("fencing gate", g.handoff())),
        }
    }

    /// Publishes `progress()` (generation, committed epoch, progress marker) every few
    /// milliseconds until this is dropped; the progress time moves whenever the marker changes.
    pub fn spawn_publisher(&mut self, progress: impl Fn() -> (u64, u64, Option<u64>) + Send + 'static) -> Result<()> {
        let Some(control) = self.responder() else { return Ok(()) };
        let stop = Arc::clone(&self.stop);
        let thread = std::thread::Builder::new().name("ftvm-heartbeat".into()).spawn(move || {
            let mut last_marker = None;
            let mut progress_ns = monotonic_ns();
            // Bounded by the stop flag.
            while !stop.load(Ordering::Relaxed) {
                let (generation, committed, marker) = progress();
                // `None`: the daemon's loop itself is the progress (nothing else to watch).
                if marker.is_none() || marker != last_marker {
                    progress_ns = monotonic_ns();
                    last_marker = marker;
                }
                if let Err(e) = control.publish(generation, committed, progress_ns) {
                    tracing::warn!(error = %ftvm_repl::ErrorChain(&e), "cannot publish to the heartbeat responder");
                }
                std::thread::sleep(PUBLISH_EVERY);
            }
        })?;
        self.publisher = Some(thread);
        Ok(())
    }

    /// Publishes that the daemon made progress now (the backup's main loop: its turning is the
    /// progress).
    pub fn publish_progress(&self, generation: u64, committed_epoch: u64) {
        if let Some(c) = self.responder() {
            if let Err(e) = c.publish(generation, committed_epoch, monotonic_ns()) {
                tracing::warn!(error = %ftvm_repl::ErrorChain(&e), "cannot publish to the heartbeat responder");
            }
        }
    }

    /// A prober of the primary's responder from `local` (this host's A-Link address), if this
    /// host has an A-Link port for eBPF (the primary's responder is on the other end).
    pub fn host_probe(&self, local: IpAddr) -> Option<Box<dyn HostProbe>> {
        self.args.as_ref()?.alink_port.as_ref()?;
        match local {
            IpAddr::V4(local) => Some(Box::new(ResponderProbe { local, prober: None })),
            IpAddr::V6(_) => None,
        }
    }

    /// For the status file.
    pub fn status(&self) -> EbpfStatus {
        let Some(args) = &self.args else {
            return EbpfStatus { enabled: false, detail: "off (no --business-port / --alink-port)".into(), ..EbpfStatus::default() };
        };
        let gate = self.gate.as_ref().map(|(gate, f)| {
            let w = f.state.lock().unwrap_or_else(|e| e.into_inner());
            let counters = f.control.counters().unwrap_or_default();
            let expiry = w.lease_until_ns.max(w.ack_until_ns);
            let now = monotonic_ns();
            GateStatus {
                port: gate.ifname().to_string(),
                guest_mac: format_mac(&f.mac),
                active: w.active && !w.fenced,
                expiry_left_ms: (expiry != u64::MAX).then(|| expiry.saturating_sub(now) / 1_000_000),
                egress_passed: counters.egress_passed,
                egress_dropped_inactive: counters.egress_dropped_inactive,
                egress_dropped_expired: counters.egress_dropped_expired,
                ingress_dropped: counters.ingress_dropped,
            }
        });
        let responder = self.responder.get().map(|r| {
            let c = r.control();
            let cur = c.current();
            ResponderStatus {
                port: r.ifname().to_string(),
                generation: cur.generation,
                committed_epoch: cur.committed_epoch,
                daemon_state: format!("{:?}", DaemonState::from_u32(cur.daemon_state)).to_lowercase(),
                peer_probes_answered: c.last_peer_probe().ok().flatten().map_or(0, |p| p.answered),
            }
        });
        let detail = format!(
            "gate {}, responder {}",
            args.business_port.as_deref().unwrap_or("off"),
            args.alink_port.as_deref().unwrap_or("off")
        );
        EbpfStatus { enabled: true, detail, gate, responder, last_probe: None }
    }
}

impl Drop for HostEbpf {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.publisher.take() {
            let _ = t.join();
        }
    }
}

/// [`HostProbe`] over the primary's XDP responder.
#[derive(Debug)]
struct ResponderProbe {
    local: Ipv4Addr,
    prober: Option<(Ipv4Addr, Prober)>,
}

impl HostProbe for ResponderProbe {
    fn probe(&mut self, peer: IpAddr) -> Result<Option<HostReply>, String> {
        let IpAddr::V4(peer) = peer else { return Err(format!("{peer}: the responder speaks IPv4 only")) };
        if self.prober.as_ref().is_none_or(|(p, _)| *p != peer) {
            let prober = Prober::bind(SocketAddrV4::new(self.local, 0), peer).map_err(|e| ftvm_repl::ErrorChain(&e).to_string())?;
            self.prober = Some((peer, prober));
        }
        let Some((_, prober)) = self.prober.as_mut() else { return Ok(None) };
        let reply = prober.probe(PROBE_TIMEOUT).map_err(|e| ftvm_repl::ErrorChain(&e).to_string())?;
        Ok(reply.map(|r| HostReply {
            generation: r.generation,
            committed_epoch: r.committed_epoch,
            daemon_dead: r.daemon_state == DaemonState::Dead,
            progress_age: r.progress_age(),
            rtt: r.rtt,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_times_convert_to_kernel_nanoseconds() {
        assert_eq!(us_to_ns(u64::MAX), u64::MAX);
        assert_eq!(us_to_ns(0), 0);
        assert_eq!(us_to_ns(1_001), 1_000_000);
        // monotonic_us is CLOCK_MONOTONIC µs + 1: the conversion lands within a microsecond of now.
        let ns = us_to_ns(ftvm_repl::ha::heartbeat::monotonic_us());
        assert!(monotonic_ns().abs_diff(ns) < 1_000_000, "{ns}");
    }

    #[test]
    fn a_missing_object_is_a_clear_error() {
        let args = EbpfArgs {
            ebpf_object: Some("/nonexistent/ftvm-ebpf".into()),
            business_port: Some("biz0".into()),
            alink_port: None,
        };
        let e = HostEbpf::attach(&args, [2, 0, 0, 0, 0, 1]).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("build-ebpf"), "{e}");
        let off = HostEbpf::attach(&EbpfArgs { ebpf_object: None, business_port: None, alink_port: None }, [2, 0, 0, 0, 0, 1]);
        assert!(!off.expect("nothing to attach").status().enabled);
    }
}
