//! Bounds-checked access to frame headers from an XDP context.
//!
//! Header structs use byte arrays for multi-byte fields: frame data has no alignment guarantee,
//! and the fields are big-endian on the wire anyway.

use core::mem;

use aya_ebpf::programs::XdpContext;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_UDP: u8 = 17;
pub const ICMP_ECHO_REQUEST: u8 = 8;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

impl EthHdr {
    pub const LEN: usize = mem::size_of::<EthHdr>();

    #[inline(always)]
    pub fn ether_type(&self) -> u16 {
        u16::from_be_bytes(self.ether_type)
    }
}

/// The fixed part of an IPv4 header (options, if any, follow it).
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub flags_frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Hdr {
    /// Header length in bytes, options included (IHL × 4).
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        usize::from(self.version_ihl & 0x0f) * 4
    }

    /// Fragment offset (in 8-byte units); only the fragment at 0 carries the L4 header.
    #[inline(always)]
    pub fn frag_offset(&self) -> u16 {
        u16::from_be_bytes(self.flags_frag_off) & 0x1fff
    }
}

/// A UDP header.
#[repr(C)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

impl UdpHdr {
    pub const LEN: usize = mem::size_of::<UdpHdr>();
}

/// The first bytes of an ICMP header (the rest depends on the type).
#[repr(C)]
pub struct IcmpHdr {
    pub icmp_type: u8,
    pub code: u8,
    pub check: [u8; 2],
}

/// A pointer to a `T` at `offset` bytes into the frame, or `None` if the frame is too short.
/// The comparison against `data_end` is what lets the verifier accept the later read.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// A shared reference to a `T` at `offset` bytes into the frame, or `None` if the frame is too
/// short. Only for the byte-array header structs above (alignment 1).
#[inline(always)]
pub fn header_at<T>(ctx: &XdpContext, offset: usize) -> Option<&T> {
    const { assert!(mem::align_of::<T>() == 1) };
    // SAFETY: `ptr_at` checked that `offset .. offset + size_of::<T>()` lies inside the frame,
    // which stays mapped and unchanged by us for the whole program run; `T` is one of the
    // alignment-1, all-bit-patterns-valid header structs of this module.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { &*p })
}

/// A mutable reference to a `T` at `offset` bytes into the frame, or `None` if the frame is too
/// short. Only for the byte-array header structs above (alignment 1); callers take references to
/// disjoint byte ranges only.
#[inline(always)]
pub fn header_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<&mut T> {
    const { assert!(mem::align_of::<T>() == 1) };
    // SAFETY: `ptr_at` checked that `offset .. offset + size_of::<T>()` lies inside the frame,
    // which the XDP program may write; `T` has alignment 1 and accepts every bit pattern; the
    // callers never hold two references to overlapping ranges.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { &mut *(p as *mut T) })
}
