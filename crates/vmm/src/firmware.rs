//! Firmware boots (`firmware = PATH`): the ROM mapped into the VM, the firmware configuration
//! device and the CMOS bytes firmware reads. x86_64 only; elsewhere a clear error.

use std::path::Path;

use kvm_ioctls::VmFd;

use crate::Error;

/// Keeps a mapped firmware ROM alive for as long as the VM exists.
pub(crate) type RomHandle = Box<dyn Send + Sync>;

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::sync::{Arc, Mutex};

    use arch::layout;
    use devices::bus::Bus;
    use devices::GuestMem;

    use super::*;

    /// The fw_cfg device's ports (selector at 0x510, data at 0x511), as QEMU places them.
    pub const FW_CFG_PORT: u64 = 0x510;
    /// The firmware debug console (SeaBIOS's and OVMF's log), as QEMU's `pc` has it.
    pub const DEBUGCON_PORT: u64 = 0x402;

    /// Maps the firmware at `path`, copies its legacy part into `mem`, and returns the ROM
    /// handle with where vCPU 0 starts.
    pub(crate) fn load(
        vm: &VmFd,
        mem: &GuestMem,
        path: &Path,
    ) -> Result<(RomHandle, arch::BootSetup), Error> {
        let mut file = crate::vm::open(path)?;
        let (rom, boot) = arch::load_firmware(vm, mem, &mut file)?;
        Ok((Box::new(rom), boot))
    }

    /// Maps the firmware at `path` again for a restored VM (its RAM already holds whatever
    /// the firmware copied there).
    pub(crate) fn remap(vm: &VmFd, path: &Path) -> Result<RomHandle, Error> {
        let mut file = crate::vm::open(path)?;
        let image = arch::read_firmware(&mut file)?;
        Ok(Box::new(arch::map_firmware(vm, &image)?))
    }

    /// Puts the firmware's devices in place: fw_cfg at 0x510 (memory map, vCPUs, ACPI
    /// tables), the debug console at 0x402 (logged at debug level, target `firmware`), the
    /// CMOS memory bytes, an i8042 that answers SeaBIOS's keyboard probe, QEMU's host bridge subsystem id, and a PCI MMIO window from the
    /// ECAM's end up to the IOAPIC, where SeaBIOS assigns BARs.
    pub(crate) fn add_devices(
        mem_size: u64,
        nr_vcpus: u8,
        pio: &mut Bus,
        mmio: &mut Bus,
        legacy: &arch::LegacyDevices,
        root: &Arc<Mutex<devices::pci::PciRoot>>,
    ) -> Result<(), Error> {
        let pci = arch::PciInfo {
            ecam_base: layout::PCI_ECAM_START,
            ecam_size: layout::PCI_ECAM_SIZE,
            mmio_base: layout::PCI_MMIO_START,
            mmio_size: layout::PCI_MMIO_SIZE,
        };
        let fw_cfg = arch::firmware_fw_cfg(mem_size, nr_vcpus, &pci)?;
        let bus_err = |e: devices::bus::BusError| Error::Device {
            name: "firmware".into(),
            reason: e.to_string(),
        };
        pio.insert(FW_CFG_PORT, 2, Arc::new(Mutex::new(fw_cfg)))
            .map_err(bus_err)?;
        pio.insert(
            DEBUGCON_PORT,
            1,
            Arc::new(Mutex::new(devices::legacy::DebugCon::new())),
        )
        .map_err(bus_err)?;
        legacy.set_machine_info(mem_size, nr_vcpus);
        legacy.answer_keyboard_probes();
        let window = layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE;
        devices::bus::lock(root).prepare_for_firmware(window, layout::IOAPIC_START - window);
        mmio.insert(
            window,
            layout::IOAPIC_START - window,
            Arc::new(Mutex::new(devices::pci::PciMmioWindow::at(
                root.clone(),
                window,
            ))),
        )
        .map_err(bus_err)?;
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::{add_devices, load, remap};

#[cfg(not(target_arch = "x86_64"))]
const UNSUPPORTED: &str = "firmware boot (--firmware) is only supported on x86_64";

/// Firmware boots are x86_64 only.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn load(
    _vm: &VmFd,
    _mem: &devices::GuestMem,
    _path: &Path,
) -> Result<(RomHandle, arch::BootSetup), Error> {
    Err(Error::Config(UNSUPPORTED.into()))
}

/// Firmware boots are x86_64 only.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn remap(_vm: &VmFd, _path: &Path) -> Result<RomHandle, Error> {
    Err(Error::Config(UNSUPPORTED.into()))
}
