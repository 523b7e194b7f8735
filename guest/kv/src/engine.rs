//! Command execution: the Redis string commands the reference guest serves, with Redis's reply
//! types and error texts, and the log records of the writes.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use crate::resp::{self, parse_i64};
use crate::rewrite::{Aof, RewriteStart};
use crate::store::Store;

/// `-ERR syntax error`.
pub const ERR_SYNTAX: &str = "ERR syntax error";
/// Reply to an integer argument or value that is not one.
pub const ERR_NOT_INTEGER: &str = "ERR value is not an integer or out of range";
/// Reply to an INCR family overflow.
pub const ERR_OVERFLOW: &str = "ERR increment or decrement would overflow";
/// Reply to a write when the log device is full.
pub const ERR_LOG_FULL: &str = "ERR disk log full";
/// Reply to a write that would grow the store past its memory limit (Redis's text).
pub const ERR_OOM: &str = "OOM command not allowed when used memory > 'maxmemory'.";
/// Reply to a command whose reply would exceed [`MAX_REPLY_BYTES`].
pub const ERR_REPLY_TOO_LARGE: &str = "ERR reply too large for ftvm-guest";
/// Largest reply one command may produce (MGET of many large values), so that no client
/// request can exhaust the guest's memory in one go.
pub const MAX_REPLY_BYTES: usize = 16 << 20;
/// Reply to SET with an expiry option.
pub const ERR_NO_EXPIRY: &str = "ERR key expiry (EX/PX/EXAT/PXAT) is not supported by ftvm-guest";

/// What the connection should do after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Keep serving.
    Continue,
    /// Close the connection once the replies are out (QUIT).
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    Ping,
    Echo,
    Set,
    Get,
    Incr,
    Decr,
    IncrBy,
    DecrBy,
    Del,
    Exists,
    MSet,
    MGet,
    DbSize,
    FlushAll,
    Command,
    Config,
    Info,
    Select,
    Quit,
    Client,
    BgRewriteAof,
    FtvmLoad,
}

/// (name as Redis reports it, arity as in Redis's command table: n = exactly n arguments
/// including the name, -n = at least n, whether it is refused when memory is full, command).
const COMMANDS: &[(&str, i32, bool, Cmd)] = &[
    ("ping", -1, false, Cmd::Ping),
    ("echo", 2, false, Cmd::Echo),
    ("set", -3, true, Cmd::Set),
    ("get", 2, false, Cmd::Get),
    ("incr", 2, true, Cmd::Incr),
    ("decr", 2, true, Cmd::Decr),
    ("incrby", 3, true, Cmd::IncrBy),
    ("decrby", 3, true, Cmd::DecrBy),
    ("del", -2, false, Cmd::Del),
    ("exists", -2, false, Cmd::Exists),
    ("mset", -3, true, Cmd::MSet),
    ("mget", -2, false, Cmd::MGet),
    ("dbsize", 1, false, Cmd::DbSize),
    ("flushall", -1, false, Cmd::FlushAll),
    ("command", -1, false, Cmd::Command),
    ("config", -2, false, Cmd::Config),
    ("info", -1, false, Cmd::Info),
    ("select", 2, false, Cmd::Select),
    ("quit", -1, false, Cmd::Quit),
    ("client", -2, false, Cmd::Client),
    ("bgrewriteaof", 1, false, Cmd::BgRewriteAof),
    ("ftvm.load", 2, false, Cmd::FtvmLoad),
];

/// Configuration values `CONFIG GET` reports (so that clients such as redis-benchmark, which
/// ask for `save` and `appendonly`, get sensible answers).
const CONFIG: &[(&str, &str)] = &[
    ("save", ""),
    ("appendonly", "yes"),
    ("appendfsync", "always"),
    ("databases", "1"),
    ("maxmemory-policy", "noeviction"),
];

fn lookup(name: &[u8]) -> Option<(&'static str, i32, bool, Cmd)> {
    COMMANDS
        .iter()
        .copied()
        .find(|(n, ..)| n.as_bytes().eq_ignore_ascii_case(name))
}

fn arity_ok(arity: i32, argc: usize) -> bool {
    if arity >= 0 {
        argc == arity as usize
    } else {
        argc >= arity.unsigned_abs() as usize
    }
}

/// Appends `-ERR wrong number of arguments for '<name>' command`.
pub fn arity_error(out: &mut Vec<u8>, name: &str) {
    let mut msg = String::from("ERR wrong number of arguments for '");
    msg.push_str(name);
    msg.push_str("' command");
    resp::error(out, &msg);
}

