//! What a primary does before its VM exists: claim the lease for a start, and reach the backup.
//!
//! Both happen before the machine is created, so that a refusal or a misconfiguration stops the
//! host with nothing half-started. Both wait for a peer that may be starting too (an unreachable
//! quorum, a backup that does not answer yet) and give up at once on an answer that will not
//! change (a refusal, a wrong secret, another protocol version, a size mismatch).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ha::lease::Lease;
use crate::ha::quorum::{Claim, LeaseGrant};
use crate::ha::term::{TermFile, TermFileError};
use crate::transport::tcp::{TcpOptions, TcpTransport};
use crate::transport::ConnectError;
use crate::ErrorChain;

/// How long to sleep between two claims while the quorum does not answer.
const CLAIM_RETRY: Duration = Duration::from_millis(500);
/// How long to sleep between two connection attempts while the backup does not answer.
const CONNECT_RETRY: Duration = Duration::from_millis(100);
/// How often a primary still waiting for its backup says so.
const CONNECT_REPORT_EVERY: Duration = Duration::from_secs(3);

/// Why [`claim_start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartClaimError {
    /// The quorum answered no (another host holds the lease, or this disk is stale), or did not
    /// answer within the wait.
    #[error("the quorum refused to let this host start the VM: {0}")]
    Refused(String),
    /// The granted term could not be stored with the disk.
    #[error("cannot store the new term with the disk")]
    Term(#[source] TermFileError),
}

/// Claims `lease` to start the VM and keeps `term_file` in step with it: the granted term is
/// stored with the disk before this returns, and every later change of term (going on alone) is
/// stored before the VM serves under it (from the lease's own thread). An unreachable quorum is
/// waited for, up to `wait` (it may be starting too); a refusal is final.
///
/// Without a quorum nothing is claimed (every claim would be granted, for ever) and the term file
/// is left alone: `Ok(None)`.
pub fn claim_start(lease: &Lease, term_file: &TermFile, wait: Duration) -> Result<Option<LeaseGrant>, StartClaimError> {
    if !lease.has_quorum() {
        return Ok(None);
    }
    let started = Instant::now();
    // Bounded by `wait`: each turn sleeps, and only an unreachable quorum turns again.
    let grant = loop {
        match lease.claim(Claim::Start) {
            Ok(g) => break g,
            Err(why) if lease.last_error().is_some() && started.elapsed() < wait => {
                tracing::info!(%why, "waiting for the quorum");
                std::thread::sleep(CLAIM_RETRY);
            }
            Err(why) => return Err(StartClaimError::Refused(why)),
        }
    };
    term_file.write(grant.term).map_err(StartClaimError::Term)?;
    tracing::info!(term = grant.term, backend = lease.backend(), "lease held");
    let file = term_file.clone();
    lease.subscribe(move |v| {
        if v.held {
            if let Err(e) = file.write(v.term) {
                tracing::error!(error = %ErrorChain(&e), "cannot store the term with the disk");
            }
        }
    });
    Ok(Some(grant))
}

/// Why [`connect_backup`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupConnectError {
    /// Nobody answered within the wait.
    #[error("cannot reach the backup at {peer} within {} s", wait.as_secs())]
    Unreachable {
        /// The backup's A-Link address.
        peer: SocketAddr,
        /// How long this primary waited.
        wait: Duration,
        /// The last attempt's failure.
        #[source]
        source: ConnectError,
    },
    /// The backup answered, and its KVM could not restore this guest's CPU state: it is no place
    /// the VM can resume, so this primary refuses it (trying again would not help).
    #[error("refusing the backup at {peer}")]
    Incompatible {
        /// The backup's A-Link address.
        peer: SocketAddr,
        /// What it lacks.
        #[source]
        source: ConnectError,
    },
    /// The backup answered and refused (a wrong secret, another protocol version, a size
    /// mismatch, another primary connected): trying again would not help.
    #[error("the backup at {peer} refused this primary")]
    Refused {
        /// The backup's A-Link address.
        peer: SocketAddr,
        /// Its answer.
        #[source]
        source: ConnectError,
    },
}

