//! `ftvm_probe_count`: XDP program that counts received frames per CPU and passes every frame on.
//! Used to check the build/load/attach path end to end, and as the first of the per-CPU metrics.

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};
use ftvm_ebpf_common::probe_count::{ALL, ARP, ICMP_ECHO_REQUEST, LEN};

use crate::net::{self, EthHdr, IcmpHdr, Ipv4Hdr};

#[map]
static PROBE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LEN, 0);

#[xdp(frags)]
pub fn ftvm_probe_count(ctx: XdpContext) -> u32 {
    match try_ftvm_probe_count(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

/// `Err` only if a counter slot is missing, i.e. the program itself is broken; what a frame
/// contains never makes it fail.
fn try_ftvm_probe_count(ctx: &XdpContext) -> Result<u32, ()> {
    bump(ALL)?;
    match classify(ctx) {
        Some(Kind::Arp) => bump(ARP)?,
        Some(Kind::IcmpEchoRequest) => bump(ICMP_ECHO_REQUEST)?,
        None => {}
    }
    Ok(xdp_action::XDP_PASS)
}

enum Kind {
    Arp,
    IcmpEchoRequest,
}

/// Untagged Ethernet only; frames too short for the headers they announce are not classified.
#[inline(always)]
fn classify(ctx: &XdpContext) -> Option<Kind> {
    let eth = net::header_at::<EthHdr>(ctx, 0)?;
    match eth.ether_type() {
        net::ETH_P_ARP => Some(Kind::Arp),
        net::ETH_P_IP => {
            let ip = net::header_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
            if ip.protocol != net::IPPROTO_ICMP || ip.frag_offset() != 0 || ip.header_len() < 20 {
                return None;
            }
            let icmp = net::header_at::<IcmpHdr>(ctx, EthHdr::LEN + ip.header_len())?;
            (icmp.icmp_type == net::ICMP_ECHO_REQUEST).then_some(Kind::IcmpEchoRequest)
        }
        _ => None,
    }
}

#[inline(always)]
fn bump(index: u32) -> Result<(), ()> {
    let counter = PROBE_COUNTERS.get_ptr_mut(index).ok_or(())?;
    // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it points to this
    // CPU's u64 slot, which nothing else writes while this program runs on this CPU.
    unsafe { *counter += 1 };
    Ok(())
}
