//! The modern virtio-pci transport (virtio 1.1 section 4.1): capabilities, status and
//! feature negotiation, queue setup and MSI-X routing.

use super::queue::Queue;
use crate::interrupts::{alloc_vector, lapic_id};
use crate::pci::{self as pcibus, Bdf, Function};
use crate::port::mmio;

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// Guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// Driver ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u8 = 8;
    /// Device hit an error and needs a reset.
    pub const NEEDS_RESET: u8 = 0x40;
}

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// "No vector" value for MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xFFFF;

/// Common configuration register offsets.
pub mod common {
    #![allow(missing_docs)]
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0C;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1A;
    pub const QUEUE_ENABLE: u64 = 0x1C;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1E;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// A modern virtio-pci function with its register windows located.
pub struct VirtioPci {
    /// PCI address.
    pub bdf: Bdf,
    /// BAR index holding the common configuration.
    pub common_bar: u8,
    common: u64,
    notify: u64,
    notify_mul: u32,
    device: u64,
    msix_table: u64,
    msix_entries: u16,
    msix_cap: u8,
    /// CPU vectors already routed to MSI-X entries 0..8 (0 = none), reused across resets.
    vecs: core::cell::Cell<[u8; 8]>,
    /// Negotiated features.
    pub features: u64,
    /// CPU vector of the config-change interrupt, if MSI-X is routed.
    pub config_vector: Option<u8>,
}

fn cap_window(b: Bdf, cap: u8) -> Option<(u64, u32)> {
    let bar = pcibus::read8(b, cap + 4);
    let off = pcibus::read32(b, cap + 8) as u64;
    let len = pcibus::read32(b, cap + 12);
    let base = pcibus::bar_address(b, bar)?;
    crate::paging::map_identity(base + off, len as u64);
    Some((base + off, len))
}

impl VirtioPci {
    /// Locates the capability windows of `f` and enables MSI-X.
    pub fn new(f: &Function) -> Result<Self, &'static str> {
        let b = f.bdf;
        pcibus::enable(b);
        let mut d = VirtioPci {
            bdf: b,
            common_bar: 0,
            common: 0,
            notify: 0,
            notify_mul: 0,
            device: 0,
            msix_table: 0,
            msix_entries: 0,
            msix_cap: 0,
            vecs: core::cell::Cell::new([0; 8]),
            features: 0,
            config_vector: None,
        };
        for (id, cap) in pcibus::caps(b) {
            match id {
                0x09 => {
                    let cfg_type = pcibus::read8(b, cap + 3);
                    let Some((addr, _len)) = cap_window(b, cap) else {
                        continue;
                    };
                    match cfg_type {
                        1 if d.common == 0 => {
                            d.common = addr;
                            d.common_bar = pcibus::read8(b, cap + 4);
                        }
                        2 if d.notify == 0 => {
                            d.notify = addr;
                            d.notify_mul = pcibus::read32(b, cap + 16);
                        }
                        4 if d.device == 0 => d.device = addr,
                        _ => {}
                    }
                }
                0x11 => {
                    let ctrl = pcibus::read16(b, cap + 2);
                    let table = pcibus::read32(b, cap + 4);
                    let entries = (ctrl & 0x7FF) + 1;
                    if let Some(base) = pcibus::bar_address(b, (table & 7) as u8) {
                        let addr = base + (table & !7) as u64;
                        crate::paging::map_identity(addr, entries as u64 * 16);
                        d.msix_table = addr;
                        d.msix_entries = entries;
                        d.msix_cap = cap;
                    }
                }
                _ => {}
            }
        }
        if d.common == 0 || d.notify == 0 {
            return Err("no-virtio-caps");
        }
        crate::probe!(
            "info virtio {} device={:04x} common={:#x} notify={:#x} msix_table={:#x} msix_entries={}",
            b,
            f.device,
            d.common,
            d.notify,
            d.msix_table,
            d.msix_entries
        );
        if d.msix_cap != 0 {
            // Enable MSI-X, clear the function mask.
            let ctrl = pcibus::read16(b, d.msix_cap + 2);
            pcibus::write16(b, d.msix_cap + 2, (ctrl | 0x8000) & !0x4000);
        }
        Ok(d)
    }

