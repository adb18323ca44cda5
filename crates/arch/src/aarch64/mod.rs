//! aarch64 platform: the same public names as the x86_64 module, so the VMM builds against
//! one interface.
//!
//! **Not implemented yet** (issue 14): what is honest today is here — the memory layout, the
//! state types, MSI routes, the exit hook — and everything that would need the GIC, the
//! device tree or `KVM_ARM_VCPU_INIT` returns [`Error::Unsupported`] rather than pretending.

pub mod layout;

use std::fs::File;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{ExitSignal, Serial};
use devices::pci::PciRoot;
use kvm_bindings::{kvm_irq_routing_entry, KVM_IRQ_ROUTING_MSI};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

/// The architecture this module builds guests for, as snapshots record it.
pub const ARCH_NAME: &str = "aarch64";

/// What every not-yet-ported operation answers.
const NOT_YET: &str = "aarch64 guests are not supported yet";

/// Errors from setting up the guest platform.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something the aarch64 port does not do yet.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A device does not fit on its bus.
    #[error(transparent)]
    Bus(#[from] devices::bus::BusError),
}

/// Where the PCI host bridge decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciInfo {
    /// ECAM base address (bus 0).
    pub ecam_base: u64,
    /// ECAM size in bytes.
    pub ecam_size: u64,
    /// 32-bit MMIO window base (BARs).
    pub mmio_base: u64,
    /// 32-bit MMIO window size.
    pub mmio_size: u64,
}

impl Default for PciInfo {
    fn default() -> Self {
        PciInfo {
            ecam_base: layout::PCI_ECAM_START,
            ecam_size: layout::PCI_ECAM_SIZE,
            mmio_base: layout::PCI_MMIO_START,
            mmio_size: layout::PCI_MMIO_SIZE,
        }
    }
}

/// What [`load_kernel`] needs to know about the machine.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs.
    pub nr_vcpus: u8,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// PCI host bridge resources.
    pub pci: PciInfo,
}

/// Where the boot vCPU starts: the kernel entry, with X0 holding the device tree's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootSetup {
    /// Entry point (guest physical).
    pub entry: GuestAddress,
    /// Address of the flattened device tree.
    pub fdt: GuestAddress,
}

/// Loads an arm64 `Image` and its device tree. Not implemented yet: [`Error::Unsupported`].
pub fn load_kernel<M: GuestMemoryBackend>(
    _mem: &M,
    _kernel: &mut File,
    _initrd: Option<&mut File>,
    _cfg: &BootConfig,
) -> Result<BootSetup, Error> {
    Err(Error::Unsupported(NOT_YET))
}

/// Creates a VM with its GIC. Not implemented yet: [`Error::Unsupported`].
pub fn create_vm(_kvm: &Kvm) -> Result<VmFd, Error> {
    Err(Error::Unsupported(NOT_YET))
}

/// Gives a new VM its platform (the GIC). Not implemented yet: [`Error::Unsupported`].
pub fn setup_vm(_vm: &VmFd) -> Result<(), Error> {
    Err(Error::Unsupported(NOT_YET))
}

/// CPU features that can be hidden: none (aarch64 has no CPUID; ID registers are issue 14).
pub fn cpuid_feature_names() -> &'static [&'static str] {
    &[]
}

/// Accepts only an empty list: hiding CPU features is x86_64-only so far.
pub fn validate_cpuid_hide(names: &[String]) -> Result<(), Error> {
    if names.iter().all(|n| n.trim().is_empty()) {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "hiding CPU features (cpuid_hide) is only supported on x86_64",
        ))
    }
}

/// The CPU model a vCPU shows (x86_64: CPUID). aarch64 has no CPUID; with nothing to hide
/// there is nothing to set, otherwise [`Error::Unsupported`].
pub fn setup_cpuid(
    _kvm: &Kvm,
    _vcpu: &VcpuFd,
    _id: u8,
    _nr_vcpus: u8,
    hide: &[String],
) -> Result<(), Error> {
    validate_cpuid_hide(hide)
}

/// Initialises a vCPU (`KVM_ARM_VCPU_INIT`, PC, X0). Not implemented yet:
/// [`Error::Unsupported`].
pub fn setup_vcpu<M: GuestMemoryBackend>(
    _vcpu: &VcpuFd,
    _id: u8,
    _boot: &BootSetup,
    _mem: &M,
) -> Result<(), Error> {
    Err(Error::Unsupported(NOT_YET))
}

/// What the VMM keeps of the platform devices.
pub struct LegacyDevices {
    /// The console UART.
    pub serial: Arc<Mutex<Serial>>,
}

/// The platform devices' state a snapshot carries besides the UART: none yet.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlatformState {}

impl LegacyDevices {
    /// The state a snapshot keeps (none yet).
    pub fn save_platform(&self) -> PlatformState {
        PlatformState {}
    }

    /// Puts the devices in `state`: nothing to do yet.
    pub fn restore_platform(&self, _state: &PlatformState) -> Result<(), Error> {
        Ok(())
    }
}

