//! Command line: what the operator types, parsed into plain values.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ftvm_vmm::dirty::DirtyTracking;

/// Default guest address: a private /24 that only exists on the TAP ftvm creates.
pub const DEFAULT_GUEST_IP: &str = "10.77.0.2/24";
/// Default guest MAC: locally administered (bit 1 of the first byte), unicast.
pub const DEFAULT_GUEST_MAC: &str = "02:46:54:00:00:02";
/// Default TAP name.
pub const DEFAULT_TAP: &str = "ftvm0";
/// Default key-value port (Redis's).
pub const DEFAULT_KV_PORT: u16 = 6379;
/// Size of a disk file that `ftvm run` creates because it does not exist yet.
pub const DEFAULT_NEW_DISK_SIZE: &str = "64M";
/// Where `cargo xtask build-guest` leaves the reference guest (relative to the workspace).
pub const DEFAULT_GUEST_ELF: &str = "target/guest/ftvm-guest";

#[derive(Debug, Parser)]
#[command(name = "ftvm", version, about = "Fault-tolerant virtual machines on two commodity servers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line, with `--version` naming the A-Link protocol this build speaks (what a
    /// rolling upgrade needs to know).
    pub fn parse_with_protocol_version() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        use ftvm_proto::frame::{PROTOCOL_MAJOR, PROTOCOL_MINOR};
        // Made once per process: leaking it gives clap the 'static string it wants.
        let version: &'static str =
            Box::leak(format!("{} (A-Link protocol {PROTOCOL_MAJOR}.{PROTOCOL_MINOR})", env!("CARGO_PKG_VERSION")).into_boxed_str());
        let matches = Self::command().version(version).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one unprotected VM on this host (the baseline every benchmark compares against).
    Run(RunArgs),
    /// Run a VM as the primary of a fault-tolerant pair: checkpoints go to the backup over the
    /// A-Link, and the guest's network output waits for the backup's acknowledgement.
    Primary(crate::ft::PrimaryArgs),
    /// Be the backup of a fault-tolerant pair: keep the last committed checkpoint, and resume the VM
    /// from it when the primary dies.
    Backup(crate::ft::BackupArgs),
    /// This server's service for a fault-tolerant VM (`--config /etc/ftvm/host.toml`): the primary
    /// if the quorum lets it start the VM, the backup of the running primary otherwise.
    Host(crate::host::HostArgs),
    /// The witness: the quorum service of a two-host site, on a third machine.
    Witness(crate::quorum::WitnessArgs),
    /// (Started by `ftvm primary`.) Releases the primary's lease when the primary dies.
    #[command(hide = true)]
    LeaseWatchdog(crate::quorum::WatchdogArgs),
    /// A whole site on this one machine, in network namespaces: hosts A and B, a client, a
    /// business LAN and the A-Link.
    Site {
        #[command(subcommand)]
        command: crate::site::SiteCommand,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest ELF (the reference guest is built by `cargo xtask build-guest`).
    #[arg(long, default_value = DEFAULT_GUEST_ELF)]
    pub guest: PathBuf,
    /// Guest RAM, e.g. 256M or 1G (a multiple of 2 MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Raw disk file for the guest's virtio-blk device; created (sparse) if it does not exist.
    #[arg(long)]
    pub disk: PathBuf,
    /// Size of the disk file when ftvm has to create it.
    #[arg(long, default_value = DEFAULT_NEW_DISK_SIZE, value_parser = parse_size)]
    pub disk_size: u64,
    #[command(flatten)]
    pub net: GuestNetArgs,
    /// The guest's default gateway.
    #[arg(long)]
    pub gateway: Option<Ipv4Addr>,
    /// TCP port of the guest's key-value (Redis protocol) server.
    #[arg(long, default_value_t = DEFAULT_KV_PORT)]
    pub port: u16,
    /// Benchmark load: pages the guest dirties per millisecond (0 = off).
    #[arg(long, default_value_t = 0)]
    pub dirty_pages_per_ms: u32,
    /// Benchmark load: size in 4 KiB pages of the region the load cycles through.
    #[arg(long, default_value_t = 4096)]
    pub dirty_region_pages: u32,
}

