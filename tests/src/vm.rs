//! Running a VMM process with a deadline and collecting its serial output.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::probe::ProbeReport;

/// How long a guest may run before the harness kills it (`PV_TEST_TIMEOUT` seconds).
pub fn default_timeout() -> Duration {
    let secs = std::env::var("PV_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// A `pocketvisor run` invocation, built flag by flag.
#[derive(Debug, Clone)]
pub struct VmCommand {
    /// The binary (defaults to [`crate::pocketvisor_bin`]).
    pub bin: PathBuf,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--memory`.
    pub memory: Option<String>,
    /// `--vcpus`.
    pub vcpus: Option<u32>,
    /// `--disk PATH[,ro]`, in order.
    pub disks: Vec<(PathBuf, bool)>,
    /// `--net` value (`tap=NAME[,mac=..]`).
    pub net: Option<String>,
    /// `--vsock cid=N,socket=PATH`.
    pub vsock: Option<(u32, PathBuf)>,
    /// `--rng`.
    pub rng: bool,
    /// `--serial` (default: the CLI's default, stdout).
    pub serial: Option<String>,
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// Arguments appended verbatim after the ones above.
    pub extra: Vec<String>,
    /// Run inside this network namespace (through `ip netns exec`).
    pub netns: Option<String>,
    /// Kill the VMM after this long.
    pub timeout: Duration,
}

impl VmCommand {
    /// A run of the probe guest with `cmdline`, 128 MiB and one vCPU.
    pub fn probe(cmdline: &str) -> VmCommand {
        let mut cmd = VmCommand::bare();
        cmd.kernel = Some(crate::probe_elf());
        cmd.cmdline = Some(cmdline.to_string());
        cmd.memory = Some("128M".to_string());
        cmd
    }

    /// `pocketvisor run` with no flags at all.
    pub fn bare() -> VmCommand {
        VmCommand::with_bin(crate::pocketvisor_bin())
    }

    /// `<bin> run` with no flags at all.
    pub fn with_bin(bin: PathBuf) -> VmCommand {
        VmCommand {
            bin,
            kernel: None,
            initrd: None,
            cmdline: None,
            memory: None,
            vcpus: None,
            disks: Vec::new(),
            net: None,
            vsock: None,
            rng: false,
            serial: None,
            config: None,
            extra: Vec::new(),
            netns: None,
            timeout: default_timeout(),
        }
    }

    /// Sets `--memory`.
    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = Some(memory.to_string());
        self
    }

    /// Sets `--vcpus`.
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = Some(n);
        self
    }

    /// Adds `--disk PATH[,ro]`.
    pub fn disk(mut self, path: &Path, read_only: bool) -> Self {
        self.disks.push((path.to_path_buf(), read_only));
        self
    }

    /// Sets `--net`.
    pub fn net(mut self, spec: &str) -> Self {
        self.net = Some(spec.to_string());
        self
    }

    /// Sets `--vsock cid=N,socket=PATH`.
    pub fn vsock(mut self, cid: u32, socket: &Path) -> Self {
        self.vsock = Some((cid, socket.to_path_buf()));
        self
    }

    /// Adds `--rng`.
    pub fn rng(mut self) -> Self {
        self.rng = true;
        self
    }

    /// Appends raw arguments.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_string());
        self
    }

    /// Runs the VMM inside network namespace `ns`.
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Sets the kill deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The arguments after the binary name, starting with `run`.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["run".to_string()];
        let mut push = |flag: &str, value: String| {
            args.push(flag.to_string());
            args.push(value);
        };
        if let Some(config) = &self.config {
            push("--config", config.display().to_string());
        }
        if let Some(kernel) = &self.kernel {
            push("--kernel", kernel.display().to_string());
        }
        if let Some(initrd) = &self.initrd {
            push("--initrd", initrd.display().to_string());
        }
        if let Some(cmdline) = &self.cmdline {
            push("--cmdline", cmdline.clone());
        }
        if let Some(memory) = &self.memory {
            push("--memory", memory.clone());
        }
        if let Some(vcpus) = self.vcpus {
            push("--vcpus", vcpus.to_string());
        }
        for (path, ro) in &self.disks {
            let ro = if *ro { ",ro" } else { "" };
            push("--disk", format!("{}{ro}", path.display()));
        }
        if let Some(net) = &self.net {
            push("--net", net.clone());
        }
        if let Some((cid, socket)) = &self.vsock {
            push("--vsock", format!("cid={cid},socket={}", socket.display()));
        }
        if let Some(serial) = &self.serial {
            push("--serial", serial.clone());
        }
        if self.rng {
            args.push("--rng".to_string());
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The process to spawn (wrapped in `ip netns exec` when a namespace is set).
    pub fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&self.bin);
                cmd
            }
            None => Command::new(&self.bin),
        };
        cmd.args(self.args());
        cmd
    }

    /// Starts the VMM.
    pub fn spawn(&self) -> RunningVm {
        RunningVm::spawn(self.command(), self.timeout)
    }

    /// Starts the VMM and waits for it to exit (or the deadline).
    pub fn run(&self) -> Outcome {
        self.spawn().wait()
    }
}

/// A serial line and when it arrived, counted from the process start.
pub type TimedLine = (Duration, String);

/// A running VMM whose stdout (the serial console) and stderr are being collected.
///
/// Dropping it kills the process if it is still running.
pub struct RunningVm {
    child: Child,
    started: Instant,
    deadline: Instant,
    rx: Receiver<TimedLine>,
    seen: Vec<TimedLine>,
    stdout_thread: Option<JoinHandle<()>>,
    stderr_thread: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
    description: String,
}

impl RunningVm {
    /// Spawns `cmd` with piped stdout/stderr; it is killed after `timeout`.
    pub fn spawn(mut cmd: Command, timeout: Duration) -> RunningVm {
        let description = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {description}: {e}"));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stdout_thread = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send((started.elapsed(), line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stderr_pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut s) = sink.lock() {
                            s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                }
            }
        });
        RunningVm {
            child,
            started,
            deadline: started + timeout,
            rx,
            seen: Vec::new(),
            stdout_thread: Some(stdout_thread),
            stderr_thread: Some(stderr_thread),
            stderr,
            description,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (it has not exited, or been reaped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// When the process was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits up to `timeout` (and never past the kill deadline) for a serial line matching
    /// `pred`; returns it with its arrival time. `None` if it did not come or the VMM exited.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<TimedLine> {
        let until = (Instant::now() + timeout).min(self.deadline);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line.1) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Serial lines seen so far (only those already consumed by [`Self::wait_for_line`]
    /// or [`Self::drain`]).
    pub fn seen(&self) -> &[TimedLine] {
        &self.seen
    }

    /// Takes every line that has arrived, without waiting; returns all lines seen so far
    /// as text, for failure messages.
    pub fn drain(&mut self) -> String {
        self.seen.extend(self.rx.try_iter());
        let mut out = String::new();
        for (_, line) in &self.seen {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sends a signal to the VMM.
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits for the exit, killing the VMM at the deadline; collects everything it printed.
    pub fn wait(self) -> Outcome {
        let deadline = self.deadline;
        self.wait_until(deadline)
    }

    /// Like [`Self::wait`] but gives up (and kills) after `timeout` from now.
    pub fn wait_for(self, timeout: Duration) -> Outcome {
        let until = (Instant::now() + timeout).min(self.deadline);
        self.wait_until(until)
    }

    fn wait_until(mut self, until: Instant) -> Outcome {
        let mut timed_out = false;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= until => {
                    timed_out = true;
                    break self.kill_and_reap();
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("waiting for {}: {e}", self.description),
            }
        };
        let elapsed = self.started.elapsed();
        // A process the VMM left behind may hold the pipes open: wait for the readers only
        // briefly, and keep what they have delivered.
        let readers_done = Instant::now() + READER_GRACE;
        for handle in [self.stdout_thread.take(), self.stderr_thread.take()]
            .into_iter()
            .flatten()
        {
            while !handle.is_finished() && Instant::now() < readers_done {
                std::thread::sleep(Duration::from_millis(10));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        let mut lines = std::mem::take(&mut self.seen);
        lines.extend(self.rx.try_iter());
        Outcome {
            status,
            timed_out,
            elapsed,
            lines,
            stderr: self.stderr_so_far(),
            description: self.description.clone(),
        }
    }

    /// SIGKILL, then reap within [`KILL_GRACE`]. A process that does not die (stuck in the
    /// kernel) fails the caller with its state and kernel stacks instead of blocking it.
    fn kill_and_reap(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        let until = Instant::now() + KILL_GRACE;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) | Err(_) => panic!(
                    "{} did not die within {KILL_GRACE:?} of SIGKILL:\n{}",
                    self.description,
                    process_state(self.child.id())
                ),
            }
        }
    }
}

/// How long a killed VMM has to die before the harness reports it stuck.
const KILL_GRACE: Duration = Duration::from_secs(30);
/// How long the output readers get to see the end of a dead VMM's pipes.
const READER_GRACE: Duration = Duration::from_secs(5);

/// Each thread's state, wait channel and kernel stack, from /proc (for a stuck process).
fn process_state(pid: u32) -> String {
    let mut out = String::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    for task in tasks.into_iter().flatten().flatten() {
        let path = task.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_string();
        out.push_str(&format!(
            "thread {} ({}) {state} wchan={}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        ));
    }
    out
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            // Reap it if it dies soon; never block a test (or its unwinding) on it.
            let until = Instant::now() + KILL_GRACE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// How a VMM run ended and what it printed.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The exit status.
    pub status: ExitStatus,
    /// The harness killed it at the deadline.
    pub timed_out: bool,
    /// Time from spawn to exit.
    pub elapsed: Duration,
    /// Serial (stdout) lines with their arrival times.
    pub lines: Vec<TimedLine>,
    /// Everything on stderr.
    pub stderr: String,
    /// The command line, for messages.
    pub description: String,
}

impl Outcome {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The serial lines.
    pub fn serial(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|(_, l)| l.as_str())
    }

    /// The parsed `PROBE` lines.
    pub fn probe(&self) -> ProbeReport {
        ProbeReport::from_lines(self.serial())
    }

    /// Non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Whether stderr shows a Rust panic.
    pub fn panicked(&self) -> bool {
        self.stderr.contains("panicked") || self.stderr.contains("RUST_BACKTRACE")
    }

    /// A full account of the run for assertion messages.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "command: {}\nstatus: {}{} after {:?}\n--- serial ---\n",
            self.description,
            self.status,
            if self.timed_out {
                " (KILLED at the deadline)"
            } else {
                ""
            },
            self.elapsed
        );
        for (_, line) in &self.lines {
            s.push_str(line);
            s.push('\n');
        }
        s.push_str("--- stderr ---\n");
        s.push_str(&self.stderr);
        s
    }

    /// Asserts the guest ran to `PROBE done ok` and the VMM exited 0.
    pub fn assert_clean_pass(&self) -> ProbeReport {
        let report = self.probe();
        assert!(
            !self.timed_out,
            "VMM did not exit in time\n{}",
            self.describe()
        );
        assert!(!self.panicked(), "VMM panicked\n{}", self.describe());
        assert!(report.done_ok(), "no `PROBE done ok`\n{}", self.describe());
        assert_eq!(self.code(), Some(0), "exit status\n{}", self.describe());
        report
    }
}
