//! A host's status file: the types `ftvm primary` and `ftvm backup` write to `--status-file`
//! several times a second, and `ftvm site` reads back through the same types.
//!
//! They live here, in the binary, rather than in `ftvm-repl`: the file is the binary's product
//! (its option, its readers), and it joins the replication library's state (the engine, the
//! backup daemon, the lease) with the eBPF programs' (the gate, the responder), which the library
//! does not know about. The types themselves are plain serde data with no clap or aya type in
//! them, so any part of the binary may read them.
//!
//! The JSON is an interface (`ftvm site status --json` shows it, scripts and the system tests read
//! it): field names and meanings do not change; new fields may be added. A file that does not
//! parse (another version's, a damaged one) is [`StatusFile::Unreadable`], never a panic.

use std::path::Path;

use ftvm_repl::epoch::context::{EpochWindowStats, Percentiles};
use ftvm_repl::disk::intent::WriteIntent;
use ftvm_repl::epoch::engine::{EngineState, StatusSnapshot, SyncProgress};
use ftvm_repl::late_input::LateInputStats;
use ftvm_repl::ha::failover::{DaemonStatus, Role};
use ftvm_repl::ha::lease::Lease;
use serde::{Deserialize, Serialize};

/// Writes `value` as JSON to `path` atomically (write, then rename), readable by root only, never
/// through a symbolic link planted at the temporary name (the rename replaces a link at `path`
/// itself rather than following it). A failure is logged at debug level: status is best effort.
pub fn write(path: &Path, value: &impl Serialize) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = serde_json::to_vec_pretty(value).ok().is_some_and(|json| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&json))
            .is_ok()
    });
    if !(written && std::fs::rename(&tmp, path).is_ok()) {
        tracing::debug!(path = %path.display(), "cannot write the status file");
    }
}

/// What a host's status file holds, as read back.
#[derive(Debug)]
pub enum StatusFile {
    /// No file (the host has not written one yet).
    Missing,
    /// The host's report (boxed: it is large beside the other cases).
    Report(Box<HostReport>),
    /// A file that cannot be read or does not parse: why.
    Unreadable(String),
}

/// Reads the status file at `path`.
pub fn read(path: &Path) -> StatusFile {
    match std::fs::read_to_string(path) {
        Ok(text) => match HostReport::from_json(&text) {
            Ok(report) => StatusFile::Report(Box::new(report)),
            Err(e) => StatusFile::Unreadable(e.to_string()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StatusFile::Missing,
        Err(e) => StatusFile::Unreadable(e.to_string()),
    }
}

/// One host's report: the primary's and the backup's differ. Written as the report itself (no
/// wrapper), as the host wrote it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HostReport {
    Primary(PrimaryStatus),
    Backup(BackupStatus),
}

impl HostReport {
    /// Parses a status file's text; its `role` says which report it is.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        /// Just the role, to pick the type (its errors then name the field at fault).
        #[derive(Deserialize)]
        struct RoleOnly {
            role: String,
        }
        let RoleOnly { role } = serde_json::from_str(text)?;
        if role == PrimaryRole::Primary.name() {
            serde_json::from_str(text).map(Self::Primary)
        } else {
            serde_json::from_str(text).map(Self::Backup)
        }
    }

    /// The lease part, which both reports have.
    pub fn quorum(&self) -> &QuorumStatus {
        match self {
            Self::Primary(p) => &p.quorum,
            Self::Backup(b) => &b.quorum,
        }
    }

    /// What the host is for its VM (for files of older versions, from their other fields).
    pub fn host_role(&self) -> HostRole {
        match self {
            Self::Primary(p) => p.host_role.unwrap_or(HostRole::running(p.protection.state)),
            Self::Backup(b) => b.host_role.unwrap_or_else(|| {
                HostRole::standing_by(b.role, b.restorable, b.connected, b.serving.as_ref().map(|s| s.state))
            }),
        }
    }

    /// The eBPF part, which both reports have.
    pub fn ebpf(&self) -> &EbpfStatus {
        match self {
            Self::Primary(p) => &p.ebpf,
            Self::Backup(b) => &b.ebpf,
        }
    }
}

