//! aarch64 platform: the same public names as the x86_64 module, so the VMM builds against
//! one interface.
//!
//! What works (issue 14): the memory layout (`layout`), KVM's vGICv3 with its ITS (`gic`), the
//! device tree (`fdt`), loading an arm64 `Image` with its initrd and starting vCPUs with PSCI
//! 0.2 (`boot`), the 16550 UART on the MMIO bus with its interrupt through an irqfd, the PL031
//! real-time clock (which Linux sets its clock from at boot), and the
//! irqchip routes of the platform's SPIs, MSI routes that carry the ITS device id. Power-off
//! and reset arrive as PSCI system events, which the VMM's vCPU loop already ends the VM on.
//! Snapshots: each vCPU's registers (`vcpu_state`) and the vGIC with its ITS (`gic_state`).
//! Not yet: CPU feature hiding.

mod boot;
pub mod fdt;
mod gic;
pub mod gic_state;
pub mod layout;
mod vcpu_state;

use std::fs::File;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{ExitSignal, Pl031, Pl031State, Serial};
use devices::pci::PciRoot;
use kvm_bindings::{
    kvm_irq_routing_entry, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MSI_VALID_DEVID,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

pub use boot::setup_vcpu;
pub use gic::Platform;
pub use vcpu_state::{prepare_vcpu, CpuModel, SavedReg, VcpuSaveContext, VcpuState};

/// The architecture this module builds guests for, as snapshots record it.
pub const ARCH_NAME: &str = "aarch64";

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
    /// The kernel or initrd cannot be loaded.
    #[error("{0}")]
    Kernel(String),
    /// The device tree cannot be built or placed.
    #[error("device tree: {0}")]
    Fdt(String),
    /// A host resource could not be set up.
    #[error("cannot {what}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The serial port could not be created (or its saved state restored).
    #[error("serial port: {0}")]
    Serial(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A device does not fit on its bus.
    #[error(transparent)]
    Bus(#[from] devices::bus::BusError),
    /// A vCPU's registers cannot be saved or restored.
    #[error("vCPU state: {0}")]
    Vcpu(String),
    /// The vGIC's state cannot be saved or restored.
    #[error("vGIC state: {0}")]
    Gic(String),
}

/// Wraps a KVM error with the operation that failed.
pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
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

/// Loads an arm64 `Image` at the start of RAM, the initrd and the device tree at its top.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cfg: &BootConfig,
) -> Result<BootSetup, Error> {
    boot::load_kernel(mem, kernel, initrd, cfg)
}

/// Creates a VM on `kvm` with its vGIC ([`setup_vm`]).
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, Error> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    setup_vm(&vm, false)?;
    Ok(vm)
}

/// Gives a new VM its vGICv3 and ITS (before any irqfd, route or vCPU);
/// [`Platform::vcpus_created`] finishes it. Firmware boots are x86_64 only: `_boots_firmware`
/// changes nothing here.
pub fn setup_vm(vm: &VmFd, _boots_firmware: bool) -> Result<Platform, Error> {
    gic::create(vm)
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

/// What the VMM keeps of the platform devices.
pub struct LegacyDevices {
    /// The console UART.
    pub serial: Arc<Mutex<Serial>>,
    /// The PL031 real-time clock (snapshots save it in [`PlatformState`]).
    rtc: Arc<Mutex<Pl031>>,
}

/// The platform devices' state a snapshot carries besides the UART: the PL031 (the offset
/// the guest set from the host's time, its registers).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlatformState {
    /// The PL031 RTC.
    pub rtc: Pl031State,
}

impl LegacyDevices {
    /// The state a snapshot keeps.
    pub fn save_platform(&self) -> PlatformState {
        PlatformState {
            rtc: devices::bus::lock(&self.rtc).save_state(),
        }
    }

    /// Puts the devices in `state` (a restore, before the vCPUs run).
    pub fn restore_platform(&self, state: &PlatformState) -> Result<(), Error> {
        devices::bus::lock(&self.rtc).restore_state(&state.rtc);
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

/// Puts the platform devices in place on the MMIO bus: the UART at [`layout::SERIAL_START`],
/// its interrupt an irqfd on SPI [`layout::SERIAL_IRQ`], and the PL031 RTC at
/// [`layout::RTC_START`].
pub fn add_legacy_devices<E>(
    ctx: &LegacyContext<'_>,
    _pio: &mut Bus,
    mmio: &mut Bus,
    make_serial: impl FnOnce(EventFd) -> Result<Serial, E>,
) -> Result<LegacyDevices, Error>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Io {
        what: "create the serial interrupt eventfd",
        source,
    })?;
    ctx.vm
        .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial = make_serial(serial_irq).map_err(|e| Error::Serial(Box::new(e)))?;
    let serial = Arc::new(Mutex::new(serial));
    // The 16550's eight byte-wide registers (reg-shift 0); the rest of the page reads as
    // nothing is there.
    mmio.insert(layout::SERIAL_START, 8, serial.clone())?;
    let rtc = Arc::new(Mutex::new(Pl031::new()));
    mmio.insert(layout::RTC_START, layout::RTC_SIZE, rtc.clone())?;
    Ok(LegacyDevices { serial, rtc })
}

