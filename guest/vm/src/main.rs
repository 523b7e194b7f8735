//! The ftvm reference guest: a Redis-protocol key-value server that runs at CPL 3 inside the ftvm
//! VMM, on virtio-net (smoltcp) and virtio-blk (an append-only log), polling its queues and
//! sleeping in the VMM when idle. The contract with the VMM is `ftvm-guest-abi`; everything that
//! does not touch hardware is in `ftvm-guest-kv`.
#![no_std]
#![no_main]

extern crate alloc;

#[macro_use]
mod rt;
mod blk;
mod net;
mod virtio;

use alloc::vec;
use alloc::vec::Vec;

use ftvm_guest_abi::{BootInfo, GuestStatus, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, WAIT_FOREVER};
use ftvm_guest_kv::aof::{DiskOp, ReplayStop, SECTOR, VERSION_1};
use ftvm_guest_kv::conn::{Conn, IN_HIGH_WATER};
use ftvm_guest_kv::engine::Engine;
use ftvm_guest_kv::load::{wait_timeout, Clock, DirtyPacer, PageCursor};
use ftvm_guest_kv::rewrite::{self, Aof, Event, OpTag};
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use crate::blk::{Blk, Kind};
use crate::net::Net;

/// TCP sockets in the pool. One socket serves one connection (smoltcp has no accept backlog),
/// and a client that reconnects at once (redis-benchmark between tests) needs new sockets while
/// its old connections are still closing: twice the 64 concurrent clients.
const SOCKETS: usize = 128;
/// Receive and send buffer of each TCP socket.
const SOCKET_RX: usize = 32 * 1024;
const SOCKET_TX: usize = 32 * 1024;
/// Smallest heap the guest accepts.
const MIN_HEAP: u64 = 16 << 20;
/// Region the dirtying load uses when the boot info names none.
const DEFAULT_DIRTY_PAGES: usize = 4096;
/// Consecutive failed disk requests after which the guest gives up.
const MAX_DISK_FAILURES: u64 = 10;

/// Entered from `_start` with the BootInfo address the VMM put in rdi.
pub extern "C" fn guest_main(boot_info_addr: u64) -> ! {
    // SAFETY: the VMM maps BOOT_INFO_GPA (rdi) as RAM; BootInfo is plain integers, so any bytes
    // are a valid value, and the magic and version are checked before anything is trusted.
    let bi: BootInfo = unsafe { core::ptr::read_volatile(boot_info_addr as *const BootInfo) };
    if !bi.is_valid() {
        println!(
            "ftvm-guest: bad boot info at {:#x}: magic {:#x} version {} (expected magic {:#x} version {})",
            boot_info_addr, bi.magic, bi.version, BOOT_INFO_MAGIC, BOOT_INFO_VERSION
        );
        rt::exit(2);
    }
    if bi.heap_start == 0
        || bi.heap_end < bi.heap_start.saturating_add(MIN_HEAP)
        || bi.heap_end > bi.mem_size
    {
        println!(
            "ftvm-guest: bad heap in boot info: {:#x}..{:#x} (RAM {:#x}, need at least {} MiB)",
            bi.heap_start,
            bi.heap_end,
            bi.mem_size,
            MIN_HEAP >> 20
        );
        rt::exit(2);
    }
    // SAFETY: the ABI gives the guest [heap_start, heap_end) (between its image and its stack).
    if !unsafe { rt::init_heap(bi.heap_start, bi.heap_end) } {
        println!(
            "ftvm-guest: the allocator refused the heap {:#x}..{:#x}",
            bi.heap_start, bi.heap_end
        );
        rt::exit(2);
    }
    rt::status(GuestStatus::Started);
    println!(
        "ftvm-guest: started: {} MiB RAM, {} MiB heap, TSC {} kHz",
        bi.mem_size >> 20,
        (bi.heap_end - bi.heap_start) >> 20,
        bi.tsc_khz
    );
    if let Err(e) = run(&bi) {
        println!("ftvm-guest: fatal: {}", e);
        rt::exit(3);
    }
    rt::exit(0)
}

