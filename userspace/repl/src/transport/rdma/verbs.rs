//! The verbs of the RDMA A-Link (cargo feature `rdma`): the device by name, its protection
//! domain, memory regions, a completion queue and one reliable-connected queue pair per link,
//! moved INIT → RTR → RTS with the peer's data from the exchange, RDMA WRITEs posted from the
//! primary's registered mirror, and the completion queue polled with a timeout.
//!
//! **Never run**: these machines have no RDMA in their kernel (not even soft-RoCE); this file is
//! compiled and its device-free neighbours are tested here. The README's "RDMA (lab procedure)"
//! says how to run it on two hosts with RDMA NICs.

use std::ffi::CStr;
use std::io;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_proto::rdma::{RdmaEndpoint, RingGrant};
use rdma_sys::{
    ___ibv_query_port, ibv_access_flags, ibv_alloc_pd, ibv_close_device, ibv_context, ibv_cq, ibv_create_cq, ibv_create_qp,
    ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_cq, ibv_destroy_qp, ibv_free_device_list, ibv_get_device_list, ibv_get_device_name,
    ibv_gid, ibv_modify_qp, ibv_mr, ibv_open_device, ibv_pd, ibv_poll_cq, ibv_port_attr, ibv_port_state, ibv_post_send, ibv_qp,
    ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_query_gid, ibv_reg_mr, ibv_send_flags,
    ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_status, ibv_wc_status_str, ibv_wr_opcode,
};

use super::backup::StagingRing;
use super::exchange::{backup_accepts, primary_accepts, random_psn, PeerPath};
use super::plan::WorkRequest;
use super::primary::RemoteWriter;
use super::{RdmaIoError, RdmaOptions, RdmaSetupError, SEND_QUEUE_DEPTH};

/// Most scatter-gather entries asked for per work request (every NIC offers at least this).
const MAX_SGE: u32 = 4;
/// Completions read per poll.
const POLL_BATCH: usize = 16;

fn verbs(call: &'static str, source: io::Error) -> RdmaSetupError {
    RdmaSetupError::Verbs { call, source }
}

/// The names of the RDMA devices libibverbs finds (empty on a kernel without RDMA).
pub fn device_names() -> Vec<String> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list writes the count into `n` and returns a NULL-terminated array
    // (or NULL), freed below with ibv_free_device_list after the names were copied.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: `i` is below the count the call returned; each entry is a device pointer whose
        // name is a NUL-terminated string owned by the list, copied before the list is freed.
        let name = unsafe {
            let dev = *list.add(i);
            let p = ibv_get_device_name(dev);
            if p.is_null() {
                continue;
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        };
        names.push(name);
    }
    // SAFETY: the list returned above, freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

/// An open device, its port's addressing, and a protection domain.
#[derive(Debug)]
struct Device {
    ctx: NonNull<ibv_context>,
    pd: NonNull<ibv_pd>,
    name: String,
    port: u8,
    gid_index: u8,
    lid: u16,
    mtu: u8,
    gid: [u8; 16],
}

// SAFETY: libibverbs objects may be used from any thread (the library locks internally); the
// pointers are owned by this value and released once, on drop.
unsafe impl Send for Device {}
// SAFETY: as above; no method mutates through `&self` except verbs calls that are thread safe.
unsafe impl Sync for Device {}

