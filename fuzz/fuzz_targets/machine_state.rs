//! The machine-state container and its payload (userspace/vmm/src/state.rs).
//!
//! Input: `mode u8 | bytes`. mode & 1 == 0: the bytes are a whole container (header checks:
//! magic, version, length, checksum). mode & 1 == 1: the bytes are a payload, wrapped in a valid
//! container (`container_around` computes the checksum), so the fuzzer works on the bincode
//! decoder behind the checksum. A state that decodes must re-encode, and decode again to itself.
#![no_main]

use ftvm_vmm::state::{container_around, MachineState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let wrapped;
    let blob = if mode & 1 == 0 {
        body
    } else {
        wrapped = container_around(body);
        &wrapped[..]
    };
    let Ok(machine) = MachineState::from_bytes(blob) else { return };
    // The boot info is read from the state's bytes with an unaligned read of a C struct.
    let _ = machine.boot_info();
    let again = machine.to_bytes().expect("a state that decoded re-encodes");
    assert_eq!(MachineState::from_bytes(&again).expect("a re-encoded state decodes"), machine);
});
