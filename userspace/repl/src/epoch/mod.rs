//! Checkpoint epochs. For now: what an epoch looks like on the wire ([`wire`]).

pub mod wire;
