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
pub struct SerialState {
    /// Divisor latch low, high; IER, IIR, LCR, LSR, MCR, MSR, scratch.
    pub regs: [u8; 9],
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Why a saved UART state was refused.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    /// The state does not describe a valid UART (a receive FIFO larger than the UART's).
    #[error("invalid serial state: {0}")]
    Invalid(String),
    /// Cloning the interrupt eventfd failed.
    #[error("serial interrupt eventfd: {0}")]
    EventFd(#[from] std::io::Error),
}

type Uart = vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// A 16550 UART writing the guest's output to `out`.
pub struct Serial {
    inner: Uart,
}

impl Serial {
    /// A UART that signals `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// The UART's state.
    pub fn save_state(&self) -> SerialState {
        let s = self.inner.state();
        SerialState {
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

    /// Puts the UART in the state `state`, keeping its interrupt and output. On error nothing
    /// changes.
    pub fn restore_state(&mut self, state: &SerialState) -> Result<(), SerialStateError> {
        let r = state.regs;
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
            in_buffer: state.in_buffer.clone(),
        };
        let irq = || self.inner.interrupt_evt().0.try_clone();
        let invalid = |e| SerialStateError::Invalid(format!("{e:?}"));
        // Checked on a throwaway UART first: building the real one consumes the output.
        let sink: Box<dyn Write + Send> = Box::new(std::io::sink());
        Uart::from_state(
            &state,
            EventFdTrigger(irq()?),
            vm_superio::serial::NoEvents,
            sink,
        )
        .map_err(invalid)?;
        let placeholder = Uart::new(EventFdTrigger(irq()?), Box::new(std::io::sink()));
        let trigger = EventFdTrigger(irq()?);
        let out = std::mem::replace(&mut self.inner, placeholder).into_writer();
        self.inner = Uart::from_state(&state, trigger, vm_superio::serial::NoEvents, out)
            .map_err(invalid)?;
        Ok(())
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
        let snap = serial.save_state();
        let out = Sink::default();
        let mut back = Serial::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        back.restore_state(&snap).unwrap();
        assert_eq!(back.save_state(), snap);
        let mut b = [0u8];
        back.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        back.read(0, &mut b);
        assert_eq!(b[0], b'a');
        // The restored UART still writes to its own output.
        back.write(0, b"!");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");
        let before = back.save_state();
        let too_much = SerialState {
            regs: snap.regs,
            in_buffer: vec![0; 1 << 16],
        };
        assert!(matches!(
            back.restore_state(&too_much),
            Err(SerialStateError::Invalid(_))
        ));
        // A refused state changes nothing.
        assert_eq!(back.save_state(), before);
        back.write(0, b"?");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!?");
    }
}
