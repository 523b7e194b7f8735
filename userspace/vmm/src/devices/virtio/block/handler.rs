//! virtio-blk request parsing, without KVM or a disk: a descriptor chain in, a [`Request`] (or
//! the status to answer at once) out.
//!
//! The layout follows the spec, not one driver's habit: the 16-byte header may share a
//! descriptor with data and data may span any number of descriptors. The device-readable part
//! comes first (header, then OUT data), the device-writable part last (IN data, then the status
//! byte, which is the last byte of the chain).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::virtio::{collect_chain, Desc, QueueError};
use crate::memory::GuestMemory;

/// Bytes per sector (capacity and request offsets count in these).
pub use ftvm_proto::limits::SECTOR_SIZE;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Request header: type u32, reserved u32, sector u64.
const HEADER_LEN: u64 = 16;

/// Status byte: success.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: the request failed or was malformed.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: unknown request type.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What the driver asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Write the device ID string.
    GetId,
}

/// A contiguous piece of guest memory that holds request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A well-formed request, checked against the disk size and guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index (what goes into the used ring).
    pub head: u16,
    /// The operation.
    pub request_type: RequestType,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data buffers (device-writable for IN and GET_ID, device-readable for OUT).
    pub data: Vec<Segment>,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

impl Request {
    /// Total data bytes.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Byte offset in the disk.
    pub fn offset(&self) -> u64 {
        // parse_request checked that the request ends within the disk, so no overflow.
        self.sector * SECTOR_SIZE
    }
}

/// The outcome of parsing one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Run it.
    Ready(Request),
    /// Answer at once with `status` (a bad request whose status byte is known).
    Reject {
        /// Head descriptor index.
        head: u16,
        /// Where the status byte goes.
        status_addr: GuestAddress,
        /// IOERR or UNSUPP.
        status: u8,
    },
}

/// Parses one chain. `capacity` is the disk size in sectors.
///
/// A request whose status byte can be located but is otherwise wrong (short header, data
/// outside RAM, sectors past the end, a length that is not whole sectors) gives
/// [`Parsed::Reject`] with IOERR; an unknown type gives UNSUPP. A chain where the status byte
/// cannot be located (a loop, a last descriptor that is not writable or is empty, a status
/// byte outside RAM, readable descriptors after writable ones) is a driver bug the device cannot
/// answer: [`QueueError::MalformedChain`].
pub fn parse_request(
    chain: DescriptorChain<&GuestMemory>,
    qidx: u16,
    mem: &GuestMemory,
    capacity: u64,
    descs: &mut Vec<Desc>,
) -> Result<Parsed, QueueError> {
    let head = chain.head_index();
    let malformed = |reason| QueueError::MalformedChain { queue: qidx, head, reason };
    if collect_chain(chain, descs).is_none() {
        return Err(malformed("the chain does not end (a loop or a bad next index)"));
    }
    let last = descs.last().copied().ok_or_else(|| malformed("empty chain"))?;
    if !last.writable || last.len == 0 {
        return Err(malformed("the last descriptor is not a writable status byte"));
    }
    let status_addr = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .filter(|a| mem.check_range(*a, 1))
        .ok_or_else(|| malformed("the status byte lies outside guest memory"))?;
    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return Err(malformed("a device-readable descriptor follows a writable one"));
    }
    let (readable, writable) = descs.split_at(first_writable);
    let reject = |status| Ok(Parsed::Reject { head, status_addr, status });

    let mut header = [0u8; HEADER_LEN as usize];
    if read_segments(mem, &segments(readable, 0, 0), &mut header).is_none() {
        return reject(STATUS_IOERR);
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    // IN and GET_ID write into everything writable but the status byte; OUT reads everything
    // readable after the header.
    let (request_type, data) = match request_type {
        VIRTIO_BLK_T_IN => (RequestType::In, segments(writable, 0, 1)),
        VIRTIO_BLK_T_OUT => (RequestType::Out, segments(readable, HEADER_LEN, 0)),
        VIRTIO_BLK_T_FLUSH => (RequestType::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => (RequestType::GetId, segments(writable, 0, 1)),
        _ => return reject(STATUS_UNSUPP),
    };
    if data.iter().any(|s| !mem.check_range(s.addr, s.len as usize)) {
        return reject(STATUS_IOERR);
    }
    let request = Request { head, request_type, sector, data, status_addr };
    let len = request.data_len();
    match request_type {
        RequestType::In | RequestType::Out => {
            if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
                return reject(STATUS_IOERR);
            }
            let fits = sector.checked_add(len / SECTOR_SIZE).is_some_and(|end| end <= capacity);
            if !fits {
                return reject(STATUS_IOERR);
            }
        }
        RequestType::GetId if len == 0 => return reject(STATUS_IOERR),
        RequestType::GetId | RequestType::Flush => {}
    }
    Ok(Parsed::Ready(request))
}

