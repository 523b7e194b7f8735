//! Device models. `bus` dispatches MMIO exits.

pub mod bus;