/// GSIs routed to the vGIC's SPIs one to one (GSI n is SPI n); MSI GSIs come after them.
pub const IRQCHIP_PINS: u32 = layout::MSI_GSI_BASE;

/// The irqchip routes of platform interrupts: GSI n to SPI n for the first
/// [`IRQCHIP_PINS`] (the serial port's among them).
pub fn legacy_irq_routes() -> Vec<kvm_irq_routing_entry> {
    (0..IRQCHIP_PINS)
        .map(|pin| {
            let mut e = kvm_irq_routing_entry {
                gsi: pin,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = 0;
            e.u.irqchip.pin = pin;
            e
        })
        .collect()
}

/// The route of an MSI on `gsi` writing `data` to `address` from the PCI function whose
/// requester id is `devid` (the ITS translates by device id: `KVM_MSI_VALID_DEVID`).
pub fn msi_route(gsi: u32, address: u64, data: u32, devid: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        flags: KVM_MSI_VALID_DEVID,
        ..Default::default()
    };
    e.u.msi.__bindgen_anon_1.devid = devid;
    let [hi, lo] = fdt_cells(address);
    e.u.msi.address_lo = lo;
    e.u.msi.address_hi = hi;
    e.u.msi.data = data;
    e
}

/// A 64-bit value as its high and low halves.
fn fdt_cells(v: u64) -> [u32; 2] {
    let b = v.to_be_bytes();
    [
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    ]
}

/// aarch64 has no port I/O: every exit goes back to the generic loop.
#[inline]
pub fn handle_arch_exit<'a>(
    exit: VcpuExit<'a>,
    _pio: &Bus,
    _split_string_io: bool,
) -> Option<VcpuExit<'a>> {
    Some(exit)
}

/// The guest PC of a stopped vCPU, for error messages.
pub fn instruction_pointer(vcpu: &VcpuFd) -> Option<u64> {
    let mut pc = [0u8; 8];
    vcpu.get_one_reg(boot::REG_PC, &mut pc).ok()?;
    Some(u64::from_le_bytes(pc))
}

/// VM-wide saved state: the vGICv3 and its ITS.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The vGIC (see [`gic_state`]).
    pub gic: gic_state::GicState,
}

impl VmState {
    /// Reads the state of a VM with `nr_vcpus` vCPUs, all out of KVM_RUN. It flushes the
    /// vGIC's LPI pending bits and ITS tables into guest RAM: save RAM after it.
    pub fn save(_vm: &VmFd, platform: &Platform, nr_vcpus: u8) -> Result<VmState, Error> {
        Ok(VmState {
            gic: gic_state::GicState::save(platform, nr_vcpus)?,
        })
    }

    /// What a new VM takes before its vCPUs exist: nothing on aarch64 (see
    /// [`restore_irqchip`](Self::restore_irqchip)).
    pub fn restore(&self, _vm: &VmFd) -> Result<(), Error> {
        Ok(())
    }

    /// Writes the vGIC's state once every vCPU exists and [`Platform::vcpus_created`] has
    /// initialised the vGIC, with guest RAM in place, before any device is restored.
    pub fn restore_irqchip(&self, platform: &Platform, nr_vcpus: u8) -> Result<(), Error> {
        self.gic.restore(platform, nr_vcpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unported_parts_say_so() {
        assert!(VcpuSaveContext.check_snapshot_supported().is_ok());
        assert!(validate_cpuid_hide(&[]).is_ok());
        assert!(matches!(
            validate_cpuid_hide(&["avx".into()]),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn platform_gsis_route_to_the_same_spi() {
        let routes = legacy_irq_routes();
        assert_eq!(routes.len(), 32);
        let serial = &routes[usize::try_from(layout::SERIAL_IRQ).unwrap()];
        assert_eq!(serial.type_, KVM_IRQ_ROUTING_IRQCHIP);
        // SAFETY: an IRQCHIP route, so `irqchip` is the union's active member.
        let pin = unsafe { serial.u.irqchip.pin };
        assert_eq!(pin, layout::SERIAL_IRQ);
        let msi = msi_route(40, 0x0809_0040, 7, 0x18);
        assert_eq!(msi.flags, KVM_MSI_VALID_DEVID);
        // SAFETY: an MSI route, so `msi` is the union's active member (and `devid` its
        // inner union's, with the flag set).
        let (lo, hi, data, devid) = unsafe {
            let m = msi.u.msi;
            (m.address_lo, m.address_hi, m.data, m.__bindgen_anon_1.devid)
        };
        assert_eq!((lo, hi, data, devid), (0x0809_0040, 0, 7, 0x18));
    }
}