/// What a host is for its VM now, whichever process type reports it: the one typed answer that
/// status reads (and a management API will), written as `host_role` in both status files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostRole {
    /// Waiting for the running primary, or receiving its copy: cannot take over yet.
    Standby,
    /// Holds a restorable copy and receives every epoch: takes over if the primary dies.
    Backup,
    /// The primary died: restoring the copy.
    Promoting,
    /// Runs the VM while a backup receives its copy.
    SyncingPrimary,
    /// Runs the VM, and the backup holds it.
    ProtectedPrimary,
    /// Runs the VM alone (no backup, or none yet).
    SimplexPrimary,
    /// Another host runs the VM: this copy was stopped and never emits again.
    Fenced,
    /// This host's part failed; its status says why.
    Failed,
    /// The VM ended here (stopped, or its guest exited).
    Stopped,
    /// The VM was handed over to the other host (a planned switchover); this host stands by next.
    HandedOver,
}

impl HostRole {
    /// The role's name in status (its serde form).
    pub fn name(self) -> &'static str {
        match self {
            Self::Standby => "standby",
            Self::Backup => "backup",
            Self::Promoting => "promoting",
            Self::SyncingPrimary => "syncing-primary",
            Self::ProtectedPrimary => "protected-primary",
            Self::SimplexPrimary => "simplex-primary",
            Self::Fenced => "fenced",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
            Self::HandedOver => "handed-over",
        }
    }

    /// The role of a host whose VM's protection is `state`.
    fn running(state: ProtectionState) -> Self {
        match state {
            ProtectionState::Syncing => Self::SyncingPrimary,
            ProtectionState::Protected => Self::ProtectedPrimary,
            ProtectionState::Simplex => Self::SimplexPrimary,
            ProtectionState::Fenced => Self::Fenced,
            ProtectionState::Failed => Self::Failed,
            ProtectionState::Stopped => Self::Stopped,
            ProtectionState::HandedOver => Self::HandedOver,
        }
    }

    /// The role of a standby daemon in `role`, holding a `restorable` copy from a `connected`
    /// primary, with its VM's protection once it took over.
    fn standing_by(role: Role, restorable: bool, connected: bool, serving: Option<ProtectionState>) -> Self {
        match role {
            Role::Standby if restorable && connected => Self::Backup,
            Role::Standby => Self::Standby,
            Role::Promoting => Self::Promoting,
            Role::Active => Self::running(serving.unwrap_or(ProtectionState::Simplex)),
            Role::Ended => Self::Stopped,
            Role::Failed => Self::Failed,
            Role::Fenced => Self::Fenced,
            Role::HandedOver => Self::HandedOver,
        }
    }
}

/// The primary's `role`: always `primary` (the backup's daemon reports its own [`Role`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrimaryRole {
    Primary,
}

impl PrimaryRole {
    fn name(self) -> &'static str {
        match self {
            Self::Primary => "primary",
        }
    }
}

/// Whether the primary's VM is protected: the engine's state without its details.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtectionState {
    Syncing,
    Protected,
    Simplex,
    Fenced,
    Failed,
    Stopped,
    #[serde(rename = "handed-over")]
    HandedOver,
}

impl ProtectionState {
    /// The state of `state`, and its detail for status (the sync's progress, the reason).
    pub fn of(state: &EngineState) -> (Self, String) {
        match state {
            // The engine says "syncing" from its start; the sizes come once the sync begins.
            EngineState::Syncing(p) if p.bytes_total() == 0 => (Self::Syncing, "preparing the initial synchronisation".into()),
            EngineState::Syncing(p) => {
                let rate = p.rate().map_or(String::new(), |r| format!(" at {} MiB/s", r >> 20));
                let eta = p.eta().map_or(String::new(), |d| format!(", about {} s left", d.as_secs_f64().ceil()));
                let memory = if p.memory_incremental { " (the pages written since the resume)" } else { "" };
                let disk = if p.disk_incremental { " (the regions written since the copies diverged)" } else { "" };
                let detail = format!(
                    "{}% ({}/{} MiB){rate}{eta}: memory {}/{} pages{memory}, disk {}/{} MiB{disk}",
                    p.percent(),
                    p.bytes_sent() >> 20,
                    p.bytes_total() >> 20,
                    p.pages_sent,
                    p.pages_total,
                    p.disk_bytes_sent >> 20,
                    p.disk_bytes_total >> 20
                );
                (Self::Syncing, detail)
            }
            EngineState::Protected => (Self::Protected, String::new()),
            EngineState::Simplex { reason } => (Self::Simplex, reason.clone()),
            EngineState::Fenced { reason } => (Self::Fenced, reason.clone()),
            EngineState::Failed { reason } => (Self::Failed, reason.clone()),
            EngineState::Stopped => (Self::Stopped, String::new()),
            EngineState::HandedOver { epoch } => (Self::HandedOver, format!("handed over to the backup at epoch {}", epoch.0)),
        }
    }

