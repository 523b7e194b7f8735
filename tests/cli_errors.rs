//! Bad invocations: `ftvm` exits non-zero with a one-line reason and never panics.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ftvm_guest_abi::GUEST_LOAD_GPA;
use ftvm_system_tests::{ftvm_bin, guest_elf, require_root_and_kvm, run_with_timeout, Netns, TempDir};
use ftvm_vmm::boot::elf::build_test_elf;

/// Runs `ftvm run` in a fresh namespace with the given guest and extra args; returns stderr after
/// checking the exit is a failure with one `ftvm: error:` line and no panic.
fn run_expecting_error(ns: &Netns, dir: &Path, guest: &Path, extra: &[&str], wrap: Option<&[&str]>) -> String {
    run_subcommand_expecting_error("run", ns, dir, guest, extra, wrap)
}

/// The same for another subcommand that takes the `run` options (`primary`).
fn run_subcommand_expecting_error(
    subcommand: &str,
    ns: &Netns,
    dir: &Path,
    guest: &Path,
    extra: &[&str],
    wrap: Option<&[&str]>,
) -> String {
    let disk = dir.join("disk.img");
    let mut argv: Vec<String> = wrap.unwrap_or(&[]).iter().map(|s| s.to_string()).collect();
    let mut bin = ftvm_bin();
    if wrap.is_some() {
        // A wrapped (unprivileged) run may not be able to reach the build tree: use a copy.
        let copy = dir.join("ftvm");
        std::fs::copy(&bin, &copy).unwrap();
        bin = copy;
    }
    argv.push(bin.display().to_string());
    argv.extend([subcommand, "--netns", ns.name(), "--memory", "64M"].map(String::from));
    if !extra.contains(&"--tap") {
        argv.extend(["--tap".into(), "ftvmtap0".into()]);
    }
    argv.extend(["--guest".into(), guest.display().to_string(), "--disk".into(), disk.display().to_string()]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env("RUST_LOG", "error");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ftvm should have failed: {argv:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "ftvm panicked:\n{stderr}");
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("ftvm: error: ")).collect();
    assert_eq!(errors.len(), 1, "expected exactly one error line:\n{stderr}");
    errors[0].to_string()
}

#[test]
fn not_an_elf_file() {
    require_root_and_kvm();
    let ns = Netns::new("noelf");
    let dir = TempDir::new("noelf");
    let bogus = dir.path().join("bogus");
    std::fs::write(&bogus, b"#!/bin/sh\necho this is not a guest\n").unwrap();
    let line = run_expecting_error(&ns, dir.path(), &bogus, &[], None);
    assert!(line.to_lowercase().contains("elf"), "{line}");
}

#[test]
fn missing_guest_file() {
    require_root_and_kvm();
    let ns = Netns::new("noguest");
    let dir = TempDir::new("noguest");
    let line = run_expecting_error(&ns, dir.path(), &dir.path().join("nope"), &[], None);
    assert!(line.contains("not found"), "{line}");
}

#[test]
fn a_guest_that_triple_faults() {
    require_root_and_kvm();
    let ns = Netns::new("fault");
    let dir = TempDir::new("fault");
    // ud2: an invalid-opcode exception with no IDT to deliver it to: a triple fault.
    let guest = dir.path().join("ud2.elf");
    std::fs::write(&guest, build_test_elf(GUEST_LOAD_GPA, &[0x0f, 0x0b], 0)).unwrap();
    let line = run_expecting_error(&ns, dir.path(), &guest, &[], None);
    assert!(line.contains("triple") || line.contains("shutdown"), "{line}");
}

#[test]
fn an_interface_that_is_not_a_tap() {
    require_root_and_kvm();
    let ns = Netns::new("notap");
    let dir = TempDir::new("notap");
    // `lo` exists in every namespace and is not a TAP device.
    let line = run_expecting_error(&ns, dir.path(), &guest_elf(), &["--tap", "lo"], None);
    assert!(line.contains("lo"), "{line}");
}

#[test]
fn a_tap_name_the_kernel_cannot_have() {
    require_root_and_kvm();
    let ns = Netns::new("badtap");
    let dir = TempDir::new("badtap");
    // Interface names are at most 15 bytes.
    let line = run_expecting_error(&ns, dir.path(), &guest_elf(), &["--tap", "a-name-far-too-long-for-linux"], None);
    assert!(line.contains("a-name-far-too-long-for-linux"), "{line}");
}

#[test]
fn an_unknown_network_namespace() {
    require_root_and_kvm();
    let dir = TempDir::new("nons");
    let out = run_with_timeout(
        Command::new(ftvm_bin())
            .args(["run", "--netns", "ftvm-no-such-namespace", "--disk"])
            .arg(dir.path().join("d.img"))
            .arg("--guest")
            .arg(guest_elf()),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("network namespace ftvm-no-such-namespace not found"), "{stderr}");
}

