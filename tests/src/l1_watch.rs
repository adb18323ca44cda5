//! Watching a running L1 for hangs, and what a hung L1 leaves behind.
//!
//! L1's `/init` (`tests/nested/l1-init`) writes a heartbeat into the job directory every 10 s
//! (`l1-live.txt`: L1's uptime and load, the tail of its kernel log, its processes). The host
//! tells two kinds of silence apart with it: a check that runs long in a live L1 (the heartbeat
//! goes on; bounded by the per-check budget) and L1 itself stopped (the heartbeat stops; killed
//! after [`heartbeat_limit`], long before the budget). Before a hung L1 is killed,
//! [`write_hang_report`] saves what the host can still see of it: QEMU's threads (state and CPU
//! time over two seconds: spinning or blocked) and, through QEMU's human monitor, its vCPUs'
//! registers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The heartbeat file L1's `/init` rewrites every 10 s.
pub const HEARTBEAT_FILE: &str = "l1-live.txt";

/// How long L1's heartbeat may stand still before L1 counts as hung (`NESTED_HEARTBEAT_LIMIT`
/// seconds, default 120: twelve beats, generous for a loaded host under TCG).
pub fn heartbeat_limit() -> Duration {
    Duration::from_secs(
        std::env::var("NESTED_HEARTBEAT_LIMIT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    )
}

/// The heartbeat as last seen by the host.
pub struct Heartbeat {
    file: PathBuf,
    last: Option<String>,
    changed: Instant,
}

impl Heartbeat {
    /// Watches `dir`'s heartbeat file (none yet: L1 is still booting).
    pub fn new(dir: &Path) -> Heartbeat {
        Heartbeat {
            file: dir.join(HEARTBEAT_FILE),
            last: None,
            changed: Instant::now(),
        }
    }

    /// Reads the heartbeat; returns how long it has stood still, or `None` while L1 has not
    /// written one yet (before its `/init` runs there is nothing to judge it by).
    pub fn still_for(&mut self) -> Option<Duration> {
        // The first line carries L1's uptime, which changes with every beat.
        let first = std::fs::read_to_string(&self.file)
            .ok()
            .and_then(|text| text.lines().next().map(str::to_string));
        if let Some(first) = first {
            if self.last.as_deref() != Some(first.as_str()) {
                self.last = Some(first);
                self.changed = Instant::now();
            }
        }
        self.last.as_ref().map(|_| self.changed.elapsed())
    }
}

/// A fresh path for QEMU's human monitor socket (a short one: the job directory can be deep).
pub fn monitor_socket() -> PathBuf {
    std::env::temp_dir().join(format!("{}.mon", crate::host::unique_name("l1")))
}

/// Writes `hang.txt` into `dir`: `why`, QEMU's threads and, if its monitor answers, the vCPUs'
/// registers. Called while the hung QEMU still runs; best effort, never fails the caller.
pub fn write_hang_report(dir: &Path, why: &str, qemu_pid: u32, monitor: &Path) {
    let mut report = format!("{why}\n\n--- QEMU's threads over 2 s ---\n");
    report.push_str(&threads_over(qemu_pid, Duration::from_secs(2)));
    report.push_str("\n--- QEMU monitor: info registers -a ---\n");
    report.push_str(
        &ask_monitor(monitor, "info registers -a").unwrap_or_else(|e| {
            format!("(no answer: {e}; a QEMU that holds its big lock does not answer)\n")
        }),
    );
    let _ = std::fs::write(dir.join("hang.txt"), report);
}

/// Each of `pid`'s threads: name, state and the CPU time it used during `window`.
fn threads_over(pid: u32, window: Duration) -> String {
    let sample = || -> Vec<(String, String, String, u64)> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        let mut out = Vec::new();
        for task in tasks.into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // comm may hold spaces: the fields after it start past the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map_or("", |(_, c)| c).to_string();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            // After ')': state is field 0, utime field 11, stime field 12.
            let cpu = ticks(11).unwrap_or(0) + ticks(12).unwrap_or(0);
            let state = fields.first().unwrap_or(&"?").to_string();
            out.push((task.file_name().to_string_lossy().into(), comm, state, cpu));
        }
        out
    };
    let before = sample();
    std::thread::sleep(window);
    let after = sample();
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out = String::new();
    for (tid, comm, state, cpu) in &after {
        let was = before.iter().find(|(t, ..)| t == tid).map_or(*cpu, |b| b.3);
        let busy = (cpu.saturating_sub(was)) as f64 / hz / window.as_secs_f64() * 100.0;
        out.push_str(&format!(
            "thread {tid} ({comm}) state {state}, {busy:.0}% of a CPU\n"
        ));
    }
    out
}

/// Sends one command to QEMU's human monitor at `socket` and returns its answer.
fn ask_monitor(socket: &Path, command: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    read_to_prompt(&mut stream)?; // the banner
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let answer = read_to_prompt(&mut stream)?;
    // The first line is the monitor's line editor echoing the command (with terminal
    // escapes), the last its next prompt: keep what lies between.
    let answer = answer.split_once('\n').map_or("", |(_, rest)| rest);
    Ok(answer.trim_end_matches("(qemu) ").replace('\r', ""))
}

/// Reads until the monitor's `(qemu) ` prompt.
fn read_to_prompt(stream: &mut UnixStream) -> Result<String, String> {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&text).ends_with("(qemu) ") {
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the monitor closed".into());
        }
        text.extend_from_slice(&buf[..n]);
        if text.len() > 1 << 20 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_counts_as_still_only_once_it_stops_changing() {
        let dir = crate::TempDir::new();
        let mut beat = Heartbeat::new(dir.path());
        assert_eq!(beat.still_for(), None, "no heartbeat yet: nothing to judge");
        std::fs::write(dir.path().join(HEARTBEAT_FILE), "uptime 1.00\nx\n").unwrap();
        assert!(beat.still_for().unwrap() < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(1200));
        assert!(beat.still_for().unwrap() >= Duration::from_millis(1200));
        std::fs::write(dir.path().join(HEARTBEAT_FILE), "uptime 11.00\ny\n").unwrap();
        assert!(
            beat.still_for().unwrap() < Duration::from_secs(1),
            "a new beat"
        );
    }

    #[test]
    fn the_thread_report_names_this_process_threads() {
        let report = threads_over(std::process::id(), Duration::from_millis(50));
        assert!(report.contains("thread "), "{report}");
        assert!(report.contains("% of a CPU"), "{report}");
    }
}
