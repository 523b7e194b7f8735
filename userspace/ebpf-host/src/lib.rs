//! The host side of ftvm's eBPF programs (built from `ebpf/` into `target/ebpf/ftvm-ebpf` by
//! `cargo xtask build-ebpf`):
//!
//! - [`FenceGate`] attaches the fencing gate to a host's business port and hands out a
//!   [`GateControl`] that says, per protected guest MAC, whether this host may emit the guest's
//!   frames and until when ([`monotonic_ns`] time).
//! - [`HeartbeatResponder`] attaches the XDP heartbeat responder to the A-Link port; its
//!   [`ResponderControl`] publishes what replies carry.
//! - A [`ResponderHandoff`] and a [`GateHandoff`] pass the responder and the gate to a watchdog
//!   child process ([`spawn_inheriting`]), which keeps both attached once the daemon died: it
//!   closes the gate ([`InheritedGate`]) and says "daemon dead" in the replies
//!   ([`InheritedResponder`]).
//! - [`Prober`] probes a peer's responder over UDP and returns its replies with the round-trip
//!   time.
//!
//! Attaching resolves the interface name in the calling thread's network namespace.
//! Program and map names come from `ftvm-ebpf-common`, the one place both sides read them from.

mod clock;
mod gate;
mod handoff;
mod link;
mod mac;
mod object;
mod prober;
mod responder;

pub use clock::{instant_to_monotonic_ns, monotonic_ns};
pub use ftvm_ebpf_common::heartbeat::{DaemonState, PeerProbe, ProbeFrame, KIND_REPLY as HEARTBEAT_REPLY_KIND, PORT as HEARTBEAT_PORT};
pub use gate::{FenceGate, GateControl, GateCounters, GateError};
pub use handoff::{spawn_inheriting, GateHandoff, Handoff, InheritedGate, InheritedResponder, ResponderHandoff};
pub use mac::{format_mac, parse_mac, Mac};
pub use object::ObjectError;
pub use prober::{ProbeError, ProbeReply, Prober};
pub use responder::{HeartbeatResponder, ResponderControl, ResponderError};
pub use link::XdpMode;