/// Where the guest sits on this host's network, and where its console goes: the same for a VM
/// that runs now (`run`, `primary`) and one that will run after a takeover (`backup`).
#[derive(Debug, Args)]
pub struct GuestNetArgs {
    /// TAP device for the guest's network; created if it does not exist, and brought up.
    #[arg(long, default_value = DEFAULT_TAP)]
    pub tap: String,
    /// Run inside this network namespace (made with `ip netns add`); the TAP is created there.
    #[arg(long)]
    pub netns: Option<String>,
    /// The guest's IPv4 address and prefix length.
    #[arg(long, default_value = DEFAULT_GUEST_IP, value_parser = parse_ipv4_cidr)]
    pub ip: (Ipv4Addr, u8),
    /// Address and prefix for the host side of the TAP, so the host (or the namespace) reaches the
    /// guest directly.
    #[arg(long, value_parser = parse_ipv4_cidr)]
    pub host_ip: Option<(Ipv4Addr, u8)>,
    /// The guest's MAC address.
    #[arg(long, default_value = DEFAULT_GUEST_MAC, value_parser = parse_mac)]
    pub mac: [u8; 6],
    /// Also write the guest console to this file (appended).
    #[arg(long)]
    pub console_log: Option<PathBuf>,
}

/// How a protected VM finds the guest pages each checkpoint must send (`--dirty-tracker`). Every
/// tracker also takes the pages the VMM wrote (devices, disk reads, received frames).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DirtyTrackerArg {
    /// KVM's dirty bitmap: a harvest reads one bit per page of guest memory. Pages the guest
    /// writes in every checkpoint are left writable (and sent each time), which saves the guest
    /// a fault per page and checkpoint.
    #[default]
    Bitmap,
    /// KVM's dirty bitmap, every written page write-protected again at each checkpoint: only the
    /// pages written are sent, each first write costs the guest a fault.
    BitmapExact,
    /// KVM's dirty ring: a harvest reads one entry per page written.
    Ring,
    /// userfaultfd write-protect of guest memory, read with PAGEMAP_SCAN, without KVM's dirty log
    /// (Linux 6.7 or later).
    Uffd,
}

impl DirtyTrackerArg {
    /// The machine's tracker.
    pub fn tracking(self) -> DirtyTracking {
        match self {
            Self::Bitmap => DirtyTracking::KvmBitmap,
            Self::BitmapExact => DirtyTracking::KvmBitmapExact,
            Self::Ring => DirtyTracking::kvm_ring(),
            Self::Uffd => DirtyTracking::Uffd,
        }
    }

    /// The option's value naming it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bitmap => "bitmap",
            Self::BitmapExact => "bitmap-exact",
            Self::Ring => "ring",
            Self::Uffd => "uffd",
        }
    }
}

/// How a checkpoint copies the epoch's dirty pages out of guest memory (`--checkpoint-copy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CheckpointCopyArg {
    /// In the pause: the VM waits for the copy of every dirty page.
    #[default]
    Stop,
    /// Copy-on-write: the pages are write-protected in the pause (userfaultfd) and copied once the
    /// VM runs again, a page the guest writes first. Not with `--dirty-tracker uffd`.
    Cow,
}

impl CheckpointCopyArg {
    /// The engine's setting.
    pub fn copy(self) -> ftvm_repl::epoch::engine::CheckpointCopy {
        use ftvm_repl::epoch::engine::CheckpointCopy;
        match self {
            Self::Stop => CheckpointCopy::StopAndCopy,
            Self::Cow => CheckpointCopy::CopyOnWrite,
        }
    }

    /// The option's value naming it (the engine's name for it in status).
    pub fn name(self) -> &'static str {
        self.copy().name()
    }
}

