//! Pausing a virtio-pci function and saving or restoring its state for snapshots.
//!
//! A snapshot is taken with the device paused (its worker parked between rounds, every popped
//! chain completed), so each queue's next available index equals the used ring index the
//! device last published; both are read back from guest memory and cross-checked.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::common::{CommonRegs, QueueConfig};
use super::{status, VirtioPciDevice};
use crate::bus::lock;
use crate::pci::MsixState;

/// One queue as the driver configured it, with the device's position in its rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Queue size chosen by the driver.
    pub size: u16,
    /// The driver enabled the queue.
    pub enabled: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub driver: u64,
    /// Used (device) ring address.
    pub device: u64,
    /// Next available ring index the device will read.
    pub next_avail: u16,
    /// Next used ring index the device will write.
    pub next_used: u16,
}

/// Everything guest-visible about one virtio-pci function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// Virtio device type (checked against the device it is restored into).
    pub device_type: u32,
    /// The 256 bytes of PCI config space (BAR addresses, command register, MSI-X control).
    pub config: Vec<u8>,
    /// MSI-X table, PBA and control bits.
    pub msix: MsixState,
    /// Device status register.
    pub status: u8,
    /// ISR status.
    pub isr: u8,
    /// Config generation counter.
    pub config_generation: u8,
    /// MSI-X vector of configuration changes.
    pub config_vector: u16,
    /// MSI-X vector of each queue.
    pub queue_vectors: Vec<u16>,
    /// Common config feature select registers and queue select.
    pub device_feature_select: u32,
    /// See [`device_feature_select`](Self::device_feature_select).
    pub driver_feature_select: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// The queue select register.
    pub queue_select: u16,
    /// Each queue.
    pub queues: Vec<QueueState>,
    /// Whether the device model was activated (DRIVER_OK accepted).
    pub activated: bool,
    /// The first bytes of the device-specific config space (disk size, MAC, CID...), which
    /// the driver may have cached: a restore refuses a device whose config differs.
    #[serde(default)]
    pub device_config: Vec<u8>,
    /// The device model's own state ([`crate::virtio::VirtioDevice::save_state`]).
    #[serde(default)]
    pub device_state: Vec<u8>,
}

/// Bytes of device-specific config space compared on restore.
const DEVICE_CONFIG_CHECKED: usize = 64;

