//! One client connection: received bytes in, commands executed, replies out, in order.
//!
//! Every reply is tagged with the log sequence number current when it was produced
//! ([`Engine::tag`]) and may be sent only once the log is durable up to that number. A reply to a
//! write therefore waits for its own record; a reply to a read that saw a not-yet-durable write
//! (of any connection) waits for that write too; a reply with nothing pending goes at once. Tags
//! only grow, so the sendable part of the output is always a prefix.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::engine::{Engine, Outcome};
use crate::resp::{self, Parsed, Parser};

/// Commands stop being executed while this much output is waiting (the client is not reading,
/// or the log is slow): back-pressure instead of unbounded memory.
pub const OUT_HIGH_WATER: usize = 256 * 1024;
/// Input stops being taken from the socket while this much is buffered and unparsed.
pub const IN_HIGH_WATER: usize = 64 * 1024;

/// The state of one client connection.
#[derive(Debug, Default)]
pub struct Conn {
    parser: Parser,
    out: Vec<u8>,
    /// Bytes of `out` already handed to the socket.
    sent: usize,
    /// Bytes of `out` that may be handed to the socket.
    released: usize,
    /// (tag, end offset in `out`) of replies not released yet, oldest first.
    marks: VecDeque<(u64, usize)>,
    closing: bool,
}

impl Conn {
    /// A fresh connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when the connection should take more input from its socket now.
    pub fn wants_input(&self) -> bool {
        !self.closing
            && self.parser.buffered() < IN_HIGH_WATER
            && self.pending_out() < OUT_HIGH_WATER
    }

