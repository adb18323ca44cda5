//! Virtio 1.x devices and their PCI transport.
//!
//! A device model implements [`VirtioDevice`]: it embeds a [`VirtioBase`] (its type, queue sizes,
//! offered and acked features, worker and [counters](DeviceCounters)), may have a config space,
//! and builds its worker in [`start`](VirtioDevice::start). When the driver sets DRIVER_OK the
//! trait's default [`activate`](VirtioDevice::activate) checks the queues, calls `start` with
//! the guest memory, the prepared queues and an [`Interrupt`] to signal the driver, and runs the
//! worker on a thread of its own; [`pause`](VirtioDevice::pause), `resume` and
//! [`reset`](VirtioDevice::reset) act on that thread. A device's own snapshot state goes through
//! [`save_state`](VirtioDevice::save_state)/[`restore_state`](VirtioDevice::restore_state), and
//! it may expose [shared memory](SharedMemory). `rng.rs` is the smallest device.

pub mod balloon;
pub mod base;
pub mod block;
pub mod chain;
pub mod control;
pub mod gpu;
pub mod input;
pub mod net;
pub mod pci;
pub mod rng;
pub mod shm;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMem;
use base::CountingInterrupt;
pub use base::{Activation, CounterValues, DeviceCounters, StateError, VirtioBase};
pub use shm::{SharedMemory, ShmRegion};
use worker::{DeviceWorker, VirtQueue};

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
    pub const GPU: u32 = 16;

    /// A short name of device type `t` (worker thread names, logs).
    pub fn name(t: u32) -> &'static str {
        match t {
            NET => "net",
            BLOCK => "blk",
            CONSOLE => "console",
            RNG => "rng",
            BALLOON => "balloon",
            VSOCK => "vsock",
            INPUT => "input",
            GPU => "gpu",
            _ => "device",
        }
    }
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
    /// The driver set DRIVER_OK without FEATURES_OK.
    #[error("DRIVER_OK without FEATURES_OK")]
    NoFeaturesOk,
    /// The backend (file, tap, socket, thread) failed.
    #[error("device backend failed: {0}")]
    Backend(#[from] std::io::Error),
}

/// A virtio device model, independent of its transport.
///
/// The plumbing every device shares lives in its [`VirtioBase`] and in the default methods
/// below; a device implements [`base`](Self::base)/[`base_mut`](Self::base_mut), its config
/// space if it has one, and [`start`](Self::start). `rng.rs` is the smallest example.
pub trait VirtioDevice: Send {
    /// The common part.
    fn base(&self) -> &VirtioBase;
    /// The common part, mutably.
    fn base_mut(&mut self) -> &mut VirtioBase;
    /// Builds the worker that serves the prepared queues (in activation order). Called with no
    /// worker running; the worker is spawned and owned by the base.
    fn start(&mut self, activation: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError>;

    /// The virtio device type (see [`device_type`]).
    fn device_type(&self) -> u32 {
        self.base().device_type()
    }
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.base().queue_sizes().to_vec()
    }
    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64 {
        self.base().offered_features()
    }
    /// The features the driver accepted (a subset of `device_features`).
    fn ack_features(&mut self, features: u64) {
        self.base_mut().ack_features(features);
    }
    /// Reads the device-specific config space; out-of-range bytes read as zero.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Writes the device-specific config space; out-of-range or read-only writes are ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Checks the activated queues and turns them into [`VirtQueue`]s and their kick eventfds.
    /// The default expects every queue, numbered in order; a device whose queues depend on the
    /// negotiated features (the balloon) maps them itself.
    fn prepare_queues(
        &self,
        mem: &GuestMem,
        queues: Vec<ActiveQueue>,
    ) -> Result<(Vec<VirtQueue>, Vec<EventFd>), ActivateError> {
        let base = self.base();
        worker::prepare_queues(mem, queues, base.acked_features(), base.num_queues())
    }
    /// Starts the device: it owns `queues` until [`reset`](Self::reset).
    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.base_mut().stop_worker();
        let (queues, kicks) = self.prepare_queues(&mem, queues)?;
        let base = self.base();
        let counters = base.counters().clone();
        let interrupt = Arc::new(CountingInterrupt {
            inner: interrupt,
            counters: counters.clone(),
        });
        let activation = Activation {
            mem,
            interrupt,
            queues,
            acked_features: base.acked_features(),
            counters,
        };
        let name = base.worker_name();
        let worker = self.start(activation)?;
        let handle = worker::spawn_worker(&name, kicks, worker)?;
        self.base_mut().set_worker(handle);
        Ok(())
    }
    /// Stops the device's worker and returns it to its initial state; then
    /// [`on_reset`](Self::on_reset).
    fn reset(&mut self) {
        self.base_mut().reset();
        self.on_reset();
    }
    /// The device's own reset steps, after its worker stopped.
    fn on_reset(&mut self) {}
    /// Quiesces an activated device for a snapshot: its worker finishes the chains it popped
    /// and stops touching guest memory and queues until [`resume`](Self::resume).
    fn pause(&mut self) {
        self.base().pause();
    }
    /// Undoes [`pause`](Self::pause).
    fn resume(&mut self) {
        self.base().resume();
    }
    /// Called after the device was re-activated from a snapshot in a new process, before the
    /// guest runs: host-side state that could not be carried over (open connections) is gone,
    /// and the device tells the driver so if its protocol has a way.
    fn restored(&mut self) {}
    /// Whether a restore may give this device another configuration than the snapshot's
    /// (checked equal otherwise): vsock, whose driver is told after a restore that it must
    /// read it again (its transport reset: a clone's new CID), and net, whose config is only
    /// the MAC a clone is given anew (a driver reads it at its next probe).
    fn config_may_change_at_restore(&self) -> bool {
        false
    }
    /// What the device counted so far.
    fn counters(&self) -> CounterValues {
        self.base().counters().get()
    }
    /// Device-specific state a snapshot must carry beyond queues and transport registers
    /// (state the driver changes through config space, like the balloon's `actual`). Called
    /// on a paused device; empty for devices without such state.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Applies what [`save_state`](Self::save_state) returned, on a freshly built device
    /// before it is re-activated. Refuses state it cannot use.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(StateError::Unexpected(state.len()))
        }
    }
    /// Shared-memory regions (virtio 1.2, 2.10) the device exposes through its extra BAR
    /// (see [`SharedMemory`]); none by default.
    fn shared_memory(&self) -> Option<&SharedMemory> {
        None
    }
    /// The handle the VMM sends this device's control requests to (see [`control`]); None
    /// for devices that take none.
    fn control(&self) -> Option<Arc<dyn control::DeviceControl>> {
        None
    }
}