impl Device {
    fn open(opts: &RdmaOptions) -> Result<Arc<Self>, RdmaSetupError> {
        let mut n = 0;
        // SAFETY: as in `device_names`.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(RdmaSetupError::NoDevice { name: opts.device.clone(), found: Vec::new() });
        }
        let mut ctx = ptr::null_mut();
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: as in `device_names`; the device is opened before the list is freed, which
            // ibv_open_device allows (the context keeps what it needs).
            unsafe {
                let dev = *list.add(i);
                let p = ibv_get_device_name(dev);
                if !p.is_null() && CStr::from_ptr(p).to_bytes() == opts.device.as_bytes() {
                    ctx = ibv_open_device(dev);
                    if ctx.is_null() {
                        let e = io::Error::last_os_error();
                        ibv_free_device_list(list);
                        return Err(verbs("ibv_open_device", e));
                    }
                    break;
                }
            }
        }
        // SAFETY: the list returned above, freed once.
        unsafe { ibv_free_device_list(list) };
        let Some(ctx) = NonNull::new(ctx) else {
            return Err(RdmaSetupError::NoDevice { name: opts.device.clone(), found: device_names() });
        };
        // From here on the context is closed on every path by `Device`'s drop, once it exists;
        // before that, by hand.
        let close = |e| {
            // SAFETY: the context opened above, not yet owned by a Device, closed once.
            unsafe { ibv_close_device(ctx.as_ptr()) };
            e
        };
        // SAFETY: ibv_port_attr is plain C data for which all-zero is valid; the call fills it.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: an open context, a port number, and a port attribute struct that lives across the call.
        let r = unsafe { ___ibv_query_port(ctx.as_ptr(), opts.port, &mut attr) };
        if r != 0 {
            return Err(close(verbs("ibv_query_port", io::Error::from_raw_os_error(r))));
        }
        if attr.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(close(RdmaSetupError::PortDown { device: opts.device.clone(), port: opts.port, state: attr.state }));
        }
        // SAFETY: a union of plain bytes; all-zero is valid.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: an open context, its port, a GID index (checked by the library), and a GID that
        // lives across the call.
        let r = unsafe { ibv_query_gid(ctx.as_ptr(), opts.port, i32::from(opts.gid_index), &mut gid) };
        if r != 0 {
            return Err(close(verbs("ibv_query_gid", io::Error::last_os_error())));
        }
        // SAFETY: every bit pattern of the union is a valid byte array.
        let gid = unsafe { gid.raw };
        // SAFETY: an open context.
        let pd = unsafe { ibv_alloc_pd(ctx.as_ptr()) };
        let Some(pd) = NonNull::new(pd) else {
            return Err(close(verbs("ibv_alloc_pd", io::Error::last_os_error())));
        };
        Ok(Arc::new(Self {
            ctx,
            pd,
            name: opts.device.clone(),
            port: opts.port,
            gid_index: opts.gid_index,
            lid: attr.lid,
            mtu: u8::try_from(attr.active_mtu).unwrap_or(1),
            gid,
        }))
    }

    fn endpoint(&self, qp: &QueuePair, ring: Option<RingGrant>) -> RdmaEndpoint {
        RdmaEndpoint { qpn: qp.qpn(), psn: qp.psn, lid: self.lid, mtu: self.mtu, gid: self.gid, ring }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: the domain and context made in `open`, released once, the domain first; every
        // object made from them holds an Arc of this Device, so none is left.
        unsafe {
            ibv_dealloc_pd(self.pd.as_ptr());
            ibv_close_device(self.ctx.as_ptr());
        }
    }
}

/// A memory region over memory that outlives it (its owner keeps both and drops this first).
#[derive(Debug)]
struct MemoryRegion {
    mr: NonNull<ibv_mr>,
    _device: Arc<Device>,
}

