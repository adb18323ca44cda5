//! virtio-net driver and the `net` selftest part.

/// The `net` selftest part.
pub fn selftest() {}
