//! What the eBPF programs and userspace must agree on: program and map names, map indices, and the
//! `#[repr(C)]` types stored in maps.
//!
//! Rules for map types added here: `#[repr(C)]`, `Copy`, no implicit padding (use `u32` flags, not
//! `bool`; pad explicitly), and an `unsafe impl aya::Pod` in [`user`] so that aya's typed maps
//! accept them in userspace.
#![no_std]

/// Per-CPU frame counters kept by the `ftvm_probe_count` XDP program.
pub mod probe_count {
    /// Name of the XDP program in the object.
    pub const PROGRAM: &str = "ftvm_probe_count";
    /// Name of its `PerCpuArray<u64>` map; the indices below select a counter.
    pub const MAP: &str = "PROBE_COUNTERS";

    /// Every frame the program saw.
    pub const ALL: u32 = 0;
    /// IPv4 ICMP echo requests (first fragment, type 8) — what `ping` sends.
    pub const ICMP_ECHO_REQUEST: u32 = 1;
    /// ARP frames (requests and replies).
    pub const ARP: u32 = 2;
    /// Number of counters (the map's `max_entries`).
    pub const LEN: u32 = 3;
}

/// The fencing gate on a host's business port: guest frames leave only while this host may run the
/// guest (`ftvm_gate_egress`, tcx egress) and frames for the guest come in only then
/// (`ftvm_gate_ingress`, XDP).
pub mod gate {
    /// Name of the tc/tcx egress classifier in the object.
    pub const EGRESS_PROGRAM: &str = "ftvm_gate_egress";
    /// Name of the XDP ingress program in the object.
    pub const INGRESS_PROGRAM: &str = "ftvm_gate_ingress";
    /// Name of the `HashMap<MacKey, GateState>` of protected guest MACs.
    pub const MAP: &str = "GATE";
    /// Name of the `PerCpuArray<u64>` of counters; the indices below select one.
    pub const COUNTERS: &str = "GATE_COUNTERS";
    /// Most protected guest MACs per port (the map's `max_entries`).
    pub const MAX_GUESTS: u32 = 256;

    /// Frames from a protected guest MAC let out (active, lease not expired).
    pub const EGRESS_PASSED: u32 = 0;
    /// Frames from a protected guest MAC dropped because its entry is not active.
    pub const EGRESS_DROPPED_INACTIVE: u32 = 1;
    /// Frames from a protected guest MAC dropped because the lease expiry has passed.
    pub const EGRESS_DROPPED_EXPIRED: u32 = 2;
    /// Frames to a protected guest MAC dropped on the way in (inactive or expired).
    pub const INGRESS_DROPPED: u32 = 3;
    /// Number of counters (the map's `max_entries`).
    pub const LEN: u32 = 4;

    /// A MAC address as a map key: 6 bytes and 2 bytes of explicit zero padding, so that the key
    /// has no implicit padding (the kernel hashes all 8 bytes).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MacKey {
        pub mac: [u8; 6],
        pub _pad: [u8; 2],
    }

    impl MacKey {
        #[inline(always)]
        pub const fn new(mac: [u8; 6]) -> Self {
            Self { mac, _pad: [0; 2] }
        }
    }

    /// What the gate knows about one protected guest MAC.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct GateState {
        /// 1: this host may emit the guest's frames (until `lease_expiry_ns`); 0: it may not.
        pub active: u32,
        pub _pad: u32,
        /// `CLOCK_MONOTONIC` nanoseconds (what `bpf_ktime_get_ns` reads) at which the permission
        /// ends by itself, with no help from userspace.
        pub lease_expiry_ns: u64,
    }

    impl GateState {
        pub const INACTIVE: GateState = GateState { active: 0, _pad: 0, lease_expiry_ns: 0 };

        /// Whether a frame from (or to) this guest may pass at `now_ns` (`CLOCK_MONOTONIC`).
        #[inline(always)]
        pub const fn allows(&self, now_ns: u64) -> bool {
            self.active != 0 && now_ns < self.lease_expiry_ns
        }
    }

    const _: () = assert!(core::mem::size_of::<MacKey>() == 8);
    const _: () = assert!(core::mem::size_of::<GateState>() == 16);
}

/// The A-Link heartbeat: the XDP responder `ftvm_heartbeat` answers UDP probes to [`PORT`] in the
/// kernel, from what the daemon last published in [`RESPONDER_MAP`], so that the peer can tell a
/// dead host (no reply), a dead daemon (reply says so) and a stuck daemon (progress stops) apart.
pub mod heartbeat {
    /// Name of the XDP program in the object.
    pub const PROGRAM: &str = "ftvm_heartbeat";
    /// Name of the one-entry `Array<ResponderState>` that userspace keeps current.
    pub const RESPONDER_MAP: &str = "RESPONDER";
    /// Name of the one-entry `Array<PeerProbe>` where the program records the peer's last probe.
    pub const PEER_MAP: &str = "PEER_PROBE";

    /// UDP port the responder answers on.
    pub const PORT: u16 = 7709;
    /// "FTVH" read as a little-endian u32.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"FTVH");
    /// Version of [`ProbeFrame`]; a frame with another version is not ours and passes untouched.
    pub const VERSION: u16 = 1;
    pub const KIND_PROBE: u16 = 1;
    pub const KIND_REPLY: u16 = 2;

