//! The nested-virtualization harness: run commands on a real, hardware-style KVM.
//!
//! The build machines' `/dev/kvm` is `kvm_pvm`, which cannot run a stock Linux kernel. QEMU's
//! TCG emulator emulates AMD SVM with nested paging, so a Debian kernel booted under
//! `qemu-system-x86_64 -accel tcg -cpu max` (the "L1" machine) can load `kvm_amd` and offer a
//! real `/dev/kvm`. [`run_in_l1`] boots L1 (assets from `tests/nested/build-l1.sh`, cached in
//! `guest/out/nested`), shares the host's root read-only and a job directory writable over
//! virtio-9p, runs a shell script chrooted in the host's root (so the host's binaries run
//! unchanged), and returns its output and exit status. Everything is bounded by a timeout.
//!
//! Environment: `NESTED_OUT` (asset and job directory), `NESTED_TIMEOUT` (seconds, default
//! 1500), `NESTED_MEM` (default 3G), `NESTED_SMP` (default 2), `NESTED_CPU` (default `max`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::qemu::QemuCommand;
use crate::vm::{Outcome, RunningVm};

/// Where the L1 assets and job directories live.
pub fn nested_dir() -> PathBuf {
    std::env::var_os("NESTED_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("guest/out/nested"))
}

/// The L1 kernel and initramfs, built by `tests/nested/build-l1.sh` when missing or built
/// from another version of that script or of `tests/nested/l1-init`.
pub fn l1_assets() -> Result<(PathBuf, PathBuf), String> {
    let dir = nested_dir();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    let sources = crate::workspace_root().join("tests/nested");
    let mut inputs = Vec::new();
    for name in ["build-l1.sh", "l1-init"] {
        let path = sources.join(name);
        inputs.extend(std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?);
    }
    let current = std::fs::read(dir.join("inputs")).is_ok_and(|built| built == inputs);
    if !(current && kernel.is_file() && initrd.is_file()) {
        let script = sources.join("build-l1.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env("NESTED_OUT", &dir)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok((kernel, initrd))
}

/// How a job in L1 ended.
#[derive(Debug)]
pub struct L1Run {
    /// The job directory on the host (kept for inspection).
    pub dir: PathBuf,
    /// The job script's exit status; `None` when L1 never reported one.
    pub rc: Option<i32>,
    /// The job's stdout and stderr, as written inside L1.
    pub output: String,
    /// L1's kernel log after the job.
    pub l1_dmesg: String,
    /// QEMU's run: the L1 console in `lines`, QEMU's own messages in `stderr`.
    pub qemu: Outcome,
    /// L1's uptime when the job started (its boot time), from the console.
    pub l1_boot: Option<Duration>,
}

impl L1Run {
    /// A full account for assertion messages.
    pub fn describe(&self) -> String {
        let tail: Vec<&str> = self.qemu.serial().collect();
        let tail = tail[tail.len().saturating_sub(40)..].join("\n");
        format!(
            "L1 job {} rc={:?} after {:?}{}\n--- L1 console (last 40 lines) ---\n{tail}\n--- QEMU stderr ---\n{}",
            self.dir.display(),
            self.rc,
            self.qemu.elapsed,
            if self.qemu.timed_out { " (KILLED at the deadline)" } else { "" },
            self.qemu.stderr
        )
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The L1 deadline: `NESTED_TIMEOUT` seconds, default 1500.
pub fn l1_timeout() -> Duration {
    Duration::from_secs(
        std::env::var("NESTED_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1500),
    )
}

/// Runs `script` (POSIX sh) in L1 and waits for it. `Err` says why L1 could not be started
/// (no QEMU, the assets cannot be built); a job that fails or hangs is an `Ok` with its
/// status (`rc` is `None` when L1 was killed or crashed).
pub fn run_in_l1(script: &str, timeout: Duration) -> Result<L1Run, String> {
    let qemu = QemuCommand::find_binary().ok_or("qemu-system-x86_64 is not installed")?;
    let (kernel, initrd) = l1_assets()?;
    let runs = nested_dir().join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| format!("create {}: {e}", runs.display()))?;
    let dir = runs.join(crate::host::unique_name("job"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("write job {name}: {e}"))
    };
    write("path", &format!("{}\n", dir.display()))?;
    write("run", script)?;

    let share = |path: &Path, tag: &str, ro: bool| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg,thread=multi", "-cpu"])
        .arg(env_or("NESTED_CPU", "max"))
        .arg("-m")
        .arg(env_or("NESTED_MEM", "3G"))
        .arg("-smp")
        .arg(env_or("NESTED_SMP", "2"))
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off",
        ])
        .arg("-virtfs")
        .arg(share(Path::new("/"), "host", true))
        .arg("-virtfs")
        .arg(share(&dir, "job", false));
    let outcome = RunningVm::spawn(cmd, timeout).wait();

    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let rc = read("rc").trim().parse().ok();
    let l1_boot = outcome
        .serial()
        .find_map(|l| l.split("NESTED-L1 ready uptime=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64);
    Ok(L1Run {
        rc: if outcome.timed_out { None } else { rc },
        output: read("output.log"),
        l1_dmesg: read("l1-dmesg.txt"),
        qemu: outcome,
        l1_boot,
        dir,
    })
}
