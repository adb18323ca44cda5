//! Benchmarks.

/// pio-bench.
pub fn pio(_n: u64) {}
/// blk-bench.
pub fn blk(_mb: u64) {}