    /// Reads a common-config register of width `T`.
    pub fn common_read<T: Copy>(&self, off: u64) -> T {
        mmio::read::<T>(self.common + off)
    }

    /// Writes a common-config register of width `T`.
    pub fn common_write<T: Copy>(&self, off: u64, v: T) {
        mmio::write::<T>(self.common + off, v)
    }

    /// Device status register.
    pub fn status(&self) -> u8 {
        self.common_read::<u8>(common::DEVICE_STATUS)
    }

    fn set_status(&self, s: u8) {
        self.common_write::<u8>(common::DEVICE_STATUS, s)
    }

    /// Whether the device asked for a reset (or gave up entirely).
    pub fn needs_reset(&self) -> bool {
        self.status() & status::NEEDS_RESET != 0
    }

    /// Resets the device and waits (up to 1 s) for status to read 0.
    pub fn reset(&self) -> bool {
        self.set_status(0);
        let dl = crate::time::deadline_ms(1000);
        while !crate::time::expired(dl) {
            if self.status() == 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// Reset, ACKNOWLEDGE|DRIVER, negotiate `wanted` (must include VERSION_1), FEATURES_OK.
    pub fn begin_init(&mut self, wanted: u64) -> Result<u64, &'static str> {
        if !self.reset() {
            return Err("reset-timeout");
        }
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.common_write::<u32>(common::DEVICE_FEATURE_SELECT, sel);
            offered |= (self.common_read::<u32>(common::DEVICE_FEATURE) as u64) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            return Err("no-version-1");
        }
        let feats = offered & (wanted | F_VERSION_1);
        for sel in 0..2u32 {
            self.common_write::<u32>(common::DRIVER_FEATURE_SELECT, sel);
            self.common_write::<u32>(
                common::DRIVER_FEATURE,
                crate::bits::lo32(feats >> (32 * sel)),
            );
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s);
        if self.status() & status::FEATURES_OK == 0 {
            return Err("features-not-ok");
        }
        self.features = feats;
        // Config-change interrupt on MSI-X entry 0.
        self.config_vector = self.route(0).and_then(|v| {
            self.common_write::<u16>(common::MSIX_CONFIG, 0);
            (self.common_read::<u16>(common::MSIX_CONFIG) == 0).then_some(v)
        });
        Ok(feats)
    }

    /// Points MSI-X table entry `entry` at a fresh CPU vector on this CPU.
    fn route(&self, entry: u16) -> Option<u8> {
        if self.msix_table == 0 || entry >= self.msix_entries {
            return None;
        }
        let mut cache = self.vecs.get();
        let v = match cache.get(entry as usize) {
            Some(&v) if v != 0 => v,
            _ => {
                let v = alloc_vector()?;
                if let Some(slot) = cache.get_mut(entry as usize) {
                    *slot = v;
                    self.vecs.set(cache);
                }
                v
            }
        };
        let e = self.msix_table + 16 * entry as u64;
        mmio::write::<u32>(e, 0xFEE0_0000 | (lapic_id() << 12));
        mmio::write::<u32>(e + 4, 0);
        mmio::write::<u32>(e + 8, v as u32);
        mmio::write::<u32>(e + 12, 0);
        Some(v)
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        self.common_read::<u16>(common::NUM_QUEUES)
    }