fn error_bytes(out: &mut Vec<u8>, msg: &[u8]) {
    out.push(b'-');
    out.extend(
        msg.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// Appends Redis's reply to an unknown command:
/// `-ERR unknown command 'foo', with args beginning with: 'a' 'b' `.
pub fn unknown_command(out: &mut Vec<u8>, args: &[Vec<u8>]) {
    let mut shown = Vec::new();
    for a in &args[1..] {
        if shown.len() >= 128 {
            break;
        }
        let room = 128 - shown.len();
        shown.push(b'\'');
        shown.extend_from_slice(&a[..a.len().min(room)]);
        shown.extend_from_slice(b"' ");
    }
    let mut msg = Vec::from(&b"ERR unknown command '"[..]);
    msg.extend_from_slice(&args[0][..args[0].len().min(128)]);
    msg.extend_from_slice(b"', with args beginning with: ");
    msg.extend_from_slice(&shown);
    error_bytes(out, &msg);
}

/// Case-insensitive glob match (`*`, `?`), as `CONFIG GET` patterns use.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star_p, mut star_t) = (usize::MAX, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p].eq_ignore_ascii_case(&text[t])) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star_p = p;
            star_t = t;
            p += 1;
        } else if star_p != usize::MAX {
            p = star_p + 1;
            star_t += 1;
            t = star_t;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// Counters `INFO` reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Commands executed.
    pub commands: u64,
    /// Connections currently open (maintained by the caller).
    pub connected_clients: u64,
    /// Connections accepted since boot (maintained by the caller).
    pub total_connections: u64,
    /// Log records replayed at boot.
    pub replayed_records: u64,
    /// Frames received and sent, device notifications (VM exits) sent, and TCP SYNs dropped
    /// because no socket was free (maintained by the caller).
    pub net: [u64; 4],
    /// Turns of the guest's main loop, and how many of them ended waiting in the VMM (maintained
    /// by the caller): work per request, seen from inside the guest.
    pub loop_turns: u64,
    /// See `loop_turns`.
    pub idle_waits: u64,
}

/// The store, the log and the commands.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    /// The append-only log the writes go to.
    pub log: Aof,
    /// Estimated store bytes beyond which growing writes are refused (0: no limit).
    pub maxmemory: usize,
    /// The memory-dirtying benchmark load, pages per millisecond (`FTVM.LOAD` sets it).
    pub dirty_pages_per_ms: u32,
    /// Counters for `INFO`.
    pub stats: Stats,
}

impl Engine {
    /// An empty store writing to `log`.
    pub fn new(log: Aof) -> Self {
        Self {
            store: Store::new(),
            log,
            maxmemory: 0,
            dirty_pages_per_ms: 0,
            stats: Stats::default(),
        }
    }

    /// The store (read only).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The tag a reply produced now must carry: the last log sequence number.
    pub fn tag(&self) -> u64 {
        self.log.last_seq()
    }

    /// Log sequence number up to which everything is durable.
    pub fn durable(&self) -> u64 {
        self.log.durable_seq()
    }

    /// Advances the log's background rewrite (see [`Aof::step`]); true if it did anything.
    pub fn step_log(&mut self) -> bool {
        self.log.step(&self.store)
    }

    /// Applies one replayed log record (see [`crate::aof`]); false if it is not one this engine
    /// writes (it is then ignored).
    pub fn apply_record(&mut self, args: &[&[u8]]) -> bool {
        let Some((name, rest)) = args.split_first() else {
            return false;
        };
        if name.eq_ignore_ascii_case(b"SET") && rest.len() == 2 {
            self.store.set(rest[0], rest[1].to_vec());
        } else if name.eq_ignore_ascii_case(b"DEL") {
            for k in rest {
                self.store.remove(k);
            }
        } else if name.eq_ignore_ascii_case(b"MSET") && rest.len().is_multiple_of(2) {
            for kv in rest.chunks(2) {
                self.store.set(kv[0], kv[1].to_vec());
            }
        } else if name.eq_ignore_ascii_case(b"FLUSHALL") {
            self.store.clear();
        } else {
            return false;
        }
        true
    }

    /// Appends a record, or the log-full error reply.
    fn log(&mut self, record: &[&[u8]], out: &mut Vec<u8>) -> bool {
        match self.log.append(record) {
            Ok(_) => true,
            Err(_) => {
                resp::error(out, ERR_LOG_FULL);
                false
            }
        }
    }

