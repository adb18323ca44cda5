//! Helpers for the `pocketvisor export`/`import`/`keygen` tests: handset daemons over scratch
//! state directories, CLI runs, and snapshots of a state directory's contents.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

// Not every test binary uses every re-export.
use crate::common::probe_elf;
#[allow(unused_imports)]
pub use crate::common::{bin, counters, wait_for, Scratch};

/// Scratch directories' prefix.
pub const SCRATCH: &str = "pv-porttest";

/// The passphrase the tests export with.
pub const PASSPHRASE: &str = "correct horse battery staple";

/// Writes a line past libtest's capture.
pub fn loud(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The probe guest (built if missing), or None after a loud SKIP line when VMs cannot run.
pub fn probe(test: &str) -> Option<PathBuf> {
    let kvm = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if kvm.is_err() {
        loud(&format!("SKIP {test}: /dev/kvm is not usable"));
        return None;
    }
    match probe_elf(true) {
        Ok(elf) => Some(elf),
        Err(why) => {
            loud(&format!("SKIP {test}: {why}"));
            None
        }
    }
}

/// A `pocketvisor handset` daemon; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    /// Its state directory.
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon on `dir` and waits until its API answers.
    pub fn start(dir: &Path, probe: Option<&Path>) -> Daemon {
        Self::start_env(dir, probe, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_env(dir: &Path, probe: Option<&Path>, env: &[(&str, &str)]) -> Daemon {
        Self::start_with(dir, probe, env, &[])
    }

    /// [`Daemon::start`] with extra environment variables and `handset` flags.
    pub fn start_with(
        dir: &Path,
        probe: Option<&Path>,
        env: &[(&str, &str)],
        flags: &[&str],
    ) -> Daemon {
        // Unique per daemon: tests run in parallel and several name their state dir alike, and
        // a daemon removes its cgroup parent when it stops.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let cgroup = format!(
            "pv-porttest-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            dir.file_name().unwrap().to_string_lossy()
        );
        let mut cmd = Command::new(bin());
        cmd.arg("handset").arg("--state-dir").arg(dir);
        // A test that restarts a daemon over running VMMs names the group itself.
        if !flags.contains(&"--cgroup-parent") {
            cmd.args(["--cgroup-parent", &cgroup]);
        }
        cmd.args(flags).stdout(Stdio::null()).stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(p) = probe {
            cmd.arg("--probe").arg(p);
        }
        let child = cmd.spawn().expect("start the handset daemon");
        let d = Daemon {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let sock = dir.join("handset.sock");
        let t0 = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the daemon on {} does not answer",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket exists before the daemon has settled the state directory (recovery);
        // a request is answered only after it.
        assert_ok(
            &run(
                &["profile", "--state-dir", dir.to_str().unwrap(), "status"],
                &[],
            ),
            "profile status",
        );
        d
    }

    /// Runs `pocketvisor profile --state-dir DIR ARGS...`, asserting success; its stdout.
    pub fn profile(&self, args: &[&str]) -> String {
        let mut all = vec!["profile", "--state-dir", self.dir.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = run(&all, &[]);
        assert_ok(&out, &format!("profile {args:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills the daemon (kill -9: its VMMs, in process groups of their own, run on) and
    /// waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the daemon (and with it the VMs) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child; no memory involved.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `pocketvisor ARGS...` with extra environment variables (POCKETVISOR_PASSPHRASE and
/// POCKETVISOR_KDF are cleared unless given).
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("POCKETVISOR_PASSPHRASE")
        .env_remove("POCKETVISOR_KDF")
        .env_remove("POCKETVISOR_STATE_DIR")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pocketvisor")
}

/// Asserts that a run succeeded, showing its output otherwise.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that a run failed with exactly one error line containing `needle`.
pub fn assert_one_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded, stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one error line: {err}");
    assert!(lines[0].starts_with("pocketvisor: error: "), "{err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "{needle:?} not in {err}"
    );
}

/// Writes the passphrase file and returns its path.
pub fn passphrase_file(s: &Scratch, name: &str, text: &str) -> PathBuf {
    let p = s.path(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    p
}

/// Fills parts of a (sparse) disk image with recognisable data, leaving holes.
pub fn scribble(disk: &Path, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let mut x = seed | 1;
    let mut block = vec![0u8; 256 * 1024];
    for off in [0u64, 3 << 20, 17 << 20, 40 << 20] {
        for b in block.iter_mut() {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[0];
        }
        f.write_all_at(&block, off).unwrap();
    }
    f.write_all_at(b"the end", (64 << 20) - 7).unwrap();
    f.sync_all().unwrap();
}

/// Every file under `root` (relative path -> contents), skipping `handset.db*`.
pub fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(list) = std::fs::read_dir(dir) else {
            return;
        };
        for e in list.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel.starts_with("handset.db") || rel.starts_with("handset.sock") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The profile rows of a state directory: (name, state).
pub fn rows(dir: &Path) -> Vec<(String, String)> {
    let db = dir.join("handset.db");
    if !db.exists() {
        return Vec::new();
    }
    handset::db::Db::open(&db)
        .unwrap()
        .profiles()
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.state))
        .collect()
}

/// Files under `dir` whose content equals those under `other` (both must exist).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    x.len() == y.len() && x == y
}

/// Runs `pocketvisor ARGS --json` and kills it (SIGKILL) at its first progress event with
/// some bytes done; returns whether it was killed before finishing.
pub fn kill_midway(args: &[&str], env: &[(&str, &str)]) -> bool {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .arg("--json")
        .env_remove("POCKETVISOR_PASSPHRASE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut killed = false;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let (done, total) = (v["bytes_done"].as_u64(), v["bytes_total"].as_u64());
        if v["event"] == "progress" && done > Some(0) && done < total {
            child.kill().unwrap();
            killed = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    killed && !status.success()
}
