//! Benchmark support shared by `cargo xtask bench`.
