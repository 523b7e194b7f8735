//! RESP2: a streaming request parser and the reply encoders.
//!
//! Requests are what Redis accepts: multibulk arrays of bulk strings (`*2\r\n$3\r\nGET\r\n...`)
//! and inline commands (`PING\r\n`, split like `redis-cli` and Redis do, with quotes). Unlike
//! Redis, a protocol error does not close the connection: the parser reports it (the caller sends
//! it as an error reply), drops the offending line and carries on with the next one. A bulk string
//! longer than [`MAX_BULK_LEN`] (or a command whose arguments together exceed
//! [`MAX_COMMAND_BYTES`]) is reported once, and then exactly its declared payload and the rest of
//! its array are discarded as they arrive, so the stream stays in sync.

use alloc::string::String;
use alloc::vec::Vec;

/// Longest bulk string a command may carry.
pub const MAX_BULK_LEN: usize = 1 << 20;
/// Most elements a multibulk array may declare (Redis's limit).
pub const MAX_MULTIBULK_LEN: i64 = 1024 * 1024;
/// Longest inline command line, and longest `*`/`$` header line (Redis's `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE_LEN: usize = 64 * 1024;
/// Most argument bytes one command may carry in total.
pub const MAX_COMMAND_BYTES: usize = 4 << 20;

/// What the parser found next in the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete command: its arguments, the name first (never empty).
    Command(Vec<Vec<u8>>),
    /// Malformed input; the text (starting with `ERR `) is the error reply to send.
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between commands.
    Start,
    /// Inside an array, expecting the next `$<len>` line.
    BulkHeader,
    /// Copying a bulk string's payload: `left` bytes to go.
    BulkData { left: usize },
    /// Skipping the CRLF after a payload (not checked, as Redis does not check it either).
    BulkCrlf { left: usize },
    /// Throwing away an oversized payload and its CRLF.
    Discard { left: u64 },
    /// Throwing away input through the next `\n` (an over-long line).
    SkipLine,
}

/// The incremental request parser of one connection.
#[derive(Debug)]
pub struct Parser {
    buf: Vec<u8>,
    pos: usize,
    state: State,
    /// Array elements still expected.
    remaining: usize,
    args: Vec<Vec<u8>>,
    /// Argument bytes of the command being assembled.
    cmd_bytes: usize,
    /// The array being read is dropped (its error was reported already).
    discarding: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    /// A parser with no input.
    pub const fn new() -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            state: State::Start,
            remaining: 0,
            args: Vec::new(),
            cmd_bytes: 0,
            discarding: false,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// Bytes received and not parsed yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Heap bytes this parser holds (input buffer and the command being assembled).
    pub fn memory(&self) -> usize {
        self.buf.capacity() + self.args.capacity() * 24 + self.args.iter().map(Vec::capacity).sum::<usize>()
    }

    /// True while the parser is in the middle of a command (or of discarding one).
    pub fn mid_command(&self) -> bool {
        self.state != State::Start || self.buffered() > 0
    }

    fn compact(&mut self) {
        if self.pos == 0 {
            return;
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            // Do not keep a large buffer around for an idle connection.
            if self.buf.capacity() > 64 * 1024 {
                self.buf = Vec::new();
            }
        } else {
            self.buf.drain(..self.pos);
        }
        self.pos = 0;
    }

    /// Finds the next line at `pos`: returns (end of line content without CR, index after LF).
    fn line(&self) -> Option<(usize, usize)> {
        let rest = &self.buf[self.pos..];
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let mut end = self.pos + nl;
        if end > self.pos && self.buf[end - 1] == b'\r' {
            end -= 1;
        }
        Some((end, self.pos + nl + 1))
    }