// SAFETY: see Device.
unsafe impl Send for MemoryRegion {}
// SAFETY: see Device.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers the memory of `ring`.
    fn register(device: &Arc<Device>, ring: &StagingRing, access: ibv_access_flags) -> Result<Self, RdmaSetupError> {
        let len = usize::try_from(ring.bytes()).unwrap_or(usize::MAX);
        // SAFETY: the ring's mapping, `len` bytes long, outlives the region (its owner drops the
        // region first); the domain is open.
        let mr = unsafe { ibv_reg_mr(device.pd.as_ptr(), ring.as_mut_ptr().cast(), len, access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| verbs("ibv_reg_mr", io::Error::last_os_error()))?;
        Ok(Self { mr, _device: Arc::clone(device) })
    }

    fn keys(&self) -> (u32, u32) {
        // SAFETY: a registered region: the library filled its keys and keeps them until dereg.
        unsafe { ((*self.mr.as_ptr()).lkey, (*self.mr.as_ptr()).rkey) }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: the region registered in `register`, deregistered once.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// A completion queue and a reliable-connected queue pair on it.
#[derive(Debug)]
struct QueuePair {
    qp: NonNull<ibv_qp>,
    cq: NonNull<ibv_cq>,
    psn: u32,
    device: Arc<Device>,
}

// SAFETY: see Device.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// A queue pair in INIT with the remote access asked for.
    fn new(device: &Arc<Device>, depth: u32, access: ibv_access_flags) -> Result<Self, RdmaSetupError> {
        // SAFETY: an open context; no completion channel.
        let cq = unsafe { ibv_create_cq(device.ctx.as_ptr(), depth as i32, ptr::null_mut(), ptr::null_mut(), 0) };
        let cq = NonNull::new(cq).ok_or_else(|| verbs("ibv_create_cq", io::Error::last_os_error()))?;
        // SAFETY: plain C data; all-zero is valid and then filled in.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.as_ptr();
        init.recv_cq = cq.as_ptr();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = MAX_SGE;
        init.cap.max_recv_sge = 1;
        // SAFETY: an open domain and an init struct that lives across the call.
        let qp = unsafe { ibv_create_qp(device.pd.as_ptr(), &mut init) };
        let Some(qp) = NonNull::new(qp) else {
            let e = io::Error::last_os_error();
            // SAFETY: the queue created above, with nothing on it yet.
            unsafe { ibv_destroy_cq(cq.as_ptr()) };
            return Err(verbs("ibv_create_qp", e));
        };
        let this = Self { qp, cq, psn: random_psn(), device: Arc::clone(device) };
        // SAFETY: plain C data; all-zero is valid and then filled in.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = device.port;
        attr.qp_access_flags = access.0;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        this.modify(&mut attr, mask, "ibv_modify_qp(INIT)")?;
        Ok(this)
    }

    fn qpn(&self) -> u32 {
        // SAFETY: a created queue pair; its number is set by the library and never changes.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, call: &'static str) -> Result<(), RdmaSetupError> {
        // SAFETY: a created queue pair and an attribute struct that lives across the call; the
        // mask names only fields that were set.
        let r = unsafe { ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as i32) };
        if r != 0 {
            return Err(verbs(call, io::Error::from_raw_os_error(r)));
        }
        Ok(())
    }

    /// INIT → RTR (ready to receive from the peer) → RTS (ready to send).
    fn connect(&self, path: &PeerPath) -> Result<(), RdmaSetupError> {
        // SAFETY: plain C data; all-zero is valid and then filled in.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = u32::from(path.mtu);
        attr.dest_qp_num = path.qpn;
        attr.rq_psn = path.psn;
        attr.max_dest_rd_atomic = 1;
        attr.min_rnr_timer = 12;
        attr.ah_attr.dlid = path.lid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = self.device.port;
        if let Some(gid) = path.gid {
            // RoCE (always) and InfiniBand across subnets: a global route header.
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = ibv_gid { raw: gid };
            attr.ah_attr.grh.sgid_index = self.device.gid_index;
            attr.ah_attr.grh.hop_limit = 64;
            attr.ah_attr.grh.traffic_class = 0;
            attr.ah_attr.grh.flow_label = 0;
        }
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTR)")?;
        // SAFETY: as above.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        // 4.096 µs × 2^14 ≈ 67 ms per retry, 7 retries: a dead backup is seen well within the
        // A-Link's own timeouts, which bound `settle` anyway.
        attr.timeout = 14;
        attr.retry_cnt = 7;
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = 1;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTS)")
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: the queue pair and completion queue made in `new`, destroyed once, the queue
        // pair first (it uses the completion queue).
        unsafe {
            ibv_destroy_qp(self.qp.as_ptr());
            ibv_destroy_cq(self.cq.as_ptr());
        }
    }
}

/// The primary's half before the backup answered: its queue pair in INIT, and the endpoint to send.
#[derive(Debug)]
pub struct PrimarySetup {
    device: Arc<Device>,
    qp: QueuePair,
    max_ring: u64,
}

impl PrimarySetup {
    /// Opens the device and makes the queue pair; returns the endpoint to send to the backup.
    pub fn open(opts: &RdmaOptions) -> Result<(Self, RdmaEndpoint), RdmaSetupError> {
        let device = Device::open(opts)?;
        let qp = QueuePair::new(&device, SEND_QUEUE_DEPTH, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE)?;
        let endpoint = device.endpoint(&qp, None);
        Ok((Self { device, qp, max_ring: opts.ring_bytes }, endpoint))
    }