/// How the backup reads the A-Link's socket (`--alink-read`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum AlinkReadArg {
    /// `read`.
    #[default]
    Socket,
    /// io_uring, one `RECV` with a linked timeout per read (Linux 5.6 or later).
    Uring,
}

impl AlinkReadArg {
    /// The option's value naming it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Uring => "uring",
        }
    }
}

/// How the primary writes to the A-Link's socket (`--alink-io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum AlinkIoArg {
    /// `writev`.
    #[default]
    Socket,
    /// io_uring, one `SENDMSG` per batch (Linux 5.11 or later).
    Uring,
    /// io_uring with the pages sent zero-copy (`SENDMSG_ZC`, Linux 6.1 or later); over loopback
    /// the kernel copies them anyway.
    UringZc,
}

impl AlinkIoArg {
    /// The transport's setting.
    pub fn io(self) -> ftvm_repl::transport::tcp::LinkIo {
        use ftvm_repl::transport::tcp::LinkIo;
        match self {
            Self::Socket => LinkIo::Socket,
            Self::Uring => LinkIo::Uring { zero_copy: false },
            Self::UringZc => LinkIo::Uring { zero_copy: true },
        }
    }

    /// The option's value naming it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Uring => "uring",
            Self::UringZc => "uring-zc",
        }
    }
}

/// The RDMA A-Link (`--alink-rdma-*`; README "RDMA (lab procedure)"): page payloads as RDMA
/// WRITEs into the backup's staging ring, everything else on the TCP A-Link. Both hosts must ask
/// for it: the backup for its receiver (and as the primary after a takeover), the primary for its
/// link; a side that cannot have it fails with the reason, there is no silent fallback.
#[derive(Clone, Debug, Args)]
pub struct AlinkRdmaArgs {
    /// Carry page payloads by RDMA through this verbs device (as `ibv_devices` names it, e.g.
    /// `mlx5_0`). Needs an `ftvm` built with the cargo feature `rdma`.
    #[arg(long, value_name = "NAME")]
    pub alink_rdma_device: Option<String>,
    /// The device's GID table index: on RoCE v2 the index of type "RoCE v2" whose address is this
    /// host's A-Link address (`show_gids`), on InfiniBand 0.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub alink_rdma_gid_index: u8,
    /// The device's port.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub alink_rdma_port: u8,
    /// The staging ring in MiB: the backup registers a ring this large; a primary mirrors the
    /// ring its backup grants, up to this size.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16384))]
    pub alink_rdma_ring_mib: u64,
}

impl AlinkRdmaArgs {
    /// The RDMA options, when a device is given. Fails in a build without the cargo feature
    /// `rdma`, before anything is started.
    pub fn options(&self) -> anyhow::Result<Option<ftvm_repl::transport::rdma::RdmaOptions>> {
        let Some(device) = &self.alink_rdma_device else { return Ok(None) };
        if !cfg!(feature = "rdma") {
            anyhow::bail!(
                "`--alink-rdma-device {device}`: this ftvm was built without RDMA; build it with the cargo feature `rdma` \
                 (`cargo build --release -p ftvm --features rdma`)"
            );
        }
        Ok(Some(ftvm_repl::transport::rdma::RdmaOptions {
            device: device.clone(),
            port: self.alink_rdma_port,
            gid_index: self.alink_rdma_gid_index,
            ring_bytes: self.alink_rdma_ring_mib << 20,
        }))
    }
}