    /// Executes one command (`args[0]` is its name) and appends its reply to `out`.
    pub fn execute(&mut self, mut args: Vec<Vec<u8>>, out: &mut Vec<u8>) -> Outcome {
        self.stats.commands += 1;
        if args.is_empty() {
            return Outcome::Continue;
        }
        let Some((name, arity, deny_oom, cmd)) = lookup(&args[0]) else {
            unknown_command(out, &args);
            return Outcome::Continue;
        };
        if !arity_ok(arity, args.len()) {
            arity_error(out, name);
            return Outcome::Continue;
        }
        if deny_oom && self.maxmemory != 0 && self.store.used_bytes() > self.maxmemory {
            resp::error(out, ERR_OOM);
            return Outcome::Continue;
        }
        match cmd {
            Cmd::Ping => match args.len() {
                1 => resp::simple(out, "PONG"),
                2 => resp::bulk(out, &args[1]),
                _ => arity_error(out, name),
            },
            Cmd::Echo => resp::bulk(out, &args[1]),
            Cmd::Set => self.set(&mut args, out),
            Cmd::Get => match self.store.get(&args[1]) {
                Some(v) => resp::bulk(out, v),
                None => resp::null_bulk(out),
            },
            Cmd::Incr => self.incr_by(&args[1], 1, out),
            Cmd::Decr => self.incr_by(&args[1], -1, out),
            Cmd::IncrBy => match parse_i64(&args[2]) {
                Some(d) => self.incr_by(&args[1], d, out),
                None => resp::error(out, ERR_NOT_INTEGER),
            },
            Cmd::DecrBy => match parse_i64(&args[2]) {
                Some(i64::MIN) => resp::error(out, "ERR decrement would overflow"),
                Some(d) => self.incr_by(&args[1], -d, out),
                None => resp::error(out, ERR_NOT_INTEGER),
            },
            Cmd::Del => {
                let mut record: Vec<&[u8]> = Vec::new();
                for k in &args[1..] {
                    if self.store.contains(k) {
                        if record.is_empty() {
                            record.push(b"DEL");
                        }
                        record.push(k);
                    }
                }
                if record.is_empty() {
                    resp::integer(out, 0);
                } else if self.log(&record, out) {
                    let removed = args[1..].iter().filter(|k| self.store.remove(k)).count();
                    resp::integer(out, removed as i64);
                }
            }
            Cmd::Exists => {
                let n = args[1..].iter().filter(|k| self.store.contains(k)).count();
                resp::integer(out, n as i64);
            }
            Cmd::MSet => {
                if args.len().is_multiple_of(2) {
                    arity_error(out, name);
                } else {
                    let record: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                    let ok = self.log(&record, out);
                    drop(record);
                    if ok {
                        let mut it = args.drain(1..);
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            self.store.set(&k, v);
                        }
                        resp::simple(out, "OK");
                    }
                }
            }
            Cmd::MGet => {
                let size: usize =
                    args[1..].iter().map(|k| self.store.get(k).map_or(5, |v| v.len() + 16)).sum();
                if size > MAX_REPLY_BYTES {
                    resp::error(out, ERR_REPLY_TOO_LARGE);
                    return Outcome::Continue;
                }
                resp::array_header(out, args.len() - 1);
                for k in &args[1..] {
                    match self.store.get(k) {
                        Some(v) => resp::bulk(out, v),
                        None => resp::null_bulk(out),
                    }
                }
            }
            Cmd::DbSize => resp::integer(out, self.store.len() as i64),
            Cmd::FlushAll => {
                let ok_opt = match args.len() {
                    1 => true,
                    2 => {
                        args[1].eq_ignore_ascii_case(b"ASYNC")
                            || args[1].eq_ignore_ascii_case(b"SYNC")
                    }
                    _ => false,
                };
                if !ok_opt {
                    resp::error(out, ERR_SYNTAX);
                } else if self.store.is_empty() || self.log(&[b"FLUSHALL"], out) {
                    self.store.clear();
                    resp::simple(out, "OK");
                }
            }
            Cmd::Command => {
                if args.len() >= 2 && args[1].eq_ignore_ascii_case(b"COUNT") {
                    resp::integer(out, COMMANDS.len() as i64);
                } else {
                    // COMMAND, COMMAND DOCS, COMMAND INFO ...: nothing to document. Clients
                    // (redis-cli's hints) treat an empty array as "no information".
                    resp::array_header(out, 0);
                }
            }
            Cmd::Config => self.config(&args, out),
            Cmd::Info => self.info(out),
            Cmd::Select => match parse_i64(&args[1]) {
                None => resp::error(out, ERR_NOT_INTEGER),
                Some(0) => resp::simple(out, "OK"),
                Some(_) => resp::error(out, "ERR DB index is out of range"),
            },
            Cmd::Quit => {
                resp::simple(out, "OK");
                return Outcome::Close;
            }
            Cmd::Client => {
                let sub = &args[1];
                if sub.eq_ignore_ascii_case(b"GETNAME") {
                    resp::null_bulk(out);
                } else if sub.eq_ignore_ascii_case(b"ID") {
                    resp::integer(out, 1);
                } else if sub.eq_ignore_ascii_case(b"SETNAME")
                    || sub.eq_ignore_ascii_case(b"SETINFO")
                {
                    resp::simple(out, "OK");
                } else {
                    unknown_subcommand(out, sub, "CLIENT");
                }
            }
            Cmd::BgRewriteAof => match self.log.request_rewrite(&self.store) {
                Ok(RewriteStart::Started) => {
                    resp::simple(out, "Background append only file rewriting started")
                }
                Ok(RewriteStart::Scheduled) => {
                    resp::simple(out, "Background append only file rewriting scheduled")
                }
                Err(msg) => resp::error(out, msg),
            },
            Cmd::FtvmLoad => match parse_i64(&args[1]) {
                Some(n) if (0..=u32::MAX as i64).contains(&n) => {
                    self.dirty_pages_per_ms = n as u32;
                    resp::simple(out, "OK");
                }
                _ => resp::error(out, ERR_NOT_INTEGER),
            },
        }
        Outcome::Continue
    }

    fn set(&mut self, args: &mut [Vec<u8>], out: &mut Vec<u8>) {
        let (mut nx, mut xx, mut get, mut keepttl, mut expire) =
            (false, false, false, false, false);
        let mut i = 3;
        while i < args.len() {
            let opt = args[i].as_slice();
            let has_next = i + 1 < args.len();
            if opt.eq_ignore_ascii_case(b"NX") && !xx {
                nx = true;
            } else if opt.eq_ignore_ascii_case(b"XX") && !nx {
                xx = true;
            } else if opt.eq_ignore_ascii_case(b"GET") {
                get = true;
            } else if opt.eq_ignore_ascii_case(b"KEEPTTL") && !expire {
                keepttl = true;
            } else if (opt.eq_ignore_ascii_case(b"EX")
                || opt.eq_ignore_ascii_case(b"PX")
                || opt.eq_ignore_ascii_case(b"EXAT")
                || opt.eq_ignore_ascii_case(b"PXAT"))
                && !keepttl
                && !expire
                && has_next
            {
                expire = true;
                i += 1;
                match parse_i64(&args[i]) {
                    None => return resp::error(out, ERR_NOT_INTEGER),
                    Some(v) if v <= 0 => {
                        return resp::error(out, "ERR invalid expire time in 'set' command")
                    }
                    Some(_) => {}
                }
            } else {
                return resp::error(out, ERR_SYNTAX);
            }
            i += 1;
        }
        if expire {
            return resp::error(out, ERR_NO_EXPIRY);
        }
        let exists = self.store.contains(&args[1]);
        if (nx && exists) || (xx && !exists) {
            if get {
                match self.store.get(&args[1]) {
                    Some(v) => resp::bulk(out, v),
                    None => resp::null_bulk(out),
                }
            } else {
                resp::null_bulk(out);
            }
            return;
        }
        if !self.log(&[b"SET", &args[1], &args[2]], out) {
            return;
        }
        let value = core::mem::take(&mut args[2]);
        let old = self.store.set(&args[1], value);
        if get {
            match old {
                Some(v) => resp::bulk(out, &v),
                None => resp::null_bulk(out),
            }
        } else {
            resp::simple(out, "OK");
        }
    }

    fn incr_by(&mut self, key: &[u8], delta: i64, out: &mut Vec<u8>) {
        let current = match self.store.get(key) {
            None => 0,
            Some(v) => match parse_i64(v) {
                Some(n) => n,
                None => return resp::error(out, ERR_NOT_INTEGER),
            },
        };
        let Some(new) = current.checked_add(delta) else {
            return resp::error(out, ERR_OVERFLOW);
        };
        let mut text = Vec::with_capacity(20);
        resp::push_i64(&mut text, new);
        if !self.log(&[b"SET", key, &text], out) {
            return;
        }
        self.store.set(key, text);
        resp::integer(out, new);
    }

    fn config(&mut self, args: &[Vec<u8>], out: &mut Vec<u8>) {
        let sub = &args[1];
        if sub.eq_ignore_ascii_case(b"GET") {
            if args.len() < 3 {
                return arity_error(out, "config|get");
            }
            let matches: Vec<(&str, &str)> = CONFIG
                .iter()
                .copied()
                .filter(|(k, _)| args[2..].iter().any(|p| glob_match(p, k.as_bytes())))
                .collect();
            resp::array_header(out, matches.len() * 2);
            for (k, v) in matches {
                resp::bulk(out, k.as_bytes());
                resp::bulk(out, v.as_bytes());
            }
        } else if sub.eq_ignore_ascii_case(b"SET") {
            if args.len() < 4 || !args.len().is_multiple_of(2) {
                return arity_error(out, "config|set");
            }
            resp::error(out, "ERR CONFIG SET is not supported by ftvm-guest");
        } else if sub.eq_ignore_ascii_case(b"RESETSTAT") {
            self.stats.commands = 0;
            resp::simple(out, "OK");
        } else {
            unknown_subcommand(out, sub, "CONFIG");
        }
    }

    fn info(&self, out: &mut Vec<u8>) {
        let mut s = String::new();
        let l = &self.log;
        let r = l.stats();
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nftvm_guest:1\r\n\r\n\
             # Clients\r\nconnected_clients:{}\r\n\r\n\
             # Memory\r\nused_memory_dataset:{}\r\nmaxmemory:{}\r\n\r\n\
             # Persistence\r\naof_enabled:{}\r\naof_rewrite_in_progress:{}\r\n\
             aof_rewrite_scheduled:{}\r\naof_rewrites:{}\r\naof_rewrites_abandoned:{}\r\n\
             aof_last_bgrewrite_status:{}\r\naof_last_rewrite_bytes:{}\r\naof_current_size:{}\r\n\
             aof_base_size:{}\r\naof_region_size:{}\r\naof_generation:{}\r\naof_last_seq:{}\r\n\
             aof_durable_seq:{}\r\naof_write_failures:{}\r\naof_replayed_records:{}\r\n\r\n\
             # Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
             ftvm_dirty_pages_per_ms:{}\r\nftvm_net_rx_frames:{}\r\nftvm_net_tx_frames:{}\r\n\
             ftvm_virtio_notifies:{}\r\nftvm_syns_dropped:{}\r\nftvm_loop_turns:{}\r\n\
             ftvm_idle_waits:{}\r\n\r\n\
             # Keyspace\r\n",
            self.stats.connected_clients,
            self.store.used_bytes(),
            self.maxmemory,
            l.enabled() as u8,
            l.rewrite_in_progress() as u8,
            l.rewrite_scheduled() as u8,
            r.rewrites,
            r.abandoned,
            if r.last_failed { "err" } else { "ok" },
            r.last_bytes,
            l.current_size(),
            r.base_size,
            l.region_size(),
            l.header().generation,
            l.last_seq(),
            l.durable_seq(),
            l.write_failures(),
            self.stats.replayed_records,
            self.stats.total_connections,
            self.stats.commands,
            self.dirty_pages_per_ms,
            self.stats.net[0],
            self.stats.net[1],
            self.stats.net[2],
            self.stats.net[3],
            self.stats.loop_turns,
            self.stats.idle_waits,
        );
        if !self.store.is_empty() {
            let _ = write!(s, "db0:keys={},expires=0,avg_ttl=0\r\n", self.store.len());
        }
        resp::bulk(out, s.as_bytes());
    }
}