    /// Adds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        if !self.closing {
            self.parser.feed(data);
        }
    }

    /// Bytes received and not parsed yet.
    pub fn buffered_input(&self) -> usize {
        self.parser.buffered()
    }

    /// Executes every complete command received (until the output high-water mark), then
    /// releases what is durable. Returns the number of commands and protocol errors handled.
    pub fn process(&mut self, engine: &mut Engine) -> usize {
        let mut n = 0;
        while !self.closing && self.pending_out() < OUT_HIGH_WATER {
            match self.parser.parse_next() {
                Some(Parsed::Command(args)) => {
                    if engine.execute(args, &mut self.out) == Outcome::Close {
                        self.closing = true;
                    }
                }
                Some(Parsed::Error(msg)) => resp::error(&mut self.out, &msg),
                None => break,
            }
            n += 1;
            self.mark(engine.tag());
        }
        self.release(engine.durable());
        n
    }

    fn mark(&mut self, tag: u64) {
        let end = self.out.len();
        match self.marks.back_mut() {
            Some(last) if last.0 == tag => last.1 = end,
            _ => self.marks.push_back((tag, end)),
        }
    }

    /// Releases the replies whose tags are durable. True if anything new became sendable.
    pub fn release(&mut self, durable: u64) -> bool {
        let before = self.released;
        while let Some(&(tag, end)) = self.marks.front() {
            if tag > durable {
                break;
            }
            self.released = end;
            self.marks.pop_front();
        }
        self.released != before
    }

    /// Output that may be sent now.
    pub fn sendable(&self) -> &[u8] {
        &self.out[self.sent..self.released]
    }

    /// The socket took `n` bytes of [`Conn::sendable`].
    pub fn sent(&mut self, n: usize) {
        self.sent += n.min(self.released - self.sent);
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
            self.released = 0;
            if self.out.capacity() > 1 << 20 {
                self.out = Vec::new();
            }
        } else if self.sent > 64 * 1024 && self.sent * 2 > self.out.len() {
            let s = self.sent;
            self.out.drain(..s);
            self.released -= s;
            for m in self.marks.iter_mut() {
                m.1 -= s;
            }
            self.sent = 0;
        }
    }

    /// Heap bytes this connection holds (input, command being assembled, output).
    pub fn memory(&self) -> usize {
        self.parser.memory() + self.out.capacity()
    }

    /// Output produced and not sent yet (released or not).
    pub fn pending_out(&self) -> usize {
        self.out.len() - self.sent
    }

    /// True when replies are waiting for the log.
    pub fn waiting_for_log(&self) -> bool {
        !self.marks.is_empty()
    }

    /// The client asked to quit: no more input is processed.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// True when the client quit and every reply has been handed to the socket.
    pub fn finished(&self) -> bool {
        self.closing && self.pending_out() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aof::DiskOp;
    use crate::rewrite::Aof;
    use alloc::vec;

    fn logged_engine() -> Engine {
        Engine::new(Aof::blank(1 << 20, true))
    }

    /// Completes every pending disk request.
    fn commit(e: &mut Engine) {
        while let Some((tag, op)) = e.log.next_op() {
            e.log.op_done(tag, op, true);
        }
    }

    fn drain(c: &mut Conn) -> Vec<u8> {
        let v = c.sendable().to_vec();
        c.sent(v.len());
        v
    }

    #[test]
    fn reads_go_at_once_writes_wait_for_the_log() {
        let mut e = logged_engine();
        let mut c = Conn::new();
        c.feed(b"PING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        assert_eq!(c.process(&mut e), 3);
        assert_eq!(
            drain(&mut c),
            b"+PONG\r\n",
            "the SET and the GET after it wait"
        );
        assert!(c.waiting_for_log());
        // The write is submitted: still not durable.
        let Some((tag, op @ DiskOp::Write { .. })) = e.log.next_op() else {
            panic!()
        };
        e.log.op_done(tag, op, true);
        assert!(!c.release(e.durable()));
        let Some((tag, DiskOp::Flush)) = e.log.next_op() else {
            panic!()
        };
        e.log.op_done(tag, DiskOp::Flush, true);
        assert!(c.release(e.durable()));
        assert_eq!(drain(&mut c), b"+OK\r\n$1\r\nv\r\n");
        assert!(!c.waiting_for_log());
    }

    #[test]
    fn a_read_that_saw_another_connections_write_waits_for_it() {
        let mut e = logged_engine();
        let mut writer = Conn::new();
        let mut reader = Conn::new();
        writer.feed(b"SET k v\r\n");
        writer.process(&mut e);
        reader.feed(b"GET k\r\n");
        reader.process(&mut e);
        assert_eq!(reader.sendable(), b"");
        commit(&mut e);
        reader.release(e.durable());
        writer.release(e.durable());
        assert_eq!(drain(&mut reader), b"$1\r\nv\r\n");
        assert_eq!(drain(&mut writer), b"+OK\r\n");
    }

    #[test]
    fn pipelined_replies_stay_in_order_across_commits() {
        let mut e = logged_engine();
        let mut c = Conn::new();
        let mut got = Vec::new();
        for i in 0..50 {
            c.feed(b"INCR n\r\nGET n\r\n");
            c.process(&mut e);
            if i % 3 == 0 {
                commit(&mut e);
                c.release(e.durable());
            }
            got.extend(drain(&mut c));
        }
        commit(&mut e);
        c.release(e.durable());
        got.extend(drain(&mut c));
        let mut expect = Vec::new();
        for i in 1..=50 {
            resp::integer(&mut expect, i);
            let s = std::format!("{i}");
            resp::bulk(&mut expect, s.as_bytes());
        }
        assert_eq!(got, expect);
    }

    #[test]
    fn protocol_errors_are_replies_in_sequence() {
        let mut e = logged_engine();
        let mut c = Conn::new();
        c.feed(b"*abc\r\nPING\r\n*1\r\n$-5\r\nPING\r\n");
        assert_eq!(c.process(&mut e), 4);
        let out = drain(&mut c);
        assert_eq!(
            out,
            b"-ERR Protocol error: invalid multibulk length\r\n+PONG\r\n-ERR Protocol error: invalid bulk length\r\n+PONG\r\n"
        );
    }

    #[test]
    fn quit_stops_input_and_finishes_after_output() {
        let mut e = logged_engine();
        let mut c = Conn::new();
        c.feed(b"PING\r\nQUIT\r\nPING\r\n");
        c.process(&mut e);
        assert!(c.closing() && !c.wants_input() && !c.finished());
        assert_eq!(drain(&mut c), b"+PONG\r\n+OK\r\n");
        assert!(c.finished());
    }

    #[test]
    fn output_high_water_mark_pauses_execution() {
        let mut e = Engine::new(Aof::disabled());
        let mut c = Conn::new();
        let value = vec![b'x'; 100_000];
        let mut set = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n".to_vec();
        set.extend_from_slice(&value);
        set.extend_from_slice(b"\r\n");
        c.feed(&set);
        c.process(&mut e);
        drain(&mut c);
        for _ in 0..10 {
            c.feed(b"GET k\r\n");
        }
        let n = c.process(&mut e);
        assert!(n < 10, "stopped at the high-water mark after {n}");
        assert!(!c.wants_input());
        // A partial send, then the rest: execution resumes once the output drains.
        let half = c.sendable().len() / 2;
        c.sent(half);
        let rest = c.sendable().len();
        c.sent(rest);
        let mut total = n;
        while total < 10 {
            let more = c.process(&mut e);
            assert!(more > 0);
            total += more;
            drain(&mut c);
        }
        assert_eq!(total, 10);
    }
}
