//! Helpers of the VMM's own tests with real guests: a VM on a thread, serial logs to wait on.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::{Controller, RunOutcome, Vm};
use vmm_sys_util::eventfd::EventFd;

/// A scratch directory removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pv-vmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM running on its own thread, with a controller and a stop event.
pub struct Running {
    pub control: Arc<Controller>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Result<RunOutcome, vmm::Error>>>,
}

impl Running {
    pub fn start(vm: Vm) -> Running {
        let control = Controller::new().unwrap();
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (c, s) = (control.clone(), stop.clone());
        let thread = std::thread::spawn(move || vm.run_with_control(&s, Some(&c)));
        Running {
            control,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits for the run to end (the guest exits, or after `stop`).
    pub fn join(mut self) -> Result<RunOutcome, vmm::Error> {
        self.thread.take().unwrap().join().unwrap()
    }

    pub fn stop(self) -> Result<RunOutcome, vmm::Error> {
        self.stop.write(1).unwrap();
        self.join()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

/// The last complete `PROBE counter <n>` line in `serial`. A line the guest had not finished
/// (no newline yet) is not one: a line cut by a migration's switch ends at the other host, and
/// its number may be cut too (`PROBE counter 3` here, `8` there).
#[allow(dead_code)]
pub fn last_counter_in(serial: &str) -> u64 {
    serial
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.strip_prefix("PROBE counter "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no counter line in\n{serial}"))
}

/// Waits up to 20 s for `path` to contain `needle`; returns the file's text.
pub fn wait_for(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The probe guest (`$POCKETVISOR_PROBE`, else `guest/out/probe.elf`), or None (with a SKIP
/// line) where it cannot run. Panics with instructions when it has not been built.
pub fn probe(test: &str) -> Option<PathBuf> {
    if !e2e::require_kvm(test) {
        return None;
    }
    let elf = std::env::var_os("POCKETVISOR_PROBE").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out/probe.elf"),
        PathBuf::from,
    );
    assert!(
        elf.exists(),
        "{} is missing: build it first with guest/build-probe.sh (`make test` does)",
        elf.display()
    );
    Some(elf)
}
