//! A TCP stream with one deadline for a whole exchange (a handshake, a first frame), not one per
//! read: a peer that sends a byte now and then cannot keep a connection in its handshake for ever.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// Reads and writes on `stream` that fail with [`io::ErrorKind::TimedOut`] once `deadline` passed.
#[derive(Debug)]
pub struct DeadlineStream<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> DeadlineStream<'a> {
    /// Every read and write on `stream` must be done by `deadline`.
    pub fn new(stream: &'a TcpStream, deadline: Instant) -> Self {
        Self { stream, deadline }
    }

    /// Sets the socket timeouts to what is left; an error once nothing is.
    fn arm(&self, write: bool) -> io::Result<()> {
        let left = self
            .deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "the exchange's deadline passed"))?;
        if write {
            self.stream.set_write_timeout(Some(left))
        } else {
            self.stream.set_read_timeout(Some(left))
        }
    }
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(false)?;
        (&*self.stream).read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(true)?;
        (&*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.stream).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_peer_that_dribbles_bytes_is_cut_off_at_the_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dribbler = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            // One byte every 50 ms for up to 2 s: each read alone would never time out.
            for _ in 0..40 {
                if s.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (s, _) = l.accept().unwrap();
        let started = Instant::now();
        let mut d = DeadlineStream::new(&s, Instant::now() + Duration::from_millis(300));
        let mut buf = [0u8; 100];
        let err = d.read_exact(&mut buf).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        drop(s);
        dribbler.join().unwrap();
    }
}
