//! The fencing gate on a host's business port (the port bridged with the guest's TAP).
//!
//! - `ftvm_gate_egress` (tc/tcx egress): a frame whose source MAC is a protected guest's leaves
//!   only while [`GATE`] says this host is active for that guest *and* the lease expiry in the
//!   entry has not passed (`bpf_ktime_get_ns`, CLOCK_MONOTONIC). The expiry is what makes the gate
//!   a fence: a primary whose daemon is stopped or wedged cannot renew it, so its guest's frames
//!   stop at the expiry with no help from userspace.
//! - `ftvm_gate_ingress` (XDP): a frame whose destination MAC is a protected guest's is dropped
//!   while that guest is not active here (a backup must not feed frames to its copy). Broadcast
//!   and multicast (ARP, …) and frames for other MACs pass.
//!
//! Frames that do not concern a protected guest are never touched. The egress program lets the
//! frames it allows continue to the next program (`TC_ACT_UNSPEC`, i.e. `TCX_NEXT`): it only ever
//! takes frames away, it never decides for others.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use ftvm_ebpf_common::gate::{
    GateState, MacKey, EGRESS_DROPPED_EXPIRED, EGRESS_DROPPED_INACTIVE, EGRESS_PASSED,
    INGRESS_DROPPED, LEN, MAX_GUESTS,
};

use crate::net::{self, EthHdr};

#[map]
static GATE: HashMap<MacKey, GateState> = HashMap::with_max_entries(MAX_GUESTS, 0);

#[map]
static GATE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LEN, 0);

/// Offset of the source MAC in an Ethernet header.
const ETH_SRC: usize = 6;

#[classifier]
pub fn ftvm_gate_egress(ctx: TcContext) -> i32 {
    // A frame too short to carry a source MAC is not a guest's frame: let it go on.
    let Ok(src) = ctx.load::<[u8; 6]>(ETH_SRC) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: the value is only read right here, while the program runs; a concurrent update from
    // userspace replaces the whole element, and a torn read of `active`/`lease_expiry_ns` can only
    // mix an old and a new decision, both of which were valid when written.
    let Some(state) = (unsafe { GATE.get(&MacKey::new(src)) }) else {
        return TC_ACT_UNSPEC;
    };
    let state = *state;
    if state.active == 0 {
        bump(EGRESS_DROPPED_INACTIVE);
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !state.allows(now) {
        bump(EGRESS_DROPPED_EXPIRED);
        return TC_ACT_SHOT as i32;
    }
    bump(EGRESS_PASSED);
    TC_ACT_UNSPEC
}

#[xdp(frags)]
pub fn ftvm_gate_ingress(ctx: XdpContext) -> u32 {
    let Some(eth) = net::header_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let dst = eth.dst;
    // Group addresses (broadcast, multicast: the I/G bit) are never a guest's own MAC.
    if dst[0] & 1 != 0 {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: as in `ftvm_gate_egress`.
    let Some(state) = (unsafe { GATE.get(&MacKey::new(dst)) }) else {
        return xdp_action::XDP_PASS;
    };
    let state = *state;
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if state.allows(now) {
        return xdp_action::XDP_PASS;
    }
    bump(INGRESS_DROPPED);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = GATE_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it points to
        // this CPU's u64 slot, which nothing else writes while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}
