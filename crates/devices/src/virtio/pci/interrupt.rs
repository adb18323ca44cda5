//! The transport's [`Interrupt`]: ISR bits, device status, MSI-X vector selection and delivery.
//!
//! Shared (in an `Arc`) between the transport, which the vCPU threads drive, and the device's
//! worker thread, which signals through it.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Mutex;

use crate::bus::lock;
use crate::pci::MsixConfig;
use crate::virtio::Interrupt;

/// "No MSI-X vector" for `msix_config` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
/// ISR bit: used-buffer notification.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: configuration change.
pub const ISR_CONFIG: u8 = 2;
/// Device status bit: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;

/// Interrupt state of one virtio-pci function.
pub struct VirtioInterrupt {
    pub(super) status: AtomicU8,
    pub(super) isr: AtomicU8,
    pub(super) config_generation: AtomicU8,
    pub(super) config_vector: AtomicU16,
    pub(super) queue_vectors: Vec<AtomicU16>,
    pub(super) msix: Mutex<MsixConfig>,
}

impl VirtioInterrupt {
    /// State for `num_queues` queues with every vector unassigned.
    pub fn new(num_queues: usize, msix: MsixConfig) -> Self {
        VirtioInterrupt {
            status: AtomicU8::new(0),
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            msix: Mutex::new(msix),
        }
    }

    /// Maps a vector the driver asked for to what the device accepts: in range, or NO_VECTOR.
    pub(super) fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < lock(&self.msix).num_vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// Reads and clears the ISR.
    pub(super) fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// Returns every vector to NO_VECTOR and clears ISR and status (device reset).
    pub(super) fn reset(&self) {
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.isr.store(0, Ordering::Release);
        self.status.store(0, Ordering::Release);
    }
}

impl Interrupt for VirtioInterrupt {
    fn signal_queue(&self, queue: u16) {
        let Some(vector) = self.queue_vectors.get(usize::from(queue)) else {
            return;
        };
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        let vector = vector.load(Ordering::Acquire);
        if vector != NO_VECTOR {
            lock(&self.msix).trigger(vector);
        }
    }

    fn signal_config(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        let vector = self.config_vector.load(Ordering::Acquire);
        if vector != NO_VECTOR {
            lock(&self.msix).trigger(vector);
        }
    }

    fn device_error(&self) {
        self.status
            .fetch_or(STATUS_DEVICE_NEEDS_RESET, Ordering::AcqRel);
        self.signal_config();
    }
}