    /// The state's name in status and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Syncing => "syncing",
            Self::Protected => "protected",
            Self::Simplex => "simplex",
            Self::Fenced => "fenced",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
            Self::HandedOver => "handed-over",
        }
    }
}

/// The primary's status file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    pub role: PrimaryRole,
    /// What this host is for its VM (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_role: Option<HostRole>,
    #[serde(flatten)]
    pub protection: ProtectionStatus,
    pub last_ack_us: Option<u64>,
    pub link_per_dirty_byte: Option<f64>,
    /// The same, the guest input sent ahead counted too (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_with_input_per_dirty_byte: Option<f64>,
    /// A-Link bytes per byte the guest wrote: the dirty pages the tracker left writable (hot
    /// pages, sent whether written or not) counted at the share of them the guest was seen to
    /// write in an epoch (absent without hot pages, and in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_per_written_byte: Option<f64>,
    /// That share: of the hot pages sampled, those written within one epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_pages_written_share: Option<f64>,
    /// A guest disk write could not be recorded for the backup (its backlog was full): the backup
    /// lacks it, so the pair is not protected until a new synchronisation.
    pub disk_replication_lost: bool,
    /// Percentiles over the last epochs, in microseconds: `<part>: [p50, p99]`.
    pub recent: RecentEpochs,
    /// The lease.
    pub quorum: QuorumStatus,
    /// The fencing gate and the heartbeat responder.
    pub ebpf: EbpfStatus,
    /// This host's record of the disk regions that may differ from the other host's copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_record: Option<DiskRecordStatus>,
}

/// A disk's write-intent record (see `ftvm_repl::disk::intent`): what a rejoin would copy of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecordStatus {
    /// The record knows every region written since the copies were last equal; if not, the next
    /// synchronisation copies the whole disk.
    pub complete: bool,
    /// Bytes of the regions marked (those a rejoin copies, with the other host's).
    pub marked_bytes: u64,
    pub region_bytes: u64,
}

impl DiskRecordStatus {
    /// The state of `record` now.
    pub fn of(record: &WriteIntent) -> Self {
        Self {
            complete: record.is_complete(),
            marked_bytes: record.marked_regions() * record.region_bytes(),
            region_bytes: record.region_bytes(),
        }
    }
}

impl PrimaryStatus {
    /// The status of an engine at `snap`, under `lease`, with the host's `ebpf`.
    pub fn of(snap: &StatusSnapshot, lease: &Lease, ebpf: EbpfStatus) -> Self {
        let protection = ProtectionStatus::of(snap);
        Self {
            role: PrimaryRole::Primary,
            host_role: Some(HostRole::running(protection.state)),
            protection,
            last_ack_us: snap.last_ack_round_trip.map(|d| d.as_micros() as u64),
            link_per_dirty_byte: snap.link_per_dirty_byte(),
            link_with_input_per_dirty_byte: snap.link_with_input_per_dirty_byte(),
            link_per_written_byte: snap.link_per_written_byte(),
            hot_pages_written_share: snap.hot_written_share(),
            disk_replication_lost: snap.disk_replication_lost,
            recent: RecentEpochs::of(&snap.recent, &snap.recent_ack),
            quorum: QuorumStatus::of(lease),
            ebpf,
            disk_record: None,
        }
    }
}

