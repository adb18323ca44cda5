//! Helpers shared by the end-to-end tests: the binary and the probe guest, scratch
//! directories, VMM children killed on drop, and polling for files and exits.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pocketvisor")
}

/// Writes a `SKIP:` line past libtest's capture, so a skip is visible in every run.
pub fn skip(why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIP: {why}");
}

/// The probe guest's ELF; when it is missing and `build` is set, guest/build-probe.sh is run
/// first. The error says why there is none.
pub fn probe_elf(build: bool) -> Result<PathBuf, &'static str> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let elf = root.join("guest/out/probe.elf");
    if elf.is_file() {
        return Ok(elf);
    }
    if !build {
        return Err("guest/out/probe.elf missing (guest/build-probe.sh builds it)");
    }
    let built = Command::new(root.join("guest/build-probe.sh"))
        .current_dir(&root)
        .status()
        .is_ok_and(|s| s.success());
    if !built || !elf.is_file() {
        return Err("guest/out/probe.elf missing and guest/build-probe.sh failed");
    }
    Ok(elf)
}

/// The probe guest (built if missing and `build` is set); None after a SKIP line when
/// /dev/kvm or the probe is missing.
pub fn probe(build: bool) -> Option<PathBuf> {
    if !Path::new("/dev/kvm").exists() {
        skip("/dev/kvm not available");
        return None;
    }
    probe_elf(build).map_err(skip).ok()
}

/// A scratch directory, `<tmp>/<prefix>-<name>-<pid>`, removed at the end of the test.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty directory.
    pub fn new(prefix: &str, name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("{prefix}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A path inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// Kills (SIGKILL) the twins a cloud host with the state directory `state` runs: they
/// outlive `cloud serve`, each its pid in its `twin.lock`. For a test's end.
#[allow(dead_code)]
pub fn kill_twins(state: &Path) {
    let Ok(devices) = std::fs::read_dir(state.join("twins")) else {
        return;
    };
    for twin in devices
        .flatten()
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flatten()
        .flatten()
    {
        let Ok(lock) = std::fs::File::open(twin.path().join("twin.lock")) else {
            continue;
        };
        // Only a held lock names a live twin: a dead one's pid may be another process's now.
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let free = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0;
        let pid = std::io::read_to_string(&lock)
            .ok()
            .and_then(|t| t.trim().parse::<libc::pid_t>().ok());
        if let Some(pid) = pid.filter(|&p| p > 1 && !free) {
            // SAFETY: kill(2) of the live twin holding the lock; no memory is passed.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) if the test fails before it exits.
pub struct Vmm(pub Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `pocketvisor ARGS...` with stdout discarded and the given stderr.
pub fn spawn(args: &[&str], stderr: Stdio) -> Vmm {
    Vmm(Command::new(bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start pocketvisor"))
}

/// Waits for the child's exit; its exit code, or None on timeout (or death by a signal).
pub fn wait_exit(vmm: &mut Vmm, timeout: Duration) -> Option<i32> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Some(status) = vmm.0.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Polls `what` until it holds; false on timeout.
pub fn wait_until(what: impl Fn() -> bool, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A file's contents as text (lossy; empty when it cannot be read).
pub fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Waits until `path` contains `needle` (a serial log line, say); false on timeout.
pub fn wait_for(path: &Path, needle: &str, timeout: Duration) -> bool {
    wait_until(|| read(path).contains(needle), timeout)
}

/// The counter values of every complete `PROBE counter N` line.
pub fn counters(text: &str) -> Vec<u64> {
    // Complete lines only: one cut by a migration's switch ends on the other host, and its
    // number may be cut too (`PROBE counter 3` here, `8` there).
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("PROBE counter "))
        .filter_map(|n| n.parse().ok())
        .collect()
}
