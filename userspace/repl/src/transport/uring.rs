//! The io_uring writer of the A-Link: one ring per link, each batch of I/O vectors one
//! `IORING_OP_SENDMSG` (or `IORING_OP_SENDMSG_ZC`) linked to an `IORING_OP_LINK_TIMEOUT`,
//! submitted and waited for on the sending thread, with no runtime (as STYLE.md asks: the io-uring
//! crate on our own thread, tokio-uring's ownership rules).
//!
//! **Timeouts.** io_uring does not look at `SO_SNDTIMEO` (it tries the socket without blocking,
//! then waits for it to be writable), so every send carries a linked timeout of the link's write
//! timeout: a backup that stops reading cancels the send after that long, as a blocking `writev`
//! would time out. Like `SO_SNDTIMEO`, the timeout is per send: a send that moves some bytes ends
//! there (short send), and the rest goes with a fresh timeout.
//!
//! **Zero copy.** With `SENDMSG_ZC` the kernel may read the buffers after the send's completion,
//! until a second completion (flag `IORING_CQE_F_NOTIF`) says it is done with them. Guest pages
//! are left to it: the engine keeps them unchanged until `commit` returns (the
//! [`PageSource`](super::PageSource) invariant), and `commit` [settles](UringSender::settle): it
//! waits for every notification pending. The other buffers of a batch (frame header, list head,
//! tag) are the caller's scratch, reused at once: they are copied into buffers this writer keeps
//! until the notifications arrive. Copying a few dozen bytes per frame is simpler than the
//! alternative, sending scratch with plain `SENDMSG` and the pages with `SENDMSG_ZC`, which needs
//! up to three ordered sends per batch, and a short send of one breaks a chain of linked sends.

use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::register::Probe;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{ConnectError, LinkError};

/// `user_data` of the operation of a round (and of its notification, told apart by its flag).
const OP: u64 = 1;
/// `user_data` of the linked timeout of a round.
const TIMEOUT: u64 = 2;
/// Send ioprio flag `IORING_RECVSEND_POLL_FIRST`: wait for room before trying (after `EAGAIN`).
const RECVSEND_POLL_FIRST: u16 = 1;
/// Send ioprio flag `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the kernel copied.
const SEND_ZC_REPORT_USAGE: u16 = 8;
/// In a notification's result with `SEND_ZC_REPORT_USAGE`: the data was copied after all.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// Two entries per round (send, timeout), one round at a time: a small ring is enough.
/// Notifications beyond the completion queue's room wait in the kernel's overflow list
/// (`IORING_FEAT_NODROP`, checked at creation), and every wait flushes it.
const RING_ENTRIES: u32 = 8;
/// Most rounds in a row that end in `EINTR` or `EAGAIN` without moving a byte.
const MAX_RETRIES: u32 = 1000;

/// Sends batches of I/O vectors on a TCP socket through io_uring. See the module documentation.
pub(crate) struct UringSender {
    ring: IoUring,
    /// The socket every send names: owned here, so it stays open as long as the ring can use it.
    stream: TcpStream,
    zero_copy: bool,
    write_timeout: Duration,
    /// Zero-copy sends whose notification has not arrived (signed: a notification may be reaped
    /// in the same pass as, and before, the completion that announces it).
    notifs_pending: i64,
    /// Copies of scratch buffers sent zero-copy; dropped once no notification is pending.
    kept: Vec<Box<[u8]>>,
    /// A submission failed in a way that may leave the ring holding work: no more sends.
    broken: bool,
    /// Whether the kernel was seen copying "zero-copy" sends (loopback, no scatter-gather NIC).
    copy_reported: bool,
    /// Sends that moved only part of what they were given (for logs and tests).
    short_sends: u64,
}

impl std::fmt::Debug for UringSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringSender")
            .field("zero_copy", &self.zero_copy)
            .field("notifs_pending", &self.notifs_pending)
            .field("kept", &self.kept.len())
            .field("broken", &self.broken)
            .field("short_sends", &self.short_sends)
            .finish_non_exhaustive()
    }
}

