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

/// Userspace-only trait implementations (`user` feature).
#[cfg(feature = "user")]
pub mod user {
    // `unsafe impl aya::Pod for <map type> {}` goes here for each `#[repr(C)]` map type above.
    // The probe counters are plain `u64`, which aya already treats as `Pod`.
}
