//! The 16550 UART on MMIO (registers one byte apart) as the probe's output.

use core::fmt::Write;

/// The UART's base address (pocketvisor's arm64 layout and QEMU virt's second UART).
const UART_BASE: usize = 0x0900_0000;
/// Line status register offset; bit 5: the transmit holding register is empty.
const LSR: usize = 5;
const LSR_THRE: u8 = 1 << 5;

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            put(b);
        }
        Ok(())
    }
}

fn put(b: u8) {
    // SAFETY: the UART's registers are device memory at a fixed address of the platform;
    // volatile byte accesses are what it expects, and the MMU is off (no mapping to break).
    unsafe {
        while core::ptr::read_volatile((UART_BASE + LSR) as *const u8) & LSR_THRE == 0 {}
        core::ptr::write_volatile(UART_BASE as *mut u8, b);
    }
}

/// Prints `PROBE <args>\n`.
pub fn line(args: core::fmt::Arguments) {
    let mut uart = Uart;
    let _ = uart.write_str("PROBE ");
    let _ = uart.write_fmt(args);
    let _ = uart.write_str("\n");
}
