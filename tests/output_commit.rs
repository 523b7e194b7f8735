//! Output commit, seen from outside: no guest frame leaves host A before the backup has
//! acknowledged the epoch that produced it.
//!
//! An `ftvm site` runs with host A's output trace on (`site up --output-trace`: every frame the
//! hold takes, every seal, every release and the epoch it acknowledges, every frame written to the
//! TAP with a hash of its bytes, on the real-time clock). While clients in the client namespace
//! write over several connections, two captures run (tcpdump, nanosecond kernel timestamps on the
//! same real-time clock):
//! - on the business LAN bridge's port for host A (`a0` in `<site>-lan`, frames coming in from A):
//!   what actually left A;
//! - on host A's A-Link port (`alink0` in `<site>-a`, segments coming in from B): when each of
//!   B's acknowledgements reached A. The stream is reassembled and its frames decoded (the A-Link
//!   is authenticated, not encrypted), which gives each `EpochAck`'s epoch.
//!
//! Each captured guest frame is found in the trace by its hash, which gives its epoch. Then:
//! 1. its capture time is not before the first `release … ack` of an epoch ≥ its own (the
//!    primary's acknowledgement handler released it);
//! 2. its capture time is not before the first `EpochAck` of an epoch ≥ its own seen on the
//!    A-Link capture. This one does not trust the primary at all: the acknowledgement is read off
//!    the wire, from B;
//! 3. no release through an epoch happened before B's acknowledgement of that epoch reached A;
//! 4. almost every guest frame on the wire is found in the trace (≥ 90 %, and several hundred).
//!
//! Why this fails if output commit breaks: a frame sent directly (not through the hold) has no
//! `sent` line, so (4) fails; a hold that lets a frame out with an earlier batch, or an engine that
//! releases an epoch at its commit instead of its acknowledgement, puts frames on the wire before
//! B's `EpochAck` for their epoch arrives (≥ one A-Link round trip early), so (2) and (3) fail;
//! a release after the right acknowledgement but of the wrong epoch fails (1) or (2). And the
//! trace must not show an `unhold` (the engine giving up on the backup) while the pair was
//! protected, which would make every check vacuous.
//!
//! Needs root, /dev/kvm and tcpdump (fails, never skips).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ftvm_proto::frame::{FrameHeader, FrameKind, HEADER_LEN, TAG_LEN};
use ftvm_system_tests::capture::{Capture, Packet};
use ftvm_system_tests::site::Site;
use ftvm_system_tests::{enter_netns, require_root_and_kvm, Reply, RespClient, TempDir};
use ftvm_repl::output::trace::{
    frame_hash, FileTrace, ReleaseCause, TraceEvent, TraceRecord,
};

/// The guest's MAC (the site's default).
use ftvm_system_tests::SITE_GUEST_MAC as GUEST_MAC;
/// The backup's A-Link port (the site's default).
const ALINK_PORT: u16 = 7700;
/// Client connections and how long they write.
const CONNECTIONS: usize = 4;
const LOAD_TIME: Duration = Duration::from_millis(2500);
/// At least this many guest frames must be captured and matched to the trace.
const MIN_MATCHED: usize = 300;
/// And at least this share of the guest frames captured.
const MIN_MATCHED_SHARE: f64 = 0.90;

// --------------------------------------------------------------------------------------------
// Captures.

/// The TCP payload of an Ethernet/IPv4/TCP frame with its sequence number and flow
/// (source address and port, destination address and port).
fn tcp_payload(frame: &[u8]) -> Option<(u64, u32, &[u8])> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = ip.get(ihl..total)?;
    let data_off = usize::from(tcp.get(12)? >> 4) * 4;
    let flow = u64::from(u32::from_be_bytes(ip[12..16].try_into().ok()?)) << 32
        | u64::from(u16::from_be_bytes([tcp[0], tcp[1]])) << 16
        | u64::from(u16::from_be_bytes([tcp[2], tcp[3]]));
    let seq = u32::from_be_bytes(tcp[4..8].try_into().ok()?);
    Some((flow, seq, tcp.get(data_off..)?))
}