/// The non-empty pieces of `descs`, without the first `skip` and the last `trim` bytes.
fn segments(descs: &[Desc], mut skip: u64, trim: u64) -> Vec<Segment> {
    let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    let mut keep = total.saturating_sub(skip).saturating_sub(trim);
    let mut out = Vec::with_capacity(descs.len());
    for d in descs {
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(keep);
        if take > 0 {
            // A segment is part of one descriptor, whose length is a u32, and does not wrap
            // (check_range is applied before use).
            if let Some(addr) = d.addr.checked_add(skip) {
                out.push(Segment { addr, len: take as u32 });
            }
        }
        keep -= take;
        skip = 0;
        if keep == 0 {
            break;
        }
    }
    out
}

/// Fills `out` from the start of `segs`; `None` if they are too short or outside RAM.
fn read_segments(mem: &GuestMemory, segs: &[Segment], out: &mut [u8]) -> Option<()> {
    let mut at = 0;
    for s in segs {
        if at == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - at);
        mem.read_slice(&mut out[at..at + n], s.addr).ok()?;
        at += n;
    }
    (at == out.len()).then_some(())
}

/// Writes `bytes` across `segs` (as much as fits); returns the number of bytes written. Goes
/// through vm-memory, so the dirty bitmap records it.
pub fn write_segments(mem: &GuestMemory, segs: &[Segment], bytes: &[u8]) -> usize {
    let mut at = 0;
    for s in segs {
        if at == bytes.len() {
            break;
        }
        let n = (s.len as usize).min(bytes.len() - at);
        if mem.write_slice(&bytes[at..at + n], s.addr).is_err() {
            break;
        }
        at += n;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::pop_chain;
    use crate::devices::virtio::test_utils::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

    const CAPACITY: u64 = 64;

    fn header(t: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// Writes a header at 0x8_0000 and parses `chain`.
    fn parse(t: u32, sector: u64, chain: &[(u64, u32, bool)]) -> Result<Parsed, QueueError> {
        let mem = test_memory();
        mem.write_slice(&header(t, sector), GuestAddress(0x8_0000)).unwrap();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        tq.add_chain(chain);
        let c = pop_chain(&mut q, &mem).unwrap().unwrap();
        parse_request(c, 0, &mem, CAPACITY, &mut Vec::new())
    }

    fn ready(p: Result<Parsed, QueueError>) -> Request {
        match p.unwrap() {
            Parsed::Ready(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn rejected(p: Result<Parsed, QueueError>) -> u8 {
        match p.unwrap() {
            Parsed::Reject { status, .. } => status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_virtio_drivers_layouts() {
        // read_blocks: [header][data (w)][status (w)]
        let r = ready(parse(
            VIRTIO_BLK_T_IN,
            3,
            &[(0x8_0000, 16, false), (0x9_0000, 1024, true), (0xa_0000, 1, true)],
        ));
        assert_eq!(r.request_type, RequestType::In);
        assert_eq!(r.sector, 3);
        assert_eq!(r.data, [Segment { addr: GuestAddress(0x9_0000), len: 1024 }]);
        assert_eq!(r.status_addr, GuestAddress(0xa_0000));
        assert_eq!(r.offset(), 3 * 512);
        // write_blocks: [header][data][status (w)]
        let r = ready(parse(
            VIRTIO_BLK_T_OUT,
            0,
            &[(0x8_0000, 16, false), (0x9_0000, 512, false), (0xa_0000, 1, true)],
        ));
        assert_eq!(r.request_type, RequestType::Out);
        assert_eq!(r.data_len(), 512);
        // flush: [header][status (w)]
        let r = ready(parse(VIRTIO_BLK_T_FLUSH, 0, &[(0x8_0000, 16, false), (0xa_0000, 1, true)]));
        assert_eq!(r.request_type, RequestType::Flush);
        // get id: [header][20 bytes (w)][status (w)]
        let r = ready(parse(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(0x8_0000, 16, false), (0x9_0000, 20, true), (0xa_0000, 1, true)],
        ));
        assert_eq!(r.request_type, RequestType::GetId);
        assert_eq!(r.data_len(), 20);
    }

    #[test]
    fn parses_any_layout() {
        // Header and OUT data in one descriptor; status sharing a descriptor with nothing else.
        let r =
            ready(parse(VIRTIO_BLK_T_OUT, 1, &[(0x8_0000, 16 + 512, false), (0xa_0000, 1, true)]));
        assert_eq!(r.data, [Segment { addr: GuestAddress(0x8_0010), len: 512 }]);
        // IN data and status in one writable descriptor, data split over two.
        let r = ready(parse(
            VIRTIO_BLK_T_IN,
            0,
            &[(0x8_0000, 16, false), (0x9_0000, 256, true), (0xa_0000, 257, true)],
        ));
        assert_eq!(
            r.data,
            [
                Segment { addr: GuestAddress(0x9_0000), len: 256 },
                Segment { addr: GuestAddress(0xa_0000), len: 256 }
            ]
        );
        assert_eq!(r.status_addr, GuestAddress(0xa_0100));
        // Header split over two descriptors, zero-length descriptors in between.
        let r = ready(parse(
            VIRTIO_BLK_T_IN,
            7,
            &[
                (0x8_0000, 8, false),
                (0x7_0000, 0, false),
                (0x8_0008, 8, false),
                (0x9_0000, 512, true),
                (0xa_0000, 1, true),
            ],
        ));
        assert_eq!(r.sector, 7);
    }

    #[test]
    fn bad_requests_get_ioerr_or_unsupp() {
        let st = |d: u64| (0xa_0000 + d, 1, true);
        // Out of range: the last sector is 63.
        assert_eq!(
            rejected(parse(
                VIRTIO_BLK_T_IN,
                63,
                &[(0x8_0000, 16, false), (0x9_0000, 1024, true), st(0)]
            )),
            STATUS_IOERR
        );
        assert_eq!(
            rejected(parse(
                VIRTIO_BLK_T_OUT,
                u64::MAX,
                &[(0x8_0000, 16, false), (0x9_0000, 512, false), st(0)]
            )),
            STATUS_IOERR
        );
        // Sector 63 alone is fine.
        ready(parse(VIRTIO_BLK_T_IN, 63, &[(0x8_0000, 16, false), (0x9_0000, 512, true), st(0)]));
        // Not whole sectors, or no data.
        assert_eq!(
            rejected(parse(
                VIRTIO_BLK_T_IN,
                0,
                &[(0x8_0000, 16, false), (0x9_0000, 100, true), st(0)]
            )),
            STATUS_IOERR
        );
        assert_eq!(
            rejected(parse(VIRTIO_BLK_T_IN, 0, &[(0x8_0000, 16, false), st(0)])),
            STATUS_IOERR
        );
        assert_eq!(
            rejected(parse(
                VIRTIO_BLK_T_OUT,
                0,
                &[(0x8_0000, 16, false), (0x9_0000, 0, false), st(0)]
            )),
            STATUS_IOERR
        );
        // Header too short.
        assert_eq!(
            rejected(parse(VIRTIO_BLK_T_IN, 0, &[(0x8_0000, 8, false), st(0)])),
            STATUS_IOERR
        );
        // Data outside guest memory.
        assert_eq!(
            rejected(parse(
                VIRTIO_BLK_T_IN,
                0,
                &[(0x8_0000, 16, false), (0x7fff_0000, 512, true), st(0)]
            )),
            STATUS_IOERR
        );
        assert_eq!(
            rejected(parse(
                VIRTIO_BLK_T_OUT,
                0,
                &[(0x8_0000, 16, false), (0xffff_ffff_ffff_0000, 512, false), st(0)]
            )),
            STATUS_IOERR
        );
        // Header outside guest memory.
        assert_eq!(
            rejected(parse(VIRTIO_BLK_T_IN, 0, &[(0x7000_0000, 16, false), st(0)])),
            STATUS_IOERR
        );
        // Unknown type (and GET_LIFETIME, DISCARD... which are not offered).
        assert_eq!(rejected(parse(99, 0, &[(0x8_0000, 16, false), st(0)])), STATUS_UNSUPP);
        assert_eq!(
            rejected(parse(11, 0, &[(0x8_0000, 16, false), (0x9_0000, 16, false), st(0)])),
            STATUS_UNSUPP
        );
    }

    #[test]
    fn chains_without_a_usable_status_byte_are_malformed() {
        let cases: [&[(u64, u32, bool)]; 5] = [
            &[(0x8_0000, 16, false), (0xa_0000, 1, false)], // status not writable
            &[(0x8_0000, 16, false), (0xa_0000, 0, true)],  // zero-length status
            &[(0x8_0000, 16, false), (0x7fff_0000, 1, true)], // status outside RAM
            &[
                (0x8_0000, 16, false),
                (0x9_0000, 512, true),
                (0x8_0000, 16, false),
                (0xa_0000, 1, true),
            ], // r after w
            &[(0x8_0000, 16, false), (u64::MAX, 1, true)],  // status address wraps
        ];
        for chain in cases {
            let r = parse(VIRTIO_BLK_T_IN, 0, chain);
            assert!(matches!(r, Err(QueueError::MalformedChain { .. })), "{chain:?}: {r:?}");
        }
    }

    #[test]
    fn a_looping_chain_is_malformed() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut q = tq.queue();
        tq.set_desc(0, 0x8_0000, 16, VRING_DESC_F_NEXT as u16, 1);
        tq.set_desc(
            1,
            0x9_0000,
            1,
            (VRING_DESC_F_NEXT | virtio_bindings::virtio_ring::VRING_DESC_F_WRITE) as u16,
            0,
        );
        tq.publish(0);
        let c = pop_chain(&mut q, &mem).unwrap().unwrap();
        let r = parse_request(c, 0, &mem, CAPACITY, &mut Vec::new());
        assert!(matches!(r, Err(QueueError::MalformedChain { .. })), "{r:?}");
        // A next index past the table.
        tq.set_desc(2, 0x8_0000, 16, VRING_DESC_F_NEXT as u16, 200);
        tq.publish(2);
        let c = pop_chain(&mut q, &mem).unwrap().unwrap();
        let r = parse_request(c, 0, &mem, CAPACITY, &mut Vec::new());
        assert!(matches!(r, Err(QueueError::MalformedChain { .. })), "{r:?}");
    }

    #[test]
    fn segments_skip_and_trim() {
        let d = |a, l| Desc { addr: GuestAddress(a), len: l, writable: true };
        let descs = [d(0x1000, 10), d(0x2000, 0), d(0x3000, 10)];
        assert_eq!(
            segments(&descs, 4, 3),
            [
                Segment { addr: GuestAddress(0x1004), len: 6 },
                Segment { addr: GuestAddress(0x3000), len: 7 }
            ]
        );
        assert_eq!(segments(&descs, 12, 0), [Segment { addr: GuestAddress(0x3002), len: 8 }]);
        assert!(segments(&descs, 30, 0).is_empty());
        assert!(segments(&descs, 10, 10).is_empty());
    }
}
