//! The queue pair exchange, device-free: what each side sends about its queue pair, and what it
//! accepts from the other before it moves its own queue pair to RTR with that data.
//!
//! The wire format is [`ftvm_proto::rdma::RdmaEndpoint`]; its decoder checks the fields one by
//! one. This module checks the pair: the primary's endpoint carries no ring and the backup's one
//! does, the ring is at most what this side will mirror, both sides are on the same fabric kind
//! (a LID on InfiniBand, a GID on RoCE), and the path MTU is the smaller of the two.

use ftvm_proto::rdma::{RdmaEndpoint, RingGrant, MAX_QPN};

/// Why the peer's endpoint cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The primary sent a ring, or the backup did not.
    #[error("The {0} sent an endpoint {1} a staging ring")]
    Ring(&'static str, &'static str),
    /// The backup's ring is larger than this primary mirrors.
    #[error("The backup's ring of {granted} bytes is larger than the {max} this primary mirrors")]
    RingTooLarge {
        /// Bytes granted.
        granted: u64,
        /// Most bytes this side registers for its mirror.
        max: u64,
    },
    /// Neither a LID nor a GID: the peer cannot be addressed.
    #[error("The peer's endpoint has neither a LID nor a GID")]
    NoAddress,
}

/// The data this side's queue pair needs to reach the peer's (for `ibv_modify_qp` to RTR and RTS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPath {
    /// The peer's queue pair number.
    pub qpn: u32,
    /// The peer's first packet sequence number (this side's receive PSN).
    pub psn: u32,
    /// The peer's LID (InfiniBand without GRH), else 0.
    pub lid: u16,
    /// The peer's GID; `None` on an InfiniBand subnet without GRH (LID routing).
    pub gid: Option<[u8; 16]>,
    /// The path MTU: the smaller of both ports' (an `ibv_mtu` code).
    pub mtu: u8,
}

/// Checks the backup's answer on the primary: a ring no larger than `max_ring` bytes.
pub fn primary_accepts(local: &RdmaEndpoint, peer: &RdmaEndpoint, max_ring: u64) -> Result<(PeerPath, RingGrant), ExchangeError> {
    let ring = peer.ring.ok_or(ExchangeError::Ring("backup", "without"))?;
    if ring.bytes > max_ring {
        return Err(ExchangeError::RingTooLarge { granted: ring.bytes, max: max_ring });
    }
    Ok((path(local, peer)?, ring))
}

/// Checks the primary's endpoint on the backup.
pub fn backup_accepts(local: &RdmaEndpoint, peer: &RdmaEndpoint) -> Result<PeerPath, ExchangeError> {
    if peer.ring.is_some() {
        return Err(ExchangeError::Ring("primary", "with"));
    }
    path(local, peer)
}

fn path(local: &RdmaEndpoint, peer: &RdmaEndpoint) -> Result<PeerPath, ExchangeError> {
    let has_gid = peer.gid.iter().any(|&b| b != 0);
    if peer.lid == 0 && !has_gid {
        return Err(ExchangeError::NoAddress);
    }
    // With a LID both sides route by LID (InfiniBand); a GID is then used only if present (GRH).
    Ok(PeerPath { qpn: peer.qpn, psn: peer.psn, lid: peer.lid, gid: has_gid.then_some(peer.gid), mtu: local.mtu.min(peer.mtu) })
}

/// A random 24-bit first packet sequence number (a fresh one per queue pair, so that packets of
/// an earlier connection between the same queue pair numbers are not taken for this one's).
pub fn random_psn() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into the array, which lives across the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let v = if n == 4 {
        u32::from_le_bytes(b)
    } else {
        // getrandom cannot fail for 4 bytes once the pool is ready; the clock is good enough here.
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.subsec_nanos())
    };
    v & MAX_QPN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(lid: u16, gid: u8, mtu: u8, ring: Option<RingGrant>) -> RdmaEndpoint {
        RdmaEndpoint { qpn: 77, psn: 5, lid, mtu, gid: [gid; 16], ring }
    }

    const RING: RingGrant = RingGrant { addr: 0x1000_0000, rkey: 3, bytes: 64 << 20 };

    #[test]
    fn each_side_accepts_the_other_and_the_smaller_mtu() {
        let primary = ep(0, 1, 5, None);
        let backup = ep(0, 2, 3, Some(RING));
        let (path, ring) = primary_accepts(&primary, &backup, 64 << 20).unwrap();
        assert_eq!(ring, RING);
        assert_eq!(path, PeerPath { qpn: 77, psn: 5, lid: 0, gid: Some([2; 16]), mtu: 3 });
        let path = backup_accepts(&backup, &primary).unwrap();
        assert_eq!((path.gid, path.mtu), (Some([1; 16]), 3));
        // InfiniBand without GRH: a LID and no GID.
        let ib = backup_accepts(&backup, &ep(9, 0, 5, None)).unwrap();
        assert_eq!((ib.lid, ib.gid), (9, None));
    }

    #[test]
    fn wrong_pairs_are_refused() {
        let primary = ep(0, 1, 5, None);
        assert_eq!(primary_accepts(&primary, &ep(0, 2, 5, None), 1 << 30), Err(ExchangeError::Ring("backup", "without")));
        assert_eq!(backup_accepts(&primary, &ep(0, 2, 5, Some(RING))), Err(ExchangeError::Ring("primary", "with")));
        assert_eq!(
            primary_accepts(&primary, &ep(0, 2, 5, Some(RING)), 32 << 20),
            Err(ExchangeError::RingTooLarge { granted: 64 << 20, max: 32 << 20 })
        );
        assert_eq!(backup_accepts(&primary, &ep(0, 0, 5, None)), Err(ExchangeError::NoAddress));
    }

    #[test]
    fn psns_are_24_bits_and_vary() {
        let psns: Vec<u32> = (0..16).map(|_| random_psn()).collect();
        assert!(psns.iter().all(|&p| p <= MAX_QPN));
        assert!(psns.windows(2).any(|w| w[0] != w[1]));
    }
}