/// What one round's completions said.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Round {
    /// The operation's result: bytes moved, or a negative errno.
    pub(crate) result: i32,
    /// Its completion's flags.
    pub(crate) flags: u32,
    /// Whether the linked timeout expired (rather than being cancelled by the completion).
    pub(crate) timed_out: bool,
}

/// Submits `op` (its `user_data` is set here), linked to a timeout of `timeout` if given, and
/// waits until both have completed, so that nothing the operation reads or writes is in use when
/// this returns. Every other completion (a zero-copy notification) goes to `other`. Interruptions
/// by signals are waited through; any other failure to enter the ring is returned, and the ring
/// may then hold the operation: its owner must not use it again.
///
/// # Safety
/// Whatever `op` points to (buffers, message headers, the fd) must stay valid until this returns,
/// and, when it fails, until the ring is dropped.
pub(crate) unsafe fn linked_round(
    ring: &mut IoUring,
    op: squeue::Entry,
    timeout: Option<Duration>,
    mut other: impl FnMut(&cqueue::Entry),
) -> io::Result<Round> {
    let ts = types::Timespec::from(timeout.unwrap_or_default());
    let pushed = match timeout {
        Some(_) => {
            let entries =
                [op.flags(squeue::Flags::IO_LINK).user_data(OP), opcode::LinkTimeout::new(&ts).build().user_data(TIMEOUT)];
            // SAFETY: the caller keeps what `op` points to valid; the timeout reads `ts`, which
            // lives until both completions are reaped below.
            unsafe { ring.submission().push_multiple(&entries) }
        }
        // SAFETY: as above, without a timeout.
        None => unsafe { ring.submission().push(&op.user_data(OP)) },
    };
    // Each round waits for its own completions, so the queue is empty here.
    if pushed.is_err() {
        return Err(io::Error::other("io_uring submission queue full"));
    }
    let mut done = None;
    let mut timer = timeout.is_none().then_some(0);
    loop {
        for cqe in ring.completion() {
            if cqueue::notif(cqe.flags()) {
                other(&cqe);
            } else if cqe.user_data() == OP {
                done = Some((cqe.result(), cqe.flags()));
            } else if cqe.user_data() == TIMEOUT {
                timer = Some(cqe.result());
            } else {
                other(&cqe);
            }
        }
        if let (Some((result, flags)), Some(timer)) = (done, timer) {
            return Ok(Round { result, flags, timed_out: timer == -libc::ETIME });
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            // EBUSY: completions in the overflow list; reaping makes room, and the next enter
            // flushes them.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
    }
}

impl UringSender {
    /// A ring for `stream`; fails when the kernel lacks an operation or feature this writer needs.
    pub(crate) fn new(stream: TcpStream, zero_copy: bool, write_timeout: Duration) -> Result<Self, ConnectError> {
        let ring = IoUring::new(RING_ENTRIES).map_err(ConnectError::Uring)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(ConnectError::Uring)?;
        let mut needed = vec![
            (opcode::SendMsg::CODE, "IORING_OP_SENDMSG (Linux 5.3)"),
            (opcode::LinkTimeout::CODE, "IORING_OP_LINK_TIMEOUT (Linux 5.5)"),
        ];
        if zero_copy {
            needed.push((opcode::SendMsgZc::CODE, "IORING_OP_SENDMSG_ZC (zero-copy sends, Linux 6.1)"));
        }
        if let Some((_, name)) = needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
            return Err(ConnectError::UringUnsupported(name));
        }
        if !ring.params().is_feature_nodrop() {
            return Err(ConnectError::UringUnsupported("IORING_FEAT_NODROP (Linux 5.5)"));
        }
        if !ring.params().is_feature_ext_arg() {
            return Err(ConnectError::UringUnsupported("IORING_FEAT_EXT_ARG (timed waits, Linux 5.11)"));
        }
        Ok(Self {
            ring,
            stream,
            zero_copy,
            write_timeout: write_timeout.max(Duration::from_millis(1)),
            notifs_pending: 0,
            kept: Vec::new(),
            broken: false,
            copy_reported: false,
            short_sends: 0,
        })
    }

    /// Whether page payloads go zero-copy.
    pub(crate) fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// Writes every byte of `bufs`, or fails; see [`LinkWriter::write_batch`](super::writer::LinkWriter::write_batch)
    /// for `stable`. Sends the batch as one operation, then the rest of it after a short send.
    pub(crate) fn write_batch(&mut self, bufs: &[IoSlice<'_>], stable: Range<usize>) -> Result<(), LinkError> {
        if self.broken {
            return Err(LinkError::Write(io::Error::other("the io_uring writer failed earlier")));
        }
        let zero_copy = self.zero_copy && !stable.is_empty();
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(bufs.len());
        for (i, b) in bufs.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
            let bytes: &[u8] = if zero_copy && !stable.contains(&i) {
                // Scratch, sent zero-copy: the kernel reads the copy, kept until its notification.
                // Moving the Box into `kept` does not move its heap bytes.
                self.kept.push(Box::from(&b[..]));
                self.kept.last().map_or(&[][..], |k| &k[..])
            } else {
                b
            };
            iovs.push(libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() });
        }
        let mut from = 0;
        let mut retries = 0;
        let mut poll_first = false;
        while from < iovs.len() {
            let round = self.round(&mut iovs[from..], zero_copy, poll_first)?;
            poll_first = false;
            match round.result {
                n if n > 0 => {
                    // A positive i32 fits usize.
                    from += advance(&mut iovs[from..], n as usize);
                    if from < iovs.len() {
                        self.short_sends += 1;
                    }
                    retries = 0;
                }
                0 => return Err(LinkError::Write(io::ErrorKind::WriteZero.into())),
                e if e == -libc::ECANCELED && round.timed_out => return Err(LinkError::WriteTimedOut),
                e if (e == -libc::EINTR || e == -libc::EAGAIN) && retries < MAX_RETRIES => {
                    retries += 1;
                    // EAGAIN: the socket is full; the retry waits for room (under its timeout).
                    poll_first = e == -libc::EAGAIN;
                }
                e => return Err(LinkError::Write(io::Error::from_raw_os_error(-e))),
            }
        }
        self.release_kept();
        Ok(())
    }

    /// One send of `iovs` with its linked timeout ([`linked_round`]).
    fn round(&mut self, iovs: &mut [libc::iovec], zero_copy: bool, poll_first: bool) -> Result<Round, LinkError> {
        // SAFETY: an all-zero msghdr is valid: no name, no control data, no I/O vectors (they are
        // set just below), no flags.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        // The batch has at most a few hundred vectors (BATCH_IOVS + 3).
        msg.msg_iovlen = iovs.len() as _;
        let fd = types::Fd(self.stream.as_raw_fd());
        let ioprio = if poll_first { RECVSEND_POLL_FIRST } else { 0 };
        // MSG_NOSIGNAL: a reset connection is an error of this call, not a SIGPIPE.
        let flags = libc::MSG_NOSIGNAL as u32;
        let send = if zero_copy {
            opcode::SendMsgZc::new(fd, &msg).ioprio(ioprio | SEND_ZC_REPORT_USAGE).flags(flags).build()
        } else {
            opcode::SendMsg::new(fd, &msg).ioprio(ioprio).flags(flags).build()
        };
        let (notifs_pending, copy_reported) = (&mut self.notifs_pending, &mut self.copy_reported);
        // SAFETY: the send reads `msg`, the vectors `iovs` it points to, and the bytes those point
        // to. All of them outlive the operation: `linked_round` does not return until its
        // completion is reaped. The one exception is an io_uring_enter that fails for another
        // reason than a signal or a full completion queue, which no correct ring meets: the writer
        // is then broken for good and the link failed, and the kernel, which copied `msg` and
        // `iovs` when it took the entry, reads at worst stale bytes for a dead connection. The
        // bytes behind the vectors belong to the caller's batch, which outlives this call, except
        // with zero copy, where the kernel may read them until the send's notification: then they
        // are guest pages, unchanged until the epoch's commit returns and commit settles every
        // notification first, or copies in `self.kept`, dropped only once no notification is
        // pending. The fd is `self.stream`, open as long as the ring.
        let round = unsafe {
            linked_round(&mut self.ring, send, Some(self.write_timeout), |cqe| {
                *notifs_pending -= 1;
                // The result is unsigned flags here; the cast keeps the bits.
                if (cqe.result() as u32) & NOTIF_USAGE_ZC_COPIED != 0 && !*copy_reported {
                    *copy_reported = true;
                    tracing::debug!("the kernel copies the A-Link's zero-copy sends (loopback, or no scatter-gather on the device)");
                }
            })
        };
        match round {
            Ok(r) => {
                if cqueue::more(r.flags) {
                    self.notifs_pending += 1;
                }
                Ok(r)
            }
            Err(e) => {
                self.broken = true;
                Err(LinkError::Write(e))
            }
        }
    }

    /// Submits what is queued and waits for a completion, or until `timeout`. Interruptions by
    /// signals and a timeout are not errors (the caller looks at the completions and its clock);
    /// any other error marks the writer broken: the kernel may hold work it will never finish.
    fn enter(&mut self, timeout: Option<Duration>) -> Result<(), LinkError> {
        let r = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                self.ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME)) => Ok(()),
            // EBUSY: completions in the overflow list; reaping makes room, and the next enter
            // flushes them.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => {
                self.broken = true;
                Err(LinkError::Write(e))
            }
        }
    }

    /// Takes every completion posted: only notifications are expected between rounds.
    fn reap_notifications(&mut self) {
        for cqe in self.ring.completion() {
            if cqueue::notif(cqe.flags()) {
                self.notifs_pending -= 1;
            }
        }
    }

    /// Drops the scratch copies once the kernel needs none of them.
    fn release_kept(&mut self) {
        if self.notifs_pending <= 0 && !self.kept.is_empty() {
            self.kept.clear();
        }
    }

    /// Waits until every zero-copy send's notification has arrived: the kernel reads none of the
    /// buffers sent any more. Fails after the write timeout (the backup's TCP acknowledges
    /// nothing: the kernel frees a sent buffer only once the peer has acknowledged its bytes).
    pub(crate) fn settle(&mut self) -> Result<(), LinkError> {
        let deadline = Instant::now() + self.write_timeout;
        loop {
            self.reap_notifications();
            if self.notifs_pending <= 0 {
                self.release_kept();
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::WriteTimedOut);
            }
            self.enter(Some(left))?;
        }
    }

    /// The link failed: nothing sent is waited for any more. Scratch copies the kernel may still
    /// read are leaked, not freed, so that no later heap contents can go out on the wire.
    pub(crate) fn forsake(&mut self) {
        self.reap_notifications();
        if self.notifs_pending > 0 {
            std::mem::forget(std::mem::take(&mut self.kept));
            self.notifs_pending = 0;
        }
        self.release_kept();
    }
}