/// One `EpochAck` read off the A-Link capture.
#[derive(Clone, Copy, Debug)]
struct WireAck {
    /// When the segment with its last byte reached A.
    t_ns: u64,
    epoch: u64,
    /// The B→A frame just before it (by A-Link sequence number) was not seen: an earlier
    /// acknowledgement may be missing, so this one cannot tell when an earlier epoch was
    /// acknowledged.
    gap_before: bool,
}

/// A TCP segment with data: sequence number, capture time, payload.
type Segment<'a> = (u32, u64, &'a [u8]);
/// A contiguous piece of a reassembled stream: its bytes, and for each segment that added bytes,
/// the length of the run after it and its capture time.
type Run = (Vec<u8>, Vec<(usize, u64)>);

/// Reassembles each B→A TCP stream of the A-Link capture and decodes its frames (header, payload,
/// tag: see `ftvm_proto::frame`); returns the acknowledgements in stream order. The capture
/// starts mid-stream, so decoding synchronises on the first position where a valid header
/// starts; after a hole in the capture it synchronises again.
fn wire_acks(packets: &[Packet]) -> (Vec<WireAck>, usize) {
    let mut flows: HashMap<u64, Vec<Segment<'_>>> = HashMap::new();
    for p in packets {
        if let Some((flow, seq, payload)) = tcp_payload(&p.data) {
            if !payload.is_empty() {
                flows.entry(flow).or_default().push((seq, p.t_ns, payload));
            }
        }
    }
    let mut acks = Vec::new();
    let mut frames_decoded = 0;
    for segs in flows.values() {
        let base = segs[0].0;
        // Contiguous runs of the stream: bytes and, for each segment that added bytes, the
        // stream offset it ended at and its capture time.
        let mut order: Vec<(u64, u64, &[u8])> = segs
            .iter()
            .map(|&(seq, t, d)| (u64::from(seq.wrapping_sub(base)), t, d))
            .filter(|&(rel, _, _)| rel < 1 << 31)
            .collect();
        order.sort_by_key(|&(rel, t, _)| (rel, t));
        let mut runs: Vec<Run> = Vec::new();
        let mut next = 0u64;
        for (rel, t, d) in order {
            let end = rel + d.len() as u64;
            if end <= next && !runs.is_empty() {
                continue; // a retransmission of bytes already seen
            }
            if runs.is_empty() || rel > next {
                runs.push((Vec::new(), Vec::new())); // a hole: start a new run
                next = rel;
            }
            let run = runs.last_mut().unwrap();
            run.0.extend_from_slice(&d[(next - rel) as usize..]);
            run.1.push((run.0.len(), t));
            next = end;
        }
        for (bytes, times) in &runs {
            let time_of = |end: usize| times[times.partition_point(|&(e, _)| e < end)].1;
            let mut pos = 0;
            let mut last_seq: Option<u64> = None;
            while pos + HEADER_LEN <= bytes.len() {
                let header = FrameHeader::decode(bytes[pos..pos + HEADER_LEN].try_into().unwrap())
                    .ok()
                    .filter(|h| h.payload_len <= 1 << 16);
                let Some(h) = header else {
                    pos += 1;
                    last_seq = None;
                    continue;
                };
                let end = pos + HEADER_LEN + h.payload_len as usize + TAG_LEN;
                if end > bytes.len() {
                    break;
                }
                frames_decoded += 1;
                let gap_before = last_seq.is_none_or(|s| s + 1 != h.seq);
                if h.kind == FrameKind::EpochAck {
                    acks.push(WireAck { t_ns: time_of(end), epoch: h.epoch, gap_before });
                }
                last_seq = Some(h.seq);
                pos = end;
            }
        }
    }
    acks.sort_by_key(|a| a.t_ns);
    (acks, frames_decoded)
}

/// For events `(t, epoch)` in time order: the time of the first whose epoch (or an earlier one's)
/// reaches `epoch`, i.e. when `epoch` was first covered.
struct Coverage {
    /// (time, highest epoch so far), non-decreasing in both.
    steps: Vec<(u64, u64)>,
}