/// Opens the log: reads the header, replays the active region into `engine`, writes the header
/// with the generation bumped (durably), and returns the log, appending after the last good
/// record.
fn open_log(blk: &mut Blk, engine: &mut Engine) -> Result<Aof, &'static str> {
    let cap = blk.capacity.saturating_mul(SECTOR as u64);
    let opened = {
        let mut read = |sector: u64, buf: &mut [u8]| blk.run(Kind::Read, sector, buf);
        let mut apply = |args: &[&[u8]]| {
            engine.apply_record(args);
        };
        rewrite::open(cap, &mut read, &mut apply)?
    };
    let h = opened.header;
    match opened.found {
        None => println!("ftvm-guest: no log header on the disk: starting a new log"),
        Some(found) if found.version == VERSION_1 => println!(
            "ftvm-guest: a version-1 log (the whole disk): its first rewrite moves it to two regions"
        ),
        Some(_) => {}
    }
    if matches!(opened.stop, Some(ReplayStop::Torn | ReplayStop::Corrupt)) {
        println!(
            "ftvm-guest: the log ends in a torn or corrupt record at byte {}: appending from there",
            opened.end
        );
    }
    engine.stats.replayed_records = opened.records;
    println!(
        "ftvm-guest: replayed {} records ({} bytes) from the log region at {} KiB ({} KiB)",
        opened.records,
        opened.bytes(),
        h.start >> 10,
        h.len >> 10
    );
    if blk.read_only {
        println!("ftvm-guest: the block device is read-only: writes will not be persisted");
        return Ok(Aof::disabled());
    }
    let mut sector = h.encode().to_vec();
    blk.run(Kind::Write, 0, &mut sector)?;
    if blk.flush {
        blk.run(Kind::Flush, 0, &mut [])?;
    }
    Ok(Aof::new(&opened, blk.flush))
}

/// Tells the console what the log's rewrite did.
fn report(events: Vec<Event>) {
    for e in events {
        match e {
            Event::Started {
                from,
                log_bytes,
                to,
                live_bytes,
            } => println!(
                "ftvm-guest: log rewrite started: {} bytes in the region at {} KiB ({} KiB), about {} bytes live, into the region at {} KiB ({} KiB)",
                log_bytes,
                from.start >> 10,
                from.len >> 10,
                live_bytes,
                to.start >> 10,
                to.len >> 10
            ),
            Event::Finished { region, bytes } => println!(
                "ftvm-guest: log rewrite done: the log is now {} bytes in the region at {} KiB",
                bytes,
                region.start >> 10
            ),
            Event::Abandoned(why) => println!("ftvm-guest: log rewrite abandoned: {}", why),
        }
    }
}

/// The log's requests in flight, by block request slot.
struct Disk {
    blk: Blk,
    inflight: Vec<Option<(OpTag, DiskOp)>>,
    failures: u64,
}

impl Disk {
    /// Takes completions and submits what the log wants written. True if anything happened.
    fn pump(&mut self, engine: &mut Engine) -> Result<bool, &'static str> {
        let mut progress = false;
        while let Some((slot, ok)) = self.blk.poll() {
            progress = true;
            let Some((tag, op)) = self.inflight.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            if ok {
                self.failures = 0;
            } else {
                self.failures += 1;
                println!(
                    "ftvm-guest: disk request failed ({} in a row); retrying",
                    self.failures
                );
                if self.failures >= MAX_DISK_FAILURES {
                    return Err("the log device keeps failing");
                }
            }
            engine.log.op_done(tag, op, ok);
        }
        let mut submitted = false;
        while let Some((tag, mut op)) = engine.log.next_op() {
            let (kind, sector, ptr, len) = match &mut op {
                DiskOp::Write { sector, data } => {
                    (Kind::Write, *sector, data.as_mut_ptr(), data.len())
                }
                DiskOp::Flush => (Kind::Flush, 0, core::ptr::null_mut(), 0),
            };
            // SAFETY: the buffer is the Vec inside `op`, kept in `inflight` (its heap storage does
            // not move) until this slot completes.
            let Some(slot) = (unsafe { self.blk.submit(kind, sector, ptr, len) }) else {
                // Each log writer (the active one and a rewrite's) keeps at most one write and
                // one flush in flight, the header one request, and there are more slots than
                // that.
                return Err("no free block request slot");
            };
            if slot >= self.inflight.len() {
                self.inflight.resize_with(slot + 1, || None);
            }
            self.inflight[slot] = Some((tag, op));
            submitted = true;
        }
        if submitted {
            self.blk.kick();
        }
        Ok(progress || submitted)
    }
}

/// The memory-dirtying benchmark load.
struct DirtyLoad {
    region: *mut u8,
    pages: usize,
    cursor: PageCursor,
    pacer: DirtyPacer,
    counter: u64,
    failed: bool,
}

impl DirtyLoad {
    fn new(pages: usize) -> Self {
        let mut d = Self {
            region: core::ptr::null_mut(),
            pages: 0,
            cursor: PageCursor::new(0),
            pacer: DirtyPacer::new(),
            counter: 0,
            failed: false,
        };
        if pages > 0 {
            d.allocate(pages);
        }
        d
    }

    fn allocate(&mut self, pages: usize) {
        match virtio::dma_alloc(pages * 4096) {
            Ok(p) => {
                self.region = p;
                self.pages = pages;
                self.cursor = PageCursor::new(pages);
                println!("ftvm-guest: dirtying region: {} pages", pages);
            }
            Err(_) => {
                self.failed = true;
                println!(
                    "ftvm-guest: no memory for a dirtying region of {} pages: load disabled",
                    pages
                );
            }
        }
    }

