//! Hostile mode.

/// Runs hostile mode.
pub fn run() {}