    /// Sets up queue `idx` with at most `max` entries, MSI-X entry `idx + 1`.
    pub fn setup_queue(&self, idx: u16, max: u16) -> Result<Queue, &'static str> {
        self.common_write::<u16>(common::QUEUE_SELECT, idx);
        let dev_max = self.common_read::<u16>(common::QUEUE_SIZE);
        if dev_max == 0 {
            return Err("queue-absent");
        }
        let want = dev_max.min(max).min(256);
        let size = 1u16 << (15 - want.leading_zeros()); // round down to a power of two
        self.common_write::<u16>(common::QUEUE_SIZE, size);
        let vector = self.route(idx + 1).and_then(|v| {
            self.common_write::<u16>(common::QUEUE_MSIX_VECTOR, idx + 1);
            (self.common_read::<u16>(common::QUEUE_MSIX_VECTOR) == idx + 1).then_some(v)
        });
        if vector.is_none() {
            self.common_write::<u16>(common::QUEUE_MSIX_VECTOR, NO_VECTOR);
        }
        let notify_off = self.common_read::<u16>(common::QUEUE_NOTIFY_OFF) as u64;
        let notify = self.notify + notify_off * self.notify_mul as u64;
        let q = Queue::new(idx, size, notify, vector);
        self.write_addr(common::QUEUE_DESC, q.desc_addr());
        self.write_addr(common::QUEUE_DRIVER, q.avail_addr());
        self.write_addr(common::QUEUE_DEVICE, q.used_addr());
        self.common_write::<u16>(common::QUEUE_ENABLE, 1);
        Ok(q)
    }

    /// Programs the rings of `q` (whatever its size) into the selected queue slot `q.index`
    /// and enables it, without validating the size; returns the notify address.
    pub fn setup_queue_raw(&self, q: &Queue) -> Option<u64> {
        self.common_write::<u16>(common::QUEUE_SELECT, q.index);
        self.common_write::<u16>(common::QUEUE_MSIX_VECTOR, NO_VECTOR);
        let notify_off = self.common_read::<u16>(common::QUEUE_NOTIFY_OFF) as u64;
        self.write_addr(common::QUEUE_DESC, q.desc_addr());
        self.write_addr(common::QUEUE_DRIVER, q.avail_addr());
        self.write_addr(common::QUEUE_DEVICE, q.used_addr());
        self.common_write::<u16>(common::QUEUE_ENABLE, 1);
        Some(self.notify + notify_off * self.notify_mul as u64)
    }

    /// Writes a 64-bit common-config field as two dwords.
    pub fn write_addr(&self, off: u64, v: u64) {
        self.common_write::<u32>(off, crate::bits::lo32(v));
        self.common_write::<u32>(off + 4, (v >> 32) as u32);
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self) {
        let s = self.status();
        self.set_status(s | status::DRIVER_OK);
    }

    /// Reads device-specific config at `off`, retried until `config_generation` is stable.
    pub fn config<T: Copy>(&self, off: u64) -> T {
        let mut v = mmio::read::<T>(self.device + off);
        for _ in 0..100 {
            let g = self.common_read::<u8>(0x15);
            v = mmio::read::<T>(self.device + off);
            if self.common_read::<u8>(0x15) == g {
                break;
            }
        }
        v
    }

    /// Reads `out.len()` bytes of device-specific config from `off` as one consistent view:
    /// retried until `config_generation` is the same before and after.
    pub fn config_bytes(&self, off: u64, out: &mut [u8]) {
        for _ in 0..100 {
            let g = self.common_read::<u8>(0x15);
            for (i, b) in out.iter_mut().enumerate() {
                *b = mmio::read::<u8>(self.device + off + i as u64);
            }
            if self.common_read::<u8>(0x15) == g {
                break;
            }
        }
    }

    /// Writes device-specific config at `off`.
    pub fn config_write<T: Copy>(&self, off: u64, v: T) {
        mmio::write::<T>(self.device + off, v)
    }

    /// Number of MSI-X table entries.
    pub fn msix_entries(&self) -> u16 {
        self.msix_entries
    }
}

/// Finds the `nth` modern virtio device of `virtio_type` on bus 0.
pub fn find(virtio_type: u16, nth: usize) -> Option<Function> {
    crate::pci::scan().find(super::VENDOR, super::device_id(virtio_type), nth)
}