/// What a synchronisation copies of memory or of the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyKind {
    /// All of it.
    #[default]
    Full,
    /// Only what may differ from the backup's copy.
    Incremental,
}

impl CopyKind {
    fn of(incremental: bool) -> Self {
        if incremental {
            Self::Incremental
        } else {
            Self::Full
        }
    }
}

/// How far the initial synchronisation is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub percent: u8,
    pub bytes_sent: u64,
    pub bytes_total: u64,
    /// Bytes per second so far (none in the first tenth of a second).
    pub rate_bytes_per_s: Option<u64>,
    /// Seconds left at that rate.
    pub eta_s: Option<u64>,
    /// Incremental: of memory, only the pages written since the VM resumed from the epoch the
    /// backup holds (the old primary of a switchover).
    #[serde(default)]
    pub memory_copy: CopyKind,
    /// Memory bytes to send, and the guest's memory size.
    #[serde(default)]
    pub memory_bytes_total: u64,
    #[serde(default)]
    pub memory_size: u64,
    /// Incremental: of the disk, only the regions written since the copies diverged.
    #[serde(default)]
    pub disk_copy: CopyKind,
    /// Disk bytes sent, of `disk_bytes_total` to send.
    #[serde(default)]
    pub disk_bytes_sent: u64,
    #[serde(default)]
    pub disk_bytes_total: u64,
    /// The disk's size.
    #[serde(default)]
    pub disk_size: u64,
    /// Since the synchronisation began.
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl SyncStatus {
    /// The figures of a synchronisation under way in `state` (none before its sizes are known).
    fn during(state: &EngineState) -> Option<Self> {
        match state {
            EngineState::Syncing(p) if p.bytes_total() > 0 => Some(Self::of(p)),
            _ => None,
        }
    }

    fn of(p: &SyncProgress) -> Self {
        Self {
            percent: p.percent(),
            bytes_sent: p.bytes_sent(),
            bytes_total: p.bytes_total(),
            rate_bytes_per_s: p.rate(),
            eta_s: p.eta().map(|d| d.as_secs_f64().ceil() as u64),
            memory_copy: CopyKind::of(p.memory_incremental),
            memory_bytes_total: p.pages_total * ftvm_repl::PAGE_SIZE as u64,
            memory_size: p.memory_pages * ftvm_repl::PAGE_SIZE as u64,
            disk_copy: CopyKind::of(p.disk_incremental),
            disk_bytes_sent: p.disk_bytes_sent,
            disk_bytes_total: p.disk_bytes_total,
            disk_size: p.disk_size,
            elapsed_ms: p.elapsed.as_millis() as u64,
        }
    }
}

/// The pause and its parts, and the acknowledgement round trip, over the last epochs: `[p50, p99]`
/// in microseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentEpochs {
    pub epochs: usize,
    pub pause_us: [u64; 2],
    pub pause_wait_us: [u64; 2],
    pub harvest_us: [u64; 2],
    pub state_us: [u64; 2],
    pub copy_us: [u64; 2],
    /// A copy-on-write epoch's copy after the resume (absent in files of older versions).
    #[serde(default)]
    pub copy_after_resume_us: [u64; 2],
    pub resume_us: [u64; 2],
    pub send_us: [u64; 2],
    pub ack_us: [u64; 2],
    pub dirty_pages_p50: u64,
    /// Of those, pages the dirty tracker left writable because the guest writes them in every
    /// epoch (sent each time; absent in files of older versions).
    #[serde(default)]
    pub hot_pages_p50: u64,
}

impl RecentEpochs {
    fn of(w: &EpochWindowStats, ack: &Percentiles) -> Self {
        let us = |p: &Percentiles| [p.p50.as_micros() as u64, p.p99.as_micros() as u64];
        Self {
            epochs: w.epochs,
            pause_us: us(&w.pause),
            pause_wait_us: us(&w.pause_wait),
            harvest_us: us(&w.harvest),
            state_us: us(&w.state),
            copy_us: us(&w.copy),
            copy_after_resume_us: us(&w.copy_after_resume),
            resume_us: us(&w.resume),
            send_us: us(&w.send),
            ack_us: us(ack),
            dirty_pages_p50: w.pages_p50,
            hot_pages_p50: w.hot_pages_p50,
        }
    }
}

