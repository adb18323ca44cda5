//! The 16550 UART at COM1, from `vm-superio`, with its interrupt on an eventfd, and a host
//! input path: bytes the host types wait in a bounded queue ([`INPUT_CAP`]) and move into the
//! UART's 64-byte receive FIFO whenever the guest has emptied it, so a paste longer than the
//! FIFO arrives whole and a flood is dropped (and counted), never blocking anyone.

use std::collections::VecDeque;
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
    /// Host input waiting for room in the receive FIFO (at most [`INPUT_CAP`] bytes; absent
    /// in snapshots written before the host input path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<u8>,
}

/// The most host input bytes that wait for the guest besides the UART's own 64-byte FIFO;
/// bytes beyond it are dropped and counted.
pub const INPUT_CAP: usize = 4096;

/// The largest `input` control request, in bytes.
pub const INPUT_REQUEST_MAX: usize = INPUT_CAP;

/// What became of host input given to [`Serial::enqueue_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct InputOutcome {
    /// Bytes queued for the guest.
    pub accepted: usize,
    /// Bytes dropped because the queue was full.
    pub dropped: usize,
}

/// The host input path's counters (the `counters` control request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct InputCounters {
    /// Bytes the host queued for the guest since the VMM started.
    pub input_bytes: u64,
    /// Bytes dropped because the queue was full.
    pub input_dropped: u64,
    /// Bytes waiting now, in the FIFO and the queue.
    pub waiting: usize,
}

/// Why a serial control request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SerialControlError {
    /// Not `{"op":"input","bytes":[...]}` or `{"op":"counters"}`.
    #[error("bad serial request: {0} (ops: input with \"bytes\": [0-255, ...] of at most {INPUT_REQUEST_MAX}, counters)")]
    BadRequest(String),
}

/// A control request to the serial port (device id `serial`).
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum SerialRequest {
    /// Queue bytes for the guest to read.
    Input { bytes: Vec<u8> },
    /// The input counters.
    Counters,
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
    /// Host input waiting for room in the FIFO, at most [`INPUT_CAP`] bytes.
    pending: VecDeque<u8>,
    input_bytes: u64,
    input_dropped: u64,
}

/// The receive FIFO's depth (vm-superio's).
const FIFO_DEPTH: usize = 64;

impl Serial {
    /// A UART that signals `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: vm_superio::Serial::new(EventFdTrigger(irq), out),
            pending: VecDeque::new(),
            input_bytes: 0,
            input_dropped: 0,
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
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// Puts the UART in the state `state`, keeping its interrupt and output. On error nothing
    /// changes.
    pub fn restore_state(&mut self, state: &SerialState) -> Result<(), SerialStateError> {
        if state.pending.len() > INPUT_CAP {
            return Err(SerialStateError::Invalid(format!(
                "{} bytes of pending input, more than {INPUT_CAP}",
                state.pending.len()
            )));
        }
        let pending: VecDeque<u8> = state.pending.iter().copied().collect();
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
        self.pending = pending;
        Ok(())
    }

