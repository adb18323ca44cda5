//! virtio-vsock driver and the `vsock` selftest part.

/// The `vsock` selftest part.
pub fn selftest() {}