/// Connects to the backup at `peer`, retrying while nobody answers (with a line of progress every
/// few seconds) until `wait` has passed.
pub fn connect_backup(
    peer: SocketAddr,
    secret: &[u8],
    options: &TcpOptions,
    wait: Duration,
) -> Result<TcpTransport, BackupConnectError> {
    let start = Instant::now();
    let mut last_report = start;
    // Bounded by `wait`: only a transient failure within it turns again, after a sleep.
    loop {
        match TcpTransport::connect(peer, secret, options) {
            Ok(t) => return Ok(t),
            // Only "nobody answers yet" is worth waiting for; a wrong secret, another protocol
            // version or a size mismatch will not fix itself.
            Err(e) if e.is_transient() && start.elapsed() < wait => {
                if last_report.elapsed() >= CONNECT_REPORT_EVERY {
                    tracing::info!(%peer, error = %ErrorChain(&e), "waiting for the backup");
                    last_report = Instant::now();
                }
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source) if source.is_transient() => return Err(BackupConnectError::Unreachable { peer, wait, source }),
            Err(source @ ConnectError::CpuIncompatible(_)) => return Err(BackupConnectError::Incompatible { peer, source }),
            Err(source) => return Err(BackupConnectError::Refused { peer, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::lease::LeaseConfig;
    use crate::ha::quorum::{FixedQuorum, NoQuorum, UnreachableQuorum};

    fn term_file(tag: &str) -> (std::path::PathBuf, TermFile) {
        let dir = std::env::temp_dir().join(format!("ftvm-claim-start-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = TermFile::for_disk(&dir.join("vm.img"), "vm");
        (dir, file)
    }

    #[test]
    fn a_granted_start_stores_the_term_now_and_at_every_change() {
        let (dir, file) = term_file("grant");
        let lease = Lease::new(Box::new(FixedQuorum { grant: true }), LeaseConfig::default(), 4);
        let grant = claim_start(&lease, &file, Duration::from_secs(1)).unwrap().expect("a quorum claims");
        assert_eq!(grant.term, 5);
        assert_eq!(file.read().unwrap(), 5);
        // Going on alone later grants a new term: it reaches the disk's term file too.
        lease.claim(Claim::RunAlone).unwrap();
        assert_eq!(file.read().unwrap(), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_refusal_is_final_and_leaves_the_term_alone() {
        let (dir, file) = term_file("refused");
        let lease = Lease::new(Box::new(FixedQuorum { grant: false }), LeaseConfig::default(), 4);
        let started = Instant::now();
        let e = claim_start(&lease, &file, Duration::from_secs(30)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "a refusal was waited on");
        assert!(e.to_string().starts_with("the quorum refused to let this host start the VM"), "{e}");
        assert_eq!(file.read().unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreachable_quorum_is_waited_for_then_refused() {
        let (dir, file) = term_file("unreachable");
        let lease = Lease::new(Box::new(UnreachableQuorum), LeaseConfig::default(), 0);
        let started = Instant::now();
        let e = claim_start(&lease, &file, Duration::from_millis(600)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(600), "gave up after {:?}", started.elapsed());
        assert!(e.to_string().contains("no witness"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_a_quorum_nothing_is_claimed() {
        let (dir, file) = term_file("none");
        let lease = Lease::new(Box::new(NoQuorum), LeaseConfig::default(), 3);
        assert!(claim_start(&lease, &file, Duration::from_secs(1)).unwrap().is_none());
        assert!(!file.path().exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_backup_nobody_answers_for_is_unreachable_after_the_wait() {
        // A port nothing listens on: bind one, and close it.
        let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = connect_backup(peer, b"a-link test secret, long enough", &TcpOptions::default(), Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(e, BackupConnectError::Unreachable { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("cannot reach the backup at {peer} within 0 s"));
    }

    #[test]
    fn a_backup_that_cannot_restore_the_guest_is_refused_at_once_with_its_reason() {
        use crate::backup::receiver::{BackupReceiver, ReceiverConfig};
        use ftvm_proto::cpu::{CpuidReg, CpuidWord, GuestCpuNeeds, HostCpuCaps};
        const SECRET: &[u8] = b"a-link test secret, long enough";
        let dir = std::env::temp_dir().join(format!("ftvm-start-cpu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = ReceiverConfig::new("127.0.0.1:0".parse().unwrap(), SECRET, 1 << 20, dir.join("disk"), 4096);
        let word = CpuidWord::new(7, 0, CpuidReg::Ebx);
        cfg.cpu_caps = Some(HostCpuCaps { words: vec![(word, 0x1f)], ..HostCpuCaps::default() });
        let backup = BackupReceiver::bind(cfg).unwrap();
        let needs = GuestCpuNeeds { words: vec![(word, 1 << 5)], ..GuestCpuNeeds::default() };
        let options = TcpOptions { cpu_needs: Some(needs), ..TcpOptions::default() };
        let started = Instant::now();
        let e = connect_backup(backup.local_addr(), SECRET, &options, Duration::from_secs(30)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "not retried");
        assert!(matches!(e, BackupConnectError::Incompatible { .. }), "{e:?}");
        assert_eq!(
            ErrorChain(&e).to_string(),
            format!(
                "refusing the backup at {}: Backup cannot resume this guest: CPUID.07H:EBX bit 5 (avx2) is not offered by the backup's KVM",
                backup.local_addr()
            )
        );
        drop(backup);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
