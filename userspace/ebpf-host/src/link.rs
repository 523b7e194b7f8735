//! Attaching programs with BPF links whose file descriptors we own: XDP (the gate's ingress half
//! and the heartbeat responder) and tcx egress (the gate's egress half).
//!
//! aya 0.13 keeps the link fds of its attachments private. We need the fds themselves: a
//! duplicate handed to the lease watchdog process keeps a program attached after the daemon died
//! (a link lives as long as any fd to it). That matters twice: the responder must keep answering
//! "daemon dead", and the gate must not be detached by the daemon's death, because that detach
//! runs under the kernel's rtnl lock for milliseconds (RCU synchronisation) exactly when the
//! backup takes over and opens its TAP, which needs the same lock. So we create the links with
//! `BPF_LINK_CREATE` directly. The programs themselves are still loaded (and verified) by aya.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use aya::programs::{ProgramError, ProgramFd, SchedClassifier, Xdp};

/// `BPF_LINK_CREATE` from `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_XDP` and `BPF_TCX_EGRESS` from `enum bpf_attach_type`.
const BPF_XDP: u32 = 37;
const BPF_TCX_EGRESS: u32 = 47;
/// `BPF_F_BEFORE` (include/uapi/linux/bpf.h): with no relative fd or id, "before every program
/// attached there", i.e. first (what aya's `LinkOrder::first()` sends).
const BPF_F_BEFORE: u32 = 1 << 3;
/// `XDP_FLAGS_SKB_MODE` / `XDP_FLAGS_DRV_MODE` (include/uapi/linux/if_link.h).
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// How an XDP program runs on its interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (the fast path; chosen where the driver has it, except on veth).
    Driver,
    /// Generic XDP, after the skb is built (works everywhere, slower).
    Generic,
}

/// The `link_create` member of `union bpf_attr` for a network device target, with its `tcx`
/// member (zero for XDP), followed by zeroes up to the size the kernel checks (it refuses
/// non-zero bytes it does not know).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    /// `tcx.relative_fd` (a union with `tcx.relative_id`).
    relative_fd: u32,
    _pad: u32,
    /// `tcx.expected_revision`: 0 attaches whatever the revision.
    expected_revision: u64,
    _rest: [u64; 6],
}

/// Attaches `program` (loaded) to interface `ifname` (index `ifindex`): in driver mode if the
/// interface offers it and it is not a veth, otherwise generic. The program stays attached while
/// the returned fd (or a duplicate of it, in any process) is open.
///
/// Why not driver mode on a veth: a veth whose end runs a driver-mode XDP program turns off
/// segmentation offload on its peer, so every TCP stream into it is cut into MSS-sized segments
/// (measured here: 64 KiB segments became 1448-byte ones, 658 → 290 MB/s), which doubled the
/// A-Link's epoch send time. Generic mode leaves the veth's offloads alone; a probe answered in
/// generic mode costs a microsecond more. Generic mode copies every skb that arrives cloned or in
/// pieces (each 64 KiB TCP segment of the A-Link) before the program sees it: into page-sized
/// pieces for a program that declares multi-buffer support (ours are all `#[xdp(frags)]`), into
/// one linear buffer (an order-5 atomic allocation, which can fail and drop the segment) for one
/// that does not.
pub(crate) fn attach_xdp(program: &Xdp, ifname: &str, ifindex: u32) -> io::Result<(OwnedFd, XdpMode)> {
    let prog_fd = raw_prog_fd(program.fd())?;
    let xdp = |flags| link_create(prog_fd, ifindex, BPF_XDP, flags);
    let generic = || xdp(XDP_FLAGS_SKB_MODE).map(|fd| (fd, XdpMode::Generic));
    if driver_name(ifname).is_ok_and(|d| d == "veth") {
        return generic();
    }
    match xdp(XDP_FLAGS_DRV_MODE) {
        Ok(fd) => Ok((fd, XdpMode::Driver)),
        Err(drv) => generic().map_err(|skb| io::Error::new(skb.kind(), format!("driver mode: {drv}; generic mode: {skb}"))),
    }
}

/// Attaches `program` (loaded) to the egress of interface `ifindex` through tcx, before every
/// program already there. The program stays attached while the returned fd (or a duplicate of
/// it, in any process) is open.
pub(crate) fn attach_tcx_egress_first(program: &SchedClassifier, ifindex: u32) -> io::Result<OwnedFd> {
    link_create(raw_prog_fd(program.fd())?, ifindex, BPF_TCX_EGRESS, BPF_F_BEFORE)
}

fn raw_prog_fd(fd: Result<&ProgramFd, ProgramError>) -> io::Result<u32> {
    let fd = fd.map_err(io::Error::other)?;
    u32::try_from(fd.as_fd().as_raw_fd()).map_err(io::Error::other)
}

/// `SIOCETHTOOL` and `ETHTOOL_GDRVINFO` (include/uapi/linux/sockios.h, ethtool.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 3;

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    counts: [u32; 5],
}

/// The driver of interface `name` in the calling thread's network namespace (`ethtool -i`).
pub(crate) fn driver_name(name: &str) -> io::Result<String> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: a plain datagram socket; the returned fd is owned right away.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` is a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    // SAFETY: an all-zero `ifreq` is valid (a name and a union of plain data).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL with a NUL-terminated name (checked length, zeroed tail) and a data
    // pointer to a live `ethtool_drvinfo` the kernel fills; both outlive the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &raw mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// `BPF_LINK_CREATE` of program `prog_fd` on interface `ifindex`. For tcx, `flags` place the
/// program relative to no particular program (`relative_fd` 0).
fn link_create(prog_fd: u32, ifindex: u32, attach_type: u32, flags: u32) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd,
        target_ifindex: ifindex,
        attach_type,
        flags,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
        _rest: [0; 6],
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_create_attribute_has_the_kernels_layout() {
        // Offsets of `union bpf_attr`'s `link_create` members (include/uapi/linux/bpf.h).
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, attach_type), 8);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, relative_fd), 16);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, expected_revision), 24);
        assert_eq!(std::mem::size_of::<LinkCreateAttr>(), 80);
    }

    #[test]
    fn the_driver_of_a_missing_or_overlong_interface_is_an_error() {
        assert!(driver_name("ftvm-no-such0").is_err());
        assert_eq!(driver_name("an-interface-name-too-long").unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
