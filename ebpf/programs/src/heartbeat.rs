//! `ftvm_heartbeat`: the A-Link heartbeat responder (XDP on the A-Link port).
//!
//! A probe is an IPv4/UDP datagram to port [`PORT`] whose payload is exactly one [`ProbeFrame`]
//! with our magic, version and `kind = KIND_PROBE`, in a 20-byte IPv4 header (no options) and not
//! a fragment. The program answers it in place with `XDP_TX`: MACs, IPs and ports swapped, TTL
//! reset, IP checksum recomputed, UDP checksum 0 (allowed for IPv4), `kind = KIND_REPLY`, and
//! generation / committed epoch / daemon progress / daemon state copied from [`RESPONDER`] (and
//! the time of the answer in `replied_ns`), which
//! the daemon (or, once it died, its watchdog) keeps current. It also records the peer's last
//! probe in [`PEER_PROBE`].
//!
//! Everything else — replies to our own probes (so that the prober's UDP socket gets them), other
//! UDP to the port, any other traffic — passes untouched: the A-Link carries the checkpoint
//! stream, and this program must never drop any of it.
//!
//! Because the answer comes from the kernel, a daemon that is busy, descheduled or stopped
//! (SIGSTOP) still answers: the peer tells "host dead" (no reply) from "daemon stuck" (replies
//! whose progress stops) and "daemon dead" (replies saying so).
//!
//! On veth, a frame sent with `XDP_TX` in driver mode is delivered to the peer end only if that
//! end has an XDP program attached too (otherwise the kernel drops it). Userspace attaches in
//! generic mode on veth (see `ftvm-ebpf-host`'s `link`), where replies leave as ordinary
//! frames, so the prober's end (the backup's, which gets its own responder only when it takes
//! over) needs no program.
//!
//! Declared `frags` (multi-buffer): the A-Link's 64 KiB TCP segments then reach it in page-sized
//! pieces; a probe is small and always whole in the first piece, and anything else passes.

use core::{mem::offset_of, ptr};

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};
use ftvm_ebpf_common::heartbeat::{
    PeerProbe, ProbeFrame, ResponderState, KIND_PROBE, KIND_REPLY, MAGIC, PORT, VERSION,
};

use crate::net::{self, EthHdr, Ipv4Hdr, UdpHdr};

#[map]
static RESPONDER: Array<ResponderState> = Array::with_max_entries(1, 0);

#[map]
static PEER_PROBE: Array<PeerProbe> = Array::with_max_entries(1, 0);

const IP_OFF: usize = EthHdr::LEN;
/// Only a 20-byte IPv4 header (IHL 5) is ours.
const IP_LEN: usize = 20;
const UDP_OFF: usize = IP_OFF + IP_LEN;
const PAYLOAD_OFF: usize = UDP_OFF + UdpHdr::LEN;
const FRAME_LEN: usize = PAYLOAD_OFF + ProbeFrame::LEN;
/// IPv4 version 4, IHL 5.
const VERSION_IHL: u8 = 0x45;
/// More-fragments flag and fragment offset: either set means a fragment.
const FRAGMENT_MASK: u16 = 0x3fff;
const REPLY_TTL: u8 = 64;