    /// Connects to the backup's endpoint: registers a mirror of its ring and moves the queue pair
    /// to RTS. Writes wait for their completions at most `write_timeout` at a time.
    pub fn connect(self, peer: &RdmaEndpoint, write_timeout: Duration) -> Result<VerbsWriter, RdmaSetupError> {
        let local = self.device.endpoint(&self.qp, None);
        let (path, ring) = primary_accepts(&local, peer, self.max_ring)?;
        let mirror = StagingRing::new(ring.bytes)?;
        let mr = MemoryRegion::register(&self.device, &mirror, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE)?;
        self.qp.connect(&path)?;
        tracing::info!(device = %self.device.name, ring_bytes = ring.bytes, qpn = local.qpn, peer_qpn = path.qpn, mtu = path.mtu, "RDMA A-Link connected");
        Ok(VerbsWriter { qp: self.qp, mr, mirror, remote: ring, outstanding: 0, write_timeout, wcs: Vec::new() })
    }
}

/// The primary's RDMA WRITEs through a connected queue pair, from a registered mirror of the ring.
pub struct VerbsWriter {
    // Field order is drop order: the queue pair before the region, the region before its memory.
    qp: QueuePair,
    mr: MemoryRegion,
    mirror: StagingRing,
    remote: RingGrant,
    /// Signalled writes posted and not completed.
    outstanding: u32,
    write_timeout: Duration,
    wcs: Vec<ibv_wc>,
}

impl std::fmt::Debug for VerbsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsWriter")
            .field("qp", &self.qp)
            .field("remote", &self.remote)
            .field("outstanding", &self.outstanding)
            .finish_non_exhaustive()
    }
}

impl VerbsWriter {
    /// Reaps completions until at most `keep` writes are outstanding, or the timeout.
    fn reap(&mut self, keep: u32, timeout: Duration) -> Result<(), RdmaIoError> {
        if self.wcs.is_empty() {
            // SAFETY: plain C data; all-zero is valid (the poll overwrites what it returns).
            self.wcs = (0..POLL_BATCH).map(|_| unsafe { std::mem::zeroed::<ibv_wc>() }).collect();
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while self.outstanding > keep {
            // SAFETY: a created completion queue and room for POLL_BATCH completions.
            let n = unsafe { ibv_poll_cq(self.qp.cq.as_ptr(), POLL_BATCH as i32, self.wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(RdmaIoError::Poll(io::Error::from_raw_os_error(-n)));
            }
            for wc in &self.wcs[..n as usize] {
                self.outstanding = self.outstanding.saturating_sub(1);
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    // SAFETY: returns a static string for any status value.
                    let text = unsafe { CStr::from_ptr(ibv_wc_status_str(wc.status)) }.to_string_lossy().into_owned();
                    return Err(RdmaIoError::Completion { status: wc.status, text, vendor: wc.vendor_err });
                }
            }
            if n == 0 {
                if start.elapsed() >= timeout {
                    return Err(RdmaIoError::TimedOut { pending: self.outstanding, waited: start.elapsed() });
                }
                // Busy-poll first (completions come in microseconds), then give the core back.
                spins += 1;
                if spins > 1000 {
                    std::thread::yield_now();
                }
            }
        }
        Ok(())
    }
}

impl RemoteWriter for VerbsWriter {
    fn mirror(&mut self) -> &mut [u8] {
        // SAFETY: the mirror's mapping, `bytes` long, owned by self; `&mut self` excludes other
        // Rust access. The NIC may be reading parts of it for writes still in flight: those belong
        // to unacknowledged epochs, which the ring plan never hands out again until acknowledged.
        unsafe { std::slice::from_raw_parts_mut(self.mirror.as_mut_ptr(), self.mirror.bytes() as usize) }
    }

    fn max_sge(&self) -> usize {
        MAX_SGE as usize
    }

