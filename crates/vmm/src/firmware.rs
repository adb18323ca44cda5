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
    /// The ACPI PM timer's offset in the PM block.
    const PM_TIMER_OFFSET: u64 = 8;

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
    /// tables; kept by `legacy` for snapshots), the debug console at 0x402 (logged at debug level, target `firmware`), the
    /// CMOS memory bytes, an i8042 that answers SeaBIOS's keyboard probe, the i440FX host
    /// bridge ids with QEMU's subsystem id, the PIIX4 PM function at 00:01.3 and the ACPI PM
    /// timer OVMF needs, and a PCI MMIO window from the ECAM's end up to the IOAPIC, where
    /// firmware assigns BARs.
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
        let fw_cfg = Arc::new(Mutex::new(fw_cfg));
        pio.insert(FW_CFG_PORT, 2, fw_cfg.clone())
            .map_err(bus_err)?;
        legacy.attach_fw_cfg(fw_cfg)?;
        pio.insert(
            DEBUGCON_PORT,
            1,
            Arc::new(Mutex::new(devices::legacy::DebugCon::new())),
        )
        .map_err(bus_err)?;
        legacy.set_machine_info(mem_size, nr_vcpus);
        legacy.answer_keyboard_probes();
        // The PM timer completes the ACPI PM block at PM1A_EVT_PORT (event + 0, control + 4,
        // timer + 8, as on the PIIX4); the PM function at 00:01.3 says where the block is.
        pio.insert(
            u64::from(layout::PM1A_EVT_PORT) + PM_TIMER_OFFSET,
            4,
            Arc::new(Mutex::new(devices::legacy::AcpiPmTimer::new())),
        )
        .map_err(bus_err)?;
        let window = layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE;
        let low = (window, layout::IOAPIC_START - window);
        // Above RAM up to the VMM's own 64-bit window: OVMF puts its 64-bit aperture near the
        // top of a 40-bit address space (896 GiB-1 TiB here), or right above RAM.
        let ram_end = if mem_size > layout::MMIO_HOLE_START {
            layout::MMIO_HOLE_END + (mem_size - layout::MMIO_HOLE_START)
        } else {
            layout::MMIO_HOLE_END
        };
        let high = (ram_end, layout::PCI_MMIO64_START.saturating_sub(ram_end));
        let mut bus0 = devices::bus::lock(root);
        bus0.prepare_for_firmware(low, high);
        let (dev, func) = devices::pci::piix_pm::PIIX_PM_DEVFN;
        bus0.add_function(
            dev,
            func,
            Arc::new(Mutex::new(devices::pci::piix_pm::PiixPm::new(
                layout::PM1A_EVT_PORT,
            ))),
        );
        drop(bus0);
        for (base, size) in [low, high] {
            mmio.insert(
                base,
                size,
                Arc::new(Mutex::new(devices::pci::PciMmioWindow::at(
                    root.clone(),
                    base,
                ))),
            )
            .map_err(bus_err)?;
        }
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
