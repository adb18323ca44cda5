//! The serial console's log file, capped: a guest printing in a loop cannot fill the disk.
//! The file is written (and rotated) by its own thread ([`LogWriter`]), so the vCPU that
//! emulates the UART does no file work: it only hands bytes over, and its seccomp filter
//! refuses opening, renaming and removing files.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use devices::bus::lock;
use devices::threads::ThreadKind;

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

/// Bytes waiting for the log thread before a writer waits for it (the UART then stalls the
/// guest, as a slow line would; nothing is dropped).
const PENDING_CAP: usize = 64 << 10;

/// What the UART's side and the log thread share.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// The writer is gone: the thread writes what is left and ends.
    closed: bool,
    /// The thread is gone (it could not start): bytes are dropped.
    dead: bool,
    /// The thread holds bytes it took and has not written yet.
    writing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when bytes arrive, when they have been taken, and on close.
    changed: Condvar,
}

/// A `Write` that hands the bytes to a thread (`serial-log`, thread kind
/// [`ThreadKind::LogWriter`]) which appends them to `log`. The thread starts with the writer,
/// so the guest's first byte (a migrated or restored guest's first sign of life) does not
/// wait for a thread to be created; in a jailed VMM, whose threads start after it drops its
/// privileges ([`devices::threads::may_start_early`]), with the first byte. A thread started
/// before a jail's filters are set narrows itself (its [`ThreadKind`] hook) before it writes
/// anything. Dropping the writer waits until everything handed over is written.
pub struct LogWriter {
    shared: Arc<Shared>,
    log: Option<Box<dyn Write + Send>>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// A writer for `log`, its thread started (where threads may start early).
    pub fn new(log: Box<dyn Write + Send>) -> Self {
        let mut w = Self {
            shared: Arc::new(Shared {
                pending: Mutex::new(Pending::default()),
                changed: Condvar::new(),
            }),
            log: Some(log),
            thread: None,
        };
        if devices::threads::may_start_early() {
            w.start();
        }
        w
    }

    fn start(&mut self) {
        let Some(mut log) = self.log.take() else {
            return;
        };
        let shared = self.shared.clone();
        let spawned = devices::threads::spawn("serial-log", move || {
            let mut narrowed = devices::threads::started(ThreadKind::LogWriter);
            loop {
                let (bytes, closed) = {
                    let mut p = lock(&shared.pending);
                    while p.bytes.is_empty() && !p.closed {
                        p = shared.changed.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                    p.writing = true;
                    (std::mem::take(&mut p.bytes), p.closed)
                };
                shared.changed.notify_all();
                // Started before a jail's filters were set: narrowed before any file work.
                if !narrowed {
                    narrowed = devices::threads::started(ThreadKind::LogWriter);
                }
                // A full disk or a failed rotation loses output, never the guest.
                let _ = log.write_all(&bytes).and_then(|()| log.flush());
                let done = {
                    let mut p = lock(&shared.pending);
                    p.writing = false;
                    closed && p.bytes.is_empty()
                };
                shared.changed.notify_all();
                if done {
                    return;
                }
            }
        });
        match spawned {
            Ok(t) => self.thread = Some(t),
            Err(_) => lock(&self.shared.pending).dead = true,
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.thread.is_none() {
            self.start();
        }
        let mut p = lock(&self.shared.pending);
        while p.bytes.len() >= PENDING_CAP && !p.dead {
            p = self
                .shared
                .changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
        if !p.dead {
            p.bytes.extend_from_slice(buf);
        }
        drop(p);
        self.shared.changed.notify_all();
        Ok(buf.len())
    }

    /// A no-op: the UART flushes after every byte, which must not wait for the file (see
    /// [`Drain`] for that).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits for a [`LogWriter`]'s thread to write what it was handed (a paused VM's log is then
/// final).
#[derive(Clone)]
pub struct Drain(Arc<Shared>);

impl LogWriter {
    /// A handle that waits for this writer's bytes to reach the file.
    pub fn drain(&self) -> Drain {
        Drain(self.shared.clone())
    }
}

impl Drain {
    /// Waits until every byte handed over so far is written (or the thread is gone), for at
    /// most `limit`: a stuck disk must not hold up a pause.
    pub fn wait(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut p = lock(&self.0.pending);
        while (!p.bytes.is_empty() || p.writing) && !p.dead && !p.closed {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            p = match self.0.changed.wait_timeout(p, left) {
                Ok((p, _)) => p,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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

    #[test]
    fn the_log_thread_writes_everything_before_the_writer_is_gone() {
        let dir = std::env::temp_dir().join(format!("pv-log-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("serial.log");
        let mut w = LogWriter::new(Box::new(RotatingLog::open(&p, 1 << 20).unwrap()));
        let mut want = Vec::new();
        // More than PENDING_CAP, a byte at a time as the UART writes.
        for i in 0..20_000u32 {
            let line = format!("line {i}\n");
            for b in line.bytes() {
                w.write_all(&[b]).unwrap();
                w.flush().unwrap();
            }
            want.extend_from_slice(line.as_bytes());
            if i == 10_000 {
                // A drain (as a pause does) leaves the file holding everything so far.
                w.drain().wait(std::time::Duration::from_secs(10));
                assert_eq!(std::fs::read(&p).unwrap(), want);
            }
        }
        let name = w
            .thread
            .as_ref()
            .and_then(|t| t.thread().name().map(str::to_string));
        assert_eq!(name.as_deref(), Some("serial-log"));
        drop(w);
        assert_eq!(std::fs::read(&p).unwrap(), want);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
