//! Checkpoint epochs: what an epoch looks like on the wire ([`wire`]), the primary's engine that
//! produces them ([`engine`]), and the per-epoch metrics it keeps ([`context`]).

pub mod context;
pub mod engine;
pub mod gate;
pub mod wire;
