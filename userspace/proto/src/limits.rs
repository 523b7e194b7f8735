//! Every size the two hosts, the guest's devices and the wire must agree on, defined once.
//!
//! The virtio-net device accepts guest frames up to [`MAX_GUEST_FRAME`], the output hold keeps
//! frames of that size, and a HeldOutput payload carries them: one constant, so that no frame the
//! device accepted can be refused by replication (two copies of this limit once drifted apart by
//! three bytes, and a guest sending a VLAN-tagged 64 KiB frame stopped its own protection).

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Size of a disk sector, the unit of disk write addresses.
pub const SECTOR_SIZE: u64 = 512;

/// The virtio-net header in front of every guest frame (`virtio_net_hdr_v1`: virtio 1.x always
/// includes `num_buffers`). The device checks its own struct against this at compile time.
pub const VIRTIO_NET_HDR_LEN: usize = 12;
/// An Ethernet header with one VLAN tag.
pub const ETHERNET_VLAN_HEADER_LEN: usize = 18;
/// The largest Ethernet payload a guest can hand the device without GSO (which is not offered).
pub const MAX_ETHERNET_PAYLOAD: usize = 65_535;
/// The largest guest frame, virtio-net header included, that the device accepts, the output hold
/// keeps and a HeldOutput payload carries.
pub const MAX_GUEST_FRAME: usize = VIRTIO_NET_HDR_LEN + ETHERNET_VLAN_HEADER_LEN + MAX_ETHERNET_PAYLOAD;
/// The smallest: a bare virtio-net header (the device passes what follows it on as it is).
pub const MIN_GUEST_FRAME: usize = VIRTIO_NET_HDR_LEN;

/// Largest payload of any A-Link frame (the frame header's length field is checked against it
/// before anything is allocated).
pub const MAX_FRAME_PAYLOAD: u32 = 64 << 20;
/// Most bytes of machine state, disk writes, disk image or held output in one A-Link frame.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;
/// Largest single disk write entry; larger guest writes are recorded as several entries.
pub const MAX_DISK_WRITE_BYTES: usize = 1 << 20;
/// Most pages in one Pages frame (1 MiB): big enough to amortise a frame, small enough that the
/// backup checks one frame while the next is on the wire.
pub const MAX_PAGES_PER_FRAME: u64 = 256;
/// Most pages (and so ranges) one RdmaPages descriptor names (16 MiB of ring): its frame stays
/// under 64 KiB, and the backup hashes one descriptor's pages in one pass.
pub const MAX_RDMA_PAGES_PER_FRAME: u64 = 4096;
/// Smallest RDMA staging ring a backup may grant (1 MiB).
pub const MIN_RDMA_RING_BYTES: u64 = 1 << 20;
/// Largest RDMA staging ring a backup may grant (16 GiB).
pub const MAX_RDMA_RING_BYTES: u64 = 16 << 30;

// A chunk always holds the largest guest frame with its length prefix, and the largest disk write
// with its entry; every chunk fits a frame.
const _: () = assert!(MAX_GUEST_FRAME + 4 <= MAX_CHUNK_BYTES);
const _: () = assert!(MAX_DISK_WRITE_BYTES + 24 <= MAX_CHUNK_BYTES);
const _: () = assert!(MAX_CHUNK_BYTES + 1024 <= MAX_FRAME_PAYLOAD as usize);
const _: () = assert!((MAX_PAGES_PER_FRAME as usize) * PAGE_SIZE + 4096 <= MAX_FRAME_PAYLOAD as usize);
const _: () = assert!(MAX_DISK_WRITE_BYTES.is_multiple_of(SECTOR_SIZE as usize));

/// Most CPUID feature words in a HostCpu payload (the comparison uses a dozen).
pub const MAX_CPU_WORDS: usize = 64;
/// Most MSR indices in a HostCpu payload (KVM's save list holds a few dozen to a few hundred).
pub const MAX_HOST_MSRS: usize = 1024;
