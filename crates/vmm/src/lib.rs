//! One virtual machine: [`VmConfig`] in, running VM out.
//!
//! [`Vm::new`] creates the KVM VM with its memory, in-kernel irqchip, legacy devices, PCI bus and
//! virtio devices, loads the kernel and sets up the vCPUs; [`Vm::run`] starts one thread per vCPU
//! and waits until the guest powers off, a vCPU fails, or the caller asks it to stop.

pub mod config;
mod error;
mod hooks;
mod vcpu;
mod vm;

pub use config::{DiskConfig, NetConfig, SerialConfig, VmConfig, VsockConfig};
pub use error::Error;
pub use vm::{RunOutcome, Vm};
