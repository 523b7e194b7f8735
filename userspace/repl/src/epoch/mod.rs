//! Checkpoint epochs: the primary's engine that produces them ([`engine`]), and the per-epoch
//! metrics it keeps ([`context`]). What an epoch looks like on the wire is [`ftvm_proto::epoch`].

pub mod context;
pub mod engine;
