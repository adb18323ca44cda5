//! `pv.mode=echo`: a serial console for the host's input path. COM1's receive interrupt is
//! routed through the IOAPIC (GSI 4) to a vector of its own; every byte typed is echoed back
//! as a terminal would, and each finished line is reported as
//! `PROBE echo-line irqs=N text="..."` (N: receive interrupts so far). The timer tick is
//! stopped, so only the receive interrupt wakes the console. The line `quit` ends the probe
//! (`done ok`, power-off).

use crate::interrupts;
use crate::port::{inb, mmio, outb};
use crate::probe;
use crate::serial;

const COM1: u16 = 0x3F8;
/// COM1's interrupt line (an ISA IRQ, identity mapped to a GSI).
const COM1_GSI: u32 = 4;
const IOAPIC: u64 = 0xFEC0_0000;
/// The longest line kept; the rest of a longer one is echoed but not reported.
const LINE_MAX: usize = 512;

/// Points IOAPIC pin `gsi` at `vector` on the CPU with LAPIC id `apic` (fixed, physical,
/// edge, active high, unmasked).
fn route(gsi: u32, vector: u8, apic: u32) {
    let write = |reg: u32, v: u32| {
        mmio::write::<u32>(IOAPIC, reg);
        mmio::write::<u32>(IOAPIC + 0x10, v);
    };
    write(0x10 + 2 * gsi + 1, apic << 24);
    write(0x10 + 2 * gsi, u32::from(vector));
}

/// Runs the echo console until the line `quit`.
pub fn run() {
    let Some(vector) = interrupts::alloc_vector() else {
        crate::fail("echo", format_args!("no-vector"));
        return;
    };
    route(COM1_GSI, vector, interrupts::lapic_id());
    // IER: received data available; MCR: DTR, RTS and OUT2 (the PC's IRQ gate).
    outb(COM1 + 1, 0x01);
    outb(COM1 + 4, 0x0B);
    // Only the receive interrupt wakes the console: no tick polls the UART behind its back.
    interrupts::stop_timer();
    probe!("echo ready");
    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    loop {
        interrupts::wait();
        while inb(COM1 + 5) & 0x01 != 0 {
            let b = inb(COM1);
            match b {
                b'\r' | b'\n' => {
                    serial::raw(b"\r\n");
                    if len == 0 {
                        continue;
                    }
                    let text = core::str::from_utf8(&line[..len]).unwrap_or("<not utf-8>");
                    probe!(
                        "echo-line irqs={} text={:?}",
                        interrupts::irq_count(vector),
                        text
                    );
                    if text == "quit" {
                        outb(COM1 + 1, 0x00);
                        return;
                    }
                    len = 0;
                }
                _ => {
                    serial::raw(&[b]);
                    if len < LINE_MAX {
                        line[len] = b;
                        len += 1;
                    }
                }
            }
        }
    }
}
