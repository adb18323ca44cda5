//! Helpers for the handset tests: a daemon in a temporary state directory, run as a
//! `pocketvisor handset` subprocess (the binary must be built: `cargo build -p pocketvisor`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use handset::client::{Client, ClientError};
use handset::{CreateProfile, ProfileInfo, ProfileSpec};

/// Writes one line to the real stderr, past libtest's capture.
pub fn loud(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The `pocketvisor` binary ($POCKETVISOR_BIN, else target/debug/pocketvisor).
pub fn pv_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("POCKETVISOR_BIN") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("debug/pocketvisor")
}

/// Whether VMs can run here; prints a loud SKIP line when not.
pub fn can_run_vms(test: &str) -> bool {
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        loud(&format!("SKIP (no usable /dev/kvm): {test}"));
        return false;
    }
    true
}

/// A daemon subprocess over a temporary state directory.
pub struct Daemon {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub child: Option<Child>,
    pub cgroup_parent: String,
    pub extra_args: Vec<String>,
    /// Extra environment of the daemon (and so of its VMMs).
    pub env: Vec<(String, String)>,
}

fn unique(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "pvtest-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    )
}

impl Daemon {
    /// Starts a daemon on a new temporary state directory.
    pub fn start(tag: &str) -> Daemon {
        Self::start_with(tag, &[])
    }

    /// A daemon on the existing (empty) state directory `dir`, which the caller removes.
    pub fn start_in(tag: &str, dir: &Path) -> Daemon {
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            _tmp: None,
            child: None,
            cgroup_parent: unique(tag),
            extra_args: vec![],
            env: vec![],
        };
        d.spawn();
        d
    }

    /// [`Daemon::start`] with more `pocketvisor handset` arguments.
    pub fn start_with(tag: &str, extra_args: &[&str]) -> Daemon {
        let bin = pv_bin();
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build -p pocketvisor` first",
            bin.display()
        );
        let tmp = tempfile::Builder::new()
            .prefix("pv-handset-")
            .tempdir()
            .unwrap();
        let mut d = Daemon {
            dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
            child: None,
            cgroup_parent: unique(tag),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: vec![],
        };
        d.spawn();
        d
    }

    /// [`Daemon::start`] with extra environment variables for the daemon and its VMMs.
    pub fn start_env(tag: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Self::start(tag);
        d.kill9();
        d.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        d.spawn();
        d
    }

    /// (Re)starts the daemon process on this state directory and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(pv_bin())
            .args(["handset", "--state-dir"])
            .arg(&self.dir)
            .args(["--cgroup-parent", &self.cgroup_parent])
            .args(&self.extra_args)
            .env("POCKETVISOR_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            match self.client().raw("GET", "/v1/handset", None) {
                Ok(a) if a.status == 200 => return,
                _ if t0.elapsed() > Duration::from_secs(20) => {
                    panic!("daemon did not answer: {}", self.log())
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// A client for the daemon's socket.
    pub fn client(&self) -> Client {
        Client::new(&self.dir.join("handset.sock"))
    }

    /// Kills the daemon with SIGKILL (its VMMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait: the daemon stops its VMs and exits.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon not running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// Runs `pocketvisor profile --state-dir DIR ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(pv_bin())
            .arg("profile")
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap()
    }

    /// The names of all profiles.
    pub fn show_all_names(&self) -> Vec<String> {
        let list: Vec<ProfileInfo> = self
            .client()
            .call("GET", "/v1/profiles", None::<&()>)
            .unwrap();
        list.into_iter().map(|p| p.name).collect()
    }

    /// Creates a probe profile in counter mode with `memory_mib`.
    pub fn create_probe(&self, name: &str, memory_mib: u64, extra: &str) -> ProfileInfo {
        let text = format!(
            "name = \"{name}\"\nkernel = \"probe\"\ncmdline = \"pv.mode=counter pv.counter.ms=20\"\n\
             memory_mib = {memory_mib}\ndisks = [{{ name = \"data\", size_mib = 8 }}]\n{extra}"
        );
        let spec = ProfileSpec::from_toml(&text).unwrap();
        let req = CreateProfile {
            spec: Some(spec),
            ..Default::default()
        };
        self.client()
            .call("POST", "/v1/profiles", Some(&req))
            .unwrap()
    }

    /// POST /v1/profiles/NAME/ACTION.
    pub fn act(&self, name: &str, action: &str) -> Result<ProfileInfo, ClientError> {
        self.client().call(
            "POST",
            &format!("/v1/profiles/{name}/{action}"),
            None::<&()>,
        )
    }

    /// GET /v1/profiles/NAME.
    pub fn show(&self, name: &str) -> ProfileInfo {
        self.client()
            .call("GET", &format!("/v1/profiles/{name}"), None::<&()>)
            .unwrap()
    }

    /// The event names of a profile.
    pub fn events(&self, name: &str) -> Vec<String> {
        let list: Vec<handset::Event> = self
            .client()
            .call(
                "GET",
                &format!("/v1/profiles/{name}/events?limit=1000"),
                None::<&()>,
            )
            .unwrap();
        list.into_iter().map(|e| e.event).collect()
    }

    /// The profile's serial log.
    pub fn serial(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("profiles/{name}/run/serial.log")))
            .unwrap_or_default()
    }

    /// The cgroup weight file of a profile, if cgroups are in use.
    pub fn weight_file(&self, name: &str) -> Option<PathBuf> {
        let info: handset::DaemonInfo = self
            .client()
            .call("GET", "/v1/handset", None::<&()>)
            .unwrap();
        match info.cgroups.mode.as_str() {
            "v2" => Some(Path::new(&info.cgroups.path?).join(name).join("cpu.weight")),
            "v1" => Some(Path::new(&info.cgroups.path?).join(name).join("cpu.shares")),
            _ => None,
        }
    }

    /// Processes (not zombies) whose command line mentions this state directory.
    pub fn our_processes(&self) -> Vec<i32> {
        let dir = self.dir.to_string_lossy().into_owned();
        let daemon = self.child.as_ref().map(|c| c.id() as i32);
        let mut out = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if Some(pid) == daemon {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            if !zombie && String::from_utf8_lossy(&cmd).contains(&dir) {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.our_processes() {
            // SAFETY: kill(2) on a leftover VMM of this test's state directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for root in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
        ] {
            let p = Path::new(root).join(&self.cgroup_parent);
            if let Ok(rd) = std::fs::read_dir(&p) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
                let _ = std::fs::remove_dir(&p);
            }
        }
    }
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes; whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// The last `PROBE counter N` value in a serial log.
pub fn last_counter(serial: &str) -> Option<u64> {
    serial
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix("PROBE counter "))
        .and_then(|n| n.trim().parse().ok())
}
