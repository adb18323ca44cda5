//! Virtio 1.x devices and their PCI transport.
//!
//! A device model implements [`VirtioDevice`]: it declares its type, queues, features and config
//! space, and when the driver sets DRIVER_OK it is [`activated`](VirtioDevice::activate) with the
//! guest memory, its queues (each with the eventfd the guest kicks) and an [`Interrupt`] to signal
//! the driver. A device processes its queues on a worker thread of its own and stops that thread
//! on [`reset`](VirtioDevice::reset).

pub mod balloon;
pub mod block;
pub mod chain;
pub mod net;
pub mod pci;
pub mod rng;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMem;

/// `VIRTIO_F_VERSION_1`: the device is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Virtio device type numbers (virtio 1.x, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
    pub const INPUT: u32 = 18;
}

/// How a device tells the driver something happened.
pub trait Interrupt: Send + Sync {
    /// Used-buffer notification for queue `queue`.
    fn signal_queue(&self, queue: u16);
    /// Configuration-change notification.
    fn signal_config(&self);
    /// The device hit an error it cannot recover from without a reset (a malformed request it
    /// cannot answer with an error status): sets DEVICE_NEEDS_RESET and notifies the driver.
    fn device_error(&self);
}

/// A queue handed to a device on activation.
pub struct ActiveQueue {
    /// Index of the queue in the device.
    pub index: u16,
    /// The queue as the driver configured it.
    pub queue: Queue,
    /// Signalled each time the driver notifies this queue.
    pub kick: EventFd,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not set up a queue the device needs, or set up an invalid one.
    #[error("queue {0} is not usable")]
    BadQueue(u16),
    /// The backend (file, tap, socket, thread) failed.
    #[error("device backend failed: {0}")]
    Backend(#[from] std::io::Error),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// The features the driver accepted (a subset of `device_features`).
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific config space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space; out-of-range or read-only writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: it owns `queues` until [`reset`](Self::reset).
    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device's worker and returns it to its initial state.
    fn reset(&mut self);
    /// Quiesces an activated device for a snapshot: its worker finishes the chains it popped
    /// and stops touching guest memory and queues until [`resume`](Self::resume). A device
    /// with a worker thread must implement this; the default suits devices without one.
    fn pause(&mut self) {}
    /// Undoes [`pause`](Self::pause).
    fn resume(&mut self) {}
    /// Called after the device was re-activated from a snapshot in a new process, before the
    /// guest runs: host-side state that could not be carried over (open connections) is gone,
    /// and the device tells the driver so if its protocol has a way.
    fn restored(&mut self) {}
    /// Device-specific state a snapshot must carry beyond queues and transport registers
    /// (state the driver changes through config space, like the balloon's `actual`). Called
    /// on a paused device; empty for devices without such state.
    fn save_device_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Applies what [`save_device_state`](Self::save_device_state) returned, on a freshly
    /// built device before it is re-activated. Refuses state it cannot use.
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err("this device keeps no state of its own".into())
        }
    }
}
