//! A minimal Redis-protocol (RESP2) client for the benchmarks that time single requests: one
//! connection, one request at a time, each reply read in full before the next request. It lives
//! here, not in the system tests' helpers, so that a reply the guest gets wrong is an error the
//! benchmark reports, never a panic, and so that nothing but the socket sits on the timed path.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use ftvm_system_tests::{try_enter_netns, GUEST_IP, KV_PORT};

/// Longest bulk string accepted in a reply: the benchmarks read small values, so a larger length
/// means the stream is out of step (or not Redis), not a value to allocate for.
const MAX_BULK: usize = 16 << 20;
/// Most elements accepted in an array reply, for the same reason.
const MAX_ARRAY: usize = 1 << 16;
/// Deepest nesting of arrays accepted.
const MAX_DEPTH: usize = 8;
/// Longest status, error or integer line.
const MAX_LINE: usize = 64 << 10;

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    /// `None`: the null bulk string (`$-1`).
    Bulk(Option<Vec<u8>>),
    /// `None`: the null array (`*-1`).
    Array(Option<Vec<Reply>>),
}

/// `args` as a RESP array of bulk strings (how clients send commands).
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one line up to CRLF (without it), bounded by [`MAX_LINE`].
fn read_line(r: &mut impl BufRead) -> Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = r.take(MAX_LINE as u64 + 2).read_until(b'\n', &mut line).context("reading a reply")?;
    if n == 0 {
        bail!("the connection closed before the reply");
    }
    if !line.ends_with(b"\r\n") {
        bail!("reply line not ended by CRLF (or longer than {MAX_LINE} bytes): {:?}", String::from_utf8_lossy(&line));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn parse_int(line: &[u8]) -> Result<i64> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad integer in reply: {:?}", String::from_utf8_lossy(line)))
}

/// Reads one reply from `r`.
pub fn read_reply(r: &mut impl BufRead) -> Result<Reply> {
    read_nested(r, 0)
}

fn read_nested(r: &mut impl BufRead, depth: usize) -> Result<Reply> {
    if depth > MAX_DEPTH {
        bail!("reply nested deeper than {MAX_DEPTH} arrays");
    }
    let line = read_line(r)?;
    let (kind, rest) = line.split_first().context("empty reply line")?;
    let text = || String::from_utf8_lossy(rest).into_owned();
    Ok(match kind {
        b'+' => Reply::Status(text()),
        b'-' => Reply::Error(text()),
        b':' => Reply::Integer(parse_int(rest)?),
        b'$' => match parse_int(rest)? {
            -1 => Reply::Bulk(None),
            n if n < 0 || n as u64 > MAX_BULK as u64 => bail!("bulk length {n} out of range"),
            n => {
                let mut data = vec![0; n as usize + 2];
                r.read_exact(&mut data).context("reading a bulk string")?;
                if !data.ends_with(b"\r\n") {
                    bail!("bulk string not ended by CRLF");
                }
                data.truncate(n as usize);
                Reply::Bulk(Some(data))
            }
        },
        b'*' => match parse_int(rest)? {
            -1 => Reply::Array(None),
            n if n < 0 || n as u64 > MAX_ARRAY as u64 => bail!("array length {n} out of range"),
            n => Reply::Array(Some((0..n).map(|_| read_nested(r, depth + 1)).collect::<Result<_>>()?)),
        },
        other => bail!("unknown reply type {:?} in {:?}", *other as char, String::from_utf8_lossy(&line)),
    })
}

/// One connection to the guest's key-value server.
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects to the guest from inside network namespace `netns` (the socket stays there
    /// whichever thread uses it). Every read and write is bounded by `io_timeout`.
    pub fn connect_in_netns(netns: &str, io_timeout: Duration) -> Result<Self> {
        let stream = std::thread::scope(|s| {
            s.spawn(|| -> Result<TcpStream> {
                // Only this short-lived thread enters the namespace.
                try_enter_netns(netns)?;
                let addr = SocketAddrV4::new(GUEST_IP, KV_PORT);
                TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))
                    .with_context(|| format!("cannot connect to {addr} from {netns}"))
            })
            .join()
            .map_err(|_| anyhow!("the connecting thread panicked"))?
        })?;
        Self::new(stream, io_timeout)
    }

    /// A client on an open stream.
    pub fn new(stream: TcpStream, io_timeout: Duration) -> Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        Ok(Self { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    /// Sends an encoded request ([`encode`]) and reads its reply.
    pub fn request(&mut self, encoded: &[u8]) -> Result<Reply> {
        self.writer.write_all(encoded).context("sending a request")?;
        read_reply(&mut self.reader)
    }

    /// Sends `args` and reads the reply; a Redis error reply is an error.
    pub fn cmd(&mut self, args: &[&str]) -> Result<Reply> {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        match self.request(&encode(&bytes))? {
            Reply::Error(e) => bail!("{}: {e}", args.join(" ")),
            reply => Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Reply> {
        read_reply(&mut &bytes[..])
    }

    #[test]
    fn encodes_a_command() {
        assert_eq!(encode(&[b"SET", b"k", b"vv"]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n");
        assert_eq!(encode(&[]), b"*0\r\n");
    }

    #[test]
    fn parses_each_reply_type() {
        assert_eq!(parse(b"+OK\r\n").unwrap(), Reply::Status("OK".into()));
        assert_eq!(parse(b"-ERR no\r\n").unwrap(), Reply::Error("ERR no".into()));
        assert_eq!(parse(b":-42\r\n").unwrap(), Reply::Integer(-42));
        assert_eq!(parse(b"$3\r\na\r\n\r\n").unwrap(), Reply::Bulk(Some(b"a\r\n".to_vec())));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Reply::Bulk(None));
        assert_eq!(parse(b"*-1\r\n").unwrap(), Reply::Array(None));
        assert_eq!(
            parse(b"*2\r\n:1\r\n*1\r\n$0\r\n\r\n").unwrap(),
            Reply::Array(Some(vec![Reply::Integer(1), Reply::Array(Some(vec![Reply::Bulk(Some(vec![]))]))]))
        );
    }

    #[test]
    fn two_replies_in_one_buffer_are_read_one_at_a_time() {
        let mut r = &b"+OK\r\n$1\r\nx\r\n"[..];
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Status("OK".into()));
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Bulk(Some(b"x".to_vec())));
        assert!(read_reply(&mut r).is_err(), "nothing left");
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        for bad in [
            &b""[..],
            b"+OK",
            b"+OK\n",
            b"\r\n",
            b"?x\r\n",
            b":1.5\r\n",
            b"$-2\r\n",
            b"$99999999999\r\n",
            b"$3\r\nab\r\n",
            b"$2\r\nabcd",
            b"*2\r\n:1\r\n",
            b"*-5\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
        }
        let long = [b"+".as_slice(), &vec![b'a'; MAX_LINE + 10], b"\r\n"].concat();
        assert!(parse(&long).is_err());
    }
}
