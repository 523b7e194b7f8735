//! `cargo xtask chaos --events N --seed S`: a site under continuous writers put through N random
//! failures and repairs (see `ftvm_system_tests::chaos`), with a release ftvm; prints the summary
//! and fails if a write was lost, a connection failed, or two hosts emitted the guest's frames at
//! once. Needs root, /dev/kvm and tcpdump.

use anyhow::{bail, Result};
use ftvm_system_tests::chaos::{self, ChaosConfig};
use ftvm_system_tests::rng::seed_from_env_or_clock;
use ftvm_system_tests::site::SiteEnv;

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// Events to survive.
    #[arg(long, default_value_t = 200)]
    pub events: usize,
    /// The random sequence's seed (default: from the clock; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Writer connections held open for the whole run.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

pub fn run(args: &ChaosArgs) -> Result<()> {
    eprintln!("[chaos] building the guest and the eBPF programs");
    let guest = crate::guest::build()?;
    crate::ebpf::build()?;
    let ftvm = crate::bench::release_ftvm("chaos", &[])?;
    let seed = args.seed.unwrap_or_else(|| seed_from_env_or_clock("FTVM_CHAOS_SEED"));
    eprintln!("[chaos] seed {seed}, {} events", args.events);
    let env = SiteEnv { ftvm, guest, logs: "/tmp/ftvm-chaos-logs".into() };
    let report = chaos::run(&ChaosConfig { env, events: args.events, seed, connections: args.connections })?;
    println!("{report}");
    if report.writes_lost > 0 || report.connections_failed > 0 || report.two_host_moments > 0 {
        bail!("the chaos run found a fault (seed {seed})");
    }
    Ok(())
}