    fn run(&mut self, now_us: u64, pages_per_ms: u32) {
        let n = self
            .pacer
            .due(now_us, if self.failed { 0 } else { pages_per_ms });
        if n == 0 {
            return;
        }
        if self.pages == 0 {
            self.allocate(DEFAULT_DIRTY_PAGES);
            if self.failed {
                return;
            }
        }
        self.counter += 1;
        let (region, value) = (self.region, self.counter);
        self.cursor.advance(n, |i| {
            // SAFETY: i < pages: one u64 at the start of a page of the region we own.
            unsafe { core::ptr::write_volatile(region.add(i * 4096) as *mut u64, value) }
        });
    }
}

fn new_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; SOCKET_RX]),
        tcp::SocketBuffer::new(vec![0u8; SOCKET_TX]),
    );
    // Replies are small and must not wait for the client's delayed ACK.
    s.set_nagle_enabled(false);
    s
}

/// Hands released output to the socket. True if it took anything.
fn send_out(sock: &mut tcp::Socket<'_>, conn: &mut Conn) -> bool {
    let data = conn.sendable();
    if data.is_empty() || !sock.may_send() {
        return false;
    }
    match sock.send_slice(data) {
        Ok(n) if n > 0 => {
            conn.sent(n);
            true
        }
        _ => false,
    }
}

/// Serves one socket of the pool. True if anything happened.
fn service(
    sock: &mut tcp::Socket<'static>,
    slot: &mut Option<Conn>,
    engine: &mut Engine,
    port: u16,
) -> bool {
    match sock.state() {
        tcp::State::Closed => {
            if slot.take().is_some() {
                engine.stats.connected_clients -= 1;
            }
            // Cannot fail: the socket is closed and the port is not zero.
            let _ = sock.listen(port);
            return true;
        }
        tcp::State::Listen | tcp::State::SynReceived => return false,
        tcp::State::TimeWait | tcp::State::Closing | tcp::State::LastAck => {
            if slot.take().is_some() {
                engine.stats.connected_clients -= 1;
            }
            return false;
        }
        _ => {}
    }
    let conn = slot.get_or_insert_with(|| {
        engine.stats.connected_clients += 1;
        engine.stats.total_connections += 1;
        Conn::new()
    });
    let mut progress = send_out(sock, conn);
    // Up to two recv calls: the ring buffer may wrap.
    for _ in 0..2 {
        if !conn.wants_input() || !sock.can_recv() {
            break;
        }
        let room = IN_HIGH_WATER - conn.buffered_input().min(IN_HIGH_WATER);
        let got = sock
            .recv(|buf| {
                let n = buf.len().min(room);
                conn.feed(&buf[..n]);
                (n, n)
            })
            .unwrap_or(0);
        if got == 0 {
            break;
        }
        progress = true;
    }
    if conn.process(engine) > 0 {
        progress = true;
    }
    progress |= send_out(sock, conn);
    let peer_done = !sock.may_recv() && sock.recv_queue() == 0;
    let done = conn.finished() || (peer_done && conn.pending_out() == 0 && !conn.waiting_for_log());
    // may_send: still Established or CloseWait, i.e. we have not closed our side yet.
    if done && sock.may_send() {
        sock.close();
        progress = true;
    }
    progress
}

