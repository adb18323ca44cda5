//! The serial console's log file, capped: a guest printing in a loop cannot fill the disk.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes a serial log file holds before it is rotated (the log takes at most twice this).
pub const SERIAL_LOG_CAP: u64 = 4 << 20;

/// How far past its cap a log may grow waiting for the end of a line.
const LINE_SLACK: u64 = 4096;

/// An append-only log that, once it holds `cap` bytes, is renamed to `<path>.1` (replacing
/// the previous one) and started anew, at the end of a line (or [`LINE_SLACK`] bytes later).
/// If the rotation fails, output beyond the cap is dropped rather than the file growing.
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    len: u64,
    cap: u64,
    at_line_start: bool,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl RotatingLog {
    /// Opens (appends to) `path`, rotating at `cap` bytes.
    pub fn open(path: &Path, cap: u64) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
            cap,
            at_line_start: true,
        })
    }

    /// `<path>.1`, where the older half of the log goes.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut p = OsString::from(path.as_os_str());
        p.push(".1");
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, Self::rotated_path(&self.path))?;
        self.file = open_append(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let due = (self.len >= self.cap && self.at_line_start)
            || self.len >= self.cap.saturating_add(LINE_SLACK);
        if due && self.rotate().is_err() {
            // Capped either way: what cannot be kept is dropped.
            return Ok(buf.len());
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        if n > 0 {
            self.at_line_start = buf[n - 1] == b'\n';
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_is_rotated_at_its_cap_and_never_grows_past_twice_it() {
        let dir = std::env::temp_dir().join(format!("pv-serial-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("serial.log");
        std::fs::write(&p, b"earlier\n").unwrap();
        let mut log = RotatingLog::open(&p, 100).unwrap();
        for i in 0..1000 {
            writeln!(log, "line {i:04}").unwrap();
        }
        let now = std::fs::read_to_string(&p).unwrap();
        let old = std::fs::read_to_string(RotatingLog::rotated_path(&p)).unwrap();
        assert!(
            now.len() <= 100 + 10 && old.len() <= 100 + 10,
            "{now:?} {old:?}"
        );
        assert!(
            now.starts_with("line ") && old.starts_with("line "),
            "{now:?} {old:?}"
        );
        assert!(now.ends_with("line 0999\n"), "{now:?}");
        // The rotated half is what came just before.
        let first_now: u32 = now[5..9].parse().unwrap();
        assert!(
            old.ends_with(&format!("line {:04}\n", first_now - 1)),
            "{old:?}"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        // Rotation impossible (the directory is gone): output is dropped, not an error.
        std::fs::remove_dir_all(&dir).unwrap();
        for _ in 0..100 {
            writeln!(log, "more").unwrap();
        }
    }
}
