//! ftvm's kernel-side programs, built into one object (`target/ebpf/ftvm-ebpf`) that userspace loads
//! with aya and attaches program by program.
//!
//! One module per program; each has a thin `#[xdp]`/`#[classifier]` entry point that calls
//! `try_<name>`. Frame parsing shared between programs lives in [`net`]; names, map indices and map
//! value types shared with userspace live in `ftvm-ebpf-common`.
#![no_std]
#![no_main]

mod gate;
mod heartbeat;
mod net;
mod probe_count;

/// The verifier proves that no panic path is reachable (a program that could reach one would call
/// an unknown function and be refused), so this never runs.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Lets the programs use GPL-only helpers. The kernel reads this section at load time.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
