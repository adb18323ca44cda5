//! The common configuration structure (virtio 1.1, 4.1.4.3): feature negotiation, device status
//! and queue setup.

use std::sync::atomic::Ordering;

use super::VirtioPciDevice;
use crate::narrow::{low_u16, low_u32, low_u8};
use crate::pci::{le_bytes_to_u64, read_slice};
use crate::virtio::Interrupt;

/// Length of the common configuration structure.
pub const COMMON_CFG_LEN: u64 = COMMON_CFG_BYTES as u64;
const COMMON_CFG_BYTES: usize = 0x38;

/// Device status bits (virtio 1.1, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// The driver's view of one queue before activation.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueConfig {
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Register state of the common configuration that is not kept elsewhere.
#[derive(Debug, Default)]
pub(super) struct CommonRegs {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
}

/// `n` (a queue count, at most MAX_QUEUES) as a u16.
fn len_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Replaces the low (`hi == false`) or high half of `v`.
fn set_half(v: u64, hi: bool, half: u32) -> u64 {
    if hi {
        (v & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (v & !0xffff_ffff) | u64::from(half)
    }
}

impl VirtioPciDevice {
    /// The common configuration as bytes (reads have no side effects).
    fn common_snapshot(&self) -> [u8; COMMON_CFG_BYTES] {
        let mut b = [0u8; COMMON_CFG_BYTES];
        let mut put = |off: u64, bytes: &[u8]| {
            let dst = usize::try_from(off)
                .ok()
                .and_then(|o| b.get_mut(o..o.checked_add(bytes.len())?));
            if let Some(dst) = dst {
                dst.copy_from_slice(bytes);
            }
        };
        let feature_half = |features: u64, select: u32| match select {
            0 => low_u32(features),
            1 => low_u32(features >> 32),
            _ => 0,
        };
        let r = &self.common;
        let irq = &self.interrupt;
        put(
            DEVICE_FEATURE_SELECT,
            &r.device_feature_select.to_le_bytes(),
        );
        put(
            0x04,
            &feature_half(self.offered_features, r.device_feature_select).to_le_bytes(),
        );
        put(
            DRIVER_FEATURE_SELECT,
            &r.driver_feature_select.to_le_bytes(),
        );
        put(
            DRIVER_FEATURE,
            &feature_half(r.driver_features, r.driver_feature_select).to_le_bytes(),
        );
        put(
            MSIX_CONFIG,
            &irq.config_vector.load(Ordering::Acquire).to_le_bytes(),
        );
        // At most MAX_QUEUES queues.
        put(0x12, &len_u16(self.queues.len()).to_le_bytes());
        put(DEVICE_STATUS, &[irq.status.load(Ordering::Acquire)]);
        put(0x15, &[irq.config_generation.load(Ordering::Acquire)]);
        put(QUEUE_SELECT, &r.queue_select.to_le_bytes());
        let qi = usize::from(r.queue_select);
        if let (Some(q), Some(vector)) = (self.queues.get(qi), irq.queue_vectors.get(qi)) {
            put(QUEUE_SIZE, &q.size.to_le_bytes());
            put(
                QUEUE_MSIX_VECTOR,
                &vector.load(Ordering::Acquire).to_le_bytes(),
            );
            put(QUEUE_ENABLE, &u16::from(q.enabled).to_le_bytes());
            // queue_notify_off: queue q is notified at notify base + q * multiplier.
            put(0x1e, &r.queue_select.to_le_bytes());
            put(QUEUE_DESC, &q.desc.to_le_bytes());
            put(QUEUE_DRIVER, &q.driver.to_le_bytes());
            put(QUEUE_DEVICE, &q.device.to_le_bytes());
        }
        b
    }

    /// The driver reads the common configuration.
    pub(super) fn common_read(&self, offset: u64, data: &mut [u8]) {
        read_slice(&self.common_snapshot(), offset, data);
    }

    /// The driver writes the common configuration. Only accesses of a field's own width (or
    /// one 32-bit half of a 64-bit field) are honoured; anything else is ignored.
    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = le_bytes_to_u64(data);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.common.device_feature_select = low_u32(v),
            (DRIVER_FEATURE_SELECT, 4) => self.common.driver_feature_select = low_u32(v),
            (DRIVER_FEATURE, 4) => self.write_driver_features(low_u32(v)),
            (MSIX_CONFIG, 2) => {
                let vector = self.interrupt.valid_vector(low_u16(v));
                self.interrupt
                    .config_vector
                    .store(vector, Ordering::Release);
            }
            (DEVICE_STATUS, 1) => self.write_status(low_u8(v)),
            (QUEUE_SELECT, 2) => self.common.queue_select = low_u16(v),
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.interrupt.valid_vector(low_u16(v));
                if let Some(q) = self
                    .interrupt
                    .queue_vectors
                    .get(usize::from(self.common.queue_select))
                {
                    q.store(vector, Ordering::Release);
                }
            }
            (QUEUE_SIZE | QUEUE_ENABLE, 2) | (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 8) => {
                self.write_queue_setup(offset, data.len(), v)
            }
            (QUEUE_DESC..=0x34, 4) if offset.is_multiple_of(4) => {
                self.write_queue_setup(offset, 4, v)
            }
            _ => crate::guest_debug!(
                "virtio-pci: ignored common config write at {offset:#x} len {}",
                data.len()
            ),
        }
    }

    fn write_driver_features(&mut self, half: u32) {
        let status = self.interrupt.status.load(Ordering::Acquire);
        if status & status::FEATURES_OK != 0 {
            return;
        }
        match self.common.driver_feature_select {
            0 => self.common.driver_features = set_half(self.common.driver_features, false, half),
            1 => self.common.driver_features = set_half(self.common.driver_features, true, half),
            _ => {}
        }
    }

    /// Queue size, enable and ring addresses; only before DRIVER_OK and for an existing queue.
    fn write_queue_setup(&mut self, offset: u64, len: usize, v: u64) {
        if self.interrupt.status.load(Ordering::Acquire) & status::DRIVER_OK != 0 {
            return;
        }
        let Some(q) = self.queues.get_mut(usize::from(self.common.queue_select)) else {
            return;
        };
        match offset {
            QUEUE_SIZE => {
                let size = low_u16(v);
                if size.is_power_of_two() && size <= q.max_size {
                    q.size = size;
                }
            }
            QUEUE_ENABLE => {
                // Drivers only ever write 1; disabling is done by a device reset.
                if v == 1 {
                    q.enabled = true;
                }
            }
            _ => {
                let field = match offset & !7 {
                    QUEUE_DESC => &mut q.desc,
                    QUEUE_DRIVER => &mut q.driver,
                    _ => &mut q.device,
                };
                *field = if len == 8 {
                    v
                } else {
                    set_half(*field, offset % 8 == 4, low_u32(v))
                };
            }
        }
    }

    /// The device status state machine.
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset_device();
            return;
        }
        let old = self.interrupt.status.load(Ordering::Acquire);
        // Bits are only ever added; the driver clears them by writing 0.
        let mut new = (old | value) & !status::DEVICE_NEEDS_RESET;
        if new & !old & status::FEATURES_OK != 0 {
            if self.features_acceptable() {
                self.device.ack_features(self.common.driver_features);
            } else {
                new &= !status::FEATURES_OK;
            }
        }
        let activate = new & !old & status::DRIVER_OK != 0;
        self.interrupt.status.fetch_or(new, Ordering::AcqRel);
        if activate {
            let result = if new & status::FEATURES_OK == 0 {
                Err(crate::virtio::ActivateError::NoFeaturesOk)
            } else {
                self.activate()
            };
            if let Err(e) = result {
                crate::guest_warn!("virtio-pci: activating the device failed: {e}");
                self.interrupt.device_error();
            }
        }
    }

    /// The driver accepted only offered features, including VIRTIO_F_VERSION_1.
    fn features_acceptable(&self) -> bool {
        let f = self.common.driver_features;
        f & !self.offered_features == 0 && f & crate::virtio::VIRTIO_F_VERSION_1 != 0
    }

    /// Back to the initial state: the device model, queues, vectors, features and status.
    pub(super) fn reset_device(&mut self) {
        self.device.reset();
        self.activated = false;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.common = CommonRegs::default();
        self.interrupt.reset();
        for kick in &self.kicks {
            // Drop notifications the old driver left behind (EAGAIN when there are none).
            let _ = kick.read();
        }
    }
}
