//! The 16550 UART at COM1, from `vm-superio`, with its interrupt on an eventfd.

use std::io::Write;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial interrupt by writing an eventfd bound to the IRQ line (a KVM irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The registers and receive FIFO of the UART, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch low, high; IER, IIR, LCR, LSR, MCR, MSR, scratch.
    pub regs: [u8; 9],
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// A 16550 UART writing the guest's output to `out`.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART that signals `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// The UART's state.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the state `snap`, signalling `irq` and writing to `out`.
    pub fn from_snapshot(
        snap: &SerialSnapshot,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> std::io::Result<Self> {
        let r = snap.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: snap.in_buffer.clone(),
        };
        let inner = vm_superio::Serial::from_state(
            &state,
            EventFdTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| std::io::Error::other(format!("serial state: {e:?}")))?;
        Ok(Self { inner })
    }

    /// Queues bytes typed by the host user for the guest to read; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), &mut *data) {
            (Ok(off), [b]) => *b = self.inner.read(off),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            // Output errors (a closed stdout) must not stop the guest.
            let _ = self.inner.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_output_and_wide_accesses_are_ignored() {
        let sink = Sink::default();
        let mut serial = Serial::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        serial.write(0, b"xy");
        serial.write(1 << 40, b"z");
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
        let mut wide = [1u8; 4];
        serial.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
    }

    #[test]
    fn snapshot_round_trips_registers_and_input() {
        let sink = Sink::default();
        let mut serial = Serial::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        serial.write(7, &[0x5a]); // scratch
        serial.write(1, &[0x01]); // IER: rx data available
        assert_eq!(serial.enqueue_input(b"ab"), 2);
        let snap = serial.snapshot();
        let mut back =
            Serial::from_snapshot(&snap, EventFd::new(0).unwrap(), Box::new(sink.clone())).unwrap();
        assert_eq!(back.snapshot(), snap);
        let mut b = [0u8];
        back.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        back.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let too_much = SerialSnapshot {
            regs: snap.regs,
            in_buffer: vec![0; 1 << 16],
        };
        assert!(
            Serial::from_snapshot(&too_much, EventFd::new(0).unwrap(), Box::new(sink)).is_err()
        );
    }
}
