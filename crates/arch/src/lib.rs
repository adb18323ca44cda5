//! Everything the VMM knows about the guest's architecture, behind one set of names per
//! architecture (the modules [`x86_64`] and `aarch64` export the same items; the crate root
//! re-exports the one being built for).
//!
//! The interface the VMM uses:
//!
//! - [`layout`]: the guest physical memory map (`ram_regions`, the PCI ECAM and MMIO
//!   windows, `MSI_GSI_BASE`, `MIN_MEMORY`, `CMDLINE_MAX`).
//! - VM creation: `create_vm` (x86_64: TSS, identity map, in-kernel irqchip, PIT).
//! - Platform devices: `add_legacy_devices` (x86_64: COM1 with its irqfd, i8042, ACPI PM1a,
//!   debug exit, port 0x80, the PCI config ports 0xcf8) onto the VMM's buses.
//! - Interrupts: `legacy_irq_routes` (x86_64: IOAPIC and PIC) and `msi_route`.
//! - The vCPU loop's architecture hook: `handle_arch_exit` (x86_64: port I/O) and
//!   `instruction_pointer` for error messages.
//! - Booting: `load_kernel` (ELF/PVH or bzImage, initrd, command line, memory map, ACPI),
//!   `setup_cpuid` (with `cpuid_feature_names`/`validate_cpuid_hide` for the hiding option)
//!   and `setup_vcpu`.
//! - Snapshots: `VcpuState` and `CpuModel` (per vCPU, with `VcpuSaveContext`), `VmState`
//!   (x86_64: PICs, IOAPIC, PIT, kvmclock), each with save and restore; `ARCH_NAME` tags a
//!   snapshot so it never restores on another architecture.
//!
//! The aarch64 module is the skeleton of the port (issue 14): the layout and types are real,
//! the rest answers `Error::Unsupported`. This crate depends on `devices`, never the reverse.

#![warn(missing_docs)]

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::*;