/// The backup's status file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupStatus {
    pub role: Role,
    /// What this host is for its VM (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_role: Option<HostRole>,
    /// The lease (claimed at a takeover).
    pub quorum: QuorumStatus,
    pub committed_epoch: Option<u64>,
    pub restorable: bool,
    pub connected: bool,
    pub last_frame_age_ms: Option<f64>,
    pub takeover_ms: Option<f64>,
    /// Frames of guest input the dead primary had taken in and not committed, given to the VM
    /// at the takeover (none before one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover_ingress_replayed: Option<u64>,
    /// Guest input that reached the dead primary's host after its death, forwarded by its
    /// watchdog: taken in, given to the VM, refused (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_input: Option<LateInputStats>,
    /// How the A-Link is read: "socket" or "io_uring" (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alink_receive_io: Option<String>,
    pub last_error: Option<String>,
    /// The fencing gate, the heartbeat responder, and the last probe of the primary's host.
    pub ebpf: EbpfStatus,
    /// After a takeover, the protection of the VM this host runs now (none before, or when the
    /// host was started without a peer to protect it with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ProtectionStatus>,
    /// This host's record of the disk regions that may differ from the other host's copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_record: Option<DiskRecordStatus>,
}

/// Whether the VM a host runs is protected: the primary's, and the VM a host runs after its
/// takeover (protected again once a backup joins).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProtectionStatus {
    pub state: ProtectionState,
    pub detail: String,
    /// The initial synchronisation's figures while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    pub epochs_committed: u64,
    pub epochs_per_sec: f64,
    pub last_pause_us: u64,
    pub lag_epochs: u64,
    /// Why the other host refused to be the backup at the last try, while the VM runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_refused: Option<String>,
    /// Why protection last ended (kept once a backup joined again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unprotected: Option<String>,
    /// Why the last switchover asked for was refused (the VM ran on here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_refused: Option<String>,
    /// The last synchronisation sent to a backup (kept after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<SyncStatus>,
    /// How checkpoints are taken and why (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointStatus>,
}

/// How a primary takes its checkpoints, and why it took them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointStatus {
    /// `stop` (the pages copied in the pause) or `cow` (write-protected in it, copied after).
    pub copy: String,
    /// How the A-Link is written: `socket`, `io_uring` or `io_uring+zc`.
    #[serde(default)]
    pub transport: String,
    /// How the dirty pages are found: `bitmap` (hot pages left writable), `bitmap-exact`, `ring`
    /// or `uffd` (absent in files of older versions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tracker: String,
    /// Checkpoints taken because guest output waited.
    pub for_output: u64,
    /// Because the dirty pages of a guest answering nobody passed the bound.
    pub for_dirty_pages: u64,
    /// At the interval.
    pub at_interval: u64,
    /// Skipped at the interval: nothing had changed.
    pub skipped: u64,
    /// The dirty bound, in pages (it follows the link's rate).
    pub dirty_bound_pages: u64,
    /// The link's measured rate, MiB per second of sending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_mib_s: Option<f64>,
    /// Frames of guest input sent ahead to the backup (for a takeover to deliver again).
    #[serde(default)]
    pub ingress_forwarded: u64,
    /// Frames of guest input taken in with a backup connected but not sent ahead (queue full,
    /// link failed).
    #[serde(default)]
    pub ingress_not_forwarded: u64,
    /// The A-Link bytes the input sent ahead took (not in `link_per_dirty_byte`).
    #[serde(default)]
    pub ingress_link_bytes: u64,
    /// Pages the current link sent as deltas from the backup's copy, and the A-Link bytes that
    /// saved (absent in files of older versions).
    #[serde(default)]
    pub pages_as_deltas: u64,
    #[serde(default)]
    pub delta_bytes_saved: u64,
}

