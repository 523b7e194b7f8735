//! The kernel fence on a real site: a primary that is merely *stopped* (SIGSTOP: its VMM, its
//! lease renewer, everything frozen, its sockets open) cannot emit guest frames once its lease
//! expired, because the fencing gate on its business port (`ftvm_gate_egress`, tcx egress on
//! `biz0`) closes at the expiry by itself; the backup takes over; and when the stopped primary
//! continues (SIGCONT), it still emits nothing.
//!
//! To show that the gate (and not merely the frozen VMM) stops the frames, a sender in host A's
//! namespace plays a wedged VMM: it keeps sending frames with the guest's source MAC into A's
//! bridge (`br0` → `biz0`) all through the stop. A capture on the business LAN (the LAN bridge's
//! port from host A, `a0`) must show those frames while A's lease is valid and none after it.
//!
//! Needs root, /dev/kvm, tcpdump and the eBPF object (`cargo xtask build-ebpf`); fails, never
//! skips. The site and every helper are removed by guards on every exit path.

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use ftvm_system_tests::capture::Capture;
    use ftvm_system_tests::load::Load;
    use ftvm_system_tests::site::Site;
    use ftvm_system_tests::{enter_netns, packet_socket, require_root_and_kvm, TempDir};

    use ftvm_system_tests::{SITE_GUEST_MAC as GUEST_MAC, SITE_GUEST_MAC_TEXT as GUEST_MAC_TEXT};
    /// The witness's lease (ftvm_repl::witness::DEFAULT_TTL). A's gate closes at its view of the
    /// lease's end, which is earlier (its grants count from the request, less a margin): every
    /// frame that passed A's gate after the stop passed within this of it.
    const LEASE_TTL: Duration = Duration::from_millis(1000);
    /// IEEE "local experimental" ethertype, for the wedged-VMM frames.
    const ETHERTYPE: u16 = 0x88b5;
    const CONNECTIONS: usize = 2;
    const REPLIES: u64 = 20;

    fn realtime_ns() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }

    fn signal(pid: i32, sig: i32) {
        // SAFETY: a signal to a process of the site this test owns.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }

    /// Sends frames from the guest's MAC on an interface of a namespace, every 2 ms, until
    /// dropped (a wedged VMM on host A).
    struct WedgedSender {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<u64>>,
    }

    impl WedgedSender {
        fn start(netns: &str, ifname: &str) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let (flag, ns, ifname) = (Arc::clone(&stop), netns.to_string(), ifname.to_string());
            let thread = std::thread::spawn(move || {
                enter_netns(&ns);
                let fd = packet_socket(&ifname, ETHERTYPE);
                let mut sent = 0u64;
                // Bounded by the stop flag, which the guard sets.
                while !flag.load(Ordering::Relaxed) {
                    let mut frame = Vec::with_capacity(60);
                    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
                    frame.extend_from_slice(&GUEST_MAC);
                    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
                    frame.extend_from_slice(&sent.to_le_bytes());
                    frame.resize(60, 0);
                    // SAFETY: `frame` is valid for reads of its length; the socket is bound.
                    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                    assert_eq!(n, frame.len() as isize, "send on {ifname}: {}", std::io::Error::last_os_error());
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                sent
            });
            Self { stop, thread: Some(thread) }
        }

        /// Stops it; how many frames it sent.
        fn stop(mut self) -> u64 {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.take().map_or(0, |t| t.join().expect("sender panicked"))
        }
    }

    impl Drop for WedgedSender {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn a_stopped_primary_emits_nothing_after_its_lease_expiry() {
        require_root_and_kvm();
        let site = Site::up("fen", &[]);
        let name = site.name.clone();
        let dir = TempDir::new("fen");
        let cap = Capture::start(&site.netns("lan"), "a0", &format!("ether src {GUEST_MAC_TEXT}"), dir.path(), "lan-a");
        let load = Load::start(&site.netns("client"), CONNECTIONS, Duration::from_secs(30));
        assert!(load.wait_progress(&[0; CONNECTIONS], REPLIES, Duration::from_secs(30)), "[{name}] the load did not start");
        let st = site.status();
        assert!(st.is_protected(), "[{name}] not protected: {st}");
        let gate_a = &st.detail("A").expect("A's status")["ebpf"]["gate"];
        assert_eq!(gate_a["active"], true, "[{name}] A's gate is not open: {gate_a}");

        let wedged = WedgedSender::start(&site.netns("a"), "br0");
        std::thread::sleep(Duration::from_millis(200));
        let pid_a = site.host_pids("A").expect("A's pid")[0];
        let stopped_ns = realtime_ns();
        signal(pid_a, libc::SIGSTOP);
        // The guard kills the site's processes on every exit path; a stopped one dies as well.

        let (st, took_over) = site.wait_status(Duration::from_secs(20), |s| s.role_b == "primary");
        let stopped_for = Duration::from_nanos(realtime_ns() - stopped_ns);
        assert!(took_over, "[{name}] B did not take over from the stopped primary within 20 s: {st}");
        let probe = st.detail("B").map(|d| d["ebpf"]["last_probe"].clone());
        println!("[{name}] B took over {:.0} ms after A was stopped; B's last probe of A: {probe:?}", stopped_for.as_secs_f64() * 1e3);
        let wedged_sent = wedged.stop();

        let continued_ns = realtime_ns();
        signal(pid_a, libc::SIGCONT);
        let before = load.replies();
        assert!(load.wait_progress(&before, REPLIES, Duration::from_secs(20)), "[{name}] B does not serve");
        // A writes its status within 100 ms of running again (if it has not ended by then).
        std::thread::sleep(Duration::from_millis(500));
        let status_a: serde_json::Value = std::fs::read_to_string(site.dir().join("host-a.status.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .expect("A's status file");
        let gate = &status_a["ebpf"]["gate"];
        let dropped = ["egress_dropped_inactive", "egress_dropped_expired"].map(|k| gate[k].as_u64().unwrap_or(0));
        println!("[{name}] A's gate after SIGCONT: {gate}");
        std::thread::sleep(Duration::from_millis(1000));
        drop(load);
        let (frames, kernel_dropped) = cap.stop();
        assert_eq!(kernel_dropped, 0, "[{name}] the capture lost frames");

        let wedged_frames: Vec<u64> =
            frames.iter().filter(|p| p.data.get(12..14) == Some(&ETHERTYPE.to_be_bytes()[..])).map(|p| p.t_ns).collect();
        let guest_frames: Vec<u64> =
            frames.iter().filter(|p| p.data.get(12..14) != Some(&ETHERTYPE.to_be_bytes()[..])).map(|p| p.t_ns).collect();
        let ms = |t: u64| (t as f64 - stopped_ns as f64) / 1e6;
        let last_wedged = wedged_frames.iter().copied().max().unwrap_or(0);
        println!(
            "[{name}] from A: {} guest frames (last at {:+.1} ms of the stop), {} of {wedged_sent} wedged-VMM frames (last at {:+.1} ms)",
            guest_frames.len(),
            guest_frames.iter().copied().max().map_or(f64::NAN, ms),
            wedged_frames.len(),
            ms(last_wedged)
        );
        assert!(!guest_frames.is_empty(), "[{name}] the capture saw no guest frame from A at all");
        assert!(
            wedged_frames.iter().any(|&t| t < stopped_ns),
            "[{name}] no wedged-VMM frame left A while its lease was valid: the capture or the sender is broken"
        );
        let deadline = stopped_ns + LEASE_TTL.as_nanos() as u64;
        let late: Vec<f64> = frames.iter().filter(|p| p.t_ns >= deadline).map(|p| ms(p.t_ns)).collect();
        assert!(
            late.is_empty(),
            "[{name}] {} frames with the guest's MAC left A after its lease expiry ({LEASE_TTL:?} after the stop), at ms {:?}",
            late.len(),
            &late[..late.len().min(10)]
        );
        assert!(
            !frames.iter().any(|p| p.t_ns >= continued_ns),
            "[{name}] the stopped primary emitted guest frames after SIGCONT"
        );
        assert!(
            dropped.iter().sum::<u64>() > 0,
            "[{name}] A's gate counted no drops although frames from the guest's MAC kept coming: {gate}"
        );
    }
}