/// What the platform devices are wired to.
pub struct LegacyContext<'a> {
    /// The VM (for the serial irqfd).
    pub vm: &'a VmFd,
    /// Where the power-off and reset devices report.
    pub exit: &'a Arc<ExitSignal>,
    /// The PCI root.
    pub pci: &'a Arc<Mutex<PciRoot>>,
}

/// Puts the platform devices (the UART at [`layout::SERIAL_START`] on the MMIO bus) in place.
/// Not implemented yet: [`Error::Unsupported`].
pub fn add_legacy_devices<E>(
    _ctx: &LegacyContext<'_>,
    _pio: &mut Bus,
    _mmio: &mut Bus,
    _make_serial: impl FnOnce(EventFd) -> Result<Serial, E>,
) -> Result<LegacyDevices, Error>
where
    E: std::error::Error + Send + Sync + 'static,
{
    Err(Error::Unsupported(NOT_YET))
}

/// Interrupt lines routed to the irqchip outside MSI: none until the GIC is set up.
pub const IRQCHIP_PINS: u32 = 0;

/// The irqchip routes of platform interrupts: none yet (the GIC comes with issue 14).
pub fn legacy_irq_routes() -> Vec<kvm_irq_routing_entry> {
    Vec::new()
}

/// The route of an MSI on `gsi` writing `data` to `address`. (A GICv3 ITS will also need the
/// requester id, `KVM_MSI_VALID_DEVID`; that comes with the ITS.)
pub fn msi_route(gsi: u32, address: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    // The 64-bit address is split into its two halves; the masks make the truncation explicit.
    e.u.msi.address_lo = (address & 0xffff_ffff) as u32;
    e.u.msi.address_hi = (address >> 32) as u32;
    e.u.msi.data = data;
    e
}

/// aarch64 has no port I/O: every exit goes back to the generic loop.
#[inline]
pub fn handle_arch_exit<'a>(exit: VcpuExit<'a>, _pio: &Bus) -> Option<VcpuExit<'a>> {
    Some(exit)
}

/// The guest PC of a stopped vCPU, for error messages: not read yet (needs `KVM_GET_ONE_REG`).
pub fn instruction_pointer(_vcpu: &VcpuFd) -> Option<u64> {
    None
}

/// What saving a vCPU needs to know about the host and the VM.
#[derive(Debug, Clone, Default)]
pub struct VcpuSaveContext;

impl VcpuSaveContext {
    /// The context of `vm` on `kvm`.
    pub fn new(_kvm: &Kvm, _vm: &VmFd) -> Self {
        VcpuSaveContext
    }

    /// Snapshots of aarch64 guests are not implemented yet: [`Error::Unsupported`].
    pub fn check_snapshot_supported(&self) -> Result<(), Error> {
        Err(Error::Unsupported(NOT_YET))
    }
}

/// The CPU a vCPU shows the guest (its ID registers, later).
#[derive(Debug, Clone, Default)]
pub struct CpuModel;

impl CpuModel {
    /// Reads the CPU model of a vCPU. Not implemented yet: [`Error::Unsupported`].
    pub fn read(_vcpu: &VcpuFd) -> Result<CpuModel, Error> {
        Err(Error::Unsupported(NOT_YET))
    }
}

/// One vCPU's saved state (its registers, later).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
}

impl VcpuState {
    /// Reads a vCPU's state. Not implemented yet: [`Error::Unsupported`].
    pub fn save(
        _id: u8,
        _vcpu: &VcpuFd,
        _ctx: &VcpuSaveContext,
        _model: &CpuModel,
    ) -> Result<VcpuState, Error> {
        Err(Error::Unsupported(NOT_YET))
    }

    /// The CPU model the guest saw: none saved yet.
    pub fn cpu_model(&self) -> Option<CpuModel> {
        None
    }

    /// Gives a new vCPU the saved CPU model. Not implemented yet: [`Error::Unsupported`].
    pub fn restore_cpu_model(&self, _vcpu: &VcpuFd) -> Result<(), Error> {
        Err(Error::Unsupported(NOT_YET))
    }

    /// Writes the state into a new vCPU. Not implemented yet: [`Error::Unsupported`].
    pub fn restore(&self, _vcpu: &VcpuFd) -> Result<(), Error> {
        Err(Error::Unsupported(NOT_YET))
    }
}

/// VM-wide saved state (the GIC, the timers, later).
#[derive(Serialize, Deserialize)]
pub struct VmState {}

impl VmState {
    /// Reads the VM's state. Not implemented yet: [`Error::Unsupported`].
    pub fn save(_vm: &VmFd) -> Result<VmState, Error> {
        Err(Error::Unsupported(NOT_YET))
    }

    /// Writes the state into a new VM. Not implemented yet: [`Error::Unsupported`].
    pub fn restore(&self, _vm: &VmFd) -> Result<(), Error> {
        Err(Error::Unsupported(NOT_YET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unported_parts_say_so() {
        let e = VcpuSaveContext.check_snapshot_supported().unwrap_err();
        assert_eq!(e.to_string(), "aarch64 guests are not supported yet");
        assert!(validate_cpuid_hide(&[]).is_ok());
        assert!(matches!(
            validate_cpuid_hide(&["avx".into()]),
            Err(Error::Unsupported(_))
        ));
    }
}