    /// What the daemon is known to be doing.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum DaemonState {
        /// Nothing published yet.
        Unknown = 0,
        Running = 1,
        /// The daemon process died (written by its watchdog).
        Dead = 2,
    }

    impl DaemonState {
        /// Any value we do not know reads as `Unknown`: the wire is outside input.
        pub const fn from_u32(v: u32) -> Self {
            match v {
                1 => DaemonState::Running,
                2 => DaemonState::Dead,
                _ => DaemonState::Unknown,
            }
        }
    }

    /// The UDP payload of a probe and of its reply: exactly [`ProbeFrame::LEN`] bytes, every field
    /// little-endian (the eBPF object is built for `bpfel` and reads the fields natively).
    ///
    /// A probe fills `magic`, `version`, `kind = KIND_PROBE`, `seq` and `sent_ns` (the prober's
    /// own clock; echoed back for the round-trip time); the reply keeps those and fills the rest
    /// from [`ResponderState`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ProbeFrame {
        pub magic: u32,
        pub version: u16,
        pub kind: u16,
        pub seq: u64,
        pub sent_ns: u64,
        pub generation: u64,
        pub committed_epoch: u64,
        /// The responding host's `CLOCK_MONOTONIC` ns of the daemon's last progress (only
        /// comparable with other values from the same host).
        pub daemon_progress_ns: u64,
        /// A [`DaemonState`] as u32.
        pub daemon_state: u32,
        pub _pad: u32,
        /// The responding host's `CLOCK_MONOTONIC` ns when it answered: with
        /// `daemon_progress_ns` it gives the age of the daemon's progress in one reply, without
        /// comparing the two hosts' clocks. Uses what would otherwise be padding.
        pub replied_ns: u64,
    }

    impl ProbeFrame {
        pub const LEN: usize = 64;

        /// A probe with sequence number `seq`, sent at `sent_ns`.
        pub const fn probe(seq: u64, sent_ns: u64) -> Self {
            Self {
                magic: MAGIC,
                version: VERSION,
                kind: KIND_PROBE,
                seq,
                sent_ns,
                generation: 0,
                committed_epoch: 0,
                daemon_progress_ns: 0,
                daemon_state: 0,
                _pad: 0,
                replied_ns: 0,
            }
        }

        /// The wire form.
        pub fn to_bytes(&self) -> [u8; Self::LEN] {
            let mut b = [0u8; Self::LEN];
            b[0..4].copy_from_slice(&self.magic.to_le_bytes());
            b[4..6].copy_from_slice(&self.version.to_le_bytes());
            b[6..8].copy_from_slice(&self.kind.to_le_bytes());
            b[8..16].copy_from_slice(&self.seq.to_le_bytes());
            b[16..24].copy_from_slice(&self.sent_ns.to_le_bytes());
            b[24..32].copy_from_slice(&self.generation.to_le_bytes());
            b[32..40].copy_from_slice(&self.committed_epoch.to_le_bytes());
            b[40..48].copy_from_slice(&self.daemon_progress_ns.to_le_bytes());
            b[48..52].copy_from_slice(&self.daemon_state.to_le_bytes());
            b[52..56].copy_from_slice(&self._pad.to_le_bytes());
            b[56..64].copy_from_slice(&self.replied_ns.to_le_bytes());
            b
        }

        /// Parses a payload: `None` unless it is exactly [`Self::LEN`] bytes with our magic and
        /// version (the kind is not checked here).
        pub fn from_bytes(b: &[u8]) -> Option<Self> {
            if b.len() != Self::LEN {
                return None;
            }
            let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
            let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            let u64_at = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&b[i..i + 8]);
                u64::from_le_bytes(w)
            };
            let frame = Self {
                magic: u32_at(0),
                version: u16_at(4),
                kind: u16_at(6),
                seq: u64_at(8),
                sent_ns: u64_at(16),
                generation: u64_at(24),
                committed_epoch: u64_at(32),
                daemon_progress_ns: u64_at(40),
                daemon_state: u32_at(48),
                _pad: u32_at(52),
                replied_ns: u64_at(56),
            };
            (frame.magic == MAGIC && frame.version == VERSION).then_some(frame)
        }
    }

    /// What the daemon publishes for the responder to put into replies.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ResponderState {
        pub generation: u64,
        pub committed_epoch: u64,
        pub daemon_progress_ns: u64,
        /// A [`DaemonState`] as u32.
        pub daemon_state: u32,
        pub _pad: u32,
    }

    /// The peer's last probe, as the responder saw it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct PeerProbe {
        pub seq: u64,
        /// The peer's `sent_ns` (its clock).
        pub sent_ns: u64,
        /// This host's `CLOCK_MONOTONIC` ns when the probe arrived.
        pub received_ns: u64,
        /// Probes answered since the program was loaded.
        pub answered: u64,
    }

    const _: () = assert!(core::mem::size_of::<ProbeFrame>() == ProbeFrame::LEN);
    const _: () = assert!(core::mem::size_of::<ResponderState>() == 32);
    const _: () = assert!(core::mem::size_of::<PeerProbe>() == 32);
    // The eBPF side reads fields at these offsets; `to_bytes` writes the same ones.
    const _: () = assert!(core::mem::offset_of!(ProbeFrame, seq) == 8);
    const _: () = assert!(core::mem::offset_of!(ProbeFrame, daemon_state) == 48);
    const _: () = assert!(core::mem::offset_of!(ProbeFrame, replied_ns) == 56);
}

/// Userspace-only trait implementations (`user` feature).
#[cfg(feature = "user")]
pub mod user {
    use crate::gate::{GateState, MacKey};
    use crate::heartbeat::{PeerProbe, ResponderState};

    // SAFETY: `#[repr(C)]`, `Copy`, only integer fields (every bit pattern is valid), and no
    // implicit padding (checked by the size assertions next to the type); the same for the three
    // types below.
    unsafe impl aya::Pod for MacKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for GateState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for ResponderState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PeerProbe {}
}
