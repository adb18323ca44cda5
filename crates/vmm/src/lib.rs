//! One virtual machine: [`VmConfig`] in, running VM out.
//!
//! [`Vm::new`] creates the KVM VM with its memory, in-kernel irqchip, legacy devices, PCI bus and
//! virtio devices, loads the kernel and sets up the vCPUs; [`Vm::run`] starts one thread per vCPU
//! and waits until the guest powers off, a vCPU fails, or the caller asks it to stop.
//! [`Vm::run_with_control`] also serves [`Request`]s (pause, resume, snapshot, stop) sent
//! through a [`Controller`]; [`Vm::restore`] rebuilds a VM from a [`snapshot`] directory, and
//! [`Vm::restore_stream`] from a snapshot sent as a byte stream
//! ([`Request::SnapshotStream`]).
//!
//! - [`device_manager`]: the virtio devices by id, built from one table of the configuration;
//!   [`Request::Device`] sends a request to one of them.
//! - [`memory`]: guest RAM and its dirty page tracking ([`Vm::dirty_log`]: KVM's dirty log
//!   ORed with the bitmap of device writes).

pub mod config;
pub mod control;
pub mod device_manager;
mod error;
mod firmware;
mod hooks;
pub mod memory;
pub mod migration;
pub mod replica;
pub mod serial_log;
pub mod snapshot;
mod vcpu;
mod vm;

pub use config::{
    ConfigError, DiskConfig, GpuConfig, NetConfig, SerialConfig, VmConfig, VsockConfig,
};
pub use control::{Controller, Request, RequestError};
pub use error::Error;
pub use memory::{DirtyLog, DirtyRegion};
pub use snapshot::{RestoreOverrides, SnapshotStats};
pub use vm::{RunOutcome, Vm};
pub use vmm_api;