/// Parses `256M`, `1G`, `4096K` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&s[..i], 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&s[..i], 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("invalid size {s:?} (use e.g. 256M, 1G)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses `10.0.0.2/24`.
pub fn parse_ipv4_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) =
        s.split_once('/').ok_or_else(|| format!("{s:?} is not address/prefix (e.g. 10.0.0.2/24)"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("invalid IPv4 address {addr:?}"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("invalid prefix length {prefix:?} (1 to 32)"))?;
    Ok((addr, prefix))
}

/// Parses `02:46:54:00:00:02`; refuses multicast addresses, which no NIC may own.
/// Parses a CPUID bit `<leaf>:<subleaf>:<reg>:<bit>`, numbers decimal or `0x` hex, e.g.
/// `1:0:edx:26` (SSE2) or `0x80000001:0:edx:27` (RDTSCP).
pub fn parse_cpuid_bit(s: &str) -> Result<(ftvm_proto::cpu::CpuidWord, u8), String> {
    let bad = || format!("invalid CPUID bit {s:?} (use <leaf>:<subleaf>:<reg>:<bit>, e.g. 1:0:edx:26)");
    let num = |t: &str| match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    };
    let parts: Vec<&str> = s.trim().split(':').collect();
    let [leaf, subleaf, reg, bit] = parts[..] else { return Err(bad()) };
    let reg = ftvm_proto::cpu::CpuidReg::parse(reg).ok_or_else(bad)?;
    let bit = num(bit).filter(|&b| b < 32).ok_or_else(bad)? as u8;
    Ok((ftvm_proto::cpu::CpuidWord::new(num(leaf).ok_or_else(bad)?, num(subleaf).ok_or_else(bad)?, reg), bit))
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| format!("invalid MAC address {s:?}"))?;
        if part.len() != 2 {
            return Err(format!("invalid MAC address {s:?}"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("invalid MAC address {s:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("invalid MAC address {s:?}"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address {s:?} is multicast"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_bits() {
        use ftvm_proto::cpu::{CpuidReg, CpuidWord};
        assert_eq!(parse_cpuid_bit("1:0:edx:26"), Ok((CpuidWord::new(1, 0, CpuidReg::Edx), 26)));
        assert_eq!(parse_cpuid_bit("0x80000001:0:EDX:0x1b"), Ok((CpuidWord::new(0x8000_0001, 0, CpuidReg::Edx), 27)));
        for bad in ["", "1:0:edx", "1:0:edx:32", "1:0:esi:1", "x:0:eax:1", "1:0:eax:1:2"] {
            assert!(parse_cpuid_bit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn cidr() {
        assert_eq!(parse_ipv4_cidr("10.0.0.2/24"), Ok((Ipv4Addr::new(10, 0, 0, 2), 24)));
        assert!(parse_ipv4_cidr("10.0.0.2").is_err());
        assert!(parse_ipv4_cidr("10.0.0.2/33").is_err());
        assert!(parse_ipv4_cidr("10.0.0/24").is_err());
    }

    #[test]
    fn mac() {
        assert_eq!(parse_mac("02:46:54:00:00:02"), Ok([2, 0x46, 0x54, 0, 0, 2]));
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_mac("02:46:54:00:00").is_err());
        assert!(parse_mac("02:46:54:00:00:02:03").is_err());
        assert!(parse_mac("zz:46:54:00:00:02").is_err());
    }

    #[test]
    fn dirty_trackers() {
        #[derive(Debug, Parser)]
        struct T {
            #[arg(long, value_enum, default_value_t)]
            dirty_tracker: DirtyTrackerArg,
        }
        let parse = |argv: &[&str]| T::try_parse_from([&["t"], argv].concat()).map(|t| t.dirty_tracker);
        assert_eq!(parse(&[]).unwrap(), DirtyTrackerArg::Bitmap);
        for t in [DirtyTrackerArg::Bitmap, DirtyTrackerArg::BitmapExact, DirtyTrackerArg::Ring, DirtyTrackerArg::Uffd] {
            assert_eq!(parse(&["--dirty-tracker", t.name()]).unwrap(), t);
            assert_eq!(t.to_possible_value().unwrap().get_name(), t.name());
        }
        assert_eq!(DirtyTrackerArg::Bitmap.tracking(), DirtyTracking::KvmBitmap);
        assert_eq!(DirtyTrackerArg::BitmapExact.tracking(), DirtyTracking::KvmBitmapExact);
        assert_eq!(DirtyTrackerArg::Ring.tracking(), DirtyTracking::kvm_ring());
        assert_eq!(DirtyTrackerArg::Uffd.tracking(), DirtyTracking::Uffd);
        let e = parse(&["--dirty-tracker", "pml"]).unwrap_err().to_string();
        assert!(e.contains("invalid value 'pml'") && e.contains("bitmap, bitmap-exact, ring, uffd"), "{e}");
    }

    #[test]
    fn alink_ios() {
        #[derive(Debug, Parser)]
        struct T {
            #[arg(long, value_enum, default_value_t)]
            alink_io: AlinkIoArg,
        }
        let parse = |argv: &[&str]| T::try_parse_from([&["t"], argv].concat()).map(|t| t.alink_io);
        assert_eq!(parse(&[]).unwrap(), AlinkIoArg::Socket);
        for a in [AlinkIoArg::Socket, AlinkIoArg::Uring, AlinkIoArg::UringZc] {
            assert_eq!(parse(&["--alink-io", a.name()]).unwrap(), a);
            assert_eq!(a.to_possible_value().unwrap().get_name(), a.name());
        }
        assert!(parse(&["--alink-io", "rdma"]).is_err());
    }

    #[test]
    fn alink_rdma_options() {
        #[derive(Debug, Parser)]
        struct T {
            #[command(flatten)]
            rdma: AlinkRdmaArgs,
        }
        let parse = |argv: &[&str]| T::try_parse_from([&["t"], argv].concat()).map(|t| t.rdma);
        assert_eq!(parse(&[]).unwrap().options().unwrap(), None);
        let args = parse(&["--alink-rdma-device", "mlx5_0", "--alink-rdma-gid-index", "3"]).unwrap();
        let built_with_rdma = cfg!(feature = "rdma");
        match args.options() {
            Ok(Some(o)) => {
                assert!(built_with_rdma, "RDMA options from a build without the feature");
                let want = ftvm_repl::transport::rdma::RdmaOptions { gid_index: 3, ..ftvm_repl::transport::rdma::RdmaOptions::new("mlx5_0") };
                assert_eq!(o, want);
            }
            Ok(None) => panic!("a device was given"),
            Err(e) => {
                assert!(!built_with_rdma, "{e}");
                assert!(format!("{e}").contains("cargo feature `rdma`"), "{e}");
            }
        }
        let o = parse(&["--alink-rdma-device", "rxe0", "--alink-rdma-port", "2", "--alink-rdma-ring-mib", "128"]).unwrap();
        assert_eq!((o.alink_rdma_port, o.alink_rdma_ring_mib << 20), (2, 128 << 20));
        assert!(parse(&["--alink-rdma-port", "0"]).is_err());
        assert!(parse(&["--alink-rdma-ring-mib", "0"]).is_err());
        assert!(parse(&["--alink-rdma-ring-mib", "16385"]).is_err());
    }

    #[test]
    fn checkpoint_copies() {
        #[derive(Debug, Parser)]
        struct T {
            #[arg(long, value_enum, default_value_t)]
            checkpoint_copy: CheckpointCopyArg,
        }
        let parse = |argv: &[&str]| T::try_parse_from([&["t"], argv].concat()).map(|t| t.checkpoint_copy);
        assert_eq!(parse(&[]).unwrap(), CheckpointCopyArg::Stop);
        for c in [CheckpointCopyArg::Stop, CheckpointCopyArg::Cow] {
            assert_eq!(parse(&["--checkpoint-copy", c.name()]).unwrap(), c);
            assert_eq!(c.to_possible_value().unwrap().get_name(), c.name());
        }
        let e = parse(&["--checkpoint-copy", "dma"]).unwrap_err().to_string();
        assert!(e.contains("invalid value 'dma'") && e.contains("stop, cow"), "{e}");
    }

    #[test]
    fn defaults_parse() {
        assert!(parse_ipv4_cidr(DEFAULT_GUEST_IP).is_ok());
        assert!(parse_mac(DEFAULT_GUEST_MAC).is_ok());
        assert!(parse_size(DEFAULT_NEW_DISK_SIZE).is_ok());
    }
}