    /// Parses the next command or protocol error; `None` when more input is needed.
    pub fn parse_next(&mut self) -> Option<Parsed> {
        loop {
            match self.state {
                State::Start => {
                    if self.pos == self.buf.len() {
                        return None;
                    }
                    if self.buf[self.pos] == b'*' {
                        let Some((end, next)) = self.line() else {
                            if self.buffered() > MAX_INLINE_LEN {
                                self.state = State::SkipLine;
                                return Some(proto_err("too big mbulk count string"));
                            }
                            return None;
                        };
                        let n = parse_i64(&self.buf[self.pos + 1..end]);
                        self.pos = next;
                        match n {
                            Some(n) if n <= MAX_MULTIBULK_LEN => {
                                if n <= 0 {
                                    continue;
                                }
                                self.remaining = n as usize;
                                self.args = Vec::with_capacity((n as usize).min(64));
                                self.cmd_bytes = 0;
                                self.discarding = false;
                                self.state = State::BulkHeader;
                            }
                            _ => return Some(proto_err("invalid multibulk length")),
                        }
                    } else {
                        let Some((end, next)) = self.line() else {
                            if self.buffered() > MAX_INLINE_LEN {
                                self.state = State::SkipLine;
                                return Some(proto_err("too big inline request"));
                            }
                            return None;
                        };
                        let parsed = split_inline(&self.buf[self.pos..end]);
                        self.pos = next;
                        match parsed {
                            None => return Some(proto_err("unbalanced quotes in request")),
                            Some(args) if args.is_empty() => continue,
                            Some(args) => return Some(Parsed::Command(args)),
                        }
                    }
                }
                State::BulkHeader => {
                    if self.pos == self.buf.len() {
                        return None;
                    }
                    let Some((end, next)) = self.line() else {
                        if self.buffered() > MAX_INLINE_LEN {
                            self.abort_command();
                            self.state = State::SkipLine;
                            return Some(proto_err("too big bulk count string"));
                        }
                        return None;
                    };
                    let first = self.buf[self.pos];
                    if first != b'$' {
                        self.pos = next;
                        self.abort_command();
                        let shown = if first.is_ascii_graphic() || first == b' ' {
                            first as char
                        } else {
                            '?'
                        };
                        let mut msg = String::from("ERR Protocol error: expected '$', got '");
                        msg.push(shown);
                        msg.push('\'');
                        return Some(Parsed::Error(msg));
                    }
                    let len = parse_i64(&self.buf[self.pos + 1..end]);
                    self.pos = next;
                    let len = match len {
                        Some(l) if l >= 0 => l as u64,
                        _ => {
                            self.abort_command();
                            return Some(proto_err("invalid bulk length"));
                        }
                    };
                    self.remaining -= 1;
                    let too_big = len > MAX_BULK_LEN as u64
                        || self.cmd_bytes + len as usize > MAX_COMMAND_BYTES;
                    if too_big || self.discarding {
                        self.state = State::Discard { left: len + 2 };
                        if !self.discarding {
                            self.discarding = true;
                            self.args = Vec::new();
                            return Some(proto_err("invalid bulk length"));
                        }
                    } else {
                        let len = len as usize;
                        self.cmd_bytes += len;
                        self.args.push(Vec::with_capacity(len.min(64 * 1024)));
                        self.state = State::BulkData { left: len };
                    }
                }
                State::BulkData { left } => {
                    let take = left.min(self.buf.len() - self.pos);
                    if let Some(arg) = self.args.last_mut() {
                        arg.extend_from_slice(&self.buf[self.pos..self.pos + take]);
                    }
                    self.pos += take;
                    if take < left {
                        self.state = State::BulkData { left: left - take };
                        return None;
                    }
                    self.state = State::BulkCrlf { left: 2 };
                }
                State::BulkCrlf { left } => {
                    let take = left.min(self.buf.len() - self.pos);
                    self.pos += take;
                    if take < left {
                        self.state = State::BulkCrlf { left: left - take };
                        return None;
                    }
                    if let Some(done) = self.element_done() {
                        return Some(done);
                    }
                }
                State::Discard { left } => {
                    let avail = (self.buf.len() - self.pos) as u64;
                    let take = left.min(avail);
                    self.pos += take as usize;
                    if take < left {
                        self.state = State::Discard { left: left - take };
                        // Nothing else can be parsed: free the discarded bytes now.
                        self.compact();
                        return None;
                    }
                    if let Some(done) = self.element_done() {
                        return Some(done);
                    }
                }
                State::SkipLine => match self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                    Some(nl) => {
                        self.pos += nl + 1;
                        self.state = State::Start;
                    }
                    None => {
                        self.pos = self.buf.len();
                        self.compact();
                        return None;
                    }
                },
            }
        }
    }

    /// One array element is complete: the command may be too.
    fn element_done(&mut self) -> Option<Parsed> {
        if self.remaining > 0 {
            self.state = State::BulkHeader;
            return None;
        }
        self.state = State::Start;
        if self.discarding {
            self.discarding = false;
            return None;
        }
        Some(Parsed::Command(core::mem::take(&mut self.args)))
    }

    fn abort_command(&mut self) {
        self.args = Vec::new();
        self.remaining = 0;
        self.discarding = false;
        self.state = State::Start;
    }
}

