//! `ftvm site`: the one-machine site comes up, serves a client through the business LAN, reports
//! its state, survives nothing it should not, and leaves nothing behind.

use std::process::Command;
use std::time::Duration;

use ftvm_system_tests::{ftvm_bin, guest_elf, require_root_and_kvm, run_with_timeout, unique_name};

fn ftvm(args: &[&str]) -> (bool, String, String) {
    let out = run_with_timeout(Command::new(ftvm_bin()).args(args), Duration::from_secs(180));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn netns_list() -> String {
    String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned()
}

/// Takes the site down on every exit path.
struct SiteGuard(String);

impl Drop for SiteGuard {
    fn drop(&mut self) {
        let _ = Command::new(ftvm_bin()).args(["site", "down", "--name", &self.0]).output();
    }
}

#[test]
fn site_up_status_kill_down() {
    require_root_and_kvm();
    let name = unique_name("s");
    let guest = guest_elf().display().to_string();
    let site = SiteGuard(name.clone());

    let (ok, stdout, stderr) = ftvm(&["site", "up", "--name", &name, "--guest", &guest]);
    assert!(ok, "site up failed:\n{stdout}\n{stderr}");
    let (ok, again, err) = ftvm(&["site", "up", "--name", &name, "--guest", &guest]);
    assert!(!ok && err.contains("already up"), "a second up must be refused: {again}{err}");

    let (ok, json, err) = ftvm(&["site", "status", "--name", &name, "--json"]);
    assert!(ok, "{err}");
    let client_ns = format!("{name}-client");
    assert!(json.contains(&format!("\"client_netns\": \"{client_ns}\"")), "{json}");
    assert!(json.contains("\"guest_ip\": \"10.77.0.2\"") && json.contains("\"guest_port\": 6379"), "{json}");
    assert!(json.contains("\"state\": \"protected\""), "{json}");

    // A client on the business LAN reaches the guest through both bridges.
    let out = run_with_timeout(
        Command::new("ip").args(["netns", "exec", &client_ns, "redis-cli", "-h", "10.77.0.2", "SET", "k", "v"]),
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");

    // Kill the primary: the backup takes over and the acknowledged write is there.
    let (ok, _, err) = ftvm(&["site", "kill", "--name", &name, "A"]);
    assert!(ok, "{err}");
    let out = run_with_timeout(
        Command::new("ip").args(["netns", "exec", &client_ns, "redis-cli", "-h", "10.77.0.2", "GET", "k"]),
        Duration::from_secs(60),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v", "after failover");
    let (_, json, _) = ftvm(&["site", "status", "--name", &name, "--json"]);
    assert!(json.contains("\"state\": \"failed over\"") && json.contains("\"role\": \"killed\""), "{json}");

    let (ok, _, err) = ftvm(&["site", "down", "--name", &name]);
    assert!(ok, "{err}");
    drop(site);
    let left = netns_list();
    assert!(!left.contains(&format!("{name}-")), "namespaces left behind:\n{left}");
    let (ok, _, err) = ftvm(&["site", "status", "--name", &name]);
    assert!(!ok && err.contains("not up"), "{err}");
}

#[test]
fn site_names_are_checked() {
    require_root_and_kvm();
    let (ok, _, err) = ftvm(&["site", "up", "--name", "bad/name"]);
    assert!(!ok && err.contains("invalid site name"), "{err}");
}
