//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).
//!
//! Every VM gets the reset command (0xFE, or the output port's reset line written low). A
//! firmware boot also gets a controller that answers what firmware probes (see
//! [`I8042::answer_probes`]): SeaBIOS polls the controller's self-test and resets the keyboard,
//! and with nothing answering it waits out 10,000 status polls per command (31 s of a boot
//! under nested virtualization). The controller answers those commands and a keyboard that
//! acknowledges its commands but never sends a key (guests type on virtio-input). It raises no
//! interrupt: firmware polls the status port with interrupts off in the command byte, and a
//! kernel-booted guest is not told an i8042 exists (the FADT has no 8042 flag).

use std::collections::VecDeque;
use std::sync::Arc;

use super::{ExitSignal, GuestExit};
use crate::bus::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
/// Output buffer full: a byte waits at the data port.
const STATUS_OBF: u8 = 0x01;
/// System flag: the controller passed its self-test.
const STATUS_SYS: u8 = 0x04;
/// The last write went to the command port (not the data port).
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited (the key lock is open).
const STATUS_UNLOCKED: u8 = 0x10;
/// The byte in the output buffer came from the auxiliary (mouse) port.
const STATUS_AUX: u8 = 0x20;

// Controller commands (written to 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_KBD_ECHO: u8 = 0xd2;
const CMD_AUX_ECHO: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Command byte (CTR) bits.
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
/// The system flag, mirrored in the status register.
const CTR_SYSTEM_FLAG: u8 = 0x04;
/// The command byte after power-on: keyboard interrupt, system flag, scan-code translation.
const CTR_DEFAULT: u8 = 0x45;

/// The controller's answer to its self-test.
const SELF_TEST_PASSED: u8 = 0x55;
/// A port test's answer: no fault.
const PORT_TEST_PASSED: u8 = 0x00;
/// The output port after power-on: the reset line high (bit 0) and the A20 gate open (bit 1).
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
/// Output port bit 0: the CPU reset line (active low).
const OUTPUT_PORT_RESET_HIGH: u8 = 0x01;

// Keyboard commands (written to 0x60) and answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// An MF2 keyboard's id with scan-code translation on.
const KBD_ID: [u8; 2] = [0xab, 0x41];
/// Bytes of a mouse command answered on the auxiliary port when no mouse is there.
const AUX_NO_DEVICE: u8 = 0xfe;

/// The output buffer's bound: no command queues more than three bytes, so a guest can never
/// grow it past this.
const OUTPUT_CAP: usize = 16;

/// What the next byte written to the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataFor {
    /// The keyboard (a command, or a command's argument when `Some`).
    Keyboard(Option<u8>),
    /// The controller's command byte.
    CommandByte,
    /// The controller's output port.
    OutputPort,
    /// Echoed back as if the keyboard sent it.
    KbdEcho,
    /// Echoed back as if the mouse sent it.
    AuxEcho,
    /// The mouse (there is none).
    Aux,
}

/// The controller's state when it answers probes.
#[derive(Debug)]
struct Controller {
    ctr: u8,
    output_port: u8,
    /// Bytes waiting at the data port, each with whether it came from the auxiliary port.
    output: VecDeque<(u8, bool)>,
    data_for: DataFor,
    last_write_was_command: bool,
    self_tested: bool,
    /// The keyboard's current scan-code set (1-3).
    scancode_set: u8,
}

