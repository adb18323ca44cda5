//! COM1 16550 UART, polled output, and the `PROBE ...` line printer.

use crate::port::{inb, outb};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

const COM1: u16 = 0x3F8;
static LOCK: AtomicBool = AtomicBool::new(false);

/// Programs COM1 for 115200 8N1 with FIFOs, no interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xC7);
    outb(COM1 + 4, 0x03);
    // Firmware (SeaBIOS under QEMU) may have left a partial line on the console.
    put(b'\n');
}

/// Bytes written since the transmitter was last seen empty (FIFO is 16 deep).
static IN_FIFO: AtomicU8 = AtomicU8::new(16);

fn put(b: u8) {
    // Poll LSR only once per 16 bytes: when THRE is set the whole FIFO is free. This halves
    // the port exits per character. Bounded so a missing UART cannot hang the probe.
    if IN_FIFO.load(Ordering::Relaxed) >= 16 {
        for _ in 0..100_000 {
            if inb(COM1 + 5) & 0x20 != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        IN_FIFO.store(0, Ordering::Relaxed);
    }
    IN_FIFO.fetch_add(1, Ordering::Relaxed);
    outb(COM1, b);
}

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            put(b);
        }
        Ok(())
    }
}

/// Prints one protocol line: `PROBE <args>\n`, under the serial spin lock.
pub fn line(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = Uart.write_str("PROBE ");
    let _ = Uart.write_fmt(args);
    let _ = Uart.write_str("\n");
    LOCK.store(false, Ordering::Release);
}

/// Writes bytes as they are, under the serial spin lock (the echo console's echo).
pub fn raw(bytes: &[u8]) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    bytes.iter().for_each(|b| put(*b));
    LOCK.store(false, Ordering::Release);
}

/// Prints a line without taking the lock (fault and panic paths only).
pub fn line_unlocked(args: fmt::Arguments) {
    let _ = Uart.write_str("PROBE ");
    let _ = Uart.write_fmt(args);
    let _ = Uart.write_str("\n");
}

/// Prints `PROBE <format>` as one line.
#[macro_export]
macro_rules! probe {
    ($($t:tt)*) => { $crate::serial::line(format_args!($($t)*)) };
}
