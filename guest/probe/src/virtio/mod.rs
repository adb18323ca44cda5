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

/// What a twin's guest watches for: the identity a clone's cloud host gives it anew (the
/// vsock CID, the MAC), each change printed as `PROBE twin cid=N` or `PROBE twin mac=M`.
pub struct TwinWatch {
    cid: Option<vsock::CidWatch>,
    mac: Option<net::MacWatch>,
}

impl TwinWatch {
    /// Watches the first vsock and network devices, those there are.
    pub fn open() -> TwinWatch {
        TwinWatch {
            cid: vsock::CidWatch::open(),
            mac: net::MacWatch::open(),
        }
    }

    /// Prints what changed since the last look.
    pub fn check(&mut self) {
        if let Some(w) = self.cid.as_mut() {
            w.check();
        }
        if let Some(w) = self.mac.as_mut() {
            w.check();
        }
    }
}

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