#[test]
fn no_permission_on_dev_kvm() {
    require_root_and_kvm();
    let ns = Netns::new("nokvm");
    let dir = TempDir::new("nokvm");
    // The directory must be reachable by the unprivileged user for the disk file.
    Command::new("chmod").arg("777").arg(dir.path()).status().unwrap();
    let guest = dir.path().join("guest.elf");
    std::fs::copy(guest_elf(), &guest).unwrap();
    Command::new("chmod").arg("755").arg(&guest).status().unwrap();
    // As user nobody, keeping only CAP_SYS_ADMIN so that entering the namespace still works: what
    // fails must be /dev/kvm (root-only, mode 0600).
    let wrap: &[&str] = &[
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+sys_admin",
        "--ambient-caps=+sys_admin", "--",
    ];
    let line = run_expecting_error(&ns, dir.path(), &guest, &[], Some(wrap));
    assert!(line.contains("/dev/kvm"), "{line}");
    assert!(line.to_lowercase().contains("permission denied"), "{line}");
}

#[test]
fn a_primary_with_the_wrong_secret_is_refused_and_the_backup_keeps_waiting() {
    require_root_and_kvm();
    let ns = Netns::new("secret");
    let dir = TempDir::new("secret");
    let (good, bad, short) = (dir.path().join("good"), dir.path().join("bad"), dir.path().join("short"));
    std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&bad, "fedcba9876543210fedcba9876543210\n").unwrap();
    std::fs::write(&short, "tooshort\n").unwrap();
    let loose = dir.path().join("loose");
    std::fs::write(&loose, "0123456789abcdef0123456789abcdef\n").unwrap();
    for f in [&good, &bad, &short] {
        Command::new("chmod").arg("600").arg(f).status().unwrap();
    }
    Command::new("chmod").arg("640").arg(&loose).status().unwrap();
    let mut backup = Command::new(ftvm_bin())
        .args(["backup", "--netns", ns.name(), "--listen", "127.0.0.1:7700", "--memory", "64M", "--tap", "ftvmb0"])
        .args(["--quorum", "none"])
        .arg("--secret-file")
        .arg(&good)
        .arg("--disk")
        .arg(dir.path().join("standby.img"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let primary = |secret: &Path| {
        let args =
            ["--peer", "127.0.0.1:7700", "--secret-file", secret.to_str().unwrap(), "--connect-timeout", "20", "--quorum", "none"];
        run_subcommand_expecting_error("primary", &ns, dir.path(), &guest_elf(), &args, None)
    };
    let line = primary(&bad);
    assert!(line.contains("refused this primary"), "{line}");
    let line = primary(&short);
    assert!(line.contains("at least 16"), "{line}");
    let line = primary(&loose);
    assert!(line.contains("readable by group or others"), "{line}");
    assert!(backup.try_wait().unwrap().is_none(), "the backup must keep running");
    let _ = backup.kill();
    let _ = backup.wait();
}

/// `ftvm host` with a configuration it cannot use: one line naming the file and the fault, before
/// anything starts; and its sample configuration is one it accepts up to the missing files.
#[test]
fn a_bad_host_configuration_is_named() {
    let dir = TempDir::new("hostcfg");
    let host_error = |text: &str| -> String {
        let path = dir.path().join("host.toml");
        std::fs::write(&path, text).unwrap();
        let out = run_with_timeout(
            Command::new(ftvm_bin()).args(["host", "--config"]).arg(&path).env("RUST_LOG", "error"),
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "ftvm host accepted:\n{text}\n{stderr}");
        assert!(!stderr.contains("panicked"), "ftvm panicked:\n{stderr}");
        let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("ftvm: error: ")).collect();
        assert_eq!(errors.len(), 1, "expected exactly one error line:\n{stderr}");
        assert!(errors[0].contains(&path.display().to_string()), "the file is not named: {}", errors[0]);
        errors[0].to_string()
    };
    let base = "listen = \"10.99.0.1:7700\"\npeer = \"10.99.0.2:7700\"\nsecret-file = \"/nonexistent/alink.secret\"\ndisk = \"/nonexistent/vm.img\"\n";
    let line = host_error(&format!("{base}quorum = \"witness\"\nwitnes = \"10.88.0.10:7800\"\n"));
    assert!(line.contains("unknown key `witnes`"), "{line}");
    let line = host_error(&format!("{base}quorum = \"none\"\n"));
    assert!(line.contains("start-as"), "a start without a quorum must say who starts: {line}");
    let line = host_error(&format!("{base}quorum = \"witness\"\nwitness = \"not an address\"\n"));
    assert!(line.contains("not an address"), "{line}");
    let missing = dir.path().join("missing.toml");
    let out = run_with_timeout(Command::new(ftvm_bin()).args(["host", "--config"]).arg(&missing), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot read the host configuration"), "{stderr}");
    // The sample parses; it fails only on what the machine lacks (its secret file here).
    let out = run_with_timeout(Command::new(ftvm_bin()).args(["host", "--sample-config"]), Duration::from_secs(30));
    assert!(out.status.success());
    let path = dir.path().join("sample.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let out = run_with_timeout(Command::new(ftvm_bin()).args(["host", "--config"]).arg(&path), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot read secret file /etc/ftvm/alink.secret"), "the sample is refused for another reason: {stderr}");
}