impl CheckpointStatus {
    fn of(snap: &StatusSnapshot) -> Self {
        let c = &snap.checkpoints;
        Self {
            copy: snap.copy.name().to_string(),
            transport: snap.transport.to_string(),
            tracker: snap.tracker.to_string(),
            for_output: c.output,
            for_dirty_pages: c.dirty,
            at_interval: c.interval,
            skipped: c.skipped,
            dirty_bound_pages: snap.dirty_bound_pages,
            link_mib_s: snap.link_bytes_per_sec.map(|r| (r / f64::from(1u32 << 20) * 10.0).round() / 10.0),
            ingress_forwarded: snap.ingress.frames_forwarded,
            ingress_not_forwarded: snap.ingress.frames_not_forwarded,
            ingress_link_bytes: snap.ingress.link_bytes,
            pages_as_deltas: snap.page_deltas.pages,
            delta_bytes_saved: snap.page_deltas.bytes_saved,
        }
    }
}

impl ProtectionStatus {
    /// A VM that runs alone, for `reason`, with no figures yet.
    pub fn alone(reason: &str) -> Self {
        Self {
            state: ProtectionState::Simplex,
            detail: reason.to_string(),
            sync: None,
            epochs_committed: 0,
            epochs_per_sec: 0.0,
            last_pause_us: 0,
            lag_epochs: 0,
            backup_refused: None,
            last_unprotected: None,
            switchover_refused: None,
            last_sync: None,
            checkpoints: None,
        }
    }

    fn of(snap: &StatusSnapshot) -> Self {
        let (state, detail) = ProtectionState::of(&snap.state);
        Self {
            state,
            detail,
            sync: SyncStatus::during(&snap.state),
            epochs_committed: snap.epochs_committed,
            epochs_per_sec: snap.epochs_per_sec,
            last_pause_us: snap.last_epoch.pause.as_micros() as u64,
            lag_epochs: snap.lag_epochs(),
            backup_refused: snap.backup_refused.clone(),
            last_unprotected: snap.last_unprotected.clone(),
            switchover_refused: snap.switchover_refused.clone(),
            last_sync: snap.last_sync.as_ref().map(SyncStatus::of),
            checkpoints: Some(CheckpointStatus::of(snap)),
        }
    }
}

impl BackupStatus {
    /// The status of a daemon at `st`, under `lease`, with the host's `ebpf` (the last probe of
    /// the primary's host is the daemon's).
    pub fn of(st: &DaemonStatus, lease: &Lease, ebpf: EbpfStatus, serving: Option<&StatusSnapshot>) -> Self {
        let serving = serving.map(ProtectionStatus::of);
        Self {
            role: st.role,
            host_role: Some(HostRole::standing_by(st.role, st.restorable, st.connected, serving.as_ref().map(|s| s.state))),
            quorum: QuorumStatus::of(lease),
            committed_epoch: st.committed.map(|e| e.0),
            restorable: st.restorable,
            connected: st.connected,
            last_frame_age_ms: st.last_frame_age.map(|d| d.as_secs_f64() * 1e3),
            takeover_ms: st.promotion.map(|p| p.suspected_to_resumed.as_secs_f64() * 1e3),
            takeover_ingress_replayed: st.promotion.map(|p| p.ingress_replayed),
            late_input: st.late_input,
            alink_receive_io: (!st.receive_io.is_empty()).then(|| st.receive_io.to_string()),
            last_error: st.last_error.clone(),
            ebpf: EbpfStatus { last_probe: st.last_probe.map(|p| p.describe()), ..ebpf },
            serving,
            disk_record: None,
        }
    }
}

/// The quorum part of a host's status file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumStatus {
    /// `none`, `witness`.
    pub backend: String,
    /// The term held, or the one this host's copy is current for.
    pub term: u64,
    /// Whether this host holds a valid lease now.
    pub lease_valid: bool,
    /// Milliseconds until the lease runs out unless renewed (none: not held, or for ever).
    pub lease_left_ms: Option<u64>,
    /// The last error talking to the quorum.
    pub error: Option<String>,
}

