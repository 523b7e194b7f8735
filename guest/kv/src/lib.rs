//! The reference guest's logic, with nothing that touches hardware, so that all of it runs and is
//! tested on the host (`cargo test -p ftvm-guest-kv`):
//!
//! * [`resp`]: the streaming RESP2 request parser (multibulk arrays and inline commands, with
//!   resynchronisation after malformed input and discarding of oversized bulk strings) and the
//!   reply encoders;
//! * [`store`] and [`engine`]: the key-value store and the commands, with Redis's replies and
//!   error texts;
//! * [`aof`]: the append-only log on the block device: header, record format, group commit
//!   (one write per batch, the partial last sector kept and rewritten) and replay that stops
//!   cleanly at a torn or corrupt tail; its module docs describe the two-region layout and the
//!   crash-safe background rewrite;
//! * [`rewrite`]: the log as a whole: opening it at boot, and the background rewrite that the
//!   main loop advances a step at a time;
//! * [`conn`]: one client connection: input parsing, command execution, and replies that are
//!   released only once the log records they depend on are durable;
//! * [`load`]: the memory-dirtying benchmark load's pacing and the idle wait's timeout.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod aof;
pub mod conn;
pub mod crc32;
pub mod engine;
pub mod load;
pub mod resp;
pub mod rewrite;
pub mod store;
