//! Loading the guest ELF from its program headers.
//!
//! A small parser of our own rather than linux-loader's `Elf`: the guest is a static ELF64
//! executable whose PT_LOAD segments must land inside `[GUEST_LOAD_GPA, heap_end)`, and each way
//! of breaking that gets its own one-line error.

use std::path::{Path, PathBuf};

use ftvm_guest_abi::{GUEST_LOAD_GPA, STACK_SIZE};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// Heap and stack are handed out in 2 MiB steps (the guest's page size).
pub const HEAP_ALIGN: u64 = 2 << 20;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// Why the guest image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum GuestLoadError {
    /// The file could not be read.
    #[error("cannot read guest image {}", .path.display())]
    Read {
        /// The image's path.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the ELF magic.
    #[error("not an ELF file")]
    NotElf,
    /// A 32-bit ELF (or an unknown class).
    #[error("not a 64-bit ELF file (class {0})")]
    WrongClass(u8),
    /// A big-endian ELF.
    #[error("not a little-endian ELF file")]
    WrongEndian,
    /// Built for another architecture.
    #[error("ELF file is for machine {0}, not x86-64")]
    WrongMachine(u16),
    /// A shared object, relocatable object or core file.
    #[error("ELF file is not a static executable (type {0})")]
    NotExecutable(u16),
    /// The header or a program header lies outside the file.
    #[error("ELF file is truncated or its program headers are malformed")]
    Malformed,
    /// No PT_LOAD segment.
    #[error("ELF file has no loadable segment")]
    NoLoadSegment,
    /// A segment whose virtual and physical addresses differ (the guest runs identity-mapped).
    #[error(
        "segment at {vaddr:#x} has physical address {paddr:#x}; the guest runs identity-mapped"
    )]
    NotIdentityMapped {
        /// p_vaddr.
        vaddr: u64,
        /// p_paddr.
        paddr: u64,
    },
    /// A segment that does not fit between the load address and the heap's end.
    #[error("segment {start:#x}..{end:#x} is outside the guest image area {min:#x}..{max:#x}")]
    SegmentOutside {
        /// First byte of the segment.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// [`GUEST_LOAD_GPA`].
        min: u64,
        /// The end of the heap (RAM minus the stack).
        max: u64,
    },
    /// The image leaves no heap.
    #[error("guest image ends at {end:#x}, leaving no heap below {heap_end:#x}")]
    NoHeap {
        /// End of the image.
        end: u64,
        /// End of the heap area.
        heap_end: u64,
    },
    /// The entry point is not inside a loaded segment.
    #[error("entry point {0:#x} is not inside a loaded segment")]
    EntryOutside(u64),
    /// Writing a segment into guest memory failed.
    #[error("cannot copy a segment into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Where the guest image landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// The ELF entry point.
    pub entry: u64,
    /// Lowest loaded address.
    pub start: u64,
    /// One past the highest loaded address (including bss).
    pub end: u64,
    /// First heap byte: `end` rounded up to 2 MiB.
    pub heap_start: u64,
}