fn unknown_subcommand(out: &mut Vec<u8>, sub: &[u8], cmd: &str) {
    let mut msg = Vec::from(&b"ERR unknown subcommand '"[..]);
    msg.extend_from_slice(&sub[..sub.len().min(128)]);
    msg.extend_from_slice(b"'. Try ");
    msg.extend_from_slice(cmd.as_bytes());
    msg.extend_from_slice(b" HELP.");
    error_bytes(out, &msg);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::aof::{DiskOp, Replay, FIRST_RECORD};
    use alloc::vec;
    use std::format;
    use std::string::ToString;

    fn engine() -> Engine {
        Engine::new(Aof::disabled())
    }

    /// Executes one command; its reply as text.
    pub(crate) fn run(e: &mut Engine, args: &[&str]) -> String {
        let mut out = Vec::new();
        e.execute(
            args.iter().map(|a| a.as_bytes().to_vec()).collect(),
            &mut out,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn ping_and_echo() {
        let mut e = engine();
        assert_eq!(run(&mut e, &["PING"]), "+PONG\r\n");
        assert_eq!(run(&mut e, &["ping", "hello"]), "$5\r\nhello\r\n");
        assert_eq!(
            run(&mut e, &["PING", "a", "b"]),
            "-ERR wrong number of arguments for 'ping' command\r\n"
        );
        assert_eq!(
            run(&mut e, &["ECHO", "hello world"]),
            "$11\r\nhello world\r\n"
        );
        assert_eq!(
            run(&mut e, &["ECHO"]),
            "-ERR wrong number of arguments for 'echo' command\r\n"
        );
    }

    #[test]
    fn set_get_and_options() {
        let mut e = engine();
        assert_eq!(run(&mut e, &["GET", "k"]), "$-1\r\n");
        assert_eq!(run(&mut e, &["SET", "k", "v"]), "+OK\r\n");
        assert_eq!(run(&mut e, &["GET", "k"]), "$1\r\nv\r\n");
        assert_eq!(run(&mut e, &["SET", "k", "w", "NX"]), "$-1\r\n");
        assert_eq!(run(&mut e, &["GET", "k"]), "$1\r\nv\r\n");
        assert_eq!(run(&mut e, &["SET", "k", "w", "XX", "GET"]), "$1\r\nv\r\n");
        assert_eq!(run(&mut e, &["SET", "new", "x", "XX"]), "$-1\r\n");
        assert_eq!(run(&mut e, &["SET", "new", "x", "nx", "get"]), "$-1\r\n");
        assert_eq!(run(&mut e, &["GET", "new"]), "$1\r\nx\r\n");
        assert_eq!(run(&mut e, &["SET", "k", "z", "GET"]), "$1\r\nw\r\n");
        assert_eq!(
            run(&mut e, &["SET", "k", "v", "NX", "XX"]),
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            run(&mut e, &["SET", "k", "v", "BOGUS"]),
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            run(&mut e, &["SET", "k", "v", "EX"]),
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            run(&mut e, &["SET", "k", "v", "EX", "abc"]),
            format!("-{ERR_NOT_INTEGER}\r\n")
        );
        assert_eq!(
            run(&mut e, &["SET", "k", "v", "EX", "0"]),
            "-ERR invalid expire time in 'set' command\r\n"
        );
        assert_eq!(
            run(&mut e, &["SET", "k", "v", "EX", "10"]),
            format!("-{ERR_NO_EXPIRY}\r\n")
        );
        assert_eq!(run(&mut e, &["SET", "k", "v", "KEEPTTL"]), "+OK\r\n");
        assert_eq!(
            run(&mut e, &["SET", "k"]),
            "-ERR wrong number of arguments for 'set' command\r\n"
        );
        assert_eq!(
            run(&mut e, &["GET"]),
            "-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert_eq!(
            run(&mut e, &["GET", "a", "b"]),
            "-ERR wrong number of arguments for 'get' command\r\n"
        );
    }

    #[test]
    fn incr_family() {
        let mut e = engine();
        assert_eq!(run(&mut e, &["INCR", "n"]), ":1\r\n");
        assert_eq!(run(&mut e, &["INCR", "n"]), ":2\r\n");
        assert_eq!(run(&mut e, &["DECR", "n"]), ":1\r\n");
        assert_eq!(run(&mut e, &["INCRBY", "n", "41"]), ":42\r\n");
        assert_eq!(run(&mut e, &["DECRBY", "n", "50"]), ":-8\r\n");
        assert_eq!(run(&mut e, &["GET", "n"]), "$2\r\n-8\r\n");
        assert_eq!(run(&mut e, &["DECR", "fresh"]), ":-1\r\n");
        run(&mut e, &["SET", "s", "abc"]);
        assert_eq!(
            run(&mut e, &["INCR", "s"]),
            "-ERR value is not an integer or out of range\r\n"
        );
        run(&mut e, &["SET", "s", " 1"]);
        assert_eq!(
            run(&mut e, &["INCR", "s"]),
            "-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(
            run(&mut e, &["INCRBY", "n", "x"]),
            "-ERR value is not an integer or out of range\r\n"
        );
        run(&mut e, &["SET", "big", &i64::MAX.to_string()]);
        assert_eq!(
            run(&mut e, &["INCR", "big"]),
            "-ERR increment or decrement would overflow\r\n"
        );
        assert_eq!(
            run(&mut e, &["DECRBY", "n", &i64::MIN.to_string()]),
            "-ERR decrement would overflow\r\n"
        );
        assert_eq!(
            run(&mut e, &["INCR"]),
            "-ERR wrong number of arguments for 'incr' command\r\n"
        );
        assert_eq!(
            run(&mut e, &["INCRBY", "n"]),
            "-ERR wrong number of arguments for 'incrby' command\r\n"
        );
    }

    #[test]
    fn del_exists_mset_mget_dbsize_flushall() {
        let mut e = engine();
        assert_eq!(
            run(&mut e, &["MSET", "a", "1", "b", "2", "c", "3"]),
            "+OK\r\n"
        );
        assert_eq!(
            run(&mut e, &["MSET", "a", "1", "b"]),
            "-ERR wrong number of arguments for 'mset' command\r\n"
        );
        assert_eq!(
            run(&mut e, &["MGET", "a", "b", "nope", "c"]),
            "*4\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n$1\r\n3\r\n"
        );
        assert_eq!(run(&mut e, &["EXISTS", "a", "b", "nope", "a"]), ":3\r\n");
        assert_eq!(run(&mut e, &["DBSIZE"]), ":3\r\n");
        assert_eq!(run(&mut e, &["DEL", "a", "nope", "b", "a"]), ":2\r\n");
        assert_eq!(run(&mut e, &["DEL", "nope"]), ":0\r\n");
        assert_eq!(run(&mut e, &["DBSIZE"]), ":1\r\n");
        assert_eq!(run(&mut e, &["FLUSHALL", "BOGUS"]), "-ERR syntax error\r\n");
        assert_eq!(run(&mut e, &["FLUSHALL"]), "+OK\r\n");
        assert_eq!(run(&mut e, &["FLUSHALL", "async"]), "+OK\r\n");
        assert_eq!(run(&mut e, &["DBSIZE"]), ":0\r\n");
        assert_eq!(
            run(&mut e, &["DEL"]),
            "-ERR wrong number of arguments for 'del' command\r\n"
        );
    }

    #[test]
    fn unknown_command_has_redis_text() {
        let mut e = engine();
        assert_eq!(
            run(&mut e, &["foo"]),
            "-ERR unknown command 'foo', with args beginning with: \r\n"
        );
        assert_eq!(
            run(&mut e, &["NOSUCHCMD", "arg", "b"]),
            "-ERR unknown command 'NOSUCHCMD', with args beginning with: 'arg' 'b' \r\n"
        );
        let long = "x".repeat(300);
        let reply = run(&mut e, &["foo", &long, "y"]);
        assert!(reply.len() < 300, "arguments are cut at 128 bytes: {reply}");
        let mut out = Vec::new();
        e.execute(vec![b"a\r\nb".to_vec()], &mut out);
        assert_eq!(
            out,
            b"-ERR unknown command 'a  b', with args beginning with: \r\n"
        );
    }

    #[test]
    fn admin_commands_keep_clients_happy() {
        let mut e = engine();
        assert_eq!(run(&mut e, &["COMMAND", "DOCS"]), "*0\r\n");
        assert_eq!(run(&mut e, &["COMMAND"]), "*0\r\n");
        assert_eq!(
            run(&mut e, &["CONFIG", "GET", "save"]),
            "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
        );
        assert_eq!(
            run(&mut e, &["CONFIG", "GET", "appendonly"]),
            "*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n"
        );
        assert_eq!(run(&mut e, &["CONFIG", "GET", "nosuch"]), "*0\r\n");
        assert!(run(&mut e, &["CONFIG", "GET", "append*"]).starts_with("*4\r\n"));
        assert_eq!(
            run(&mut e, &["CONFIG", "GET"]),
            "-ERR wrong number of arguments for 'config|get' command\r\n"
        );
        assert_eq!(
            run(&mut e, &["CONFIG", "FOO"]),
            "-ERR unknown subcommand 'FOO'. Try CONFIG HELP.\r\n"
        );
        assert_eq!(run(&mut e, &["SELECT", "0"]), "+OK\r\n");
        assert_eq!(
            run(&mut e, &["SELECT", "1"]),
            "-ERR DB index is out of range\r\n"
        );
        assert_eq!(
            run(&mut e, &["SELECT", "x"]),
            format!("-{ERR_NOT_INTEGER}\r\n")
        );
        assert_eq!(run(&mut e, &["CLIENT", "SETNAME", "x"]), "+OK\r\n");
        run(&mut e, &["SET", "k", "v"]);
        let info = run(&mut e, &["INFO"]);
        assert!(
            info.starts_with('$') && info.contains("redis_version:") && info.contains("db0:keys=1")
        );
        let mut out = Vec::new();
        assert_eq!(e.execute(vec![b"QUIT".to_vec()], &mut out), Outcome::Close);
        assert_eq!(out, b"+OK\r\n");
    }

    #[test]
    fn ftvm_load_sets_the_dirty_rate() {
        let mut e = engine();
        assert_eq!(run(&mut e, &["FTVM.LOAD", "1000"]), "+OK\r\n");
        assert_eq!(e.dirty_pages_per_ms, 1000);
        assert_eq!(
            run(&mut e, &["ftvm.load", "-1"]),
            format!("-{ERR_NOT_INTEGER}\r\n")
        );
        assert_eq!(e.dirty_pages_per_ms, 1000);
    }

    #[test]
    fn huge_mget_is_refused() {
        let mut e = engine();
        let v = "x".repeat(1 << 20);
        run(&mut e, &["SET", "big", &v]);
        let mut args = vec!["MGET"];
        args.extend(core::iter::repeat_n("big", 20));
        assert_eq!(run(&mut e, &args), format!("-{ERR_REPLY_TOO_LARGE}\r\n"));
        assert!(run(&mut e, &["MGET", "big", "big"]).starts_with("*2\r\n$1048576\r\n"));
    }

    #[test]
    fn glob() {
        assert!(glob_match(b"*", b"save"));
        assert!(glob_match(b"SA?E", b"save"));
        assert!(glob_match(b"a*y", b"appendonly"));
        assert!(!glob_match(b"a*x", b"appendonly"));
    }

    #[test]
    fn writes_are_logged_as_effects_and_replay_rebuilds_the_store() {
        let mut e = Engine::new(Aof::blank(1 << 20, true));
        for cmd in [
            &["SET", "a", "1"][..],
            &["INCR", "a"],
            &["INCRBY", "c", "5"],
            &["MSET", "x", "1", "y", "2"],
            &["DEL", "x", "nope"],
            &["SET", "k", "v", "NX"],
            &["SET", "k", "w", "NX"],
            &["FLUSHALL"],
            &["SET", "after", "flush"],
            &["INCR", "after"],
            &["DEL", "nope"],
        ] {
            run(&mut e, cmd);
        }
        // Failed (INCR of "flush") and no-op writes are not logged: 8 records.
        assert_eq!(e.log.last_seq(), 8);
        let mut disk = vec![0u8; 1 << 20];
        while let Some((tag, op)) = e.log.next_op() {
            if let DiskOp::Write { sector, data } = &op {
                let at = *sector as usize * 512;
                disk[at..at + data.len()].copy_from_slice(data);
            }
            e.log.op_done(tag, op, true);
        }
        let mut e2 = engine();
        let mut r = Replay::new(FIRST_RECORD, disk.len() as u64, 1, 1);
        let mut ok = true;
        r.feed(&disk[512..], &mut |args| ok &= e2.apply_record(args));
        assert!(ok);
        assert_eq!(r.records(), 8);
        assert_eq!(run(&mut e2, &["GET", "after"]), "$5\r\nflush\r\n");
        assert_eq!(run(&mut e2, &["DBSIZE"]), ":1\r\n");
    }

    #[test]
    fn a_full_log_refuses_writes_and_reads_keep_working() {
        let mut e = Engine::new(Aof::blank(1024, true));
        let v = "x".repeat(300);
        assert_eq!(run(&mut e, &["SET", "a", &v]), "+OK\r\n");
        assert_eq!(run(&mut e, &["SET", "b", &v]), "-ERR disk log full\r\n");
        assert_eq!(run(&mut e, &["INCR", "n"]), ":1\r\n");
        assert_eq!(run(&mut e, &["MSET", "b", &v]), "-ERR disk log full\r\n");
        assert_eq!(run(&mut e, &["GET", "b"]), "$-1\r\n");
        assert_eq!(run(&mut e, &["EXISTS", "a"]), ":1\r\n");
    }

    #[test]
    fn maxmemory_refuses_growing_writes_only() {
        let mut e = engine();
        e.maxmemory = 100;
        assert_eq!(run(&mut e, &["SET", "a", &"x".repeat(200)]), "+OK\r\n");
        assert_eq!(run(&mut e, &["SET", "b", "1"]), format!("-{ERR_OOM}\r\n"));
        assert_eq!(run(&mut e, &["GET", "b"]), "$-1\r\n");
        assert_eq!(run(&mut e, &["DEL", "a"]), ":1\r\n");
        assert_eq!(run(&mut e, &["SET", "b", "1"]), "+OK\r\n");
    }

    #[test]
    fn tags_follow_the_log() {
        let mut e = Engine::new(Aof::blank(1 << 20, true));
        assert_eq!(e.tag(), 0);
        run(&mut e, &["GET", "x"]);
        assert_eq!(e.tag(), 0);
        run(&mut e, &["SET", "x", "1"]);
        assert_eq!(e.tag(), 1);
        assert_eq!(e.durable(), 0);
    }
}
