//! The part of every virtio device that is the same for all of them: its type and queue sizes,
//! the features it offers and the driver acked, its worker thread and its counters.
//!
//! A device embeds a [`VirtioBase`] and hands it out through [`VirtioDevice::base`]; the
//! trait's default methods do the feature negotiation, activation (queue checks, spawning the
//! worker), pause, resume and reset with it, so a device implements only its config space and
//! [`VirtioDevice::start`] (the worker it runs on the prepared queues).
//!
//! [`VirtioDevice`]: super::VirtioDevice
//! [`VirtioDevice::base`]: super::VirtioDevice::base
//! [`VirtioDevice::start`]: super::VirtioDevice::start

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::worker::{VirtQueue, WorkerHandle, WorkerSlot};
use super::{device_type, Interrupt, VIRTIO_F_VERSION_1};
use crate::GuestMem;

/// What every device has in common.
pub struct VirtioBase {
    device_type: u32,
    queue_sizes: Vec<u16>,
    offered: u64,
    acked: u64,
    worker: WorkerSlot,
    counters: Arc<DeviceCounters>,
}

impl VirtioBase {
    /// A device of type `device_type` with one queue per entry of `queue_sizes` (each that
    /// queue's maximum size), offering `features` (plus [`VIRTIO_F_VERSION_1`]).
    pub fn new(device_type: u32, queue_sizes: &[u16], features: u64) -> Self {
        VirtioBase {
            device_type,
            queue_sizes: queue_sizes.to_vec(),
            offered: features | VIRTIO_F_VERSION_1,
            acked: 0,
            worker: WorkerSlot::default(),
            counters: Arc::default(),
        }
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Maximum size of each queue.
    pub fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queue_sizes.len()
    }

    /// Features offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Features the driver accepted (always a subset of the offered ones).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Records the driver's features, dropping any that were not offered.
    pub fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
    }

    /// Whether the driver accepted feature bit(s) `feature`.
    pub fn has_feature(&self, feature: u64) -> bool {
        self.acked & feature == feature
    }

    /// The device's counters (shared with its worker).
    pub fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    /// Thread name of the device's worker.
    pub fn worker_name(&self) -> String {
        format!("virtio-{}", device_type::name(self.device_type))
    }

    /// Stops the running worker (if any) and waits for it.
    pub fn stop_worker(&mut self) {
        self.worker.stop();
    }

    /// Installs a newly spawned worker, stopping the previous one.
    pub fn set_worker(&mut self, handle: WorkerHandle) {
        self.worker.set(handle);
    }

    /// Parks the worker between two rounds (see [`WorkerHandle::pause`]).
    pub fn pause(&self) {
        self.worker.pause();
    }

    /// Lets a paused worker run again.
    pub fn resume(&self) {
        self.worker.resume();
    }

    /// Stops the worker and forgets the negotiated features. Counters are kept: they describe
    /// the device's life, not one driver's.
    pub fn reset(&mut self) {
        self.worker.stop();
        self.acked = 0;
    }
}

/// What a device's [`start`](super::VirtioDevice::start) gets: everything its worker needs.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMem,
    /// Signals the driver (counts used-buffer notifications in the device's counters).
    pub interrupt: Arc<dyn Interrupt>,
    /// The queues, checked and with the negotiated ring features applied, in activation order.
    pub queues: Vec<VirtQueue>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The device's counters, for the worker to update.
    pub counters: Arc<DeviceCounters>,
}

/// Running totals of what a device did, updated by its worker and readable at any time.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    interrupts: AtomicU64,
}

impl DeviceCounters {
    /// One request (a chain, a frame, a packet) was served, moving `bytes` bytes of payload.
    pub fn request(&self, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A request failed or was malformed.
    pub fn error(&self) {
        self.errors(1);
    }

    /// `n` requests (or parts of one) failed.
    pub fn errors(&self, n: u64) {
        self.errors.fetch_add(n, Ordering::Relaxed);
    }

    /// The device notified the driver of used buffers.
    pub fn interrupt(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn get(&self) -> CounterValues {
        CounterValues {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
        }
    }
}

/// A reading of a device's [`DeviceCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterValues {
    /// Requests served (block: requests; net: frames both ways; vsock: packets both ways;
    /// rng: buffers filled; balloon: buffers of PFNs, stats or free ranges).
    pub requests: u64,
    /// Payload bytes moved (block: data read or written; net and vsock: frame or packet
    /// bytes; rng: random bytes; balloon: bytes given back to or taken back from the host).
    pub bytes: u64,
    /// Requests that failed or were malformed.
    pub errors: u64,
    /// Used-buffer notifications sent to the driver.
    pub interrupts: u64,
}

/// An [`Interrupt`] that counts used-buffer notifications before passing them on.
pub(crate) struct CountingInterrupt {
    pub inner: Arc<dyn Interrupt>,
    pub counters: Arc<DeviceCounters>,
}

impl Interrupt for CountingInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.counters.interrupt();
        self.inner.signal_queue(queue);
    }

    fn signal_config(&self) {
        self.inner.signal_config();
    }

    fn device_error(&self) {
        self.inner.device_error();
    }
}

/// Why a device refused saved state of its own.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The device keeps no state of its own but was given some.
    #[error("this device keeps no state of its own ({0} bytes given)")]
    Unexpected(usize),
    /// The state has the wrong length for its version.
    #[error("device state of {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    /// The state was written by a format this build does not know.
    #[error("device state version {0} is not supported")]
    Version(u8),
    /// A value in the state is out of range for this device.
    #[error("invalid device state: {0}")]
    Invalid(&'static str),
}
