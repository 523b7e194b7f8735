//! `ftvm site`: the one-machine site comes up, serves a client through the business LAN, reports
//! its state, survives nothing it should not, and leaves nothing behind.

use std::process::Command;
use std::time::Duration;

use ftvm_system_tests::site::{ftvm, Site};
use ftvm_system_tests::{guest_elf, require_root_and_kvm, run_with_timeout};

/// How long one `ftvm` command may take.
const FTVM_TIMEOUT: Duration = Duration::from_secs(180);

fn netns_list() -> String {
    String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned()
}

#[test]
fn site_up_status_kill_down() {
    require_root_and_kvm();
    let site = Site::up("s", &[]);
    let name = site.name.clone();
    let guest = guest_elf().display().to_string();

    let (ok, again, err) = ftvm(&["site", "up", "--name", &name, "--guest", &guest], FTVM_TIMEOUT);
    assert!(!ok && err.contains("already up"), "a second up must be refused: {again}{err}");

    let st = site.status();
    let client_ns = site.netns("client");
    assert_eq!(st.json["client_netns"], client_ns.as_str(), "{:#}", st.json);
    assert!(st.json["guest_ip"] == "10.77.0.2" && st.json["guest_port"] == 6379, "{:#}", st.json);
    assert_eq!(st.state, "protected", "{:#}", st.json);

    // A client on the business LAN reaches the guest through both bridges.
    let out = run_with_timeout(
        Command::new("ip").args(["netns", "exec", &client_ns, "redis-cli", "-h", "10.77.0.2", "SET", "k", "v"]),
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");

    // Kill the primary: the backup takes over and the acknowledged write is there.
    site.kill("A");
    let out = run_with_timeout(
        Command::new("ip").args(["netns", "exec", &client_ns, "redis-cli", "-h", "10.77.0.2", "GET", "k"]),
        Duration::from_secs(60),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v", "after failover");
    // B's status file follows within its 50 ms period: the reply may come before it.
    let (st, over) = site.wait_status(Duration::from_secs(10), |s| s.state == "failed over");
    assert!(over && (st.role_a == "killed" || st.role_b == "killed"), "{:#}", st.json);

    let (ok, _, err) = ftvm(&["site", "down", "--name", &name], FTVM_TIMEOUT);
    assert!(ok, "{err}");
    drop(site);
    let left = netns_list();
    assert!(!left.contains(&format!("{name}-")), "namespaces left behind:\n{left}");
    let (ok, _, err) = ftvm(&["site", "status", "--name", &name], FTVM_TIMEOUT);
    assert!(!ok && err.contains("not up"), "{err}");
}

#[test]
fn site_names_are_checked() {
    require_root_and_kvm();
    let (ok, _, err) = ftvm(&["site", "up", "--name", "bad/name"], FTVM_TIMEOUT);
    assert!(!ok && err.contains("invalid site name"), "{err}");
}

/// A backup that cannot resume the guest (here its KVM is made to hide SSE2, which the guest's
/// CPUID has) is refused when pairing: `site up` fails at once, naming what is missing, the site
/// is removed and its logs kept, and B never ran the VM.
#[test]
fn an_incompatible_backup_is_refused_with_its_reason() {
    require_root_and_kvm();
    let mut site = Site::try_new(ftvm_system_tests::site::SiteEnv::tests(), "si").expect("site guard");
    let started = std::time::Instant::now();
    let err = site.try_up(&["--test-mask-cpuid-b", "1:0:edx:26"]).expect_err("an incompatible backup was accepted");
    let err = format!("{err:#}");
    assert!(err.contains("CPUID.01H:EDX bit 26 (sse2) is not offered by the backup's KVM"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "the refusal was not at once: {:?}", started.elapsed());
    let kept = std::path::Path::new("/run/ftvm/failed-sites").join(&site.name).join("host-a.log");
    let log = std::fs::read_to_string(&kept).unwrap_or_else(|e| panic!("{}: {e}", kept.display()));
    assert!(log.contains("Backup cannot resume this guest"), "host A's kept log does not say why");
    assert!(!netns_list().contains(&format!("{}-a", site.name)), "the site's namespaces are left behind");
}
