//! Attaching an XDP program with a BPF link whose file descriptor we own.
//!
//! aya 0.13 keeps the link fd of an XDP attachment private. The heartbeat responder needs the fd
//! itself: a duplicate handed to the watchdog process keeps the program attached after the daemon
//! died (the link lives as long as any fd to it), so we create the link with `BPF_LINK_CREATE`
//! directly. The program itself is still loaded (and verified) by aya.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use aya::programs::Xdp;

/// `BPF_LINK_CREATE` from `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_XDP` from `enum bpf_attach_type`.
const BPF_XDP: u32 = 37;
/// `XDP_FLAGS_SKB_MODE` / `XDP_FLAGS_DRV_MODE` (include/uapi/linux/if_link.h).
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// How an XDP program runs on its interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (veth and TAP have it; the fast path).
    Driver,
    /// Generic XDP, after the skb is built (works everywhere, slower).
    Generic,
}

/// The `link_create` member of `union bpf_attr`, for an XDP target, followed by zeroes up to the
/// size the kernel checks (it refuses non-zero bytes it does not know).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 8],
}

/// Attaches `program` (loaded) to interface index `ifindex`: in driver mode if the interface
/// offers it, otherwise generic. The program stays attached while the returned fd (or a
/// duplicate of it, in any process) is open.
pub(crate) fn attach(program: &Xdp, ifindex: u32) -> io::Result<(OwnedFd, XdpMode)> {
    let prog_fd = program.fd().map_err(io::Error::other)?;
    let prog_fd = u32::try_from(prog_fd.as_fd().as_raw_fd()).map_err(io::Error::other)?;
    match link_create(prog_fd, ifindex, XDP_FLAGS_DRV_MODE) {
        Ok(fd) => Ok((fd, XdpMode::Driver)),
        Err(drv) => link_create(prog_fd, ifindex, XDP_FLAGS_SKB_MODE)
            .map(|fd| (fd, XdpMode::Generic))
            .map_err(|skb| io::Error::new(skb.kind(), format!("driver mode: {drv}; generic mode: {skb}"))),
    }
}

fn link_create(prog_fd: u32, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr { prog_fd, target_ifindex: ifindex, attach_type: BPF_XDP, flags, _rest: [0; 8] };
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` prefix of the size passed; the
    // kernel only reads it.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, &attr as *const LinkCreateAttr, std::mem::size_of::<LinkCreateAttr>())
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(rc).map_err(io::Error::other)?;
    // SAFETY: a successful BPF_LINK_CREATE returns a new file descriptor that nothing else owns
    // (the kernel sets O_CLOEXEC on it).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The index of interface `name` in the calling thread's network namespace.
pub(crate) fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}