fn run(bi: &BootInfo) -> Result<(), &'static str> {
    let clock = Clock::new(bi.tsc_khz, rt::rdtsc());
    if bi.tsc_khz == 0 {
        println!("ftvm-guest: boot info gives no TSC frequency: assuming 1 GHz");
    }

    // ---- disk and log ----
    let mut engine = Engine::new(Aof::disabled());
    let mut disk = if bi.virtio_blk_base != 0 {
        let mut blk = Blk::new(bi.virtio_blk_base)?;
        println!(
            "ftvm-guest: virtio-blk: {} MiB{}{}",
            blk.capacity >> 11,
            if blk.flush { ", flush" } else { "" },
            if blk.read_only { ", read-only" } else { "" }
        );
        engine.log = open_log(&mut blk, &mut engine)?;
        Some(Disk {
            blk,
            inflight: Vec::new(),
            failures: 0,
        })
    } else {
        println!("ftvm-guest: no block device: writes will not be persisted");
        println!("ftvm-guest: replayed 0 records (0 bytes)");
        None
    };
    rt::status(GuestStatus::LogReplayed);

    // ---- dirtying load and memory limit ----
    engine.dirty_pages_per_ms = bi.dirty_pages_per_ms;
    let mut load = DirtyLoad::new(bi.dirty_region_pages as usize);
    let heap = (bi.heap_end - bi.heap_start) as usize;
    let fixed = load.pages * 4096 + SOCKETS * (SOCKET_RX + SOCKET_TX) + (16 << 20);
    engine.maxmemory = heap.saturating_sub(fixed) / 2;
    // Above this, connections are dropped to protect the guest (the store stops growing at
    // `maxmemory`, about half of it).
    let heap_limit = heap / 10 * 9;

    // ---- network ----
    if bi.virtio_net_base == 0 {
        return Err("no network device");
    }
    let mut net = Net::new(bi.virtio_net_base)?;
    let mac = if bi.mac != [0; 6] {
        bi.mac
    } else {
        net.config_mac
    };
    if net.config_mac != [0; 6] && net.config_mac != mac {
        println!("ftvm-guest: note: the device's MAC differs from the boot info's; using the boot info's");
    }
    let now = || Instant::from_micros(clock.micros(rt::rdtsc()) as i64);
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = rt::rdtsc();
    let mut iface = Interface::new(config, &mut net, now());
    let [a, b, c, d] = bi.ipv4;
    let ip = Ipv4Address::new(a, b, c, d);
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), bi.ipv4_prefix_len));
    });
    if bi.ipv4_gateway != [0; 4] {
        let [a, b, c, d] = bi.ipv4_gateway;
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(a, b, c, d))
            .map_err(|_| "route table full")?;
    }
    let port = if bi.kv_port == 0 { 6379 } else { bi.kv_port };
    let mut sockets = SocketSet::new(Vec::with_capacity(SOCKETS));
    let mut handles: Vec<SocketHandle> = Vec::with_capacity(SOCKETS);
    for _ in 0..SOCKETS {
        let mut s = new_socket();
        s.listen(port).map_err(|_| "cannot listen")?;
        handles.push(sockets.add(s));
    }
    let mut conns: Vec<Option<Conn>> = (0..SOCKETS).map(|_| None).collect();
    net.syn_budget = Some((port, SOCKETS));
    rt::status(GuestStatus::Serving);
    println!(
        "ftvm-guest: serving on {}:{} (mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, /{})",
        ip, port, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], bi.ipv4_prefix_len
    );

    // ---- main loop ----
    loop {
        engine.stats.loop_turns += 1;
        let ts = now();
        let mut progress = iface.poll(ts, &mut net, &mut sockets) == PollResult::SocketStateChanged;
        progress |= net.take_activity();
        if let Some(d) = disk.as_mut() {
            progress |= d.pump(&mut engine)?;
        }
        // Memory pressure (clients holding large partial commands or unread replies): drop the
        // connection that holds the most, rather than running out of heap.
        if rt::heap_allocated() > heap_limit {
            let biggest = conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (c.memory(), i)))
                .max();
            if let Some((bytes, i)) = biggest {
                if bytes > 0 {
                    println!(
                        "ftvm-guest: heap nearly full: dropping a connection that holds {} bytes",
                        bytes
                    );
                    sockets.get_mut::<tcp::Socket>(handles[i]).abort();
                    conns[i] = None;
                    engine.stats.connected_clients -= 1;
                    progress = true;
                }
            }
        }
        let mut listening = 0;
        for (h, slot) in handles.iter().zip(conns.iter_mut()) {
            let sock = sockets.get_mut::<tcp::Socket>(*h);
            progress |= service(sock, slot, &mut engine, port);
            listening += (sock.state() == tcp::State::Listen) as usize;
        }
        net.syn_budget = Some((port, listening));
        engine.stats.net = net.stats();
        // The log's rewrite copies a bounded number of keys per turn; then this iteration's
        // records (and the copy) go to the disk at once (group commit).
        if let Some(d) = disk.as_mut() {
            progress |= engine.step_log();
            report(engine.log.take_events());
            progress |= d.pump(&mut engine)?;
        }
        let now_us = clock.micros(rt::rdtsc());
        load.run(now_us, engine.dirty_pages_per_ms);
        net.kick();
        if progress {
            continue;
        }
        // Idle: sleep in the VMM until a device event or the next timer.
        let ts = now();
        let smol = iface.poll_delay(ts, &sockets).map(|d| d.total_micros());
        let dirty = load
            .pacer
            .next_deadline()
            .map(|t| t.saturating_sub(clock.micros(rt::rdtsc())));
        let timeout = wait_timeout(&[smol, dirty]);
        let mut pending = net.arm();
        if let Some(d) = disk.as_mut() {
            pending |= d.blk.arm();
        }
        if pending || timeout == Some(0) {
            continue;
        }
        engine.stats.idle_waits += 1;
        rt::wait(timeout.unwrap_or(WAIT_FOREVER));
    }
}
