//! How much an agent holds, and the line lengths that follow from it.

use crate::b64;

/// The most JSON a line carries around its base64 data (op, field names, a file name).
pub const ENVELOPE_MAX: usize = 1024;

/// What one agent accepts, as its `health` answer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest clipboard content in bytes.
    pub max_clipboard: usize,
    /// Largest file in bytes.
    pub max_file: usize,
    /// Files the inbox holds.
    pub max_files: usize,
}

/// The Linux agent's limits (also the most the handset carries).
pub const LINUX: Limits = Limits {
    max_clipboard: 1 << 20,
    max_file: 64 << 20,
    max_files: 1024,
};

/// The probe's limits: everything lives in its small RAM arena.
pub const PROBE: Limits = Limits {
    max_clipboard: 64 * 1024,
    max_file: 1 << 20,
    max_files: 4,
};

impl Limits {
    /// Longest request or answer line: the largest item in base64 plus [`ENVELOPE_MAX`].
    pub const fn line_max(&self) -> usize {
        let largest = if self.max_file > self.max_clipboard {
            self.max_file
        } else {
            self.max_clipboard
        };
        b64::encoded_len(largest) + ENVELOPE_MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_fits_a_line() {
        for l in [LINUX, PROBE] {
            assert!(l.line_max() >= b64::encoded_len(l.max_file) + 200);
        }
        assert_eq!(PROBE.line_max(), 1_398_104 + ENVELOPE_MAX);
    }
}
