//! Checkpoint support with real KVM guests: capture of the whole machine state, restore into a
//! fresh VM (the failover path), dirty tracking with each backend, and the pause rule. The
//! guests are hand-assembled x86-64 bytes in a minimal ELF (assembly next to the bytes; GNU as,
//! checked with objdump). They need `/dev/kvm` (run as root).

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use ftvm_guest_abi::GUEST_LOAD_GPA;
    use ftvm_proto::pages::PageRangeSet;
    use ftvm_vmm::boot::elf::build_test_elf;
    use ftvm_vmm::boot::BootParams;
    use ftvm_vmm::devices::{BlockConfig, DeviceConfig};
    use ftvm_vmm::dirty::{DirtyTracking, TrackerKind};
    use ftvm_vmm::machine::{
        CaptureError, CheckpointSource, Machine, MachineExit, MachineRestoreError, MachineRunError,
        MemoryImage, VmConfig,
    };
    use ftvm_vmm::memory::{sized_memfd, AdoptMemoryError};
    use ftvm_vmm::state::MachineState;
    use ftvm_vmm::vcpu::state::{self as vstate, FpuState, StateConfig, XsaveSupport};
    use ftvm_vmm::vcpu::{VcpuSaveError, VcpuState};
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
        MmapRegion,
    };

    /// Sink for guest console output.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-ckpt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn config(name: &str, code: &[u8], mem_size: u64, tracking: DirtyTracking) -> VmConfig {
        VmConfig {
            mem_size,
            guest_elf: temp_file(name, &build_test_elf(GUEST_LOAD_GPA, code, 0)),
            boot: BootParams::default(),
            devices: Default::default(),
            console: Box::new(Sink::default()),
            dirty_tracking: tracking,
        }
    }

    fn spawn_run(mut m: Machine) -> JoinHandle<Result<MachineExit, MachineRunError>> {
        std::thread::spawn(move || m.run())
    }

    /// The counter guest: three counters that must stay equal, checked at the top of every
    /// iteration; a mismatch exits with 0x100 (memory) or 0x200 (SSE).
    ///
    /// ```text
    ///        mov rsi, 0x400000        ; the memory counter's address
    ///        xor ebx, ebx             ; rbx: register counter
    ///        mov qword [rsi], 0       ; [rsi]: memory counter
    ///        pxor xmm0, xmm0          ; xmm0 (low qword): SSE counter
    ///        mov eax, 1
    ///        movq xmm7, rax           ; xmm7: SSE increment
    /// loop:  mov rax, [rsi]
    ///        cmp rax, rbx
    ///        jne fail_mem
    ///        movq rcx, xmm0
    ///        cmp rcx, rbx
    ///        jne fail_sse
    ///        inc rbx
    ///        inc qword [rsi]
    ///        paddq xmm0, xmm7
    ///        jmp loop
    /// fail_mem: mov eax, 0x100; mov dx, 0x501; out dx, eax
    /// fail_sse: mov eax, 0x200; mov dx, 0x501; out dx, eax
    /// ```
    const COUNTER_GUEST: [u8; 80] = [
        0x48, 0xc7, 0xc6, 0x00, 0x00, 0x40, 0x00, // mov rsi, 0x400000
        0x31, 0xdb, // xor ebx, ebx
        0x48, 0xc7, 0x06, 0x00, 0x00, 0x00, 0x00, // mov qword [rsi], 0
        0x66, 0x0f, 0xef, 0xc0, // pxor xmm0, xmm0
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x66, 0x48, 0x0f, 0x6e, 0xf8, // movq xmm7, rax
        0x48, 0x8b, 0x06, // loop: mov rax, [rsi]
        0x48, 0x39, 0xd8, // cmp rax, rbx
        0x75, 0x16, // jne fail_mem
        0x66, 0x48, 0x0f, 0x7e, 0xc1, // movq rcx, xmm0
        0x48, 0x39, 0xd9, // cmp rcx, rbx
        0x75, 0x16, // jne fail_sse
        0x48, 0xff, 0xc3, // inc rbx
        0x48, 0xff, 0x06, // inc qword [rsi]
        0x66, 0x0f, 0xd4, 0xc7, // paddq xmm0, xmm7
        0xeb, 0xe2, // jmp loop
        0xb8, 0x00, 0x01, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xef, // fail_mem: exit 0x100
        0xb8, 0x00, 0x02, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xef, // fail_sse: exit 0x200
    ];
    const COUNTER_GPA: u64 = 0x40_0000;
    const COUNTER_LOOP: u64 = GUEST_LOAD_GPA + 0x1e;
    const COUNTER_END: u64 = GUEST_LOAD_GPA + 0x3c;

    /// The low qword of XMM0 in the state (the XSAVE legacy area has XMM0 at byte 160).
    fn xmm0(s: &VcpuState) -> u64 {
        match &s.fpu {
            FpuState::Xsave(w) => u64::from(w[40]) | (u64::from(w[41]) << 32),
            FpuState::Fpu(f) => u64::from_le_bytes(f.xmm[0][..8].try_into().unwrap()),
        }
    }

    /// Checks the counter guest's invariant at an arbitrary pause point and returns rbx.
    fn check_counters(state: &MachineState, mem_counter: u64) -> u64 {
        let v = &state.vcpus[0];
        let (rbx, rip) = (v.regs.rbx, v.regs.rip);
        assert!(
            (COUNTER_LOOP..COUNTER_END).contains(&rip),
            "rip {rip:#x} outside the loop"
        );
        // The pause may fall between the three increments of one iteration.
        assert!(
            mem_counter == rbx || mem_counter + 1 == rbx,
            "memory {mem_counter} vs rbx {rbx}"
        );
        let sse = xmm0(v);
        assert!(sse == rbx || sse + 1 == rbx, "xmm0 {sse} vs rbx {rbx}");
        rbx
    }

    /// Waits until the counter guest's memory counter passes `n`.
    fn wait_for_counter(src: &CheckpointSource, n: u64) {
        let mem = src.guest_memory();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap() <= n {
            assert!(
                Instant::now() < deadline,
                "the counter guest did not pass {n}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn read_all(src: &CheckpointSource, size: u64) -> Vec<u8> {
        let mut image = vec![0u8; size as usize];
        src.guest_memory()
            .read_slice(&mut image, GuestAddress(0))
            .unwrap();
        image
    }

    /// (a) A running guest is paused, captured, copied, restored into a fresh VM and carries on
    /// exactly where it was: register, memory and SSE counters continue, none resets. Also: the
    /// state survives its container; the restored vCPU's registers are the saved ones before it
    /// runs; and capture is refused while running (d).
    #[test]
    fn guest_moves_to_a_fresh_vm_and_carries_on() {
        const MEM: u64 = 32 << 20;
        // With a disk, so that device state goes along (the guest does not drive it).
        let disk = temp_file("counter-disk", &vec![0u8; 1 << 20]);
        let devices = DeviceConfig {
            block: Some(BlockConfig::new(disk)),
            ..Default::default()
        };
        let mut cfg1 = config("counter1", &COUNTER_GUEST, MEM, DirtyTracking::Off);
        cfg1.devices = devices.clone();
        let mut m1 = Machine::create(cfg1).unwrap();
        assert_ne!(m1.boot_info().virtio_blk_base, 0);
        let mut src = m1.checkpoint_source().unwrap();
        assert!(
            m1.checkpoint_source().is_err(),
            "only one source per machine"
        );
        assert_eq!(src.tracker_kind(), None);
        let run1 = spawn_run(m1);
        wait_for_counter(&src, 1000);

        // (d) Running: refused, and the guest keeps going.
        assert!(matches!(src.capture_state(), Err(CaptureError::NotPaused)));
        let mut pages = PageRangeSet::new();
        assert!(matches!(
            src.capture(&mut pages),
            Err(CaptureError::NoDirtyTracking)
        ));

        let t = Instant::now();
        src.pause().unwrap();
        let pause = t.elapsed();
        assert!(src.with_devices(|d| d.is_paused()));
        let state = src.capture_state().unwrap();
        let capture = src.last_timings();
        assert!(state.devices.block.is_some() && state.devices.net.is_none());
        let mem_counter: u64 = src
            .guest_memory()
            .read_obj(GuestAddress(COUNTER_GPA))
            .unwrap();
        let rbx1 = check_counters(&state, mem_counter);
        assert!(rbx1 > 1000, "the guest ran ({rbx1} iterations)");
        let image = read_all(&src, MEM);
        // (d) After a resume the pause no longer counts.
        src.resume().unwrap();
        assert!(!src.with_devices(|d| d.is_paused()));
        assert!(matches!(src.capture_state(), Err(CaptureError::NotPaused)));
        src.pause().unwrap();
        // The failover: the source machine is gone.
        src.handle().stop();
        assert_eq!(run1.join().unwrap().unwrap(), MachineExit::Stopped);

        // Through the container, as the backup would receive it.
        let blob = state.to_bytes().unwrap();
        let decoded = MachineState::from_bytes(&blob).unwrap();
        assert_eq!(decoded, state);
        let state = decoded;
        let v = &state.vcpus[0];
        eprintln!(
            "state: {} bytes encoded; xsave {}, xcrs {}, lapic {}, debugregs {}, {} MSRs: {:x?}",
            blob.len(),
            matches!(v.fpu, FpuState::Xsave(_)),
            v.xcrs.is_some(),
            v.lapic.is_some(),
            v.debug_regs.is_some(),
            v.msrs.len(),
            v.msrs.iter().map(|m| m.index).collect::<Vec<_>>()
        );
        assert!(v.msr(vstate::MSR_IA32_TSC).is_some_and(|t| t > 0));

        // A fresh VM, with dirty tracking this time (the ring: enabled before its vCPUs).
        // The configuration must name the same devices as the state.
        assert!(matches!(
            Machine::restore(
                config("counter2", &[0x0f, 0x0b], MEM, DirtyTracking::Off),
                MemoryImage::Bytes(&image),
                &state,
            ),
            Err(MachineRestoreError::Devices(_))
        ));
        let mut cfg2 = config("counter2", &[0x0f, 0x0b], MEM, DirtyTracking::kvm_ring());
        cfg2.devices = devices;
        let t = Instant::now();
        let mut m2 = Machine::restore(cfg2, MemoryImage::Bytes(&image), &state).unwrap();
        let restore = t.elapsed();
        let mut src2 = m2.checkpoint_source().unwrap();
        assert_eq!(src2.tracker_kind(), Some(TrackerKind::KvmRing));
        // Before it runs, the restored vCPU is the saved one.
        src2.pause().unwrap();
        let again = src2.capture_state().unwrap();
        let (a, b) = (&state.vcpus[0], &again.vcpus[0]);
        assert_eq!(a.regs, b.regs);
        assert_eq!(a.sregs, b.sregs);
        assert_eq!(a.fpu, b.fpu);
        assert_eq!(a.xcrs, b.xcrs);
        assert_eq!(a.cpuid, b.cpuid);
        assert_eq!(a.mp_state, b.mp_state);
        for m in &a.msrs {
            let now = b.msr(m.index).unwrap();
            if m.index == vstate::MSR_IA32_TSC {
                // The guest's TSC goes on from the saved value (it does not jump to the new
                // VM's, nor back to 0).
                assert!(
                    now >= m.data && now - m.data < 5_000_000_000,
                    "TSC {} -> {now}",
                    m.data
                );
            } else {
                assert_eq!(m.data, now, "MSR {:#x}", m.index);
            }
        }
        assert_eq!(again.boot_info, state.boot_info);
        assert_eq!(again.devices, state.devices);
        assert_eq!(*m2.boot_info(), state.boot_info().unwrap());

        let run2 = spawn_run(m2);
        wait_for_counter(&src2, rbx1 + 1000);
        src2.pause().unwrap();
        let later = src2.capture_state().unwrap();
        let mem_counter: u64 = src2
            .guest_memory()
            .read_obj(GuestAddress(COUNTER_GPA))
            .unwrap();
        let rbx2 = check_counters(&later, mem_counter);
        assert!(rbx2 > rbx1 + 1000, "carried on: {rbx1} -> {rbx2}");
        src2.handle().stop();
        // Stopped, not GuestExit(0x100/0x200): the guest's own checks never failed.
        assert_eq!(run2.join().unwrap().unwrap(), MachineExit::Stopped);
        eprintln!(
            "counter guest: {rbx1} iterations in VM 1, {rbx2} after restore; pause {pause:?}, \
             capture {:?} (vCPU {:?}), restore of {} MiB {restore:?}",
            capture.total,
            capture.vcpus,
            MEM >> 20
        );
    }

    #[test]
    fn restore_refuses_a_state_that_does_not_fit() {
        const MEM: u64 = 32 << 20;
        let mut m =
            Machine::create(config("fit", &COUNTER_GUEST, MEM, DirtyTracking::Off)).unwrap();
        let mut src = m.checkpoint_source().unwrap();
        src.pause().unwrap();
        let state = src.capture_state().unwrap();
        let image = read_all(&src, MEM);
        drop(m);
        let cfg = |mem| config("fit2", &[0x90], mem, DirtyTracking::Off);
        assert!(matches!(
            Machine::restore(cfg(64 << 20), MemoryImage::Bytes(&image), &state),
            Err(MachineRestoreError::MemSize { .. })
        ));
        assert!(matches!(
            Machine::restore(cfg(MEM), MemoryImage::Bytes(&image[..4096]), &state),
            Err(MachineRestoreError::ImageSize { .. })
        ));
        let mut bad = state.clone();
        bad.boot_info.truncate(10);
        assert!(matches!(
            Machine::restore(cfg(MEM), MemoryImage::Bytes(&image), &bad),
            Err(MachineRestoreError::BootInfo)
        ));
        let mut two = state.clone();
        two.vcpus.push(two.vcpus[0].clone());
        assert!(matches!(
            Machine::restore(cfg(MEM), MemoryImage::Bytes(&image), &two),
            Err(MachineRestoreError::VcpuCount(2))
        ));
        // A GuestMemory image works as well as bytes.
        let mem = src.guest_memory();
        let m2 = Machine::restore(cfg(MEM), MemoryImage::Memory(&mem), &state).unwrap();
        let got: u64 = m2
            .vm()
            .memory()
            .read_obj(GuestAddress(GUEST_LOAD_GPA))
            .unwrap();
        assert_eq!(
            got,
            u64::from_le_bytes(COUNTER_GUEST[..8].try_into().unwrap())
        );
    }

    /// A memfd holding `image` (its all-zero pages left as holes), sealable like the backup's
    /// standby memory; `MFD_ALLOW_SEALING` can be left out, to test the refusal.
    fn memfd_image(image: &[u8], sealable: bool) -> File {
        let flags = if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
        let f = File::from(sized_memfd(c"ftvm-test-image", flags, image.len()).expect("memfd_create"));
        for (i, page) in image.chunks(4096).enumerate() {
            if page.iter().any(|&b| b != 0) {
                f.write_all_at(page, (i * 4096) as u64).unwrap();
            }
        }
        f
    }

    /// Another shared mapping of `f`, as the backup's standby mapping is to the VM that adopts
    /// its memfd.
    fn map_shared(f: &File, len: u64) -> GuestMemoryMmap<()> {
        let region =
            MmapRegion::<()>::from_file(FileOffset::new(f.try_clone().unwrap(), 0), len as usize)
                .unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap()
    }

    /// (e) Failover without a copy: the restore adopts a memfd holding the image as the new VM's
    /// RAM. The restored guest carries on from the image; its writes appear in another mapping of
    /// the memfd (the backup's standby mapping), so the memory is shared, not copied; writes by
    /// the VMM reach the file too; dirty tracking (KVM's log, with either backend, or userfaultfd
    /// write-protect of the shared mapping, and the VMM's bitmap) works on adopted memory; and a
    /// memfd that does not fit, or that could be shrunk under the guest, is refused.
    #[test]
    fn guest_carries_on_in_adopted_memory() {
        const MEM: u64 = 32 << 20;
        let mut m1 =
            Machine::create(config("adopt1", &COUNTER_GUEST, MEM, DirtyTracking::Off)).unwrap();
        let mut src = m1.checkpoint_source().unwrap();
        let run1 = spawn_run(m1);
        wait_for_counter(&src, 1000);
        src.pause().unwrap();
        let state = src.capture_state().unwrap();
        let image = read_all(&src, MEM);
        src.handle().stop();
        assert_eq!(run1.join().unwrap().unwrap(), MachineExit::Stopped);
        let at = COUNTER_GPA as usize;
        let mem_counter = u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
        let rbx1 = check_counters(&state, mem_counter);
        let cfg = |name, tracking| config(name, &[0x0f, 0x0b], MEM, tracking);

        let short = memfd_image(&image[..(MEM / 2) as usize], true);
        assert!(matches!(
            Machine::restore(
                cfg("adopt-short", DirtyTracking::Off),
                MemoryImage::Adopt(short.into()),
                &state
            ),
            Err(MachineRestoreError::AdoptMemory(AdoptMemoryError::Size { file, mem }))
                if file == MEM / 2 && mem == MEM
        ));
        let unsealable = memfd_image(&image, false);
        assert!(matches!(
            Machine::restore(
                cfg("adopt-unsealable", DirtyTracking::Off),
                MemoryImage::Adopt(unsealable.into()),
                &state
            ),
            Err(MachineRestoreError::AdoptMemory(
                AdoptMemoryError::NotSealable(_)
            ))
        ));

        for (name, tracking) in [
            ("bitmap", DirtyTracking::KvmBitmap),
            ("ring", DirtyTracking::kvm_ring()),
            ("uffd", DirtyTracking::Uffd),
        ] {
            let file = memfd_image(&image, true);
            let standby = map_shared(&file, MEM);
            let t = Instant::now();
            let mut m2 = Machine::restore(
                cfg("adopt2", tracking),
                MemoryImage::Adopt(file.try_clone().unwrap().into()),
                &state,
            )
            .unwrap();
            let restore = t.elapsed();
            // The new VM's RAM holds the image, through its own mapping.
            let gm = m2.vm().memory().clone();
            assert_eq!(
                gm.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap(),
                mem_counter
            );
            assert_ne!(
                gm.get_host_address(GuestAddress(0)).unwrap(),
                standby.get_host_address(GuestAddress(0)).unwrap()
            );
            // The restore sealed the file: it can no longer shrink under the guest.
            assert!(file.set_len(MEM / 2).is_err());
            let mut src2 = m2.checkpoint_source().unwrap();
            src2.start_tracking().unwrap();
            let run2 = spawn_run(m2);

            // The guest's writes appear in the standby's mapping: the same pages.
            let deadline = Instant::now() + Duration::from_secs(10);
            while standby.read_obj::<u64>(GuestAddress(COUNTER_GPA)).unwrap() <= rbx1 + 1000 {
                assert!(!run2.is_finished(), "{name}: the restored guest exited");
                assert!(
                    Instant::now() < deadline,
                    "{name}: the guest does not progress"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            src2.pause().unwrap();
            let mut pages = PageRangeSet::new();
            let later = src2.capture(&mut pages).unwrap();
            let seen: u64 = standby.read_obj(GuestAddress(COUNTER_GPA)).unwrap();
            assert_eq!(
                seen,
                src2.guest_memory()
                    .read_obj::<u64>(GuestAddress(COUNTER_GPA))
                    .unwrap()
            );
            let rbx2 = check_counters(&later, seen);
            assert!(rbx2 > rbx1 + 1000, "{name}: carried on: {rbx1} -> {rbx2}");
            // The tracker saw the guest's writes to the adopted memory.
            let counter_page = COUNTER_GPA / 4096;
            assert!(
                pages.pages().any(|p| p == counter_page),
                "{name}: the counter page is not in the harvest"
            );

            // The VMM's own writes reach the file, and its bitmap reports them.
            src2.guest_memory()
                .write_obj(0x5eed_u64, GuestAddress(VMM_GPA))
                .unwrap();
            let mut b = [0u8; 8];
            file.read_exact_at(&mut b, VMM_GPA).unwrap();
            assert_eq!(u64::from_le_bytes(b), 0x5eed);
            src2.resume().unwrap();
            src2.pause().unwrap();
            let mut pages = PageRangeSet::new();
            src2.capture(&mut pages).unwrap();
            let got: BTreeSet<u64> = pages.pages().collect();
            assert!(got.contains(&pfn(VMM_GPA)), "{name}: {got:x?}");

            src2.handle().stop();
            // Stopped, not GuestExit(0x100/0x200): the guest's own checks held.
            assert_eq!(run2.join().unwrap().unwrap(), MachineExit::Stopped);
            eprintln!(
                "adopted ({name}): {rbx1} iterations in VM 1, {rbx2} after restore; restore of \
                 {} MiB without a copy {restore:?}",
                MEM >> 20
            );
        }
    }

    /// The dirtying guest: waits (PORT_WAIT, 100 µs at a time) until the GO word at 0x401000
    /// exceeds its round number r, then writes r into N pages of the region at 8 MiB — page
    /// `((r * N + i) * S) & MASK` for i in 0..N, all distinct for an odd S — and stores r + 1 at
    /// 0x400000 (STATUS). N, S and MASK are read once from 0x401008, 0x401010, 0x401018.
    ///
    /// ```text
    ///          mov rsi, 0x400000          ; STATUS
    ///          mov rdi, 0x401000          ; GO and parameters
    ///          mov r12, 0x800000          ; region
    ///          mov r13, [rdi + 8]         ; N
    ///          mov r14, [rdi + 16]        ; S
    ///          mov r15, [rdi + 24]        ; MASK
    ///          xor ebx, ebx               ; r
    /// wait_go: mov rax, [rdi]
    ///          cmp rax, rbx
    ///          ja do_round
    ///          mov dx, 0x500
    ///          mov eax, 100
    ///          out dx, eax
    ///          jmp wait_go
    /// do_round: xor ecx, ecx
    /// write:   mov rax, rbx
    ///          imul rax, r13
    ///          add rax, rcx
    ///          imul rax, r14
    ///          and rax, r15
    ///          shl rax, 12
    ///          mov [r12 + rax], rbx
    ///          inc rcx
    ///          cmp rcx, r13
    ///          jb write
    ///          inc rbx
    ///          mov [rsi], rbx
    ///          jmp wait_go
    /// ```
    const DIRTY_GUEST: [u8; 98] = [
        0x48, 0xc7, 0xc6, 0x00, 0x00, 0x40, 0x00, // mov rsi, 0x400000
        0x48, 0xc7, 0xc7, 0x00, 0x10, 0x40, 0x00, // mov rdi, 0x401000
        0x49, 0xc7, 0xc4, 0x00, 0x00, 0x80, 0x00, // mov r12, 0x800000
        0x4c, 0x8b, 0x6f, 0x08, // mov r13, [rdi + 8]
        0x4c, 0x8b, 0x77, 0x10, // mov r14, [rdi + 16]
        0x4c, 0x8b, 0x7f, 0x18, // mov r15, [rdi + 24]
        0x31, 0xdb, // xor ebx, ebx
        0x48, 0x8b, 0x07, // wait_go: mov rax, [rdi]
        0x48, 0x39, 0xd8, // cmp rax, rbx
        0x77, 0x0c, // ja do_round
        0x66, 0xba, 0x00, 0x05, // mov dx, 0x500
        0xb8, 0x64, 0x00, 0x00, 0x00, // mov eax, 100
        0xef, // out dx, eax
        0xeb, 0xec, // jmp wait_go
        0x31, 0xc9, // do_round: xor ecx, ecx
        0x48, 0x89, 0xd8, // write: mov rax, rbx
        0x49, 0x0f, 0xaf, 0xc5, // imul rax, r13
        0x48, 0x01, 0xc8, // add rax, rcx
        0x49, 0x0f, 0xaf, 0xc6, // imul rax, r14
        0x4c, 0x21, 0xf8, // and rax, r15
        0x48, 0xc1, 0xe0, 0x0c, // shl rax, 12
        0x49, 0x89, 0x1c, 0x04, // mov [r12 + rax], rbx
        0x48, 0xff, 0xc1, // inc rcx
        0x4c, 0x39, 0xe9, // cmp rcx, r13
        0x72, 0xdf, // jb write
        0x48, 0xff, 0xc3, // inc rbx
        0x48, 0x89, 0x1e, // mov [rsi], rbx
        0xeb, 0xc1, // jmp wait_go
    ];
    const STATUS_GPA: u64 = 0x40_0000;
    const GO_GPA: u64 = 0x40_1000;
    const REGION_GPA: u64 = 0x80_0000;
    /// The region: 2048 pages (8 MiB).
    const REGION_MASK: u64 = 2047;
    const STRIDE: u64 = 3;
    /// Where the test itself writes through vm-memory (the VMM's own dirty pages).
    const VMM_GPA: u64 = 0x180_0000;

    fn pfn(gpa: u64) -> u64 {
        gpa / 4096
    }

    fn guest_pages(round: u64, n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(move |i| pfn(REGION_GPA) + (((round * n + i) * STRIDE) & REGION_MASK))
    }

    /// Sets the dirtying guest's parameters: `n` pages per round, the stride and the mask.
    fn set_dirtier_parameters(gm: &ftvm_vmm::memory::GuestMemory, n: u64) {
        gm.write_obj(n, GuestAddress(GO_GPA + 8)).unwrap();
        gm.write_obj(STRIDE, GuestAddress(GO_GPA + 16)).unwrap();
        gm.write_obj(REGION_MASK, GuestAddress(GO_GPA + 24))
            .unwrap();
    }

    /// A machine running the dirtying guest, with `n` pages per round, tracking started.
    struct Dirtier {
        src: CheckpointSource,
        run: Option<JoinHandle<Result<MachineExit, MachineRunError>>>,
        n: u64,
        round: u64,
    }

    impl Dirtier {
        fn start(name: &str, tracking: DirtyTracking, mem: u64, n: u64) -> Self {
            let m = Machine::create(config(name, &DIRTY_GUEST, mem, tracking)).unwrap();
            set_dirtier_parameters(m.vm().memory(), n);
            Self::attach(m, n)
        }

        /// Starts tracking on `m`, which holds the dirtying guest with `n` pages per round set,
        /// before its first round (made, or restored), runs it, and checks the warm-up epoch.
        fn attach(mut m: Machine, n: u64) -> Self {
            let mut src = m.checkpoint_source().unwrap();
            src.start_tracking().unwrap();
            let run = Some(spawn_run(m));
            let mut d = Self {
                src,
                run,
                n,
                round: 0,
            };
            // A warm-up epoch. KVM logs a page as dirty when it maps it writable, and with shadow
            // paging (this machine's nested KVM) it does that on the first *read* fault of a page
            // whose guest PTE is already dirty (the VMM's page tables preset A and D): the guest's
            // code page and the GO page it polls show up once, in the first epoch after they are
            // first touched. Extra pages cost bandwidth, never correctness; the exact checks
            // start after one full round, which is sure to have touched them. userfaultfd
            // write-protect has no such extras: KVM can only map a protected page read-only, so
            // a page is reported when it is written, and the warm-up is exact too.
            d.round();
            let want = d.expected();
            let (warm, _) = d.checkpoint();
            if d.src.tracker_kind() == Some(TrackerKind::Uffd) {
                assert_eq!(warm, want, "warm-up: {}", diff(&warm, &want));
            }
            assert!(warm.is_superset(&want), "warm-up: {}", diff(&warm, &want));
            let read_only: BTreeSet<u64> = [pfn(GUEST_LOAD_GPA), pfn(GO_GPA)].into();
            assert!(
                warm.difference(&want).all(|p| read_only.contains(p)),
                "warm-up: {}",
                diff(&warm, &want)
            );
            d
        }

        /// Lets the guest do its next round and waits until it is done (still running).
        fn round(&mut self) {
            let mem = self.src.guest_memory();
            self.round += 1;
            mem.write_obj(self.round, GuestAddress(GO_GPA)).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while mem.read_obj::<u64>(GuestAddress(STATUS_GPA)).unwrap() != self.round {
                assert!(
                    Instant::now() < deadline,
                    "round {} did not finish",
                    self.round
                );
                std::thread::yield_now();
            }
        }

        /// Pages the guest wrote in the round just done, plus STATUS and GO.
        fn expected(&self) -> BTreeSet<u64> {
            let mut e: BTreeSet<u64> = guest_pages(self.round - 1, self.n).collect();
            e.insert(pfn(STATUS_GPA));
            e.insert(pfn(GO_GPA));
            e
        }

        /// Pause, capture (harvest), resume; the harvested pages.
        fn checkpoint(&mut self) -> (BTreeSet<u64>, PageRangeSet) {
            self.src.pause().unwrap();
            let mut pages = PageRangeSet::new();
            self.src.capture(&mut pages).unwrap();
            self.src.resume().unwrap();
            (pages.pages().collect(), pages)
        }

        fn finish(mut self) {
            self.src.handle().stop();
            let r = self.run.take().unwrap().join().unwrap();
            assert_eq!(r.unwrap(), MachineExit::Stopped);
        }
    }

    fn diff(got: &BTreeSet<u64>, want: &BTreeSet<u64>) -> String {
        let extra: Vec<_> = got
            .difference(want)
            .map(|p| format!("{:#x}", p * 4096))
            .collect();
        let missing: Vec<_> = want
            .difference(got)
            .map(|p| format!("{:#x}", p * 4096))
            .collect();
        format!("extra {extra:?}, missing {missing:?}")
    }

    /// (b) For one backend: each harvest is exactly the pages the guest wrote that round, plus
    /// the pages the VMM wrote through vm-memory; a harvest with nothing written is empty; and
    /// remark after a harvest makes the next harvest return those pages again.
    fn harvests_exactly_what_was_written(name: &str, tracking: DirtyTracking, n: u64) {
        harvests_exactly_what_was_written_by(name, Dirtier::start(name, tracking, 32 << 20, n));
    }

    /// (b) on a machine already running the dirtying guest.
    fn harvests_exactly_what_was_written_by(name: &str, mut d: Dirtier) {
        let n = d.n;
        let mem = d.src.guest_memory();
        let mut full_exits = 0;
        for r in 0..6u64 {
            d.round();
            // The VMM writes too (as device emulation would): one page, and a 2-page span.
            let vmm_a = VMM_GPA + (r * 7 % 64) * 4096;
            let vmm_b = VMM_GPA + 0x10_0000 + r * 3 * 4096 + 4092;
            mem.write_obj(r, GuestAddress(vmm_a)).unwrap();
            mem.write_slice(&[0xab; 8], GuestAddress(vmm_b)).unwrap();
            let mut want = d.expected();
            want.extend([pfn(vmm_a), pfn(vmm_b), pfn(vmm_b) + 1]);
            let (got, set) = d.checkpoint();
            assert_eq!(got, want, "{name} round {r}: {}", diff(&got, &want));
            full_exits += d.src.last_harvest().ring_full_exits;

            // Nothing written since: an empty harvest.
            let (empty, _) = d.checkpoint();
            assert!(
                empty.is_empty(),
                "{name}: {} pages with nothing written",
                empty.len()
            );

            if r == 3 {
                // A failed epoch gives its pages back: they come again, with the new ones.
                d.src.remark(&set).unwrap();
                d.round();
                let mut want2 = d.expected();
                want2.extend(got.iter().copied());
                let (got2, _) = d.checkpoint();
                assert_eq!(got2, want2, "{name} after remark: {}", diff(&got2, &want2));
            }
        }
        eprintln!(
            "{name}: exact harvests of {n} guest pages per round; {full_exits} ring-full exits"
        );
        d.finish();
    }

    #[test]
    fn kvm_bitmap_harvests_exactly_what_was_written() {
        harvests_exactly_what_was_written("bitmap-exact", DirtyTracking::KvmBitmapExact, 300);
    }

    /// The bitmap tracker that leaves hot pages writable: a page the guest writes in every round
    /// (STATUS) becomes hot at its second write and is left writable; every harvest still holds
    /// every page written (nothing is lost while a page is hot), and its extra pages are only hot
    /// ones; with nothing written, a harvest holds the hot pages alone; once cooled, the hot pages
    /// are protected again and an idle harvest is empty.
    #[test]
    fn kvm_bitmap_leaves_hot_pages_writable_and_loses_no_page() {
        let mut d = Dirtier::start("bitmap-hot", DirtyTracking::KvmBitmap, 32 << 20, 300);
        let mem = d.src.guest_memory();
        let status = pfn(STATUS_GPA);
        for r in 0..6u64 {
            d.round();
            let vmm = VMM_GPA + r * 4096;
            mem.write_obj(r, GuestAddress(vmm)).unwrap();
            let mut want = d.expected();
            want.insert(pfn(vmm));
            let (got, _) = d.checkpoint();
            let hot = d.src.last_harvest().hot_pages;
            assert!(got.is_superset(&want), "round {r}: {}", diff(&got, &want));
            assert!(got.len() as u64 - want.len() as u64 <= hot, "round {r}: {hot} hot pages, {}", diff(&got, &want));
            // The warm-up round and this loop's first round wrote STATUS twice already.
            assert!(hot >= 1, "round {r}: STATUS, written every round, is not left writable");
            assert!(d.src.writable_pages().contains(status), "round {r}: STATUS is not among the writable pages");
            // Nothing written since: only the hot pages, STATUS among them.
            let (idle, _) = d.checkpoint();
            assert!(idle.contains(&status), "round {r}: the hot STATUS page is not reported: {idle:x?}");
            assert_eq!(idle.len() as u64, d.src.last_harvest().hot_pages, "round {r}: {idle:x?}");
        }
        // The guest's last round is long done: cool, and the hot pages go one last time.
        d.src.cool_tracking();
        let (cooled, _) = d.checkpoint();
        assert!(cooled.contains(&status));
        assert_eq!(d.src.last_harvest().hot_pages, 0, "a cooling harvest leaves nothing writable");
        assert!(d.src.writable_pages().is_empty());
        let (empty, _) = d.checkpoint();
        assert!(empty.is_empty(), "an idle guest after cooling: {empty:x?}");
        // STATUS is protected again: the next round's write is seen through KVM's log.
        d.round();
        let want = d.expected();
        let (got, _) = d.checkpoint();
        assert_eq!(got, want, "{}", diff(&got, &want));
        d.finish();
    }

    #[test]
    fn kvm_ring_harvests_exactly_what_was_written() {
        harvests_exactly_what_was_written("ring", DirtyTracking::kvm_ring(), 300);
    }

    #[test]
    fn uffd_harvests_exactly_what_was_written() {
        harvests_exactly_what_was_written("uffd", DirtyTracking::Uffd, 300);
    }

    /// The userfaultfd tracker on memory adopted from a memfd, as a takeover's VM runs (shared
    /// memory, which write-protect handles apart from private memory): the dirtying guest, made
    /// in one VM and stopped before its first round, is restored into a VM that adopts a memfd
    /// holding its memory; the guest's writes reach the memfd, and each harvest there is exactly
    /// what the guest and the VMM wrote.
    #[test]
    fn uffd_harvests_exactly_what_was_written_in_adopted_memory() {
        const MEM: u64 = 32 << 20;
        const N: u64 = 300;
        let mut m1 =
            Machine::create(config("uffd-adopt1", &DIRTY_GUEST, MEM, DirtyTracking::Off)).unwrap();
        set_dirtier_parameters(m1.vm().memory(), N);
        let mut src = m1.checkpoint_source().unwrap();
        let run1 = spawn_run(m1);
        // Round 0: the guest waits for GO, whenever it is paused.
        std::thread::sleep(Duration::from_millis(20));
        src.pause().unwrap();
        let state = src.capture_state().unwrap();
        let image = read_all(&src, MEM);
        src.handle().stop();
        assert_eq!(run1.join().unwrap().unwrap(), MachineExit::Stopped);

        let file = memfd_image(&image, true);
        let standby = map_shared(&file, MEM);
        let m2 = Machine::restore(
            config("uffd-adopt2", &[0x0f, 0x0b], MEM, DirtyTracking::Uffd),
            MemoryImage::Adopt(file.into()),
            &state,
        )
        .unwrap();
        let d = Dirtier::attach(m2, N);
        // The warm-up round ran in the memfd's pages: its STATUS (0 in the image) is there.
        assert_eq!(d.src.tracker_kind(), Some(TrackerKind::Uffd));
        assert_eq!(
            standby.read_obj::<u64>(GuestAddress(STATUS_GPA)).unwrap(),
            1
        );
        harvests_exactly_what_was_written_by("uffd-adopted", d);
    }

    /// A ring far smaller than one round: KVM_EXIT_DIRTY_RING_FULL several times per round, each
    /// drained by the vCPU thread; the harvest is still exact.
    #[test]
    fn a_full_dirty_ring_loses_no_page() {
        harvests_exactly_what_was_written(
            "small-ring",
            DirtyTracking::KvmRing { entries: 256 },
            1000,
        );
    }

    #[test]
    fn harvest_needs_tracking_started_and_bad_ring_sizes_are_refused() {
        let mut m = Machine::create(config(
            "nostart",
            &DIRTY_GUEST,
            32 << 20,
            DirtyTracking::KvmBitmap,
        ))
        .unwrap();
        let mut src = m.checkpoint_source().unwrap();
        src.pause().unwrap();
        let mut pages = PageRangeSet::new();
        assert!(matches!(
            src.capture(&mut pages),
            Err(CaptureError::Harvest(
                ftvm_vmm::dirty::HarvestError::NotStarted
            ))
        ));
        src.start_tracking().unwrap();
        src.capture(&mut pages).unwrap();
        src.stop_tracking().unwrap();
        assert!(src.capture(&mut pages).is_err());
        drop(m);
        for entries in [100, 128, 1 << 30] {
            let e = Machine::create(config(
                "badring",
                &DIRTY_GUEST,
                32 << 20,
                DirtyTracking::KvmRing { entries },
            ))
            .unwrap_err();
            assert!(e.to_string().contains("dirty ring"), "{entries}: {e}");
        }
    }

    /// (d) at the vCPU thread itself: SaveState is refused while Running (and the vCPU keeps
    /// running), accepted while Paused.
    #[test]
    fn a_running_vcpu_refuses_to_save_its_state() {
        use ftvm_vmm::devices::bus::MmioBus;
        use ftvm_vmm::vcpu::{Console, StatusCell, Vcpu, VcpuContext};
        use ftvm_vmm::wake::GuestWake;

        let vm = ftvm_vmm::vm::Vm::new(32 << 20).unwrap();
        let mem = vm.memory().clone();
        // inc rbx; jmp $-3
        let elf = temp_file(
            "spin",
            &build_test_elf(GUEST_LOAD_GPA, &[0x48, 0xff, 0xc3, 0xeb, 0xfb], 0),
        );
        let image = ftvm_vmm::boot::load_guest(&mem, 32 << 20, &elf).unwrap();
        let supported = ftvm_vmm::cpuid::supported_cpuid(vm.kvm()).unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let features = ftvm_vmm::cpuid::configure_cpuid(&fd, &supported, 0, 1_000_000).unwrap();
        let entry = ftvm_vmm::boot::EntryPoint {
            rip: image.entry,
            rsp: 32 << 20,
        };
        ftvm_vmm::boot::configure_vcpu(&fd, &features, entry).unwrap();
        let table = ftvm_vmm::cpuid::build_cpuid(&supported, 0, 1_000_000).unwrap();
        let state_cfg = StateConfig::probe(vm.kvm(), vm.fd(), &table, vm.has_irqchip()).unwrap();
        let ctx = VcpuContext {
            mem,
            bus: Arc::new(MmioBus::default()),
            wake: Arc::new(GuestWake::new().unwrap()),
            console: Arc::new(Console::new(Box::new(Sink::default()))),
            status: Arc::new(StatusCell::default()),
            state: Arc::new(state_cfg),
            dirty_ring: None,
        };
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut h = Vcpu::start(0, fd, ctx, tx).unwrap();
        let paused = h.save_state().unwrap();
        h.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(h.save_state(), Err(VcpuSaveError::NotPaused(0))));
        assert!(matches!(
            h.restore_state(paused.clone()),
            Err(ftvm_vmm::vcpu::VcpuRestoreError::NotPaused(0))
        ));
        h.pause().unwrap();
        let later = h.save_state().unwrap();
        assert!(
            later.regs.rbx > paused.regs.rbx,
            "kept running after the refusal"
        );
        // Restoring while paused rewinds it.
        h.restore_state(paused.clone()).unwrap();
        assert_eq!(h.save_state().unwrap().regs, paused.regs);
        h.stop().unwrap();
    }

    /// The fallback for hosts without KVM_CAP_XSAVE: the legacy FPU image carries x87 and SSE
    /// state into a fresh VM.
    #[test]
    fn fpu_only_state_round_trips_into_a_fresh_vm() {
        let new_vcpu = || {
            let vm = ftvm_vmm::vm::Vm::new(32 << 20).unwrap();
            let supported = ftvm_vmm::cpuid::supported_cpuid(vm.kvm()).unwrap();
            let fd = vm.create_vcpu(0).unwrap();
            ftvm_vmm::cpuid::configure_cpuid(&fd, &supported, 0, 1_000_000).unwrap();
            let table = ftvm_vmm::cpuid::build_cpuid(&supported, 0, 1_000_000).unwrap();
            let mut cfg = StateConfig::probe(vm.kvm(), vm.fd(), &table, vm.has_irqchip()).unwrap();
            cfg.xsave = XsaveSupport::None;
            (vm, fd, cfg)
        };
        let (_vm1, fd1, cfg) = new_vcpu();
        let mut fpu = fd1.get_fpu().unwrap();
        fpu.xmm[3] = [0x5a; 16];
        fpu.mxcsr = 0x1f80;
        fpu.fcw = 0x37f;
        fd1.set_fpu(&fpu).unwrap();
        let mut regs = fd1.get_regs().unwrap();
        regs.rax = 0xfeed;
        regs.rflags = 2;
        fd1.set_regs(&regs).unwrap();
        let saved = vstate::save_state(&fd1, &cfg).unwrap();
        assert!(matches!(saved.fpu, FpuState::Fpu(_)));
        let (_vm2, fd2, cfg2) = new_vcpu();
        vstate::restore_state(&fd2, &cfg2, &saved).unwrap();
        assert_eq!(fd2.get_fpu().unwrap().xmm[3], [0x5a; 16]);
        assert_eq!(fd2.get_regs().unwrap().rax, 0xfeed);
        // A host without XSAVE cannot take an XSAVE area.
        let (_vm3, fd3, mut cfg3) = new_vcpu();
        cfg3.xsave = XsaveSupport::Legacy;
        let with_xsave = vstate::save_state(&fd3, &cfg3).unwrap();
        cfg3.xsave = XsaveSupport::None;
        assert!(vstate::restore_state(&fd3, &cfg3, &with_xsave).is_err());
    }

    fn median(v: &mut [Duration]) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    fn max(v: &[Duration]) -> Duration {
        v.iter().copied().max().unwrap_or_default()
    }

    /// Where a checkpoint's pause goes, per backend, with 1 000 guest pages dirtied per epoch in
    /// 64 MiB of RAM. Prints numbers; asserts nothing about speed.
    #[test]
    fn checkpoint_costs() {
        const MEM: u64 = 64 << 20;
        const N: u64 = 1000;
        const ROUNDS: usize = 30;
        for (name, tracking) in [
            ("bitmap", DirtyTracking::KvmBitmap),
            ("ring", DirtyTracking::kvm_ring()),
            ("uffd", DirtyTracking::Uffd),
        ] {
            let mut d = Dirtier::start(name, tracking, MEM, N);
            let (mut pause, mut harvest, mut vcpu, mut devices, mut resume, mut encode) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            let mut window = vec![];
            let mut buf = Vec::new();
            for r in 0..ROUNDS {
                d.round();
                let t0 = Instant::now();
                d.src.pause().unwrap();
                let p = t0.elapsed();
                let mut pages = PageRangeSet::new();
                let state = d.src.capture(&mut pages).unwrap();
                let t = Instant::now();
                ftvm_vmm::state::encode_into(&state, &mut buf).unwrap();
                let e = t.elapsed();
                let t = Instant::now();
                d.src.resume().unwrap();
                let rs = t.elapsed();
                // Pause to resume, less the encoding (which an engine does after resuming).
                let w = t0.elapsed() - e;
                // The first rounds fault pages in; measure the steady state.
                assert!(pages.page_count() >= N);
                if r >= 5 {
                    let c = d.src.last_timings();
                    pause.push(p);
                    harvest.push(c.harvest);
                    vcpu.push(c.vcpus);
                    devices.push(c.devices);
                    resume.push(rs);
                    encode.push(e);
                    window.push(w);
                }
            }
            eprintln!(
                "{name} ({} MiB, {N} dirty pages/epoch, {} epochs): median (max) pause {:?} ({:?}), \
                 harvest {:?} ({:?}), vCPU state {:?} ({:?}), devices+clock {:?}, encode {:?} \
                 ({} bytes), resume {:?} ({:?}); pause-to-resumed {:?} ({:?})",
                MEM >> 20,
                pause.len(),
                median(&mut pause.clone()),
                max(&pause),
                median(&mut harvest.clone()),
                max(&harvest),
                median(&mut vcpu.clone()),
                max(&vcpu),
                median(&mut devices),
                median(&mut encode),
                buf.len(),
                median(&mut resume.clone()),
                max(&resume),
                median(&mut window.clone()),
                max(&window),
            );
            d.finish();
        }
        // Restore of a 64 MiB image (the failover's memory copy plus VM and vCPU set-up), copied
        // and adopted; then of a 256 MiB image whose every page is in use (the reference VM's
        // size; the guest is not run, so its memory need not make sense).
        let restore_times = |mem: u64, image: &[u8], state: &MachineState| {
            let (mut copy, mut adopt) = (Vec::new(), Vec::new());
            let file = memfd_image(image, true);
            for _ in 0..5 {
                let t = Instant::now();
                let m2 = Machine::restore(
                    config("cost-restore2", &[0x90], mem, DirtyTracking::Off),
                    MemoryImage::Bytes(image),
                    state,
                )
                .unwrap();
                copy.push(t.elapsed());
                drop(m2);
                let fd = file.try_clone().unwrap().into();
                let t = Instant::now();
                let m2 = Machine::restore(
                    config("cost-restore2", &[0x90], mem, DirtyTracking::Off),
                    MemoryImage::Adopt(fd),
                    state,
                )
                .unwrap();
                adopt.push(t.elapsed());
                drop(m2);
            }
            let used = image
                .chunks(4096)
                .filter(|p| p.iter().any(|&b| b != 0))
                .count();
            eprintln!(
                "restore ({} MiB image, {used} non-zero pages): median {:?} copied, {:?} adopted",
                mem >> 20,
                median(&mut copy),
                median(&mut adopt)
            );
        };
        let mut m = Machine::create(config(
            "cost-restore",
            &COUNTER_GUEST,
            MEM,
            DirtyTracking::Off,
        ))
        .unwrap();
        let mut src = m.checkpoint_source().unwrap();
        let run = spawn_run(m);
        std::thread::sleep(Duration::from_millis(20));
        src.pause().unwrap();
        let state = src.capture_state().unwrap();
        let image = read_all(&src, MEM);
        src.handle().stop();
        run.join().unwrap().unwrap();
        restore_times(MEM, &image, &state);

        const BIG: u64 = 256 << 20;
        let mut m =
            Machine::create(config("cost-restore-big", &[0x90], BIG, DirtyTracking::Off)).unwrap();
        let mut src = m.checkpoint_source().unwrap();
        src.pause().unwrap();
        let state = src.capture_state().unwrap();
        let mut image = read_all(&src, BIG);
        drop(m);
        for page in image.chunks_mut(4096).skip(4096) {
            page[..8].copy_from_slice(&0x5a5a_5a5a_u64.to_le_bytes());
        }
        restore_times(BIG, &image, &state);
    }
}
