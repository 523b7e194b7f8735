//! How the primary's frames reach the A-Link socket: the one frame-writing path, and the choice of
//! system interface under it (`writev` on the blocking socket, or io_uring, optionally zero-copy).
//!
//! [`write_frame`] seals a frame and hands it down in batches of I/O vectors; a [`LinkWriter`]
//! puts each batch on the socket whole, or fails. Both writers send the same bytes: the wire does
//! not know which one the primary uses, so either pairs with any backup.

use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::time::Duration;

use ftvm_proto::frame::{FrameKind, FrameSealer, TAG_LEN};

use super::uring::UringSender;
use super::{ConnectError, LinkError};

/// Most I/O vectors per batch (the kernel takes up to 1024 per `writev` or `sendmsg`).
const BATCH_IOVS: usize = 256;
/// Bytes hashed, then written, per batch: small enough to still be in cache when the kernel copies.
const BATCH_BYTES: usize = 512 << 10;

/// How the primary writes to the A-Link socket. The bytes on the wire are the same either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkIo {
    /// `writev` on the blocking socket, with `SO_SNDTIMEO` as the write timeout: works everywhere.
    #[default]
    Socket,
    /// io_uring: one ring per link, one `IORING_OP_SENDMSG` per batch with a linked timeout.
    /// Needs Linux 5.11 or later (the link is refused at connect otherwise).
    Uring {
        /// Page payloads go as `IORING_OP_SENDMSG_ZC` (Linux 6.1): the kernel reads guest pages
        /// straight from guest memory instead of copying them into socket buffers, and `commit`
        /// then waits until the kernel no longer needs them (on a real network: until the backup's
        /// TCP acknowledges them). Over loopback the kernel copies anyway.
        zero_copy: bool,
    },
}

impl LinkIo {
    /// The name shown in status and logs: "socket", "io_uring" or "io_uring+zc".
    pub fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Uring { zero_copy: false } => "io_uring",
            Self::Uring { zero_copy: true } => "io_uring+zc",
        }
    }
}

/// The writing end of the link, as chosen by [`LinkIo`].
#[derive(Debug)]
pub(crate) enum LinkWriter {
    /// `writev` on (a duplicate of) the link's socket, which has the write timeout set.
    Socket(TcpStream),
    /// io_uring on (a duplicate of) the link's socket (boxed: the ring is large, and a
    /// transport's size should not depend on the writer it was not given).
    Uring(Box<UringSender>),
}

impl LinkWriter {
    /// A writer of kind `io` on `stream` (which the writer keeps open). io_uring writers check at
    /// once that the kernel has what they need.
    pub(crate) fn new(stream: TcpStream, io: LinkIo, write_timeout: Duration) -> Result<Self, ConnectError> {
        match io {
            LinkIo::Socket => Ok(Self::Socket(stream)),
            LinkIo::Uring { zero_copy } => Ok(Self::Uring(Box::new(UringSender::new(stream, zero_copy, write_timeout)?))),
        }
    }

    /// Which [`LinkIo`] this is, by name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Socket(_) => LinkIo::Socket.name(),
            Self::Uring(u) => LinkIo::Uring { zero_copy: u.zero_copy() }.name(),
        }
    }

    /// Writes every byte of `bufs`, or fails. `stable` indexes the slices that stay unchanged
    /// until the epoch's [`settle`](Self::settle) returns (guest pages, by the
    /// [`PageSource`](super::PageSource) invariant): only those may be left for the kernel to read
    /// after this call returns. The others are scratch the caller reuses at once.
    pub(crate) fn write_batch(&mut self, bufs: &mut [IoSlice<'_>], stable: Range<usize>) -> Result<(), LinkError> {
        match self {
            Self::Socket(stream) => write_all_vectored(stream, bufs),
            Self::Uring(u) => u.write_batch(bufs, stable),
        }
    }

    /// The link failed: stops waiting for what the kernel may still read (see
    /// [`UringSender::forsake`]).
    pub(crate) fn forsake(&mut self) {
        if let Self::Uring(u) = self {
            u.forsake();
        }
    }

    /// Returns once the kernel reads none of the buffers handed to [`write_batch`](Self::write_batch)
    /// any more (at once unless zero-copy sends are pending), or fails after the write timeout.
    pub(crate) fn settle(&mut self) -> Result<(), LinkError> {
        match self {
            Self::Socket(_) => Ok(()),
            Self::Uring(u) => u.settle(),
        }
    }
}

