//! A guest's serial console read through a FIFO, each read timestamped as it arrives: how long
//! the guest was silent is seen from outside the VMM. The probe's tick bytes (`pv.tick.us`,
//! [`TICK`]) are counted as output and taken out; the rest is appended to a log file, which
//! [`crate::compare::lines`] and [`crate::compare::wait_until`] read as before. The reading
//! thread asks for real-time priority (when it may), so its timestamps are the arrivals'.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The probe's tick byte (ASCII SYN).
pub const TICK: u8 = 0x16;

/// A FIFO a VMM writes the guest's serial output into and the thread that reads it.
pub struct SerialTap {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Instant>>>,
}

impl SerialTap {
    /// Creates the FIFO `fifo` (to give the VMM as its serial file) and starts reading it into
    /// `log`. The FIFO is opened read-write here, so a VMM's open for writing never blocks and
    /// a writer that ends is no end of the stream.
    pub fn start(fifo: &Path, log: &Path) -> Result<SerialTap> {
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes())?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            bail!(
                "mkfifo {}: {}",
                fifo.display(),
                std::io::Error::last_os_error()
            );
        }
        let input = OpenOptions::new()
            .read(true)
            .write(true)
            .open(fifo)
            .with_context(|| format!("open {}", fifo.display()))?;
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("serial-tap".into())
            .spawn(move || read_loop(input, out, &flag))?;
        Ok(SerialTap {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops reading once nothing more is waiting; the arrival time of every read that brought
    /// bytes, oldest first.
    pub fn finish(mut self) -> Vec<Instant> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for SerialTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `f` has bytes to read within `ms` milliseconds.
fn readable(f: &File, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Asks for real-time scheduling (SCHED_FIFO, the lowest priority) for this thread, so a read's
/// timestamp does not wait for the host's scheduler at load; without the privilege it runs as
/// it was.
fn realtime() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sets this thread's own policy from a valid sched_param.
    let _ = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
}

fn read_loop(mut input: File, mut out: File, stop: &AtomicBool) -> Vec<Instant> {
    realtime();
    let mut times = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Once stopped, read what is already there and end.
        let stopping = stop.load(Ordering::Acquire);
        if !readable(&input, if stopping { 0 } else { 20 }) {
            if stopping {
                return times;
            }
            continue;
        }
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return times,
            Ok(n) => n,
        };
        times.push(Instant::now());
        let text: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != TICK).collect();
        if !text.is_empty() && out.write_all(&text).is_err() {
            return times;
        }
    }
}

/// What the two streams of a migration show: `src` and `dst` the arrival times of the
/// source's and the destination's output, `from` when the migration was asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Switch {
    /// From the source's last output to the destination's first, ms: the guest was silent
    /// this long across the switch.
    pub gap_ms: f64,
    /// The longest silence in the source's output between `from` and its last output, ms
    /// (live rounds, throttling, the host's scheduling).
    pub before_ms: f64,
}

/// The [`Switch`] of two streams; `None` if either is empty or the source said nothing
/// before the destination's first output.
pub fn switch(src: &[Instant], dst: &[Instant], from: Instant) -> Option<Switch> {
    let first = *dst.first()?;
    let last = *src.iter().rev().find(|t| **t <= first)?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let mut before = 0.0f64;
    let mut prev = from;
    for &t in src.iter().filter(|t| **t >= from && **t <= last) {
        before = before.max(ms(t.saturating_duration_since(prev)));
        prev = t;
    }
    Some(Switch {
        gap_ms: ms(first - last),
        before_ms: before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_gap_runs_from_the_sources_last_output_to_the_destinations_first() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let src = [at(0), at(1), at(5), at(6), at(7)];
        let dst = [at(10), at(11)];
        let s = switch(&src, &dst, at(1)).unwrap();
        assert_eq!((s.gap_ms, s.before_ms), (3.0, 4.0));
        // Nothing from the destination, or nothing from the source before it: no figure.
        assert!(switch(&src, &[], at(0)).is_none());
        assert!(switch(&[at(20)], &dst, at(0)).is_none());
    }

    #[test]
    fn ticks_are_taken_out_and_every_read_is_timed() {
        let dir = std::env::temp_dir().join(format!("pv-serial-tap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (fifo, log) = (dir.join("fifo"), dir.join("log"));
        let tap = SerialTap::start(&fifo, &log).unwrap();
        let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"\x16PROBE counter 1\n\x16\x16").unwrap();
        drop(w);
        // The writer closing is no end: the tap reads until it is finished.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read(&log).unwrap_or_default().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let times = tap.finish();
        assert!(!times.is_empty());
        assert_eq!(std::fs::read(&log).unwrap(), b"PROBE counter 1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