#[xdp(frags)]
pub fn ftvm_heartbeat(ctx: XdpContext) -> u32 {
    match answer(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}

/// Turns the frame into the reply and returns `Some` if it is one of our probes; otherwise
/// returns `None` having changed nothing.
#[inline(always)]
fn answer(ctx: &XdpContext) -> Option<()> {
    let start = ctx.data();
    if start + FRAME_LEN > ctx.data_end() {
        return None;
    }
    let eth = net::header_at_mut::<EthHdr>(ctx, 0)?;
    if eth.ether_type() != net::ETH_P_IP {
        return None;
    }
    let ip = net::header_at_mut::<Ipv4Hdr>(ctx, IP_OFF)?;
    if ip.version_ihl != VERSION_IHL
        || ip.protocol != net::IPPROTO_UDP
        || u16::from_be_bytes(ip.flags_frag_off) & FRAGMENT_MASK != 0
        || usize::from(u16::from_be_bytes(ip.total_len)) != IP_LEN + UdpHdr::LEN + ProbeFrame::LEN
    {
        return None;
    }
    let udp = net::header_at_mut::<UdpHdr>(ctx, UDP_OFF)?;
    if u16::from_be_bytes(udp.dst_port) != PORT
        || usize::from(u16::from_be_bytes(udp.len)) != UdpHdr::LEN + ProbeFrame::LEN
    {
        return None;
    }
    let payload = (start + PAYLOAD_OFF) as *mut u8;
    // SAFETY: `start + FRAME_LEN <= data_end` was checked above, so the whole 64-byte payload is
    // inside the frame; the reads are unaligned-safe.
    let (magic, version, kind, seq, sent_ns) = unsafe {
        (
            read::<u32>(payload, offset_of!(ProbeFrame, magic)),
            read::<u16>(payload, offset_of!(ProbeFrame, version)),
            read::<u16>(payload, offset_of!(ProbeFrame, kind)),
            read::<u64>(payload, offset_of!(ProbeFrame, seq)),
            read::<u64>(payload, offset_of!(ProbeFrame, sent_ns)),
        )
    };
    if magic != MAGIC || version != VERSION || kind != KIND_PROBE {
        return None;
    }

    // It is ours: from here on the frame becomes the reply.
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let state = RESPONDER.get(0).copied().unwrap_or_default();
    // SAFETY: as for the reads above: the payload lies inside the frame, which XDP may write.
    unsafe {
        write::<u16>(payload, offset_of!(ProbeFrame, kind), KIND_REPLY);
        write::<u64>(payload, offset_of!(ProbeFrame, generation), state.generation);
        write::<u64>(payload, offset_of!(ProbeFrame, committed_epoch), state.committed_epoch);
        write::<u64>(payload, offset_of!(ProbeFrame, daemon_progress_ns), state.daemon_progress_ns);
        write::<u32>(payload, offset_of!(ProbeFrame, daemon_state), state.daemon_state);
        write::<u32>(payload, offset_of!(ProbeFrame, _pad), 0);
        write::<u64>(payload, offset_of!(ProbeFrame, replied_ns), now);
    }
    if let Some(peer) = PEER_PROBE.get_ptr_mut(0) {
        // SAFETY: the pointer comes from a successful lookup in the one-entry array; concurrent
        // probes on other CPUs may interleave their writes, which only blurs which probe counts
        // as "last" (userspace reads it for information only).
        unsafe {
            (*peer).seq = seq;
            (*peer).sent_ns = sent_ns;
            (*peer).received_ns = now;
            (*peer).answered += 1;
        }
    }

    let (dst_mac, src_mac) = (eth.dst, eth.src);
    eth.dst = src_mac;
    eth.src = dst_mac;
    let (dst_ip, src_ip) = (ip.dst, ip.src);
    ip.dst = src_ip;
    ip.src = dst_ip;
    ip.ttl = REPLY_TTL;
    ip.check = [0, 0];
    ip.check = ipv4_checksum(ip).to_be_bytes();
    let (dst_port, src_port) = (udp.dst_port, udp.src_port);
    udp.dst_port = src_port;
    udp.src_port = dst_port;
    udp.check = [0, 0];
    Some(())
}

/// The RFC 791 header checksum of a 20-byte header whose `check` field is zero.
#[inline(always)]
fn ipv4_checksum(ip: &Ipv4Hdr) -> u16 {
    let words = [
        u16::from_be_bytes([ip.version_ihl, ip.tos]),
        u16::from_be_bytes(ip.total_len),
        u16::from_be_bytes(ip.id),
        u16::from_be_bytes(ip.flags_frag_off),
        u16::from_be_bytes([ip.ttl, ip.protocol]),
        u16::from_be_bytes(ip.check),
        u16::from_be_bytes([ip.src[0], ip.src[1]]),
        u16::from_be_bytes([ip.src[2], ip.src[3]]),
        u16::from_be_bytes([ip.dst[0], ip.dst[1]]),
        u16::from_be_bytes([ip.dst[2], ip.dst[3]]),
    ];
    let mut sum: u32 = 0;
    for w in words {
        sum += u32::from(w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// # Safety
/// `base + offset .. + size_of::<T>()` must lie inside the frame.
#[inline(always)]
unsafe fn read<T: Copy>(base: *mut u8, offset: usize) -> T {
    // SAFETY: the caller guarantees the range is inside the frame; unaligned read.
    unsafe { ptr::read_unaligned(base.add(offset) as *const T) }
}

/// # Safety
/// `base + offset .. + size_of::<T>()` must lie inside the frame.
#[inline(always)]
unsafe fn write<T: Copy>(base: *mut u8, offset: usize, value: T) {
    // SAFETY: the caller guarantees the range is inside the frame; unaligned write.
    unsafe { ptr::write_unaligned(base.add(offset) as *mut T, value) }
}
