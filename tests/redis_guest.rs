//! The unprotected VM serves real Redis clients: every command, redis-benchmark, restarts that
//! keep every acknowledged write, a torn log tail, and bad client input.
//!
//! Needs root and /dev/kvm; each test boots the reference guest in its own network namespace.

use std::time::Duration;

use ftvm_system_tests::{
    redis_cli, require_root_and_kvm, run_with_timeout, Netns, Reply, RespClient, TempDir, Vm, VmOptions,
    GUEST_IP,
};

fn boot(tag: &str) -> (Netns, TempDir, Vm, VmOptions) {
    require_root_and_kvm();
    let ns = Netns::new(tag);
    let dir = TempDir::new(tag);
    let opts = VmOptions::new(dir.path().join("disk.img"));
    let vm = Vm::start(&ns, dir.path(), &opts);
    (ns, dir, vm, opts)
}

#[test]
fn redis_cli_commands_behave_as_in_redis() {
    let (ns, _dir, _vm, _) = boot("cmd");
    assert_eq!(redis_cli(&ns, &["PING"]), "PONG");
    assert_eq!(redis_cli(&ns, &["ECHO", "hello world"]), "hello world");
    assert_eq!(redis_cli(&ns, &["SET", "k1", "v1"]), "OK");
    assert_eq!(redis_cli(&ns, &["GET", "k1"]), "v1");
    assert_eq!(redis_cli(&ns, &["GET", "missing"]), "");
    assert_eq!(redis_cli(&ns, &["INCR", "counter"]), "1");
    assert_eq!(redis_cli(&ns, &["INCR", "counter"]), "2");
    assert!(redis_cli(&ns, &["INCR", "k1"]).contains("ERR value is not an integer or out of range"));
    assert_eq!(redis_cli(&ns, &["MSET", "a", "1", "b", "2", "c", "3"]), "OK");
    assert_eq!(redis_cli(&ns, &["MGET", "a", "b", "nope", "c"]), "1\n2\n\n3");
    assert_eq!(redis_cli(&ns, &["EXISTS", "a", "b", "nope", "a"]), "3");
    assert_eq!(redis_cli(&ns, &["DBSIZE"]), "5");
    assert_eq!(redis_cli(&ns, &["DEL", "a", "nope", "b"]), "2");
    assert_eq!(redis_cli(&ns, &["DBSIZE"]), "3");
    assert_eq!(redis_cli(&ns, &["FLUSHALL"]), "OK");
    assert_eq!(redis_cli(&ns, &["DBSIZE"]), "0");
    assert_eq!(redis_cli(&ns, &["EXISTS", "k1"]), "0");
}

#[test]
fn exact_replies_over_one_connection() {
    let (ns, _dir, _vm, _) = boot("resp");
    ns.run(|| {
        let mut c = RespClient::connect();
        assert_eq!(c.cmd(&["PING"]), Reply::Status("PONG".into()));
        assert_eq!(c.cmd(&["PING", "x"]), Reply::bulk("x"));
        assert_eq!(c.cmd(&["SET", "n", "41"]), Reply::Status("OK".into()));
        assert_eq!(c.cmd(&["INCR", "n"]), Reply::Integer(42));
        assert_eq!(c.cmd(&["GET", "n"]), Reply::bulk("42"));
        assert_eq!(c.cmd(&["GET", "none"]), Reply::Bulk(None));
        assert_eq!(
            c.cmd(&["MGET", "n", "none"]),
            Reply::Array(Some(vec![Reply::bulk("42"), Reply::Bulk(None)]))
        );
        match c.cmd(&["GET"]) {
            Reply::Error(e) => assert!(e.contains("wrong number of arguments"), "{e}"),
            other => panic!("expected an arity error, got {other:?}"),
        }
        // Pipelined: three commands in one write, three replies in order.
        c.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\np\r\n$1\r\n1\r\n*2\r\n$4\r\nINCR\r\n$1\r\np\r\n*2\r\n$3\r\nGET\r\n$1\r\np\r\n");
        assert_eq!(c.read_reply(), Reply::Status("OK".into()));
        assert_eq!(c.read_reply(), Reply::Integer(2));
        assert_eq!(c.read_reply(), Reply::bulk("2"));
        // Inline command, as telnet users type it.
        c.send_raw(b"PING\r\n");
        assert_eq!(c.read_reply(), Reply::Status("PONG".into()));
    });
}