impl QuorumStatus {
    /// The status of `lease` now.
    pub fn of(lease: &Lease) -> Self {
        let now = ftvm_repl::ha::heartbeat::monotonic_us();
        let until = lease.valid_until_us();
        Self {
            backend: lease.backend().to_string(),
            term: lease.term(),
            lease_valid: lease.is_valid(now),
            lease_left_ms: (until != u64::MAX && until > now).then(|| (until - now) / 1000),
            error: lease.last_error().or_else(|| lease.lost()),
        }
    }
}

/// The eBPF part of a host's status file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbpfStatus {
    pub enabled: bool,
    pub detail: String,
    pub gate: Option<GateStatus>,
    pub responder: Option<ResponderStatus>,
    /// The backup's last probe of the primary's host.
    pub last_probe: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateStatus {
    pub port: String,
    pub guest_mac: String,
    /// Whether the guest's frames may leave (until the expiry).
    pub active: bool,
    /// Milliseconds until the gate closes by itself (none: never).
    pub expiry_left_ms: Option<u64>,
    pub egress_passed: u64,
    pub egress_dropped_inactive: u64,
    pub egress_dropped_expired: u64,
    pub ingress_dropped: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponderStatus {
    pub port: String,
    pub generation: u64,
    pub committed_epoch: u64,
    pub daemon_state: String,
    /// Probes from the peer answered so far.
    pub peer_probes_answered: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_role_is_written_by_its_name() {
        use HostRole::*;
        for role in [Standby, Backup, Promoting, SyncingPrimary, ProtectedPrimary, SimplexPrimary, Fenced, Failed, Stopped] {
            assert_eq!(serde_json::to_value(role).unwrap(), serde_json::Value::String(role.name().into()));
        }
    }

    #[test]
    fn a_sync_not_begun_shows_no_figures_and_one_under_way_shows_them() {
        let (state, detail) = ProtectionState::of(&EngineState::Syncing(SyncProgress::default()));
        assert_eq!((state, detail.as_str()), (ProtectionState::Syncing, "preparing the initial synchronisation"));
        let p = SyncProgress {
            pages_sent: 256,
            pages_total: 512,
            disk_bytes_total: 2 << 20,
            elapsed: std::time::Duration::from_secs(1),
            ..SyncProgress::default()
        };
        let (_, detail) = ProtectionState::of(&EngineState::Syncing(p));
        assert_eq!(detail, "25% (1/4 MiB) at 1 MiB/s, about 3 s left: memory 256/512 pages, disk 0/2 MiB");
        let sync = SyncStatus::of(&p);
        assert_eq!((sync.percent, sync.bytes_sent, sync.bytes_total, sync.eta_s), (25, 1 << 20, 4 << 20, Some(3)));
    }

    /// A primary's status file as this version writes it (the keys the site and the tests read).
    const PRIMARY: &str = r#"{
      "role": "primary", "state": "protected", "detail": "", "epochs_committed": 1200,
      "epochs_per_sec": 812.5, "last_pause_us": 310, "last_ack_us": 640, "lag_epochs": 1,
      "link_per_dirty_byte": 1.02, "link_with_input_per_dirty_byte": 1.03, "link_per_written_byte": 1.1,
      "hot_pages_written_share": 0.8, "disk_replication_lost": false,
      "checkpoints": { "copy": "cow", "transport": "io_uring", "tracker": "bitmap", "for_output": 1100, "for_dirty_pages": 40, "at_interval": 60,
        "skipped": 300, "dirty_bound_pages": 244, "link_mib_s": 950.5, "ingress_forwarded": 5400,
        "ingress_not_forwarded": 1, "ingress_link_bytes": 1200000, "pages_as_deltas": 900,
        "delta_bytes_saved": 3500000 },
      "recent": { "epochs": 100, "pause_us": [300, 900], "pause_wait_us": [10, 40],
        "harvest_us": [50, 90], "state_us": [20, 30], "copy_us": [100, 300], "copy_after_resume_us": [0, 0], "resume_us": [5, 9],
        "send_us": [200, 500], "ack_us": [600, 1500], "dirty_pages_p50": 12,
        "hot_pages_p50": 9 },
      "quorum": { "backend": "witness", "term": 3, "lease_valid": true, "lease_left_ms": 700, "error": null },
      "ebpf": { "enabled": true, "detail": "gate biz0, responder alink0",
        "gate": { "port": "biz0", "guest_mac": "02:00:00:00:00:01", "active": true, "expiry_left_ms": 650,
          "egress_passed": 10, "egress_dropped_inactive": 0, "egress_dropped_expired": 0, "ingress_dropped": 2 },
        "responder": { "port": "alink0", "generation": 3, "committed_epoch": 1200, "daemon_state": "running",
          "peer_probes_answered": 4 },
        "last_probe": null }
    }"#;

    const BACKUP: &str = r#"{
      "role": "active",
      "quorum": { "backend": "witness", "term": 4, "lease_valid": true, "lease_left_ms": null, "error": null },
      "committed_epoch": 1199, "restorable": true, "connected": false, "last_frame_age_ms": 812.25,
      "takeover_ms": 95.5, "takeover_ingress_replayed": 3, "last_error": null,
      "ebpf": { "enabled": false, "detail": "off (no --business-port / --alink-port)", "gate": null,
        "responder": null, "last_probe": "daemon dead" }
    }"#;

    #[test]
    fn reports_are_read_back_as_written() {
        for text in [PRIMARY, BACKUP] {
            let report = HostReport::from_json(text).unwrap();
            let written = serde_json::to_string(&report).unwrap();
            assert_eq!(HostReport::from_json(&written).unwrap(), report);
            // Field for field, the same JSON (names and values).
            let before: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(serde_json::to_value(&report).unwrap(), before);
        }
        let HostReport::Primary(p) = HostReport::from_json(PRIMARY).unwrap() else { panic!("not the primary's") };
        assert_eq!((p.protection.state, p.quorum.term, p.ebpf.gate.map(|g| g.ingress_dropped)), (ProtectionState::Protected, 3, Some(2)));
        let HostReport::Backup(b) = HostReport::from_json(BACKUP).unwrap() else { panic!("not the backup's") };
        assert_eq!((b.role, b.takeover_ms, b.ebpf.last_probe.as_deref()), (Role::Active, Some(95.5), Some("daemon dead")));
        assert_eq!(b.takeover_ingress_replayed, Some(3));
    }

    #[test]
    fn states_are_written_by_their_names() {
        use ProtectionState as P;
        for state in [P::Syncing, P::Protected, P::Simplex, P::Fenced, P::Failed, P::Stopped] {
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{}\"", state.name()));
        }
        assert_eq!(serde_json::to_string(&PrimaryRole::Primary).unwrap(), format!("\"{}\"", PrimaryRole::Primary.name()));
        let (state, detail) = ProtectionState::of(&EngineState::Simplex { reason: "the backup is gone".into() });
        assert_eq!((state, detail.as_str()), (P::Simplex, "the backup is gone"));
    }

    #[test]
    fn a_file_that_does_not_parse_is_unreadable_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("ftvm-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host.status.json");
        assert!(matches!(read(&path), StatusFile::Missing));
        let cut = &PRIMARY[..PRIMARY.len() / 2];
        let no_role = r#"{"state": "protected"}"#;
        let unknown_state = PRIMARY.replace("\"protected\"", "\"dancing\"");
        let unknown_role = BACKUP.replace("\"active\"", "\"dancing\"");
        for text in ["", "null", "[]", cut, no_role, &unknown_state, &unknown_role] {
            std::fs::write(&path, text).unwrap();
            match read(&path) {
                StatusFile::Unreadable(why) => assert!(!why.is_empty(), "{text:?}"),
                other => panic!("{text:?} read as {other:?}"),
            }
        }
        // Fields of a later version are left aside.
        std::fs::write(&path, BACKUP.replace("\"restorable\"", "\"from_the_future\": 1, \"restorable\"")).unwrap();
        assert!(matches!(read(&path), StatusFile::Report(r) if matches!(*r, HostReport::Backup(_))));
        // What `write` wrote, `read` reads.
        let report = HostReport::from_json(PRIMARY).unwrap();
        write(&path, &report);
        assert!(matches!(read(&path), StatusFile::Report(r) if *r == report));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