fn proto_err(what: &str) -> Parsed {
    let mut msg = String::from("ERR Protocol error: ");
    msg.push_str(what);
    Parsed::Error(msg)
}

/// Parses a signed decimal integer strictly, as Redis's `string2ll` does: optional `-`, digits,
/// no leading zeros (except `0` itself), no spaces or `+`, no overflow.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = if s[0] == b'-' {
        (true, &s[1..])
    } else {
        (false, s)
    };
    if digits.is_empty() || !(b'1'..=b'9').contains(&digits[0]) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((d - b'0') as u64)?;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            None
        } else {
            Some((v as i64).wrapping_neg())
        }
    } else if v > i64::MAX as u64 {
        None
    } else {
        Some(v as i64)
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline command line into arguments like Redis's `sdssplitargs`: whitespace
/// separated, with `"..."` (backslash escapes, `\xHH`) and `'...'` quoting. `None` means
/// unbalanced quotes.
pub fn split_inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut p = 0;
    let n = line.len();
    loop {
        while p < n && is_space(line[p]) {
            p += 1;
        }
        if p >= n {
            return Some(args);
        }
        let mut cur = Vec::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            if in_dq {
                if p >= n {
                    return None;
                }
                let c = line[p];
                if c == b'\\' && p + 3 < n && line[p + 1] == b'x' {
                    if let (Some(h), Some(l)) = (hex_val(line[p + 2]), hex_val(line[p + 3])) {
                        cur.push(h * 16 + l);
                        p += 4;
                        continue;
                    }
                }
                if c == b'\\' && p + 1 < n {
                    cur.push(match line[p + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    p += 2;
                } else if c == b'"' {
                    // The closing quote must be followed by a space or the end.
                    if p + 1 < n && !is_space(line[p + 1]) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    cur.push(c);
                    p += 1;
                }
            } else if in_sq {
                if p >= n {
                    return None;
                }
                let c = line[p];
                if c == b'\\' && p + 1 < n && line[p + 1] == b'\'' {
                    cur.push(b'\'');
                    p += 2;
                } else if c == b'\'' {
                    if p + 1 < n && !is_space(line[p + 1]) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    cur.push(c);
                    p += 1;
                }
            } else {
                if p >= n {
                    break;
                }
                match line[p] {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        p += 1;
                        break;
                    }
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
                p += 1;
            }
        }
        args.push(cur);
    }
}

// ---- reply encoders -----------------------------------------------------------------------

/// Appends the decimal form of `v`.
pub fn push_i64(out: &mut Vec<u8>, v: i64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let neg = v < 0;
    let mut u = v.unsigned_abs();
    loop {
        i -= 1;
        tmp[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if neg {
        out.push(b'-');
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Appends the decimal form of `v`.
pub fn push_u64(out: &mut Vec<u8>, v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let mut u = v;
    loop {
        i -= 1;
        tmp[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// `+<s>\r\n`.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-<msg>\r\n`; CR and LF inside the message become spaces (as in Redis) so the reply stays
/// well formed.
pub fn error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// `:<v>\r\n`.
pub fn integer(out: &mut Vec<u8>, v: i64) {
    out.push(b':');
    push_i64(out, v);
    out.extend_from_slice(b"\r\n");
}

/// `$<len>\r\n<data>\r\n`.
pub fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'$');
    push_u64(out, data.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// `$-1\r\n`, the null bulk string.
pub fn null_bulk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// `*<n>\r\n`, followed by `n` replies.
pub fn array_header(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_u64(out, n as u64);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use std::format;
    use std::string::ToString;

    fn cmd(args: &[&str]) -> Parsed {
        Parsed::Command(args.iter().map(|a| a.as_bytes().to_vec()).collect())
    }

    fn all(p: &mut Parser) -> Vec<Parsed> {
        let mut v = Vec::new();
        while let Some(x) = p.parse_next() {
            v.push(x);
        }
        v
    }

    fn is_err(p: &Parsed, needle: &str) -> bool {
        matches!(p, Parsed::Error(e) if e.starts_with("ERR Protocol error") && e.contains(needle))
    }

    #[test]
    fn multibulk_command() {
        let mut p = Parser::new();
        p.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n");
        assert_eq!(all(&mut p), vec![cmd(&["SET", "k", "hello"])]);
        assert!(!p.mid_command());
    }

    #[test]
    fn binary_safe_payload() {
        let mut p = Parser::new();
        p.feed(b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n");
        assert_eq!(
            p.parse_next(),
            Some(Parsed::Command(vec![b"GET".to_vec(), b"a\r\nb".to_vec()]))
        );
    }

    #[test]
    fn every_split_point_gives_the_same_commands() {
        let input: &[u8] =
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\nPING\r\n*1\r\n$4\r\nPING\r\nECHO \"a b\"\n*0\r\n*2\r\n$3\r\nGET\r\n$0\r\n\r\n";
        let expect = vec![
            cmd(&["SET", "key", "value"]),
            cmd(&["PING"]),
            cmd(&["PING"]),
            cmd(&["ECHO", "a b"]),
            cmd(&["GET", ""]),
        ];
        for split in 0..=input.len() {
            let mut p = Parser::new();
            let mut got = Vec::new();
            p.feed(&input[..split]);
            got.extend(all(&mut p));
            p.feed(&input[split..]);
            got.extend(all(&mut p));
            assert_eq!(got, expect, "split at {split}");
        }
        // Byte by byte.
        let mut p = Parser::new();
        let mut got = Vec::new();
        for b in input {
            p.feed(core::slice::from_ref(b));
            got.extend(all(&mut p));
        }
        assert_eq!(got, expect);
    }

    #[test]
    fn pipelined_commands_come_out_in_order() {
        let mut p = Parser::new();
        let mut input = Vec::new();
        for i in 0..100 {
            let n = i.to_string();
            input.extend_from_slice(
                format!("*2\r\n$4\r\nINCR\r\n${}\r\n{}\r\n", n.len(), n).as_bytes(),
            );
        }
        p.feed(&input);
        let got = all(&mut p);
        assert_eq!(got.len(), 100);
        for (i, c) in got.into_iter().enumerate() {
            assert_eq!(c, cmd(&["INCR", &i.to_string()]));
        }
    }

    #[test]
    fn inline_commands_and_quotes() {
        let mut p = Parser::new();
        p.feed(b"PING\r\n  set  k   v \n\r\n\nSET \"a\\x41\\n\" 'it\\'s'\r\nECHO \"\"\r\n");
        assert_eq!(
            all(&mut p),
            vec![
                cmd(&["PING"]),
                cmd(&["set", "k", "v"]),
                cmd(&["SET", "aA\n", "it's"]),
                cmd(&["ECHO", ""]),
            ]
        );
    }

    #[test]
    fn unbalanced_quotes_are_an_error_and_the_next_line_works() {
        let mut p = Parser::new();
        p.feed(b"SET \"abc\r\nPING\r\nSET \"a\"b c\r\n");
        let got = all(&mut p);
        assert!(is_err(&got[0], "unbalanced quotes"));
        assert_eq!(got[1], cmd(&["PING"]));
        assert!(is_err(&got[2], "unbalanced quotes"));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn bad_multibulk_length_resyncs_on_the_next_line() {
        let mut p = Parser::new();
        p.feed(b"*abc\r\n*1\r\n$4\r\nPING\r\n*-1\r\n*01\r\n*99999999999\r\nPING\r\n");
        let got = all(&mut p);
        assert!(is_err(&got[0], "invalid multibulk length"), "{got:?}");
        assert_eq!(got[1], cmd(&["PING"]));
        assert!(is_err(&got[2], "invalid multibulk length"));
        assert!(is_err(&got[3], "invalid multibulk length"));
        assert_eq!(got[4], cmd(&["PING"]));
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn bad_bulk_length_and_missing_dollar() {
        let mut p = Parser::new();
        p.feed(b"*1\r\n$-5\r\n*2\r\n$3\r\nGET\r\n:5\r\n*1\r\n$x\r\n*1\r\n$4\r\nPING\r\n");
        let got = all(&mut p);
        assert!(is_err(&got[0], "invalid bulk length"), "{got:?}");
        assert!(
            matches!(&got[1], Parsed::Error(e) if e == "ERR Protocol error: expected '$', got ':'")
        );
        assert!(is_err(&got[2], "invalid bulk length"));
        assert_eq!(got[3], cmd(&["PING"]));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn oversized_bulk_is_refused_once_and_discarded_exactly() {
        let size = MAX_BULK_LEN + 10;
        let mut input = format!("*4\r\n$3\r\nSET\r\n$3\r\nbig\r\n${size}\r\n").into_bytes();
        input.resize(input.len() + size, b'*');
        input.extend_from_slice(b"\r\n$2\r\nNX\r\n*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n");
        // Fed in uneven chunks: the discarded payload looks like protocol, and must be ignored.
        let mut p = Parser::new();
        let mut got = Vec::new();
        for chunk in input.chunks(7919) {
            p.feed(chunk);
            got.extend(all(&mut p));
            assert!(p.buffered() < 2 * 7919, "discarded bytes are not kept");
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(is_err(&got[0], "invalid bulk length"));
        assert_eq!(got[1], cmd(&["GET", "big"]));
    }

    #[test]
    fn huge_declared_length_is_discarded_too() {
        let mut p = Parser::new();
        p.feed(b"*1\r\n$9999999999\r\n");
        assert!(is_err(&p.parse_next().unwrap(), "invalid bulk length"));
        assert_eq!(p.parse_next(), None);
        assert!(p.mid_command());
    }

    #[test]
    fn too_long_lines_are_refused_and_skipped() {
        let mut p = Parser::new();
        let mut input = vec![b'a'; MAX_INLINE_LEN + 5];
        p.feed(&input);
        assert!(is_err(&p.parse_next().unwrap(), "too big inline request"));
        input.clear();
        input.extend_from_slice(b"aaaa\r\nPING\r\n");
        p.feed(&input);
        assert_eq!(all(&mut p), vec![cmd(&["PING"])]);

        let mut p = Parser::new();
        let mut input = b"*".to_vec();
        input.resize(MAX_INLINE_LEN + 5, b'1');
        p.feed(&input);
        assert!(is_err(
            &p.parse_next().unwrap(),
            "too big mbulk count string"
        ));
        p.feed(b"\r\nPING\r\n");
        assert_eq!(all(&mut p), vec![cmd(&["PING"])]);
    }

    #[test]
    fn parse_i64_is_strict() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"9223372036854775808",
            b"1a",
            b"-0",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", core::str::from_utf8(bad));
        }
    }

    #[test]
    fn encoders() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        error(&mut out, "ERR bad\r\nthing");
        integer(&mut out, -42);
        integer(&mut out, i64::MIN);
        bulk(&mut out, b"hi");
        null_bulk(&mut out);
        array_header(&mut out, 3);
        assert_eq!(
            out,
            b"+OK\r\n-ERR bad  thing\r\n:-42\r\n:-9223372036854775808\r\n$2\r\nhi\r\n$-1\r\n*3\r\n"
        );
    }
}
