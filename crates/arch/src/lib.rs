//! Everything the VMM knows about the guest's architecture, behind one set of names per
//! architecture (the modules [`x86_64`] and `aarch64` export the same items; the crate root
//! re-exports the one being built for).
//!
//! The interface the VMM uses:
//!
//! - [`layout`]: the guest physical memory map (`ram_regions`, the PCI ECAM and MMIO
//!   windows, `MSI_GSI_BASE`, `MIN_MEMORY`, `CMDLINE_MAX`).
//! - VM creation: `create_vm`, or `setup_vm` on a new VM (x86_64: TSS, identity map,
//!   in-kernel irqchip, PIT; aarch64: the vGICv3 and its ITS), which returns the `Platform`;
//!   `Platform::vcpus_created` once every vCPU exists (aarch64: initialises the vGIC).
//! - Platform devices: `add_legacy_devices` (x86_64: COM1 with its irqfd, i8042, ACPI PM1a,
//!   debug exit, port 0x80, the PCI config ports 0xcf8; aarch64: the 16550 and the PL031 on
//!   MMIO) onto the VMM's buses.
//! - Interrupts: `legacy_irq_routes` (x86_64: IOAPIC and PIC) and `msi_route`.
//! - The vCPU loop's architecture hook: `handle_arch_exit` (x86_64: port I/O) and
//!   `instruction_pointer` for error messages.
//! - Booting: `load_kernel` (x86_64: ELF/PVH or bzImage, initrd, command line, memory map,
//!   ACPI; aarch64: an arm64 `Image`, initrd and the device tree),
//!   `setup_cpuid` (with `cpuid_feature_names`/`validate_cpuid_hide` for the hiding option)
//!   and `setup_vcpu`; `prepare_vcpu` is what every new vCPU needs first, at boot or restore
//!   (aarch64: `KVM_ARM_VCPU_INIT`).
//! - Snapshots: `VcpuState` and `CpuModel` (per vCPU, with `VcpuSaveContext`), `VmState`
//!   (x86_64: PICs, IOAPIC, PIT, kvmclock, restored before the vCPUs exist; aarch64: the
//!   vGICv3 and its ITS, restored by `VmState::restore_irqchip` once they do) and
//!   `PlatformState` (x86_64: the CMOS RTC and a firmware boot's fw_cfg position; aarch64: the PL031 RTC; through
//!   `LegacyDevices::save_platform`), each
//!   with save and restore; `ARCH_NAME` tags a snapshot so it never restores on another
//!   architecture.
//!
//! The aarch64 module (issue 14) boots Linux: layout, device tree, vGICv3 with ITS, the UART
//! on MMIO, `KVM_ARM_VCPU_INIT` with PSCI 0.2, and saves and restores vCPUs and the vGIC.
//! This crate depends on `devices`, never the reverse.

#![warn(missing_docs)]

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::*;

/// The interface every architecture module provides, spelled out with its types: this
/// compiles for each target, so an architecture that drifts from the others fails
/// `cargo check --target ...` instead of the VMM's build on that target.
// Spelling the signatures out is the point: complex types are expected here.
#[allow(dead_code, clippy::type_complexity)]
fn _same_interface_on_every_architecture() {
    use std::fs::File;
    use std::sync::Arc;

    use devices::bus::Bus;
    use devices::legacy::Serial;
    use kvm_bindings::kvm_irq_routing_entry;
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    type SerialMaker = fn(EventFd) -> Result<Serial, std::io::Error>;
    let _: &str = ARCH_NAME;
    let _: fn(&Kvm) -> Result<VmFd, Error> = create_vm;
    let _: fn(&VmFd, bool) -> Result<Platform, Error> = setup_vm;
    let _: fn(&Platform) -> Result<(), Error> = Platform::vcpus_created;
    let _: fn(&LegacyContext<'_>, &mut Bus, &mut Bus, SerialMaker) -> Result<LegacyDevices, Error> =
        add_legacy_devices;
    let _: fn(&LegacyDevices) -> &Arc<std::sync::Mutex<Serial>> = |l| &l.serial;
    let _: fn(&LegacyDevices) -> PlatformState = LegacyDevices::save_platform;
    let _: fn(&LegacyDevices, &PlatformState) -> Result<(), Error> =
        LegacyDevices::restore_platform;
    let _: u32 = IRQCHIP_PINS;
    let _: fn() -> Vec<kvm_irq_routing_entry> = legacy_irq_routes;
    let _: fn(u32, u64, u32, u32) -> kvm_irq_routing_entry = msi_route;
    let _: for<'a> fn(VcpuExit<'a>, &Bus, bool) -> Option<VcpuExit<'a>> = handle_arch_exit;
    let _: fn(&VcpuFd) -> Option<u64> = instruction_pointer;
    let _: fn(
        &GuestMemoryMmap,
        &mut File,
        Option<&mut File>,
        &BootConfig,
    ) -> Result<BootSetup, Error> = load_kernel::<GuestMemoryMmap>;
    let _: fn(&Kvm, &VcpuFd, u8, u8, &[String]) -> Result<(), Error> = setup_cpuid;
    let _: fn(&Platform, &VcpuFd, u8, &BootSetup, &GuestMemoryMmap) -> Result<(), Error> =
        setup_vcpu::<GuestMemoryMmap>;
    let _: fn(&Platform, &VcpuFd, u8) -> Result<(), Error> = prepare_vcpu;
    let _: fn() -> &'static [&'static str] = cpuid_feature_names;
    let _: fn(&[String]) -> Result<(), Error> = validate_cpuid_hide;
    let _: fn(&Kvm, &VmFd) -> VcpuSaveContext = VcpuSaveContext::new;
    let _: fn(&VcpuSaveContext) -> Result<(), Error> = VcpuSaveContext::check_snapshot_supported;
    let _: fn(&VcpuFd) -> Result<CpuModel, Error> = CpuModel::read;
    let _: fn(u8, &VcpuFd, &VcpuSaveContext, &CpuModel) -> Result<VcpuState, Error> =
        VcpuState::save;
    let _: fn(&VcpuState) -> u8 = |s| s.id;
    let _: fn(&VcpuState) -> Option<CpuModel> = VcpuState::cpu_model;
    let _: fn(&VcpuState, &VcpuFd) -> Result<(), Error> = VcpuState::restore_cpu_model;
    let _: fn(&VcpuState, &VcpuFd) -> Result<(), Error> = VcpuState::restore;
    let _: fn(&VmFd, &Platform, u8) -> Result<VmState, Error> = VmState::save;
    let _: fn(&VmState, &VmFd) -> Result<(), Error> = VmState::restore;
    let _: fn(&VmState, &Platform, u8) -> Result<(), Error> = VmState::restore_irqchip;
    let _: fn(u64) -> Vec<(GuestAddress, usize)> = layout::ram_regions;
    let _: [u64; 6] = [
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        layout::PCI_MMIO_START,
        layout::PCI_MMIO_SIZE,
        layout::PCI_MMIO64_START,
        layout::PCI_MMIO64_SIZE,
    ];
    let _: (u32, u64, usize) = (
        layout::MSI_GSI_BASE,
        layout::MIN_MEMORY,
        layout::CMDLINE_MAX,
    );
    let _: PciInfo = PciInfo::default();
    fn stored_in_snapshots<T: serde::Serialize + serde::de::DeserializeOwned>() {}
    stored_in_snapshots::<VcpuState>();
    stored_in_snapshots::<VmState>();
    stored_in_snapshots::<PlatformState>();
}