impl Controller {
    fn new() -> Self {
        Self {
            ctr: CTR_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            output: VecDeque::new(),
            data_for: DataFor::Keyboard(None),
            last_write_was_command: false,
            self_tested: false,
            scancode_set: 2,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if let Some(&(_, aux)) = self.output.front() {
            status |= STATUS_OBF;
            if aux {
                status |= STATUS_AUX;
            }
        }
        if self.self_tested {
            status |= STATUS_SYS;
        }
        if self.last_write_was_command {
            status |= STATUS_CMD;
        }
        status
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.output.len() < OUTPUT_CAP {
            self.output.push_back((byte, aux));
        }
    }

    fn read_data(&mut self) -> u8 {
        self.output.pop_front().map_or(0, |(byte, _)| byte)
    }

    /// A command written to 0x64; returns whether it resets the machine.
    fn command(&mut self, cmd: u8) -> bool {
        self.last_write_was_command = true;
        self.data_for = DataFor::Keyboard(None);
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, false),
            CMD_WRITE_CTR => self.data_for = DataFor::CommandByte,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLED,
            CMD_AUX_TEST | CMD_KBD_TEST => self.push(PORT_TEST_PASSED, false),
            CMD_SELF_TEST => {
                self.self_tested = true;
                self.output.clear();
                self.push(SELF_TEST_PASSED, false);
            }
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.push(self.output_port, false),
            CMD_WRITE_OUTPUT_PORT => self.data_for = DataFor::OutputPort,
            CMD_KBD_ECHO => self.data_for = DataFor::KbdEcho,
            CMD_AUX_ECHO => self.data_for = DataFor::AuxEcho,
            CMD_AUX_SEND => self.data_for = DataFor::Aux,
            // 0xF0-0xFF pulse the output port's low bits; bit 0 low is the reset line.
            0xf0..=0xff => return cmd & OUTPUT_PORT_RESET_HIGH == 0,
            _ => {}
        }
        false
    }

    /// A byte written to 0x60; returns whether it resets the machine.
    fn data(&mut self, byte: u8) -> bool {
        self.last_write_was_command = false;
        let target = std::mem::replace(&mut self.data_for, DataFor::Keyboard(None));
        match target {
            DataFor::CommandByte => {
                self.ctr = byte;
                self.self_tested |= byte & CTR_SYSTEM_FLAG != 0;
            }
            DataFor::OutputPort => {
                self.output_port = byte;
                return byte & OUTPUT_PORT_RESET_HIGH == 0;
            }
            DataFor::KbdEcho => self.push(byte, false),
            DataFor::AuxEcho => self.push(byte, true),
            DataFor::Aux => self.push(AUX_NO_DEVICE, true),
            DataFor::Keyboard(pending) => self.keyboard(pending, byte),
        }
        false
    }

    /// The keyboard takes `byte`: a command, or the argument of `pending`.
    fn keyboard(&mut self, pending: Option<u8>, byte: u8) {
        if let Some(cmd) = pending {
            self.push(KBD_ACK, false);
            if cmd == KBD_SCANCODE_SET {
                match byte {
                    0 => self.push(self.scancode_set, false),
                    1..=3 => self.scancode_set = byte,
                    _ => {}
                }
            }
            return;
        }
        match byte {
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_TYPEMATIC => {
                self.push(KBD_ACK, false);
                self.data_for = DataFor::Keyboard(Some(byte));
            }
            KBD_ECHO => self.push(KBD_ECHO, false),
            KBD_GET_ID => {
                self.push(KBD_ACK, false);
                for b in KBD_ID {
                    self.push(b, false);
                }
            }
            KBD_RESET => {
                self.scancode_set = 2;
                self.push(KBD_ACK, false);
                self.push(KBD_SELF_TEST_PASSED, false);
            }
            // Enable, disable, set defaults and the typematic/make-break modes: acknowledged.
            0xf4..=0xfd => self.push(KBD_ACK, false),
            _ => self.push(KBD_RESEND, false),
        }
    }
}

/// An i8042 at ports 0x60-0x64. By default it reads as an idle controller with nothing to
/// say and only its reset command does anything; [`I8042::answer_probes`] makes it answer
/// the controller and keyboard commands firmware sends.
pub struct I8042 {
    exit: Arc<ExitSignal>,
    controller: Option<Controller>,
}

