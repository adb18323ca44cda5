//! The power-management function of a firmware-booted VM at 00:01.3, where OVMF's i440FX
//! platform code looks for the PIIX4 ACPI function: its PM I/O base (PMBA, config 0x40) and
//! the PM I/O enable (PMREGMISC, config 0x80). Both are fixed, already enabled, at the VM's
//! ACPI PM block (`PM1a` event and control at base + 0 and + 4, the PM timer at base + 8), so
//! firmware reads where the block is and programs nothing. No BARs, no interrupts.

use super::config::{PciConfig, PciConfigParams};
use super::PciDevice;

/// Where OVMF's i440FX code looks for the PM function: device 1, function 3.
pub const PIIX_PM_DEVFN: (u8, u8) = (1, 3);
/// PMBA, the PM I/O base register (dword index of config byte 0x40).
const PMBA_REG: usize = 0x40 / 4;
/// PMREGMISC (dword index of config byte 0x80); bit 0 (PMIOSE) enables the PM I/O block.
const PMREGMISC_REG: usize = 0x80 / 4;
/// PMBA bit 0 reads as 1 (the register names an I/O space address).
const PMBA_IO_SPACE: u32 = 1;

/// The PIIX4 ACPI function's PM registers over a PM block at a fixed port.
pub struct PiixPm {
    config: PciConfig,
    pm_base: u16,
}

impl PiixPm {
    /// The function (Intel 82371AB/EB/MB PIIX4 ACPI, 8086:7113) with its PM block at `pm_base`.
    pub fn new(pm_base: u16) -> Self {
        PiixPm {
            config: PciConfig::new(PciConfigParams {
                vendor_id: 0x8086,
                device_id: 0x7113,
                revision: 3,
                class_code: 0x06_80_00,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
            pm_base,
        }
    }
}

impl PciDevice for PiixPm {
    fn config_read(&mut self, reg: usize) -> u32 {
        match reg {
            PMBA_REG => u32::from(self.pm_base) | PMBA_IO_SPACE,
            PMREGMISC_REG => 1,
            _ => self.config.read(reg),
        }
    }
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        // The PM block does not move and cannot be switched off.
        if reg != PMBA_REG && reg != PMREGMISC_REG {
            self.config.write(reg, offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pm_base_is_fixed_and_enabled() {
        let mut pm = PiixPm::new(0x600);
        assert_eq!(pm.config_read(0) & 0xffff, 0x8086);
        assert_eq!(pm.config_read(PMBA_REG), 0x601);
        assert_eq!(pm.config_read(PMREGMISC_REG) & 1, 1);
        // What OVMF does when the enable bit is clear (it is not): the base stays.
        pm.config_write(PMBA_REG, 0, &0xb000u32.to_le_bytes());
        pm.config_write(PMREGMISC_REG, 0, &[0]);
        assert_eq!(pm.config_read(PMBA_REG), 0x601);
        assert_eq!(pm.config_read(PMREGMISC_REG) & 1, 1);
    }
}
