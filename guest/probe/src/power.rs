//! Power off (ACPI S5) and failure exit (debug-exit port 0xF4).

use crate::port::{halt_forever, outl, outw};

/// Powers the VM off through PM1a_CNT (SLP_EN, SLP_TYP 0).
pub fn poweroff() -> ! {
    outw(0x604, 0x2000);
    crate::time::delay_ms(500);
    // Still running: no ACPI PM; a debug-exit of 0 is the VMM's "success".
    outl(0xF4, 0);
    halt_forever()
}

/// Exits with the failure count (clamped to 1..=255) on the debug-exit port, then halts.
pub fn fail_exit(n: u32) -> ! {
    outl(0xF4, n.clamp(1, 255));
    halt_forever()
}