/// One PT_LOAD segment.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the guest ELF at `path` and copies its segments into `mem`, whose size is `mem_size`.
pub fn load_elf_file(
    mem: &GuestMemory,
    mem_size: u64,
    path: &Path,
) -> Result<LoadedImage, GuestLoadError> {
    let read_err = |source| GuestLoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > mem_size {
        // Not an image that could fit anyway; avoid reading a huge file into memory.
        let bytes = std::fs::File::open(path)
            .and_then(|f| {
                use std::io::Read as _;
                let mut head = Vec::with_capacity(EHDR_SIZE);
                f.take(EHDR_SIZE as u64).read_to_end(&mut head)?;
                Ok(head)
            })
            .map_err(read_err)?;
        parse_header(&bytes)?;
        return Err(GuestLoadError::NoHeap {
            end: meta.len(),
            heap_end: heap_end(mem_size),
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    load_elf(mem, mem_size, &bytes)
}

/// The end of the heap: RAM minus the stack at its top.
pub fn heap_end(mem_size: u64) -> u64 {
    mem_size.saturating_sub(STACK_SIZE)
}

struct Header {
    entry: u64,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
}

fn parse_header(b: &[u8]) -> Result<Header, GuestLoadError> {
    if b.len() < 4 || b[..4] != ELF_MAGIC {
        return Err(GuestLoadError::NotElf);
    }
    if b.len() < EHDR_SIZE {
        return Err(GuestLoadError::Malformed);
    }
    if b[4] != ELFCLASS64 {
        return Err(GuestLoadError::WrongClass(b[4]));
    }
    if b[5] != ELFDATA2LSB {
        return Err(GuestLoadError::WrongEndian);
    }
    let machine = u16_at(b, 18);
    if machine != EM_X86_64 {
        return Err(GuestLoadError::WrongMachine(machine));
    }
    let kind = u16_at(b, 16);
    if kind != ET_EXEC {
        return Err(GuestLoadError::NotExecutable(kind));
    }
    Ok(Header {
        entry: u64_at(b, 24),
        phoff: u64_at(b, 32),
        phentsize: u16_at(b, 54),
        phnum: u16_at(b, 56),
    })
}

fn segments(b: &[u8], h: &Header) -> Result<Vec<Segment>, GuestLoadError> {
    if usize::from(h.phentsize) < PHDR_SIZE && h.phnum > 0 {
        return Err(GuestLoadError::Malformed);
    }
    let mut out = Vec::new();
    for i in 0..u64::from(h.phnum) {
        let at = i
            .checked_mul(u64::from(h.phentsize))
            .and_then(|o| o.checked_add(h.phoff))
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o.checked_add(PHDR_SIZE).is_some_and(|e| e <= b.len()))
            .ok_or(GuestLoadError::Malformed)?;
        let p = &b[at..at + PHDR_SIZE];
        if u32_at(p, 0) != PT_LOAD {
            continue;
        }
        let s = Segment {
            offset: u64_at(p, 8),
            vaddr: u64_at(p, 16),
            paddr: u64_at(p, 24),
            filesz: u64_at(p, 32),
            memsz: u64_at(p, 40),
        };
        let file_end = s
            .offset
            .checked_add(s.filesz)
            .ok_or(GuestLoadError::Malformed)?;
        if s.filesz > s.memsz || file_end > b.len() as u64 {
            return Err(GuestLoadError::Malformed);
        }
        if s.memsz == 0 {
            continue;
        }
        out.push(s);
    }
    if out.is_empty() {
        return Err(GuestLoadError::NoLoadSegment);
    }
    Ok(out)
}

/// Copies the PT_LOAD segments of the ELF image `b` into `mem`.
///
/// `mem` must be fresh (all zero): the bss parts of segments are not written, which keeps pages
/// the guest never touches unallocated.
pub fn load_elf(mem: &GuestMemory, mem_size: u64, b: &[u8]) -> Result<LoadedImage, GuestLoadError> {
    let h = parse_header(b)?;
    let segs = segments(b, &h)?;
    let max = heap_end(mem_size);
    let (mut start, mut end) = (u64::MAX, 0u64);
    for s in &segs {
        if s.vaddr != s.paddr {
            return Err(GuestLoadError::NotIdentityMapped {
                vaddr: s.vaddr,
                paddr: s.paddr,
            });
        }
        let seg_end = s.paddr.checked_add(s.memsz);
        if s.paddr < GUEST_LOAD_GPA || seg_end.is_none_or(|e| e > max) {
            return Err(GuestLoadError::SegmentOutside {
                start: s.paddr,
                end: seg_end.unwrap_or(u64::MAX),
                min: GUEST_LOAD_GPA,
                max,
            });
        }
        start = start.min(s.paddr);
        end = end.max(seg_end.expect("checked above"));
    }
    let heap_start = end.div_ceil(HEAP_ALIGN) * HEAP_ALIGN;
    if heap_start >= max {
        return Err(GuestLoadError::NoHeap { end, heap_end: max });
    }
    if !segs
        .iter()
        .any(|s| (s.vaddr..s.vaddr + s.memsz).contains(&h.entry))
    {
        return Err(GuestLoadError::EntryOutside(h.entry));
    }
    for s in &segs {
        // In bounds of `b` (checked in `segments`) and of guest memory (checked above).
        let data = &b[s.offset as usize..(s.offset + s.filesz) as usize];
        mem.write_slice(data, GuestAddress(s.paddr))
            .map_err(GuestLoadError::Write)?;
    }
    Ok(LoadedImage {
        entry: h.entry,
        start,
        end,
        heap_start,
    })
}

/// Builds a minimal ELF64 x86-64 executable: one PT_LOAD segment at `load_addr` holding `code`
/// (plus `bss` zero bytes), entry at `load_addr`. For tests that need a guest without a compiler.
pub fn build_test_elf(load_addr: u64, code: &[u8], bss: u64) -> Vec<u8> {
    let code_off = (EHDR_SIZE + PHDR_SIZE) as u64;
    let mut b = Vec::new();
    b.extend_from_slice(&ELF_MAGIC);
    b.extend_from_slice(&[ELFCLASS64, ELFDATA2LSB, 1, 0]);
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&ET_EXEC.to_le_bytes());
    b.extend_from_slice(&EM_X86_64.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // e_version
    b.extend_from_slice(&(load_addr).to_le_bytes()); // e_entry
    b.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    b.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    b.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    b.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    b.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    debug_assert_eq!(b.len(), EHDR_SIZE);
    b.extend_from_slice(&PT_LOAD.to_le_bytes());
    b.extend_from_slice(&7u32.to_le_bytes()); // RWX
    b.extend_from_slice(&code_off.to_le_bytes());
    b.extend_from_slice(&load_addr.to_le_bytes());
    b.extend_from_slice(&load_addr.to_le_bytes());
    b.extend_from_slice(&(code.len() as u64).to_le_bytes());
    b.extend_from_slice(&(code.len() as u64 + bss).to_le_bytes());
    b.extend_from_slice(&0x1000u64.to_le_bytes());
    debug_assert_eq!(b.len() as u64, code_off);
    b.extend_from_slice(code);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::create_guest_memory;

    const MEM: u64 = 32 << 20;

    #[test]
    fn loads_segments_and_rounds_heap() {
        let mem = create_guest_memory(MEM).unwrap();
        let elf = build_test_elf(GUEST_LOAD_GPA, &[0x90, 0x0f, 0x0b], 0x1000);
        let img = load_elf(&mem, MEM, &elf).unwrap();
        assert_eq!(img.entry, GUEST_LOAD_GPA);
        assert_eq!(img.start, GUEST_LOAD_GPA);
        assert_eq!(img.end, GUEST_LOAD_GPA + 3 + 0x1000);
        assert_eq!(img.heap_start, GUEST_LOAD_GPA + HEAP_ALIGN);
        let mut code = [0u8; 3];
        mem.read_slice(&mut code, GuestAddress(GUEST_LOAD_GPA))
            .unwrap();
        assert_eq!(code, [0x90, 0x0f, 0x0b]);
    }

    #[test]
    fn rejects_what_is_not_our_guest() {
        let mem = create_guest_memory(MEM).unwrap();
        let good = build_test_elf(GUEST_LOAD_GPA, &[0x90], 0);
        let err = |b: &[u8]| load_elf(&mem, MEM, b).unwrap_err();

        assert!(matches!(
            err(b"#!/bin/sh\necho hi\n"),
            GuestLoadError::NotElf
        ));
        assert_eq!(err(b"hello").to_string(), "not an ELF file");
        let mut b = good.clone();
        b[4] = 1;
        assert!(matches!(err(&b), GuestLoadError::WrongClass(1)));
        let mut b = good.clone();
        b[18] = 3; // EM_386
        assert!(matches!(err(&b), GuestLoadError::WrongMachine(3)));
        let mut b = good.clone();
        b[16] = 3; // ET_DYN
        assert!(matches!(err(&b), GuestLoadError::NotExecutable(3)));
        assert!(matches!(err(&good[..80]), GuestLoadError::Malformed));
        // Below the load address (over the page tables).
        let low = build_test_elf(0x1000, &[0x90], 0);
        assert!(matches!(
            err(&low),
            GuestLoadError::SegmentOutside { start: 0x1000, .. }
        ));
        // Into the stack.
        let high = build_test_elf(MEM - 0x1000, &[0x90], 0);
        assert!(matches!(err(&high), GuestLoadError::SegmentOutside { .. }));
        // A bss that leaves no heap.
        let big = build_test_elf(GUEST_LOAD_GPA, &[0x90], heap_end(MEM) - GUEST_LOAD_GPA - 1);
        assert!(matches!(err(&big), GuestLoadError::NoHeap { .. }));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let mem = create_guest_memory(MEM).unwrap();
        let e = load_elf_file(&mem, MEM, Path::new("/nonexistent/guest")).unwrap_err();
        match e {
            GuestLoadError::Read { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
            }
            other => panic!("{other}"),
        }
    }
}
