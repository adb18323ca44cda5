//! The files of a snapshot directory.

/// The state container.
pub const STATE_FILE: &str = "state.bin";
/// Guest RAM.
pub const MEMORY_FILE: &str = "memory.bin";
/// The configuration, human-readable.
pub const CONFIG_FILE: &str = "config.json";
/// Marker written last.
pub const COMPLETE_FILE: &str = "COMPLETE";
