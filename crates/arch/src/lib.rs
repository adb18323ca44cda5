//! Guest platform setup for x86_64 KVM guests.
//!
//! This crate owns the guest side of the platform contract that the VMM and the devices share:
//!
//! - [`layout`]: the guest physical memory map (RAM below 3 GiB and from 4 GiB, the MMIO hole with
//!   the PCI window, ECAM, IOAPIC and LAPIC), fixed ports and IRQs.
//! - [`load_kernel`]: loads an ELF kernel through its PVH entry note or a bzImage through the
//!   Linux 64-bit boot protocol, the initrd, the command line, the e820 / PVH memory map and the
//!   ACPI tables (RSDP, XSDT, FADT, FACS, DSDT, MADT, MCFG).
//! - [`setup_vcpu`]: registers, segments, page tables, FPU, MSRs and LAPIC of each vCPU.
//! - [`setup_cpuid`]: the CPUID a vCPU sees, derived from what KVM supports, with topology,
//!   hypervisor leaves and optionally hidden features.
//!
//! Only x86_64 exists today; the API avoids x86 specifics where it can so other architectures
//! can follow.

#![warn(missing_docs)]

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
