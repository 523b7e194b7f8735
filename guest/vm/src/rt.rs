//! The runtime a `#![no_std]` program on the host target needs: the entry point, the C memory
//! functions, unwinding stubs, the panic handler, the heap, port I/O and the console.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::{asm, global_asm};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use ftvm_guest_abi::{
    ConsoleWrite, GuestStatus, PORT_CONSOLE_WRITE, PORT_EXIT, PORT_STATUS, PORT_WAIT,
};
use talc::lock_api::{GuardNoSend, RawMutex};
use talc::source::Manual;
use talc::TalcLock;

// The VMM starts the vCPU here with rdi = the BootInfo address and rsp = BootInfo::stack_top.
// Align the stack as the SysV ABI wants it at a call, clear the frame pointer and the direction
// flag, and call Rust with rdi untouched (its first argument).
global_asm!(
    ".section .text._start,\"ax\",@progbits",
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "    cld",
    "    xor ebp, ebp",
    "    and rsp, -16",
    "    call {main}",
    "    ud2",
    main = sym crate::guest_main,
);

// ---- C memory functions (the host target's core and alloc call them) -------------------------

/// # Safety
/// The C contract: `n` bytes readable at `src`, writable at `dest`, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; rep movsb copies exactly rcx bytes forward (DF is clear).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// The C contract: `n` bytes readable at `src` and writable at `dest`; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n == 0 {
        return dest;
    }
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src, or past its end: a forward copy never overwrites unread bytes.
        // SAFETY: as for memcpy.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
                 options(nostack, preserves_flags));
        }
    } else {
        // SAFETY: copies backwards from the last byte (DF set only for this instruction).
        unsafe {
            asm!("std", "rep movsb", "cld", inout("rcx") n => _,
                 inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 options(nostack));
        }
    }
    dest
}

/// # Safety
/// The C contract: `n` bytes writable at `dest`.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; rep stosb stores al rcx times.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// The C contract: `n` bytes readable at `a` and `b`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    // Eight bytes at a time; a differing word is compared as big-endian to get byte order.
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, inside both buffers; unaligned reads are allowed.
        let (x, y) = unsafe {
            (
                core::ptr::read_unaligned(a.add(i) as *const u64),
                core::ptr::read_unaligned(b.add(i) as *const u64),
            )
        };
        if x != y {
            return if x.swap_bytes() < y.swap_bytes() {
                -1
            } else {
                1
            };
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n. Volatile, so the compiler cannot turn this loop back into a memcmp call.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// The C contract: `n` bytes readable at `a` and `b`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` references the unwinder's personality routine; with `panic = "abort"`
/// it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Referenced by the precompiled `core`/`alloc` landing pads; never reached with
/// `panic = "abort"`.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    exit(102)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::println!("ftvm-guest: panic: {}", info);
    exit(101)
}

// ---- heap ---------------------------------------------------------------------------------

/// A lock that does nothing: the guest has one thread and takes no interrupts.
pub struct NoLock;

// SAFETY: there is never a second thread or an interrupt handler that could contend.
unsafe impl RawMutex for NoLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = NoLock;
    type GuardMarker = GuardNoSend;
    fn lock(&self) {}
    fn try_lock(&self) -> bool {
        true
    }
    unsafe fn unlock(&self) {}
}

/// Talc, plus a count of the bytes allocated (for the memory-pressure guard).
struct CountingHeap {
    talc: TalcLock<NoLock, Manual>,
    allocated: AtomicUsize,
}

#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    talc: TalcLock::new(Manual),
    allocated: AtomicUsize::new(0),
};

// SAFETY: every call is forwarded to Talc unchanged; the counter only observes sizes.
unsafe impl GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.talc.alloc(layout) };
        if !p.is_null() {
            self.allocated.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.talc.alloc_zeroed(layout) };
        if !p.is_null() {
            self.allocated.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.talc.dealloc(ptr, layout) };
        self.allocated.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.talc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.allocated.fetch_add(new_size, Ordering::Relaxed);
            self.allocated.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

/// Gives the allocator `[start, end)`.
///
/// # Safety
/// The range is RAM that nothing else uses, for the life of the program.
pub unsafe fn init_heap(start: u64, end: u64) -> bool {
    // SAFETY: the caller's contract.
    unsafe {
        HEAP.talc
            .lock()
            .claim(start as *mut u8, (end - start) as usize)
            .is_some()
    }
}

/// Bytes currently allocated on the heap.
pub fn heap_allocated() -> usize {
    HEAP.allocated.load(Ordering::Relaxed)
}

// ---- ports ----------------------------------------------------------------------------------

fn out32(port: u16, value: u32) {
    // SAFETY: port I/O to the VMM's hypercall ports (IOPL = 3); no memory is touched, except
    // what the VMM reads for PORT_CONSOLE_WRITE, which the caller keeps alive across the exit.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// Tells the VMM we are finished; never returns.
pub fn exit(code: u32) -> ! {
    out32(PORT_EXIT, code);
    loop {
        core::hint::spin_loop();
    }
}

/// Reports a boot milestone.
pub fn status(s: GuestStatus) {
    out32(PORT_STATUS, s as u32);
}

/// Blocks until a device event or `timeout_us` (WAIT_FOREVER: no timeout).
pub fn wait(timeout_us: u32) {
    out32(PORT_WAIT, timeout_us);
}

/// The TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects (CR4.TSD = 0 per the ABI).
    unsafe { core::arch::x86_64::_rdtsc() }
}

// ---- console --------------------------------------------------------------------------------

/// Sends one chunk (at most 4 KiB) to the console in one exit.
pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(4096) {
        let req = ConsoleWrite {
            addr: chunk.as_ptr() as u64,
            len: chunk.len() as u64,
        };
        let addr = &req as *const ConsoleWrite as u64;
        // Identity mapped RAM below 4 GiB: the port takes a 32-bit address.
        out32(PORT_CONSOLE_WRITE, addr as u32);
        // Keep `req` and `chunk` alive (and written) until after the exit.
        core::hint::black_box(&req);
    }
}

/// A line being formatted, sent in one exit.
pub struct Line {
    buf: [u8; 1024],
    len: usize,
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Self {
            buf: [0; 1024],
            len: 0,
        }
    }

    /// Sends what was written, with a newline.
    pub fn finish(mut self) {
        if self.len == self.buf.len() {
            self.len -= 1;
        }
        self.buf[self.len] = b'\n';
        self.len += 1;
        console_write(&self.buf[..self.len]);
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                // Full: send what we have and keep going.
                console_write(&self.buf);
                self.len = 0;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Prints one line on the console (one VM exit per line).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut line = $crate::rt::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        line.finish();
    }};
}