impl I8042 {
    /// A controller that reports resets to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            exit,
            controller: None,
        }
    }

    /// From now on answers the controller's commands (self-test, port tests, the command
    /// byte, the output port) and a keyboard's (reset, id, enable, scan-code set), as
    /// firmware probes them; for firmware boots.
    pub fn answer_probes(&mut self) {
        self.controller.get_or_insert_with(Controller::new);
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (Some(first), Some(ctl)) = (data.first_mut(), self.controller.as_mut()) else {
            // Idle: output buffer empty, input buffer empty, nothing pending.
            return;
        };
        match offset {
            0 => *first = ctl.read_data(),
            COMMAND_OFFSET => *first = ctl.status(),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        let reset = match (offset, self.controller.as_mut()) {
            (COMMAND_OFFSET, Some(ctl)) => ctl.command(byte),
            (0, Some(ctl)) => ctl.data(byte),
            (COMMAND_OFFSET, None) => byte == CMD_RESET_CPU,
            _ => false,
        };
        if reset {
            self.exit.exit(GuestExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probing() -> (Arc<ExitSignal>, I8042) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.answer_probes();
        (exit, dev)
    }

    fn status(dev: &mut I8042) -> u8 {
        let mut b = [0u8];
        dev.read(COMMAND_OFFSET, &mut b);
        b[0]
    }

    /// Reads the bytes waiting at the data port, as a polling driver does.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while status(dev) & STATUS_OBF != 0 {
            let mut b = [0u8];
            dev.read(0, &mut b);
            out.push(b[0]);
            assert!(out.len() <= OUTPUT_CAP, "the output buffer never empties");
        }
        out
    }

    fn command(dev: &mut I8042, cmd: u8) -> Vec<u8> {
        dev.write(COMMAND_OFFSET, &[cmd]);
        drain(dev)
    }

    fn data(dev: &mut I8042, byte: u8) -> Vec<u8> {
        dev.write(0, &[byte]);
        drain(dev)
    }

    #[test]
    fn reset_command_ends_the_vm_and_other_writes_do_not() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert_eq!(exit.reason(), None);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }

    #[test]
    fn without_probes_answered_it_reads_idle_and_ignores_commands() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        assert!(command(&mut dev, CMD_SELF_TEST).is_empty());
        assert_eq!(status(&mut dev), 0);
        assert!(data(&mut dev, KBD_RESET).is_empty());
        assert_eq!(exit.reason(), None);
    }

    /// SeaBIOS's `ps2_keyboard_setup` in order: it ends with "PS2 keyboard initialized"
    /// only if every answer here is right.
    #[test]
    fn seabios_keyboard_setup_gets_the_answers_it_checks() {
        let (exit, mut dev) = probing();
        assert!(drain(&mut dev).is_empty(), "flush: nothing pending");
        assert_eq!(command(&mut dev, CMD_SELF_TEST), [SELF_TEST_PASSED]);
        assert_ne!(status(&mut dev) & STATUS_SYS, 0);
        assert_eq!(command(&mut dev, CMD_KBD_TEST), [PORT_TEST_PASSED]);
        // Each keyboard command: the command byte written, the port enabled, the command.
        let ctr_off = CTR_KBD_DISABLED | CTR_AUX_DISABLED;
        for (cmd, arg, answer) in [
            (KBD_RESET, None, vec![KBD_ACK, KBD_SELF_TEST_PASSED]),
            (0xf5, None, vec![KBD_ACK]),
            (KBD_SCANCODE_SET, Some(2), vec![KBD_ACK]),
            (0xf4, None, vec![KBD_ACK]),
        ] {
            assert!(command(&mut dev, CMD_WRITE_CTR).is_empty());
            assert!(data(&mut dev, ctr_off).is_empty());
            assert!(command(&mut dev, CMD_WRITE_CTR).is_empty());
            assert!(data(&mut dev, CTR_AUX_DISABLED).is_empty());
            assert_eq!(data(&mut dev, cmd), answer, "keyboard command {cmd:#x}");
            if let Some(arg) = arg {
                assert_eq!(data(&mut dev, arg), [KBD_ACK], "argument of {cmd:#x}");
            }
        }
        assert_eq!(command(&mut dev, CMD_READ_CTR), [CTR_AUX_DISABLED]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn keyboard_reports_its_id_and_scancode_set_and_resends_unknown_commands() {
        let (_, mut dev) = probing();
        assert_eq!(data(&mut dev, KBD_GET_ID), [KBD_ACK, 0xab, 0x41]);
        assert_eq!(data(&mut dev, KBD_SCANCODE_SET), [KBD_ACK]);
        assert_eq!(data(&mut dev, 3), [KBD_ACK]);
        assert_eq!(data(&mut dev, KBD_SCANCODE_SET), [KBD_ACK]);
        assert_eq!(data(&mut dev, 0), [KBD_ACK, 3]);
        assert_eq!(data(&mut dev, KBD_ECHO), [KBD_ECHO]);
        assert_eq!(data(&mut dev, 0x01), [KBD_RESEND]);
    }

    #[test]
    fn no_mouse_answers_and_echoes_come_back_from_their_port() {
        let (_, mut dev) = probing();
        assert_eq!(command(&mut dev, CMD_AUX_TEST), [PORT_TEST_PASSED]);
        dev.write(COMMAND_OFFSET, &[CMD_AUX_SEND]);
        dev.write(0, &[0xff]);
        assert_ne!(
            status(&mut dev) & STATUS_AUX,
            0,
            "the answer is the mouse port's"
        );
        assert_eq!(drain(&mut dev), [AUX_NO_DEVICE]);
        dev.write(COMMAND_OFFSET, &[CMD_KBD_ECHO]);
        assert_eq!(data(&mut dev, 0x5a), [0x5a]);
        dev.write(COMMAND_OFFSET, &[CMD_AUX_ECHO]);
        dev.write(0, &[0x33]);
        assert_eq!(status(&mut dev) & STATUS_AUX, STATUS_AUX);
        assert_eq!(drain(&mut dev), [0x33]);
    }

    #[test]
    fn the_output_port_and_pulse_commands_reset_only_with_the_reset_line_low() {
        let (exit, mut dev) = probing();
        assert_eq!(
            command(&mut dev, CMD_READ_OUTPUT_PORT),
            [OUTPUT_PORT_DEFAULT]
        );
        command(&mut dev, CMD_WRITE_OUTPUT_PORT);
        data(&mut dev, 0x03);
        command(&mut dev, 0xff); // pulse nothing
        assert_eq!(exit.reason(), None);
        command(&mut dev, CMD_WRITE_OUTPUT_PORT);
        data(&mut dev, 0x02);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));

        let (exit, mut dev) = probing();
        command(&mut dev, CMD_RESET_CPU);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }

    #[test]
    fn a_guest_never_grows_the_output_buffer_past_its_bound() {
        let (_, mut dev) = probing();
        for _ in 0..1000 {
            dev.write(0, &[KBD_GET_ID]);
            dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        }
        assert_eq!(drain(&mut dev).len(), OUTPUT_CAP);
        // Odd widths and offsets neither panic nor answer.
        let mut wide = [0xffu8; 4];
        dev.read(2, &mut wide);
        assert_eq!(wide, [0; 4]);
        dev.write(1, &[]);
        dev.write(3, &[1, 2, 3]);
        dev.read(0, &mut []);
    }
}