impl Coverage {
    fn new(mut events: Vec<(u64, u64)>) -> Self {
        events.sort_by_key(|&(t, _)| t);
        let mut max = None;
        let mut steps = Vec::new();
        for (t, e) in events {
            if max.is_none_or(|m| e > m) {
                max = Some(e);
                steps.push((t, e));
            }
        }
        Self { steps }
    }

    fn first_covering(&self, epoch: u64) -> Option<(u64, u64)> {
        self.steps.get(self.steps.partition_point(|&(_, e)| e < epoch)).copied()
    }
}

// --------------------------------------------------------------------------------------------
// The load.

/// Each connection alternates `SET` and `INCR` for `LOAD_TIME`; returns acknowledged replies and
/// failures.
fn run_load(client_ns: &str) -> (u64, Vec<String>) {
    let results: Vec<Result<u64, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONNECTIONS)
            .map(|c| {
                s.spawn(move || {
                    enter_netns(client_ns);
                    let mut client = RespClient::try_connect(Duration::from_secs(10))
                        .map_err(|e| format!("connection {c}: {e}"))?;
                    let start = Instant::now();
                    let mut n = 0u64;
                    while start.elapsed() < LOAD_TIME && n < 1_000_000 {
                        let reply = if n.is_multiple_of(2) {
                            client.try_cmd(&["SET", &format!("oc{c}:{n}"), &n.to_string()])
                        } else {
                            client.try_cmd(&["INCR", &format!("oc{c}")])
                        };
                        match reply {
                            Ok(Reply::Status(s)) if s == "OK" => {}
                            Ok(Reply::Integer(_)) => {}
                            Ok(other) => return Err(format!("connection {c}: reply {other:?}")),
                            Err(e) => return Err(format!("connection {c}: {e}")),
                        }
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("load thread panicked")).collect()
    });
    let mut total = 0;
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(n) => total += n,
            Err(e) => failures.push(e),
        }
    }
    (total, failures)
}

// --------------------------------------------------------------------------------------------
// Figures.

/// "min / p1 / p50 / p99 / max" of signed nanosecond figures, in microseconds.
fn distribution(values: &mut [i64]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort_unstable();
    let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
    format!(
        "min {:.1} / p1 {:.1} / p50 {:.1} / p99 {:.1} / max {:.1} µs (n = {})",
        at(0.0),
        at(0.01),
        at(0.5),
        at(0.99),
        at(1.0),
        values.len()
    )
}

/// What the trace says about the frames that went to the TAP.
#[derive(Default)]
struct Trace {
    /// (release time, through) of releases caused by an acknowledgement.
    ack_releases: Vec<(u64, u64)>,
    unholds: Vec<TraceRecord>,
    /// hash → (sent time, epoch, length, seq) of each frame written to the TAP.
    sent: HashMap<u64, Vec<(u64, u64, usize, u64)>>,
    sent_count: usize,
    sent_errors: usize,
    dropped: u64,
    lines: usize,
}

fn read_trace(path: &Path) -> Trace {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the output trace {}: {e}", path.display()));
    let mut t = Trace::default();
    for (i, line) in text.lines().enumerate() {
        let rec: TraceRecord = line.parse().unwrap_or_else(|e| panic!("trace line {}: {e}", i + 1));
        t.lines += 1;
        match rec.event {
            TraceEvent::Release { through, cause: ReleaseCause::Ack } => {
                t.ack_releases.push((rec.wall_ns, through))
            }
            TraceEvent::Release { cause: ReleaseCause::Unhold, .. } => t.unholds.push(rec),
            TraceEvent::Sent { seq, epoch, len, hash, ok } => {
                t.sent_count += 1;
                if ok {
                    t.sent.entry(hash).or_default().push((rec.wall_ns, epoch, len, seq));
                } else {
                    t.sent_errors += 1;
                }
            }
            TraceEvent::Dropped { records } => t.dropped += records,
            _ => {}
        }
    }
    t
}