#[test]
fn bad_input_gets_error_replies_and_the_connection_stays_usable() {
    let (ns, _dir, _vm, _) = boot("bad");
    ns.run(|| {
        let mut c = RespClient::connect();
        // Unknown command.
        match c.cmd(&["NOSUCHCMD", "arg"]) {
            Reply::Error(e) => assert!(e.starts_with("ERR unknown command"), "{e}"),
            other => panic!("expected an error, got {other:?}"),
        }
        assert_eq!(c.cmd(&["PING"]), Reply::Status("PONG".into()));
        // Malformed array header.
        c.send_raw(b"*abc\r\n");
        match c.read_reply() {
            Reply::Error(e) => assert!(e.contains("Protocol error"), "{e}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert_eq!(c.cmd(&["PING"]), Reply::Status("PONG".into()));
        // Malformed bulk length.
        c.send_raw(b"*1\r\n$-5\r\n");
        assert!(matches!(c.read_reply(), Reply::Error(_)));
        assert_eq!(c.cmd(&["SET", "still", "here"]), Reply::Status("OK".into()));
        // Oversized bulk string: declared 4 MiB, sent in full; refused, then the stream resyncs.
        let size = 4 << 20;
        let mut big = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${size}\r\n").into_bytes();
        big.resize(big.len() + size, b'x');
        big.extend_from_slice(b"\r\n");
        c.send_raw(&big);
        match c.read_reply() {
            Reply::Error(e) => assert!(!e.is_empty()),
            other => panic!("expected an error for the oversized bulk, got {other:?}"),
        }
        assert_eq!(c.cmd(&["GET", "big"]), Reply::Bulk(None));
        assert_eq!(c.cmd(&["GET", "still"]), Reply::bulk("here"));
    });
}

fn benchmark(ns: &Netns, pipeline: &str) {
    let ip = GUEST_IP.to_string();
    let out = run_with_timeout(
        &mut ns.exec(&[
            "redis-benchmark", "-h", &ip, "-p", "6379", "-t", "ping,set,get,incr", "-n", "100000", "-c",
            "50", "-P", pipeline, "--csv",
        ]),
        Duration::from_secs(600),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {stdout}\n{stderr}");
    assert!(!stdout.to_lowercase().contains("error") && !stderr.to_lowercase().contains("error"), "{stdout}\n{stderr}");
    // --csv: one row per test, "TEST","rps",...; every test must have run at a positive rate.
    for test in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"] {
        let rps: f64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("\"{test}\",\"")))
            .and_then(|rest| rest.split('"').next())
            .and_then(|rps| rps.parse().ok())
            .unwrap_or_else(|| panic!("no {test} result in:\n{stdout}"));
        assert!(rps > 0.0, "{test}: {rps} requests/s");
    }
}

#[test]
fn redis_benchmark_50_clients_without_and_with_pipelining() {
    let (ns, _dir, _vm, _) = boot("bench");
    benchmark(&ns, "1");
    benchmark(&ns, "16");
    // The load's INCRs all landed on one counter: 100 000 per run.
    assert_eq!(redis_cli(&ns, &["GET", "counter:__rand_int__"]), "200000");
}

#[test]
fn restart_keeps_every_acknowledged_write() {
    let (ns, dir, mut vm, opts) = boot("restart");
    ns.run(|| {
        let mut c = RespClient::connect();
        for i in 0..500 {
            assert_eq!(c.cmd(&["SET", &format!("key:{i}"), &format!("value:{i}")]), Reply::Status("OK".into()));
        }
        for _ in 0..77 {
            c.cmd(&["INCR", "hits"]);
        }
        assert_eq!(c.cmd(&["DEL", "key:0"]), Reply::Integer(1));
    });
    assert!(vm.stop().success(), "ftvm did not exit cleanly on SIGTERM:\n{}", vm.stderr());
    drop(vm);

    let vm = Vm::start(&ns, dir.path(), &opts);
    assert!(vm.console().contains("replayed"), "{}", vm.console());
    ns.run(|| {
        let mut c = RespClient::connect();
        assert_eq!(c.cmd(&["GET", "key:0"]), Reply::Bulk(None));
        for i in 1..500 {
            assert_eq!(c.cmd(&["GET", &format!("key:{i}")]), Reply::bulk(&format!("value:{i}")));
        }
        assert_eq!(c.cmd(&["GET", "hits"]), Reply::bulk("77"));
        assert_eq!(c.cmd(&["DBSIZE"]), Reply::Integer(500));
    });
}

#[test]
fn a_torn_log_tail_is_recovered_up_to_the_last_whole_record() {
    let (ns, dir, mut vm, opts) = boot("torn");
    ns.run(|| {
        let mut c = RespClient::connect();
        for i in 0..50 {
            assert_eq!(c.cmd(&["SET", &format!("t:{i}"), "x"]), Reply::Status("OK".into()));
        }
        assert_eq!(c.cmd(&["SET", "last", "a-value-long-enough-to-be-cut"]), Reply::Status("OK".into()));
    });
    assert!(vm.stop().success());
    drop(vm);

    // Power loss mid-record: zero the last 8 bytes the log wrote.
    let mut disk = std::fs::read(&opts.disk).unwrap();
    let end = disk.iter().rposition(|&b| b != 0).expect("the log wrote something") + 1;
    disk[end - 8..end].fill(0);
    std::fs::write(&opts.disk, &disk).unwrap();

    let mut vm = Vm::start(&ns, dir.path(), &opts);
    ns.run(|| {
        let mut c = RespClient::connect();
        assert_eq!(c.cmd(&["GET", "last"]), Reply::Bulk(None), "the torn record must not be applied");
        for i in 0..50 {
            assert_eq!(c.cmd(&["GET", &format!("t:{i}")]), Reply::bulk("x"));
        }
        // The log carries on from the cut: a new write survives the next restart.
        assert_eq!(c.cmd(&["SET", "after", "cut"]), Reply::Status("OK".into()));
    });
    assert!(vm.stop().success());
    drop(vm);
    let _vm = Vm::start(&ns, dir.path(), &opts);
    ns.run(|| {
        let mut c = RespClient::connect();
        assert_eq!(c.cmd(&["GET", "after"]), Reply::bulk("cut"));
        assert_eq!(c.cmd(&["GET", "t:49"]), Reply::bulk("x"));
    });
}
