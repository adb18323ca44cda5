//! ACPI PM1a power-off, the debug-exit port, and a write-only sink port.

use std::sync::Arc;

use super::{ExitSignal, GuestExit};
use crate::bus::BusDevice;

/// PM1 control: SCI_EN, always set (the platform is in ACPI mode).
const PM1_CNT_SCI_EN: u16 = 1;
/// PM1 control: sleep enable.
const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// The SLP_TYP value our DSDT declares for S5 (`\_S5_ = {0, 0}`, as QEMU's `pc` machine does).
const S5_SLP_TYP: u16 = 0;
/// Offset of PM1a_CNT from the start of the PM block (event block at 0, control at 4).
const PM1A_CNT_OFFSET: u64 = 4;

/// The ACPI PM1a event (4 bytes) and control (2 bytes) blocks, as one 8-byte range.
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
    enable: u16,
}

impl AcpiPm {
    /// A PM block that reports S5 to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit, enable: 0 }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs: [u16; 4] = [0, self.enable, PM1_CNT_SCI_EN, 0];
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at
                .and_then(|at| Some(regs.get(at / 2)?.to_le_bytes()[at % 2]))
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = match data {
            [lo] => u16::from(*lo),
            [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            [] => return,
        };
        match offset {
            2 => self.enable = value,
            PM1A_CNT_OFFSET => {
                let slp_typ = (value >> 10) & 7;
                if value & PM1_CNT_SLP_EN != 0 && slp_typ == S5_SLP_TYP {
                    self.exit.exit(GuestExit::PowerOff);
                }
            }
            _ => {}
        }
    }
}

/// A port whose writes end the VM with the written value as the exit status.
pub struct DebugExit {
    exit: Arc<ExitSignal>,
}

impl DebugExit {
    /// A debug-exit port reporting to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.exit.exit(GuestExit::DebugExit(u32::from_le_bytes(v)));
    }
}

/// A port that ignores writes and reads as 0xff (the POST code port 0x80 and the like).
pub struct PortSink;

impl BusDevice for PortSink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_write_powers_off_and_reads_show_acpi_mode() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        let mut cnt = [0u8; 2];
        pm.read(PM1A_CNT_OFFSET, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & PM1_CNT_SCI_EN, 1);
        // SLP_TYP 5 without our S5 value, and SLP_TYP 0 without SLP_EN, do nothing.
        pm.write(
            PM1A_CNT_OFFSET,
            &(5u16 << 10 | PM1_CNT_SLP_EN).to_le_bytes(),
        );
        pm.write(PM1A_CNT_OFFSET, &0u16.to_le_bytes());
        assert_eq!(exit.reason(), None);
        pm.write(PM1A_CNT_OFFSET, &0x2000u16.to_le_bytes());
        assert_eq!(exit.reason(), Some(GuestExit::PowerOff));
        // Odd offsets and lengths never panic.
        let mut big = [0u8; 8];
        pm.read(6, &mut big);
        pm.write(7, &[]);
    }

    #[test]
    fn debug_exit_reports_the_value_and_first_exit_wins() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = DebugExit::new(exit.clone());
        dev.write(0, &3u32.to_le_bytes());
        dev.write(0, &7u32.to_le_bytes());
        assert_eq!(exit.reason(), Some(GuestExit::DebugExit(3)));
        assert_eq!(exit.reason().unwrap().status(), 3);
    }
}
