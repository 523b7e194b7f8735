//! The backup's A-Link reads through io_uring: each read one `IORING_OP_RECV` linked to an
//! `IORING_OP_LINK_TIMEOUT`, submitted and waited for on the session's thread (the writer's
//! [`linked_round`], no runtime).
//!
//! **Timeouts.** io_uring does not look at `SO_RCVTIMEO` (it tries the socket without blocking,
//! then waits for it to be readable), so a read carries a linked timeout of the reader's read
//! timeout, and one that expires is `WouldBlock`, as a blocking `read` with `SO_RCVTIMEO` gives.
//! **Stopping.** A `shutdown` of the socket from another thread wakes a waiting receive, which
//! then ends with the end of the stream, as a blocking `read` does.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::register::Probe;
use io_uring::{opcode, types, IoUring};

use super::uring::linked_round;

/// One receive and its timeout at a time.
const RING_ENTRIES: u32 = 4;
/// Most receives in a row that end in `EINTR` or `EAGAIN` without a byte.
const MAX_RETRIES: u32 = 1000;

/// Reads a TCP socket through io_uring. See the module documentation.
pub struct UringReader {
    ring: IoUring,
    /// A handle on the socket every receive names: the fd stays open as long as the ring.
    stream: TcpStream,
    read_timeout: Option<Duration>,
    /// A failed enter may have left the ring holding a receive into a buffer gone since.
    broken: bool,
}

impl std::fmt::Debug for UringReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringReader").field("read_timeout", &self.read_timeout).field("broken", &self.broken).finish_non_exhaustive()
    }
}

impl UringReader {
    /// A ring reading `stream` (a handle of it is kept), with no read timeout; fails when the
    /// kernel lacks what this reader needs.
    pub fn new(stream: &TcpStream) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Recv::CODE, "IORING_OP_RECV (Linux 5.6)"),
            (opcode::LinkTimeout::CODE, "IORING_OP_LINK_TIMEOUT (Linux 5.5)"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, format!("this kernel's io_uring lacks {name}")));
            }
        }
        Ok(Self { ring, stream: stream.try_clone()?, read_timeout: None, broken: false })
    }

    /// Whether this kernel can read a socket through io_uring (a ring is made and dropped).
    pub fn supported() -> io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let stream = TcpStream::connect(listener.local_addr()?)?;
        Self::new(&stream).map(drop)
    }

    /// How long a read waits for data before it fails with `WouldBlock` (`None`: for ever).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout.filter(|t| !t.is_zero());
    }
}

impl Read for UringReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::other("the io_uring reader failed earlier"));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        for _ in 0..MAX_RETRIES {
            let recv = opcode::Recv::new(types::Fd(self.stream.as_raw_fd()), buf.as_mut_ptr(), len).build();
            // SAFETY: the receive writes at most `len` bytes into `buf`, which outlives the round
            // (it does not return before the receive's completion); the fd is `self.stream`'s,
            // open as long as the ring. Should entering the ring fail, the reader is marked broken
            // and never submits again; the kernel, which may still hold the receive, writes at
            // worst into a buffer of the dead session (its pool is dropped with the ring's owner).
            let round = unsafe { linked_round(&mut self.ring, recv, self.read_timeout, |_| {}) };
            let round = match round {
                Ok(r) => r,
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            };
            match round.result {
                // A non-negative i32 fits usize.
                n if n >= 0 => return Ok(n as usize),
                e if e == -libc::ECANCELED && round.timed_out => return Err(io::ErrorKind::WouldBlock.into()),
                e if e == -libc::EINTR || e == -libc::EAGAIN => continue,
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
        Err(io::Error::other("io_uring receive kept being interrupted"))
    }
}

/// The session's read side: the socket itself, or io_uring on it.
#[derive(Debug)]
pub enum LinkReader<'a> {
    /// Plain `read` on the blocking socket, with `SO_RCVTIMEO`.
    Socket(&'a TcpStream),
    /// io_uring ([`UringReader`]).
    Uring(Box<UringReader>),
}

impl LinkReader<'_> {
    /// Sets how long a read may wait (`SO_RCVTIMEO`, or the io_uring read's linked timeout).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Socket(s) => s.set_read_timeout(timeout),
            Self::Uring(u) => {
                u.set_read_timeout(timeout);
                Ok(())
            }
        }
    }
}

impl Read for LinkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Socket(s) => s.read(buf),
            Self::Uring(u) => u.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{Shutdown, TcpListener};
    use std::time::Instant;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn reads_what_was_sent_in_order_through_small_and_large_buffers() {
        let (mut client, server) = pair();
        let mut r = UringReader::new(&server).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            for chunk in sent.chunks(7000) {
                client.write_all(chunk).unwrap();
            }
            client
        });
        let mut got = Vec::new();
        let mut sizes = [1usize, 13, 4096, 65536].iter().cycle();
        while got.len() < data.len() {
            let mut buf = vec![0u8; *sizes.next().unwrap()];
            let n = r.read(&mut buf).unwrap();
            assert_ne!(n, 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == data);
        drop(writer.join().unwrap());
        // The peer closed: the end of the stream.
        assert_eq!(r.read(&mut [0u8; 16]).unwrap(), 0);
    }

    #[test]
    fn a_read_times_out_as_a_blocking_read_does() {
        let (_client, server) = pair();
        let mut r = UringReader::new(&server).unwrap();
        r.set_read_timeout(Some(Duration::from_millis(50)));
        let t = Instant::now();
        let e = r.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(t.elapsed() >= Duration::from_millis(45), "{:?}", t.elapsed());
        // The ring is clean: the next read gets data.
        let mut client = _client;
        client.write_all(b"late").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(r.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"late");
    }

    #[test]
    fn a_shutdown_from_another_thread_ends_a_waiting_read() {
        let (_client, server) = pair();
        let mut r = UringReader::new(&server).unwrap();
        let other = server.try_clone().unwrap();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            other.shutdown(Shutdown::Both).unwrap();
        });
        let t = Instant::now();
        assert_eq!(r.read(&mut [0u8; 16]).unwrap(), 0);
        assert!(t.elapsed() < Duration::from_secs(5));
        stopper.join().unwrap();
    }
}