    /// Queues bytes typed by the host for the guest to read: as many as the receive FIFO
    /// takes go there now (raising the receive interrupt if the guest enabled it), the rest
    /// wait for the guest to empty the FIFO; what does not fit in [`INPUT_CAP`] is dropped.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> InputOutcome {
        let room = INPUT_CAP.saturating_sub(self.pending.len());
        let accepted = bytes.len().min(room);
        self.pending.extend(&bytes[..accepted]);
        let dropped = bytes.len() - accepted;
        self.input_bytes += accepted as u64;
        self.input_dropped += dropped as u64;
        self.refill();
        InputOutcome { accepted, dropped }
    }

    /// Moves waiting input into the receive FIFO once the guest has emptied it.
    fn refill(&mut self) {
        if self.pending.is_empty() || self.inner.fifo_capacity() < FIFO_DEPTH {
            return;
        }
        let (front, _) = self.pending.as_slices();
        let chunk = &front[..front.len().min(FIFO_DEPTH)];
        // An interrupt that cannot be raised (a closed eventfd) loses no data: the bytes
        // are in the FIFO and LSR says so.
        let moved = self.inner.enqueue_raw_bytes(chunk).unwrap_or(0);
        self.pending.drain(..moved);
    }

    /// The input counters.
    pub fn input_counters(&self) -> InputCounters {
        InputCounters {
            input_bytes: self.input_bytes,
            input_dropped: self.input_dropped,
            waiting: self.pending.len() + (FIFO_DEPTH - self.inner.fifo_capacity()),
        }
    }

    /// Serves a control request (device id `serial`): `{"op":"input","bytes":[...]}` answers
    /// an [`InputOutcome`], `{"op":"counters"}` the [`InputCounters`].
    pub fn control(
        &mut self,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, SerialControlError> {
        let bad = |e: String| SerialControlError::BadRequest(e);
        let req: SerialRequest =
            serde_json::from_value(request.clone()).map_err(|e| bad(e.to_string()))?;
        let answer = match req {
            SerialRequest::Input { bytes } if bytes.len() > INPUT_REQUEST_MAX => {
                return Err(bad(format!("{} bytes in one request", bytes.len())))
            }
            SerialRequest::Input { bytes } => serde_json::to_value(self.enqueue_input(&bytes)),
            SerialRequest::Counters => serde_json::to_value(self.input_counters()),
        };
        answer.map_err(|e| bad(e.to_string()))
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), &mut *data) {
            (Ok(off), [b]) => {
                *b = self.inner.read(off);
                // A read of the receive buffer may have emptied the FIFO.
                if off == 0 {
                    self.refill();
                }
            }
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
        assert_eq!(serial.enqueue_input(b"ab").accepted, 2);
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
            pending: Vec::new(),
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

    /// Reads what the guest's driver would: LSR data-ready, then the receive buffer.
    fn guest_reads_all(serial: &mut Serial) -> Vec<u8> {
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            serial.read(5, &mut b);
            if b[0] & 0x01 == 0 {
                return got;
            }
            serial.read(0, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn host_input_longer_than_the_fifo_arrives_whole_with_receive_interrupts() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        serial.write(1, &[0x01]); // IER: received data available
        let line: Vec<u8> = (0..200u8).map(|i| b'a' + i % 26).collect();
        let out = serial.enqueue_input(&line);
        assert_eq!(
            out,
            InputOutcome {
                accepted: 200,
                dropped: 0
            }
        );
        assert!(irq.read().unwrap() >= 1, "no receive interrupt");
        let mut iir = [0u8];
        serial.read(2, &mut iir);
        assert_eq!(
            iir[0] & 0x0f,
            0x04,
            "IIR does not say received data available"
        );
        assert_eq!(serial.input_counters().waiting, 200);
        assert_eq!(guest_reads_all(&mut serial), line);
        // Each refill of the emptied FIFO raised the interrupt again.
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(
            serial.input_counters(),
            InputCounters {
                input_bytes: 200,
                input_dropped: 0,
                waiting: 0
            }
        );
    }

    #[test]
    fn a_flood_is_dropped_and_counted_never_queued_without_bound() {
        let mut serial = Serial::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        let first = serial.enqueue_input(&vec![b'x'; INPUT_CAP + 10]);
        assert_eq!(
            first,
            InputOutcome {
                accepted: INPUT_CAP,
                dropped: 10
            }
        );
        // The FIFO took 64 of them; the queue has room for exactly that many more.
        let second = serial.enqueue_input(&[b'y'; 100]);
        assert_eq!(
            second,
            InputOutcome {
                accepted: FIFO_DEPTH,
                dropped: 100 - FIFO_DEPTH
            }
        );
        let c = serial.input_counters();
        assert_eq!(c.input_dropped, 10 + 100 - FIFO_DEPTH as u64);
        assert_eq!(c.waiting, INPUT_CAP + FIFO_DEPTH);
        let got = guest_reads_all(&mut serial);
        assert_eq!(got.len(), INPUT_CAP + FIFO_DEPTH);
        assert!(got.ends_with(&[b'y'; FIFO_DEPTH]));
    }

    #[test]
    fn control_requests_queue_input_and_refuse_bad_ones() {
        let mut serial = Serial::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        let answer = serial
            .control(&serde_json::json!({"op": "input", "bytes": [104, 105, 10]}))
            .unwrap();
        assert_eq!(answer, serde_json::json!({"accepted": 3, "dropped": 0}));
        let counters = serial
            .control(&serde_json::json!({"op": "counters"}))
            .unwrap();
        assert_eq!(counters["input_bytes"], 3);
        assert_eq!(counters["waiting"], 3);
        for bad in [
            serde_json::json!({"op": "input"}),
            serde_json::json!({"op": "input", "bytes": [256]}),
            serde_json::json!({"op": "input", "bytes": "hi"}),
            serde_json::json!({"op": "input", "bytes": [1], "x": 1}),
            serde_json::json!({"op": "input", "bytes": vec![1; INPUT_REQUEST_MAX + 1]}),
            serde_json::json!({"op": "explode"}),
        ] {
            assert!(serial.control(&bad).is_err(), "{bad} accepted");
        }
        assert_eq!(guest_reads_all(&mut serial), b"hi\n");
    }

    #[test]
    fn waiting_input_survives_a_snapshot() {
        let mut serial = Serial::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        let text: Vec<u8> = (0..100u8).collect();
        serial.enqueue_input(&text);
        let snap = serial.save_state();
        assert_eq!(snap.in_buffer.len(), FIFO_DEPTH);
        assert_eq!(snap.pending.len(), 100 - FIFO_DEPTH);
        // Written before the input path: no `pending` field.
        let mut json = serde_json::to_value(&snap).unwrap();
        json.as_object_mut().unwrap().remove("pending");
        let old: SerialState = serde_json::from_value(json).unwrap();
        assert!(old.pending.is_empty());
        let mut back = Serial::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        back.restore_state(&snap).unwrap();
        assert_eq!(guest_reads_all(&mut back), text);
        let too_much = SerialState {
            pending: vec![0; INPUT_CAP + 1],
            ..snap
        };
        assert!(matches!(
            back.restore_state(&too_much),
            Err(SerialStateError::Invalid(_))
        ));
    }
}