    fn post(&mut self, wr: &WorkRequest) -> Result<(), RdmaIoError> {
        if self.outstanding >= SEND_QUEUE_DEPTH {
            self.reap(SEND_QUEUE_DEPTH - 1, self.write_timeout)?;
        }
        let (lkey, _) = self.mr.keys();
        let base = self.mirror.as_mut_ptr() as u64;
        let mut sges: Vec<ibv_sge> =
            wr.segments.iter().map(|s| ibv_sge { addr: base + s.local, length: s.len as u32, lkey }).collect();
        // SAFETY: plain C data; all-zero is valid and then filled in.
        let mut swr: ibv_send_wr = unsafe { std::mem::zeroed() };
        swr.wr_id = 0;
        swr.next = ptr::null_mut();
        swr.sg_list = sges.as_mut_ptr();
        swr.num_sge = sges.len() as i32;
        swr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        swr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        swr.wr.rdma.remote_addr = self.remote.addr + wr.remote;
        swr.wr.rdma.rkey = self.remote.rkey;
        let mut bad = ptr::null_mut();
        // SAFETY: a connected queue pair; the work request and its scatter-gather list live across
        // the call (the library copies them into the send queue); the segments lie in the
        // registered mirror (the plan keeps them inside the ring's size).
        let r = unsafe { ibv_post_send(self.qp.qp.as_ptr(), &mut swr, &mut bad) };
        if r != 0 {
            return Err(RdmaIoError::Post(io::Error::from_raw_os_error(r)));
        }
        self.outstanding += 1;
        Ok(())
    }

    fn settle(&mut self, timeout: Duration) -> Result<(), RdmaIoError> {
        self.reap(0, timeout)
    }

    fn forsake(&mut self) {
        // Nothing to wait for: the mirror stays mapped until the queue pair is destroyed.
        self.outstanding = 0;
    }

    fn device(&self) -> &str {
        &self.qp.device.name
    }
}

/// The backup's RDMA: the device and the staging ring registered for remote writes, once, when
/// the receiver starts; a queue pair per primary session ([`RdmaBackup::accept`]).
#[derive(Debug)]
pub struct RdmaBackup {
    // Field order is drop order: the region before the ring's memory.
    mr: MemoryRegion,
    ring: StagingRing,
    device: Arc<Device>,
}

/// A session's queue pair on the backup: keep it for the session; dropping it ends the
/// primary's access (its writes then fail).
#[derive(Debug)]
pub struct BackupSession {
    _qp: QueuePair,
}

impl RdmaBackup {
    /// Opens the device and registers a staging ring of `opts.ring_bytes`.
    pub fn open(opts: &RdmaOptions) -> Result<Self, RdmaSetupError> {
        let device = Device::open(opts)?;
        let ring = StagingRing::new(opts.ring_bytes)?;
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        let mr = MemoryRegion::register(&device, &ring, access)?;
        Ok(Self { mr, ring, device })
    }

    /// The staging ring (for [`StagingRing::copy_out`] at each commit).
    pub fn ring(&self) -> &StagingRing {
        &self.ring
    }

    /// Answers a primary's endpoint: a queue pair connected to it, and the endpoint (with the
    /// ring) to send back.
    pub fn accept(&self, peer: &RdmaEndpoint) -> Result<(BackupSession, RdmaEndpoint), RdmaSetupError> {
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        let qp = QueuePair::new(&self.device, 1, access)?;
        let (_, rkey) = self.mr.keys();
        let grant = RingGrant { addr: self.ring.as_mut_ptr() as u64, rkey, bytes: self.ring.bytes() };
        let local = self.device.endpoint(&qp, Some(grant));
        let path = backup_accepts(&local, peer)?;
        qp.connect(&path)?;
        tracing::info!(device = %self.device.name, qpn = local.qpn, peer_qpn = path.qpn, ring_bytes = grant.bytes, "RDMA A-Link accepted");
        Ok((BackupSession { _qp: qp }, local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a kernel without RDMA (these machines) there is no device: opening one fails with a
    /// clear error, never a crash. On a lab host with `mlx5_0` this test is skipped.
    #[test]
    fn a_missing_device_is_a_clear_error() {
        let names = device_names();
        if !names.is_empty() {
            eprintln!("RDMA devices present ({names:?}): skipped");
            return;
        }
        let e = RdmaBackup::open(&RdmaOptions::new("mlx5_0")).unwrap_err();
        assert!(matches!(e, RdmaSetupError::NoDevice { ref name, ref found } if name == "mlx5_0" && found.is_empty()), "{e}");
        let e = PrimarySetup::open(&RdmaOptions::new("rxe0")).unwrap_err();
        assert!(matches!(e, RdmaSetupError::NoDevice { .. }), "{e}");
    }
}