/// Writes every byte of `bufs`, or fails. Bounded: each round writes at least one byte or ends, and
/// interruptions by signals are retried a limited number of times.
fn write_all_vectored(stream: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> Result<(), LinkError> {
    IoSlice::advance_slices(&mut bufs, 0);
    let mut interrupts = 0;
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(LinkError::Write(io::ErrorKind::WriteZero.into())),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupts < 1000 => interrupts += 1,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(LinkError::WriteTimedOut)
            }
            Err(e) => return Err(LinkError::Write(e)),
        }
    }
    Ok(())
}

/// Seals and writes one frame whose payload is `head` then `pieces`, in batches that are hashed
/// just before they are written. Returns the frame's tag.
///
/// `stable_pieces`: the pieces are guest pages under the [`PageSource`](super::PageSource)
/// invariant (unchanged until the epoch's commit returns), so a zero-copy writer may leave them to
/// the kernel past this call. Header, head and tag are always scratch.
pub(crate) fn write_frame(
    writer: &mut LinkWriter,
    sealer: &mut FrameSealer,
    kind: FrameKind,
    epoch: u64,
    head: &[u8],
    pieces: &[&[u8]],
    stable_pieces: bool,
) -> Result<[u8; TAG_LEN], LinkError> {
    let len: usize = head.len() + pieces.iter().map(|p| p.len()).sum::<usize>();
    // Our frames are bounded by construction (MAX_CHUNK_BYTES, MAX_PAGES_PER_FRAME); a failure here
    // would be a bug, reported as a broken link rather than a panic.
    let too_large = || LinkError::Write(io::Error::new(io::ErrorKind::InvalidInput, "frame over the payload limit"));
    let mut frame = sealer.start(kind, 0, epoch, len).map_err(|_| too_large())?;
    let header = *frame.header();
    let mut batch: Vec<IoSlice<'_>> = Vec::with_capacity(BATCH_IOVS.min(pieces.len()) + 3);
    batch.push(IoSlice::new(&header));
    frame.update(head);
    batch.push(IoSlice::new(head));
    // The batch's pieces start after the header and the head in the first batch, at 0 after.
    let mut first_piece = batch.len();
    let stable = |from: usize, to: usize| if stable_pieces { from..to } else { 0..0 };
    let mut batch_bytes = head.len();
    for p in pieces {
        frame.update(p);
        batch.push(IoSlice::new(p));
        batch_bytes += p.len();
        if batch.len() >= BATCH_IOVS || batch_bytes >= BATCH_BYTES {
            let end = batch.len();
            writer.write_batch(&mut batch, stable(first_piece, end))?;
            batch.clear();
            batch_bytes = 0;
            first_piece = 0;
        }
    }
    let tag = frame.finish().map_err(|_| too_large())?;
    let end = batch.len();
    batch.push(IoSlice::new(&tag));
    writer.write_batch(&mut batch, stable(first_piece, end))?;
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_proto::frame::FrameOpener;

    /// Every writer: more pieces and bytes than one batch, with empty pieces among them, arrive as
    /// one frame that opens normally.
    #[test]
    fn frames_written_in_batches_open_normally() {
        for io in [LinkIo::Socket, LinkIo::Uring { zero_copy: false }, LinkIo::Uring { zero_copy: true }] {
            for stable in [false, true] {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let t = std::thread::spawn(move || {
                    let (mut s, _) = listener.accept().unwrap();
                    let mut o = FrameOpener::new([3; 32]);
                    let f = o.read(&mut s).unwrap();
                    (f.header.kind, f.payload)
                });
                let stream = TcpStream::connect(addr).unwrap();
                stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut writer = LinkWriter::new(stream, io, Duration::from_secs(5)).unwrap();
                assert_eq!(writer.name(), io.name());
                let mut sealer = FrameSealer::new([3; 32]);
                let pages: Vec<Vec<u8>> = (0..600).map(|i| vec![i as u8; if i % 7 == 0 { 0 } else { 4096 }]).collect();
                let pieces: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
                let tag = write_frame(&mut writer, &mut sealer, FrameKind::Pages, 4, b"head", &pieces, stable).unwrap();
                writer.settle().unwrap();
                let (kind, payload) = t.join().unwrap();
                assert_eq!(kind, FrameKind::Pages, "{io:?}");
                assert!(payload == [b"head".to_vec(), pages.concat()].concat(), "{io:?} stable {stable}");
                assert_ne!(tag, [0; TAG_LEN]);
            }
        }
    }
}