#[test]
fn no_guest_frame_leaves_host_a_before_the_backup_acknowledges_its_epoch() {
    require_root_and_kvm();
    let tmp = TempDir::new("oc");
    let site = Site::up("oc", &["--output-trace"]);
    let st = site.status();
    assert!(st.is_protected(), "after site up: want protected / A primary / B backup; got {st}");

    // Only segments with data, from the backup's port: B's frames to A, not the TCP
    // acknowledgements of A's epochs.
    let alink_filter = format!(
        "tcp src port {ALINK_PORT} and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)"
    );
    let biz = Capture::start(&site.netns("lan"), "a0", "", tmp.path(), "business");
    let alink = Capture::start(&site.netns("a"), "alink0", &alink_filter, tmp.path(), "alink");
    let load_start = Instant::now();
    let (replies, failures) = run_load(&site.netns("client"));
    let load_time = load_start.elapsed();
    // The last replies' TCP acknowledgements and FINs leave a few epochs later.
    std::thread::sleep(Duration::from_millis(200));
    let (biz_packets, biz_dropped) = biz.stop();
    let (alink_packets, alink_dropped) = alink.stop();
    let st = site.status();
    // The trace writer writes every FLUSH_INTERVAL: wait until everything up to the end of the
    // captures is in the file (host A still runs; `site down` SIGKILLs it).
    std::thread::sleep(FileTrace::FLUSH_INTERVAL * 4);
    let trace = read_trace(&site.dir().join("output-trace.txt"));

    println!(
        "[{}] load: {replies} replies over {CONNECTIONS} connections in {:.2} s; failures: {failures:?}",
        site.name,
        load_time.as_secs_f64()
    );
    assert!(failures.is_empty(), "client load failed: {failures:?}");
    assert!(
        st.state == "protected" && st.role_a == "primary" && st.role_b == "backup",
        "after the load the pair must still be protected; got {} / {} / {}",
        st.state,
        st.role_a,
        st.role_b
    );
    assert_eq!(trace.dropped, 0, "the output trace lost records: it cannot be checked");
    assert!(
        trace.unholds.is_empty(),
        "the primary stopped holding output while the pair was protected: {:?}",
        trace.unholds
    );
    assert_eq!((biz_dropped, alink_dropped), (0, 0), "tcpdump dropped frames (business, A-Link)");
    println!(
        "[{}] trace: {} lines, {} ack releases, {} frames sent ({} refused by the TAP)",
        site.name,
        trace.lines,
        trace.ack_releases.len(),
        trace.sent_count,
        trace.sent_errors
    );

    // B's acknowledgements, off the wire.
    let (acks, alink_frames) = wire_acks(&alink_packets);
    let first_wire_ack = acks.first().map(|a| a.epoch).expect("no EpochAck in the A-Link capture");
    println!(
        "[{}] A-Link capture: {} segments, {alink_frames} frames decoded, {} EpochAcks (epochs {first_wire_ack}..={})",
        site.name,
        alink_packets.len(),
        acks.len(),
        acks.iter().map(|a| a.epoch).max().unwrap_or(0)
    );
    let wire = Coverage::new(acks.iter().map(|a| (a.t_ns, a.epoch)).collect());
    let gap_before: HashMap<u64, bool> = acks.iter().map(|a| (a.epoch, a.gap_before)).collect();
    let released = Coverage::new(trace.ack_releases.clone());

    // (3) No release before B's acknowledgement of that epoch reached A.
    let mut early_releases = Vec::new();
    let mut release_lag = Vec::new();
    for &(t, through) in &released.steps {
        if through <= first_wire_ack {
            continue;
        }
        match wire.first_covering(through) {
            Some((ta, e)) if !gap_before.get(&e).copied().unwrap_or(true) => {
                release_lag.push(t as i64 - ta as i64);
                if t < ta {
                    early_releases.push(format!(
                        "release through {through} at {t}, {:.1} µs before B's EpochAck {e} reached A",
                        (ta - t) as f64 / 1e3
                    ));
                }
            }
            _ => {}
        }
    }

    // (1), (2), (4): every guest frame that left A.
    let guest: Vec<&Packet> =
        biz_packets.iter().filter(|p| p.data.get(6..12) == Some(&GUEST_MAC)).collect();
    let mut matched = 0usize;
    let mut unmatched = Vec::new();
    let mut ambiguous = 0usize;
    let mut wire_judged = 0usize;
    let mut violations = Vec::new();
    let (mut after_release, mut after_wire_ack, mut after_sent) =
        (Vec::new(), Vec::new(), Vec::new());
    for p in &guest {
        let h = frame_hash(&p.data);
        // The `sent` line of this frame: same hash and length, written closest to the capture.
        let cands: Vec<_> =
            trace.sent.get(&h).into_iter().flatten().filter(|c| c.2 == p.data.len()).collect();
        ambiguous += usize::from(cands.len() > 1);
        let Some(&&(t_sent, epoch, _, seq)) =
            cands.iter().min_by_key(|c| (c.0 as i64 - p.t_ns as i64).unsigned_abs())
        else {
            unmatched.push(p.t_ns);
            continue;
        };
        if (t_sent as i64 - p.t_ns as i64).unsigned_abs() > 1_000_000_000 {
            unmatched.push(p.t_ns);
            continue;
        }
        matched += 1;
        after_sent.push(p.t_ns as i64 - t_sent as i64);
        match released.first_covering(epoch) {
            Some((t_rel, through)) => {
                after_release.push(p.t_ns as i64 - t_rel as i64);
                if p.t_ns < t_rel {
                    violations.push(format!(
                        "frame seq {seq} of epoch {epoch} captured at {}, {:.1} µs before the primary released through {through}",
                        p.t_ns,
                        (t_rel - p.t_ns) as f64 / 1e3
                    ));
                }
            }
            None => violations.push(format!(
                "frame seq {seq} of epoch {epoch} captured at {} but no release covers its epoch",
                p.t_ns
            )),
        }
        // B's acknowledgement of an epoch ≥ this one must have reached A before. Epochs up to
        // the first acknowledgement captured may have been acknowledged before the capture began.
        if epoch > first_wire_ack {
            match wire.first_covering(epoch) {
                Some((_, e)) if gap_before.get(&e).copied().unwrap_or(true) => {}
                Some((t_ack, e)) => {
                    wire_judged += 1;
                    after_wire_ack.push(p.t_ns as i64 - t_ack as i64);
                    if p.t_ns < t_ack {
                        violations.push(format!(
                            "frame seq {seq} of epoch {epoch} captured at {}, {:.1} µs before B's EpochAck {e} reached A",
                            p.t_ns,
                            (t_ack - p.t_ns) as f64 / 1e3
                        ));
                    }
                }
                None => violations.push(format!(
                    "frame seq {seq} of epoch {epoch} captured at {}, but B never acknowledged its epoch on the A-Link capture",
                    p.t_ns
                )),
            }
        }
    }

    let name = &site.name;
    println!(
        "[{name}] business capture: {} frames from A, {} from the guest; matched in the trace: {matched} ({:.1} %), unmatched {}, ambiguous hashes {ambiguous}",
        biz_packets.len(),
        guest.len(),
        100.0 * matched as f64 / guest.len().max(1) as f64,
        unmatched.len()
    );
    println!("[{name}] capture − primary's release (ack): {}", distribution(&mut after_release));
    println!(
        "[{name}] capture − B's EpochAck on the A-Link ({wire_judged} frames): {}",
        distribution(&mut after_wire_ack)
    );
    println!("[{name}] capture − write to the TAP: {}", distribution(&mut after_sent));
    println!(
        "[{name}] primary's release − B's EpochAck on the A-Link: {}",
        distribution(&mut release_lag)
    );

    assert!(
        violations.is_empty(),
        "{} frames left A too early:\n{}",
        violations.len(),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        early_releases.is_empty(),
        "releases before the acknowledgement:\n{}",
        early_releases.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        matched >= MIN_MATCHED && matched as f64 >= MIN_MATCHED_SHARE * guest.len() as f64,
        "only {matched} of {} guest frames on the wire were found in the output trace (want ≥ {MIN_MATCHED} and ≥ {:.0} %): frames that bypass the hold?",
        guest.len(),
        MIN_MATCHED_SHARE * 100.0
    );
    assert!(
        wire_judged as f64 >= MIN_MATCHED_SHARE * matched as f64,
        "only {wire_judged} of {matched} matched frames could be checked against the A-Link capture"
    );
    assert!(
        release_lag.len() >= 100,
        "only {} releases checked against the A-Link capture",
        release_lag.len()
    );
}