/// Why a saved state does not fit this function.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The saved state is of another device or layout.
    #[error("saved virtio-pci state does not match this device: {0}")]
    Mismatch(String),
    /// The device model refused its own saved state.
    #[error("the device refused its saved state: {0}")]
    DeviceState(#[from] crate::virtio::StateError),
    /// The MSI-X state does not fit this function.
    #[error("saved MSI-X state does not match this device: {0}")]
    Msix(#[from] crate::pci::PciError),
    /// Re-activating the device model failed.
    #[error("re-activating the device failed: {0}")]
    Activate(#[from] crate::virtio::ActivateError),
}

impl VirtioPciDevice {
    /// Quiesces the device model (see [`crate::virtio::VirtioDevice::pause`]).
    pub fn pause(&mut self) {
        if self.activated {
            self.device.pause();
        }
    }

    /// Lets a paused device model run again.
    pub fn resume(&mut self) {
        if self.activated {
            self.device.resume();
        }
    }

    /// After a restore, once the vCPUs exist: raises each active queue's used-buffer
    /// interrupt once. An MSI the device sent just before the snapshot may still have been on
    /// its way into KVM (irqfd injection is asynchronous) when the LAPIC was saved; a spurious
    /// used-buffer interrupt is harmless to a virtio driver, a lost one is not.
    pub fn renotify_queues(&self) {
        if !self.activated {
            return;
        }
        for (i, q) in (0u16..).zip(&self.queues) {
            if q.enabled {
                crate::virtio::Interrupt::signal_queue(&*self.interrupt, i);
            }
        }
    }

    /// Reads the used ring index of a queue (the device's next used position).
    fn used_idx(&self, q: &QueueConfig) -> Option<u16> {
        self.mem
            .read_obj::<u16>(GuestAddress(q.device.checked_add(2)?))
            .ok()
    }

    /// The state of a paused device.
    pub fn save_state(&self) -> VirtioPciState {
        let irq = &self.interrupt;
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let pos = if self.activated && q.enabled {
                    self.used_idx(q).unwrap_or(0)
                } else {
                    0
                };
                QueueState {
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    next_avail: pos,
                    next_used: pos,
                }
            })
            .collect();
        VirtioPciState {
            device_type: self.device.device_type(),
            config: self.config.raw_bytes().to_vec(),
            msix: lock(&irq.msix).save_state(),
            status: irq.status.load(Ordering::Acquire),
            isr: irq.isr.load(Ordering::Acquire),
            config_generation: irq.config_generation.load(Ordering::Acquire),
            config_vector: irq.config_vector.load(Ordering::Acquire),
            queue_vectors: irq
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
            device_feature_select: self.common.device_feature_select,
            driver_feature_select: self.common.driver_feature_select,
            driver_features: self.common.driver_features,
            queue_select: self.common.queue_select,
            queues,
            activated: self.activated,
            device_config: self.device_config(),
            device_state: self.device.save_state(),
        }
    }

    fn device_config(&self) -> Vec<u8> {
        let mut b = vec![0u8; DEVICE_CONFIG_CHECKED];
        self.device.read_config(0, &mut b);
        b
    }

    /// Applies a saved state to a freshly built function (same device, same configuration) whose
    /// guest memory already holds the snapshot's RAM: config space, MSI-X (with new KVM routes),
    /// common config, and, if the device was running, re-activates it at the saved queue
    /// positions. Call [`crate::pci::PciRoot::refresh_all`] afterwards to decode the BARs.
    /// On error the function may be partly restored: discard it.
    pub fn restore_state(&mut self, s: &VirtioPciState) -> Result<(), RestoreError> {
        let mismatch = |what: &str| RestoreError::Mismatch(what.to_string());
        if s.device_type != self.device.device_type() {
            return Err(RestoreError::Mismatch(format!(
                "device type {} saved, {} here",
                s.device_type,
                self.device.device_type()
            )));
        }
        // The device's own state first: it may be what its config space shows (balloon).
        self.device.restore_state(&s.device_state)?;
        let config_changed = !s.device_config.is_empty() && s.device_config != self.device_config();
        if config_changed && !self.device.config_may_change_at_restore() {
            return Err(mismatch(
                "the device's configuration differs from the snapshot's \
                 (a disk of another size?)",
            ));
        }
        if s.queues.len() != self.queues.len() || s.queue_vectors.len() != self.queues.len() {
            return Err(mismatch("number of queues"));
        }
        if s.driver_features & !self.offered_features != 0 {
            return Err(mismatch("driver features not offered by this device"));
        }
        for (qc, qs) in self.queues.iter().zip(&s.queues) {
            if !qs.size.is_power_of_two() || qs.size > qc.max_size {
                return Err(mismatch("queue size"));
            }
        }
        let num_vectors = lock(&self.interrupt.msix).num_vectors();
        let vector_ok = |v: u16| v == super::NO_VECTOR || usize::from(v) < num_vectors;
        if !vector_ok(s.config_vector) || !s.queue_vectors.iter().all(|&v| vector_ok(v)) {
            return Err(mismatch("MSI-X vector out of range"));
        }
        let saved_config = self.config.raw_bytes();
        if !self.config.restore_raw_bytes(&s.config) {
            return Err(mismatch("PCI config space layout"));
        }
        if let Err(e) = lock(&self.interrupt.msix).restore_state(&s.msix) {
            self.config.restore_raw_bytes(&saved_config);
            return Err(e.into());
        }
        let irq = &self.interrupt;
        irq.status.store(s.status, Ordering::Release);
        irq.isr.store(s.isr, Ordering::Release);
        // A configuration that changed is a new generation of it (virtio 1.x 4.1.4.3.1).
        irq.config_generation.store(
            s.config_generation.wrapping_add(u8::from(config_changed)),
            Ordering::Release,
        );
        irq.config_vector.store(s.config_vector, Ordering::Release);
        for (v, &saved) in irq.queue_vectors.iter().zip(&s.queue_vectors) {
            v.store(saved, Ordering::Release);
        }
        self.common = CommonRegs {
            device_feature_select: s.device_feature_select,
            driver_feature_select: s.driver_feature_select,
            driver_features: s.driver_features,
            queue_select: s.queue_select,
        };
        for (qc, qs) in self.queues.iter_mut().zip(&s.queues) {
            qc.size = qs.size;
            qc.enabled = qs.enabled;
            qc.desc = qs.desc;
            qc.driver = qs.driver;
            qc.device = qs.device;
        }
        if s.status & status::FEATURES_OK != 0 {
            self.device.ack_features(s.driver_features);
        }
        if s.activated {
            for (qc, qs) in self.queues.iter().zip(&s.queues) {
                if qs.enabled && self.used_idx(qc) != Some(qs.next_used) {
                    return Err(mismatch(
                        "used ring index in memory differs from the saved one",
                    ));
                }
            }
            let positions: Vec<(u16, u16)> = s
                .queues
                .iter()
                .map(|q| (q.next_avail, q.next_used))
                .collect();
            self.device.restored();
            self.activate_at(&positions)?;
        }
        Ok(())
    }
}