impl Drop for UringSender {
    /// Gives the kernel the write timeout to finish with what was sent zero-copy (an epoch begun
    /// and never committed), then forsakes the rest. Rounds never outlive their call, so the ring
    /// holds no send when it closes.
    fn drop(&mut self) {
        if self.notifs_pending > 0 && !self.broken {
            let _ = self.settle();
        }
        self.forsake();
    }
}

/// Moves the start of `iovs` past `n` bytes sent: returns how many vectors are done, and shortens
/// the first one not done.
fn advance(iovs: &mut [libc::iovec], mut n: usize) -> usize {
    let mut done = 0;
    for v in iovs.iter_mut() {
        if n < v.iov_len {
            // SAFETY: `n` is less than the vector's length, so the new base stays inside the same
            // buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            return done;
        }
        n -= v.iov_len;
        done += 1;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn pair(sndbuf: Option<libc::c_int>) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        if let Some(bytes) = sndbuf {
            // SAFETY: the fd is the open socket `client`; the value is a c_int living across the
            // call, with its size.
            let r = unsafe {
                libc::setsockopt(
                    client.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&bytes as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0);
        }
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn advancing_past_sent_bytes_shortens_the_vectors() {
        let (a, b) = ([1u8; 10], [2u8; 10]);
        let mut v = [
            libc::iovec { iov_base: a.as_ptr().cast_mut().cast(), iov_len: 10 },
            libc::iovec { iov_base: b.as_ptr().cast_mut().cast(), iov_len: 10 },
        ];
        assert_eq!(advance(&mut v, 13), 1);
        assert_eq!(v[1].iov_len, 7);
        // SAFETY: `v[1]` points 3 bytes into `b`, 7 bytes left.
        assert_eq!(unsafe { std::slice::from_raw_parts(v[1].iov_base.cast::<u8>(), 7) }, &[2u8; 7]);
        assert_eq!(advance(&mut v[1..], 7), 1);
    }

    /// A small send buffer and a reader that takes its time: sends come back short, and the rest
    /// goes after them until every byte arrived, in order.
    #[test]
    fn short_sends_are_completed() {
        for zero_copy in [false, true] {
            let (client, mut server) = pair(Some(4096));
            let mut sender = UringSender::new(client, zero_copy, Duration::from_secs(5)).unwrap();
            let data: Vec<Vec<u8>> = (0..64u32).map(|i| (0..16384u32).map(|b| (b ^ i.wrapping_mul(7)) as u8).collect()).collect();
            let total: usize = data.iter().map(Vec::len).sum();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 3000];
                while got.len() < total {
                    std::thread::sleep(Duration::from_micros(200));
                    let n = server.read(&mut buf).unwrap();
                    assert_ne!(n, 0);
                    got.extend_from_slice(&buf[..n]);
                }
                got
            });
            let mut header = *b"header!!";
            let slices: Vec<IoSlice<'_>> =
                std::iter::once(IoSlice::new(&header)).chain(data.iter().map(|d| IoSlice::new(d))).collect();
            sender.write_batch(&slices, 1..slices.len()).unwrap();
            drop(slices);
            // The scratch may be reused at once: the kernel reads a copy.
            header.fill(0);
            sender.settle().unwrap();
            assert!(sender.notifs_pending <= 0);
            let got = reader.join().unwrap();
            let want = [b"header!!".to_vec(), data.concat()].concat();
            assert!(got == want, "zero_copy {zero_copy}: {} bytes of {}", got.len(), want.len());
            assert!(sender.short_sends > 0, "zero_copy {zero_copy}: no short send was provoked");
        }
    }

    /// The peer never reads: the send is cancelled by its linked timeout, not left hanging.
    #[test]
    fn a_peer_that_does_not_read_times_the_send_out() {
        for zero_copy in [false, true] {
            let (client, server) = pair(Some(4096));
            let mut sender = UringSender::new(client, zero_copy, Duration::from_millis(200)).unwrap();
            let data = vec![7u8; 8 << 20];
            let started = Instant::now();
            let err = sender.write_batch(&[IoSlice::new(&data)], 0..1).unwrap_err();
            let took = started.elapsed();
            assert!(matches!(err, LinkError::WriteTimedOut), "{err}");
            assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3), "{took:?}");
            sender.forsake();
            drop(server);
        }
    }

    /// A peer that is gone: the send fails with the socket's error.
    #[test]
    fn a_reset_connection_fails_the_send() {
        let (client, server) = pair(None);
        // SO_LINGER 0: closing resets the connection.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: the fd is the open socket `server`; the value lives across the call, with its size.
        let r = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        drop(server);
        let mut sender = UringSender::new(client, false, Duration::from_secs(1)).unwrap();
        let data = vec![1u8; 1 << 16];
        let err = (0..100).find_map(|_| sender.write_batch(&[IoSlice::new(&data)], 0..0).err()).unwrap();
        assert!(matches!(&err, LinkError::Write(e) if matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE))), "{err:?}");
    }
}
