//! TAP backend: a non-blocking `/dev/net/tun` fd in TAP mode with a 12-byte virtio-net header
//! on every frame (`IFF_VNET_HDR`), no packet-info prefix, and every offload off.
//!
//! A TAP created here is not persistent: it disappears when the fd is closed, on every exit
//! path of the process.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::handler::{FrameSink, FrameSource, VNET_HDR_LEN};

/// `struct ifreq` as the kernel reads it: the name, then a 24-byte union that each ioctl reads
/// as the type it needs (flags, a sockaddr). Plain bytes, so nothing is ever uninitialised.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    fn new(name: &str) -> Self {
        let mut req = Self { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        // `name` was validated: shorter than IFNAMSIZ, so a NUL terminator remains.
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn set_flags(&mut self, flags: i16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    /// Stores a `struct sockaddr_in` for `addr` (port 0).
    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }
}

/// Why a TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapOpenError {
    /// The name cannot be an interface name.
    #[error("invalid TAP name {name:?}: {reason}")]
    InvalidName {
        /// The refused name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// An interface with that name exists and is something else (`lo`, a bridge, a TUN).
    #[error("interface {name} exists and is not a TAP device")]
    NotTap {
        /// The interface name.
        name: String,
    },
    /// The TAP exists and another process has it open.
    #[error("TAP {name} is in use by another process")]
    Busy {
        /// The interface name.
        name: String,
    },
    /// `TUNSETIFF` failed (e.g. no CAP_NET_ADMIN).
    #[error("cannot create TAP {name}")]
    Create {
        /// The interface name.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// The TAP exists but refused the virtio-net header or offload settings.
    #[error("cannot configure TAP {name} ({what})")]
    Configure {
        /// The interface name.
        name: String,
        /// Which setting.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
}

/// Why a TAP could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum TapUpError {
    /// No socket to issue interface ioctls on.
    #[error("cannot open a socket to configure {name}")]
    Socket {
        /// The interface name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `SIOCGIFFLAGS`/`SIOCSIFFLAGS` failed.
    #[error("cannot bring {name} up")]
    SetFlags {
        /// The interface name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Why an IPv4 address could not be set on a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapAddressError {
    /// The prefix length is above 32.
    #[error("invalid prefix length /{prefix} for {addr}")]
    Prefix {
        /// The address.
        addr: Ipv4Addr,
        /// The refused prefix length.
        prefix: u8,
    },
    /// No socket to issue interface ioctls on.
    #[error("cannot open a socket to configure {name}")]
    Socket {
        /// The interface name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `SIOCSIFADDR` or `SIOCSIFNETMASK` failed.
    #[error("cannot set address {addr}/{prefix} on {name}")]
    Set {
        /// The interface name.
        name: String,
        /// The address.
        addr: Ipv4Addr,
        /// Prefix length.
        prefix: u8,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks what the kernel's `dev_valid_name` would refuse, so the operator gets a clear reason.
fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("reserved name");
    }
    if name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace()) {
        return Err("contains '/', ':', a NUL or white space");
    }
    Ok(())
}

/// True when an interface called `name` exists in this network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else { return false };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// An AF_INET datagram socket, the handle interface ioctls go through.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(fd, request, req)` for the ifreq-based requests.
fn ifreq_ioctl(fd: RawFd, request: libc::Ioctl, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every request passed here reads (and for SIOCGIFFLAGS writes) one `struct ifreq`,
    // which `IfReq` matches in size and layout; `req` is valid for the duration of the call.
    let r = unsafe { libc::ioctl(fd, request, req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `ioctl(fd, request, &value)` for the TUN requests that take an int.
fn int_ioctl(fd: RawFd, request: libc::Ioctl, value: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer; `value` lives through the call.
    let r = unsafe { libc::ioctl(fd, request, &value as *const libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens TAP `name`, creating it if it does not exist, with the virtio-net header on and
    /// offloads off. The fd is non-blocking.
    pub fn open(name: &str) -> Result<Self, TapOpenError> {
        validate_name(name)
            .map_err(|reason| TapOpenError::InvalidName { name: name.into(), reason })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapOpenError::OpenTun)?;
        let fd = file.as_raw_fd();
        let mut req = IfReq::new(name);
        req.set_flags((libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16);
        if let Err(source) = ifreq_ioctl(fd, libc::TUNSETIFF, &mut req) {
            // TUNSETIFF on an existing interface of another kind gives EINVAL; on a TAP that
            // another fd holds (single queue), EBUSY.
            return Err(match source.raw_os_error() {
                Some(libc::EINVAL) if interface_exists(name) => {
                    TapOpenError::NotTap { name: name.into() }
                }
                Some(libc::EBUSY) if interface_exists(name) => {
                    TapOpenError::Busy { name: name.into() }
                }
                _ => TapOpenError::Create { name: name.into(), source },
            });
        }
        let configure = |what, source| TapOpenError::Configure { name: name.into(), what, source };
        int_ioctl(fd, libc::TUNSETVNETHDRSZ, VNET_HDR_LEN as libc::c_int)
            .map_err(|e| configure("virtio-net header size", e))?;
        // No checksum or segmentation offload: the guest is offered none, so the TAP must hand
        // it complete, checksummed frames.
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if r < 0 {
            return Err(configure("offloads", io::Error::last_os_error()));
        }
        Ok(Self { file, name: name.into() })
    }

    /// A second handle on the same TAP queue (a dup of the fd): frames written through either
    /// go out in the order written. The TAP lives until every handle is closed.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { file: self.file.try_clone()?, name: self.name.clone() })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets IFF_UP on the interface.
    pub fn set_up(&self) -> Result<(), TapUpError> {
        let name = &self.name;
        let sock =
            inet_socket().map_err(|source| TapUpError::Socket { name: name.clone(), source })?;
        let set_flags = |source| TapUpError::SetFlags { name: name.clone(), source };
        let mut req = IfReq::new(name);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req).map_err(set_flags)?;
        let flags = req.flags() | libc::IFF_UP as i16;
        req.set_flags(flags);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req).map_err(set_flags)
    }

    /// Gives the interface the address `addr/prefix` (replacing its primary IPv4 address).
    pub fn set_ipv4(&self, addr: Ipv4Addr, prefix: u8) -> Result<(), TapAddressError> {
        if prefix > 32 {
            return Err(TapAddressError::Prefix { addr, prefix });
        }
        let name = &self.name;
        let sock = inet_socket()
            .map_err(|source| TapAddressError::Socket { name: name.clone(), source })?;
        let set = |source| TapAddressError::Set { name: name.clone(), addr, prefix, source };
        let mut req = IfReq::new(name);
        req.set_ipv4(addr);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &mut req).map_err(set)?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        req.set_ipv4(Ipv4Addr::from(mask));
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &mut req).map_err(set)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameSink for Tap {
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        loop {
            match (&self.file).write(frame) {
                // A TAP takes a frame whole or not at all.
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl FrameSource for Tap {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn names_the_kernel_would_refuse_are_refused_first() {
        for bad in ["", "a-name-that-is-too-long", "a/b", "a:b", "a b", ".", ".."] {
            let err = Tap::open(bad).unwrap_err();
            assert!(matches!(err, TapOpenError::InvalidName { .. }), "{bad:?}: {err}");
        }
        assert!(validate_name("ftvm0").is_ok());
        assert!(validate_name("fifteen-bytes-x").is_ok());
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Runs `f` on a thread that has its own, fresh network namespace, so the test touches
    /// nothing on the host and every interface it makes vanishes with the thread.
    fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace;
                // the thread ends when `f` returns.
                let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn ip(args: &[&str]) -> String {
        // A child forked from this thread runs in this thread's namespace.
        let out = Command::new("ip").args(args).output().expect("ip(8) is installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn creates_configures_and_removes_a_tap() {
        if !is_root() {
            eprintln!("skipped: needs root and CAP_NET_ADMIN");
            return;
        }
        let name = format!("ftvmt{}", std::process::id() % 10_000);
        in_fresh_netns(|| {
            {
                let tap = Tap::open(&name).unwrap();
                assert_eq!(tap.name(), name);
                tap.set_up().unwrap();
                tap.set_ipv4(Ipv4Addr::new(10, 77, 0, 1), 24).unwrap();
                let addrs = ip(&["-o", "addr", "show", "dev", &name]);
                assert!(addrs.contains("inet 10.77.0.1/24"), "{addrs}");
                let link = ip(&["-o", "link", "show", "dev", &name]);
                assert!(link.contains("UP"), "{link}");
                // A second open of the same (non-multiqueue) TAP is refused while held.
                let err = Tap::open(&name).unwrap_err();
                assert!(matches!(err, TapOpenError::Busy { .. }), "{err}");
                assert!(err.to_string().contains(&name));
                assert!(tap.set_ipv4(Ipv4Addr::new(10, 77, 0, 1), 33).is_err());
            }
            // Not persistent: closing the fd removed it.
            assert!(!interface_exists(&name));
        });
    }

    #[test]
    fn refuses_an_interface_that_is_not_a_tap() {
        if !is_root() {
            eprintln!("skipped: needs root and CAP_NET_ADMIN");
            return;
        }
        in_fresh_netns(|| {
            let err = Tap::open("lo").unwrap_err();
            assert_eq!(err.to_string(), "interface lo exists and is not a TAP device");
        });
    }

    #[test]
    fn frames_cross_the_tap() {
        if !is_root() {
            eprintln!("skipped: needs root and CAP_NET_ADMIN");
            return;
        }
        in_fresh_netns(|| {
            let mut tap = Tap::open("ftvmframes").unwrap();
            tap.set_up().unwrap();
            tap.set_ipv4(Ipv4Addr::new(10, 78, 0, 1), 24).unwrap();
            // Nothing to read yet: non-blocking.
            let mut buf = vec![0u8; 65_600];
            // The kernel may send IPv6 router solicitations etc.; drain whatever is there.
            while tap.recv_frame(&mut buf).is_ok() {}
            assert_eq!(tap.recv_frame(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
            // An ARP request from the "guest" for the host's address: the host answers.
            let mut frame = vec![0u8; VNET_HDR_LEN];
            let guest_mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&guest_mac);
            frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            frame.extend_from_slice(&guest_mac);
            frame.extend_from_slice(&[10, 78, 0, 2]);
            frame.extend_from_slice(&[0; 6]);
            frame.extend_from_slice(&[10, 78, 0, 1]);
            tap.send_frame(&frame).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match tap.recv_frame(&mut buf) {
                    Ok(n) => {
                        let eth = &buf[VNET_HDR_LEN..n];
                        if eth.len() >= 22
                            && eth[..6] == guest_mac
                            && eth[12..14] == [0x08, 0x06]
                            && eth[20..22] == [0, 2]
                        {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "no ARP reply");
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        });
    }
}
