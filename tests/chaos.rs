//! A short chaos run in the test suite (`cargo xtask chaos --events N --seed S` runs long ones):
//! a site under writers on open connections through 20 random failures and repairs (see
//! `ftvm_system_tests::chaos`). Nothing acknowledged may be lost, no connection may fail, and two
//! hosts may never emit the guest's frames at once. The seed is printed; `FTVM_CHAOS_SEED` repeats
//! a run.
//!
//! Needs root, /dev/kvm and tcpdump (fails, never skips).

use ftvm_system_tests::chaos::{self, ChaosConfig};
use ftvm_system_tests::require_root_and_kvm;
use ftvm_system_tests::rng::seed_from_env_or_clock;
use ftvm_system_tests::site::SiteEnv;

#[test]
fn twenty_random_failures_lose_nothing_and_never_leave_two_hosts_serving() {
    require_root_and_kvm();
    let seed = seed_from_env_or_clock("FTVM_CHAOS_SEED");
    let cfg = ChaosConfig { env: SiteEnv::tests(), events: 20, seed, connections: 4 };
    println!("[chaos] seed {seed} (FTVM_CHAOS_SEED={seed} repeats this run)");
    let report = chaos::run(&cfg).unwrap_or_else(|e| panic!("chaos run, seed {seed}: {e:#}"));
    println!("{report}");
    assert_eq!(report.events_survived, 20, "{report}");
    assert_eq!(report.writes_lost, 0, "{report}");
    assert_eq!(report.connections_failed, 0, "{report}");
    assert_eq!(report.two_host_moments, 0, "{report}");
    assert!(report.writes_checked > 0, "{report}");
}
