//! The firmware debug console (QEMU's `debugcon`, port 0x402 on the PC): SeaBIOS and OVMF
//! write their diagnostic log there one byte at a time. Each line goes to the VMM's log at
//! debug level (target `firmware`); a line is cut at 256 bytes, bytes other than printable
//! ASCII are dropped, and after [`MAX_LINES`] lines the console goes quiet, so a guest can
//! neither flood nor garble the log (a boot's log is a few hundred lines).

use crate::bus::BusDevice;

/// The longest line kept; longer ones are logged in pieces.
const MAX_LINE: usize = 256;

/// Lines logged per VM at most.
pub const MAX_LINES: u32 = 2000;

/// The debug console: the line being written and how many were logged.
#[derive(Default)]
pub struct DebugCon {
    line: Vec<u8>,
    logged: u32,
}

impl DebugCon {
    /// An empty console.
    pub fn new() -> Self {
        Self::default()
    }

    fn flush(&mut self) {
        if self.line.is_empty() {
            return;
        }
        if self.logged < MAX_LINES {
            self.logged += 1;
            let text = String::from_utf8_lossy(&self.line);
            let more = if self.logged == MAX_LINES {
                " (the firmware log ends here: line limit)"
            } else {
                ""
            };
            tracing::debug!(target: "firmware", "{text}{more}");
        }
        self.line.clear();
    }
}

impl BusDevice for DebugCon {
    /// Reads say the console is there (QEMU returns 0xe9).
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xe9);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' => self.flush(),
                0x20..=0x7e | b'\t' => {
                    self.line.push(b);
                    if self.line.len() >= MAX_LINE {
                        self.flush();
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_and_garbage_dropped() {
        let mut con = DebugCon::new();
        con.write(0, b"ab\x01\xffc");
        assert_eq!(con.line, b"abc");
        con.write(0, b"\n");
        assert!(con.line.is_empty());
        con.write(0, &[b'x'; MAX_LINE + 3]);
        assert_eq!(con.line.len(), 3);
        let mut b = [0u8; 1];
        con.read(0, &mut b);
        assert_eq!(b, [0xe9]);
        for _ in 0..MAX_LINES + 10 {
            con.write(0, b"x\n");
        }
        assert_eq!(con.logged, MAX_LINES);
    }
}
