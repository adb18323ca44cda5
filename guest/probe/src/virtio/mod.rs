//! Virtio 1.x over PCI (modern only): transport, split virtqueues and the drivers.

pub mod balloon;
pub mod blk;
pub mod gpu;
pub mod input;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod vsock;

/// Virtio PCI vendor id.
pub const VENDOR: u16 = 0x1AF4;
/// Modern device id of a virtio type.
pub const fn device_id(virtio_type: u16) -> u16 {
    0x1040 + virtio_type
}

/// FNV-1a 64 of `data`.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
