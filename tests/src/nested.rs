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
//! [`run_in_l1_on`] with [`L1Arch::Aarch64`] does the same on an emulated arm64 machine:
//! `qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on`, whose
//! Debian kernel has KVM built in (EL2 emulated by TCG). Its L1 runs aarch64 code, so it cannot
//! chroot into the host's root: it shares the checkout read-only (the
//! `aarch64-unknown-linux-musl` builds in it) and runs the script with its own busybox.
//!
//! Environment: `NESTED_OUT` (asset and job directory), `NESTED_TIMEOUT` (seconds, default
//! 1500), `NESTED_MEM` (default 3G), `NESTED_SMP` (default 2), `NESTED_CPU` (default `max`),
//! `NESTED_QEMU` (the x86_64 QEMU binary, default from `$PATH`), `NESTED_TCG_THREAD` (default
//! `multi`);
//! for arm64 `NESTED_ARM64_OUT`, `NESTED_ARM64_MEM` (default 2G), `NESTED_ARM64_SMP` (default
//! 2) and `NESTED_ARM64_KVM_MODE` (`kvm-arm.mode`: `nvhe`, `protected`; default: KVM's choice).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::vm::{Outcome, RunningVm};

/// The architecture of the L1 machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Arch {
    /// `qemu-system-x86_64 -cpu max`: AMD SVM with nested paging, `kvm_amd`.
    X86_64,
    /// `qemu-system-aarch64 -M virt,virtualization=on`: EL2, KVM built into the kernel.
    Aarch64,
}

impl L1Arch {
    /// The QEMU binary that emulates this machine.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            L1Arch::X86_64 => "qemu-system-x86_64",
            L1Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// Debian's name of the architecture (`NESTED_ARCH` of `build-l1.sh`).
    fn debian_name(self) -> &'static str {
        match self {
            L1Arch::X86_64 => "amd64",
            L1Arch::Aarch64 => "arm64",
        }
    }

    /// The files in `tests/nested` the assets are built from (after `build-l1.sh`): L1's
    /// `/init`, and for arm64 the guest's.
    fn init_scripts(self) -> &'static [&'static str] {
        match self {
            L1Arch::X86_64 => &["l1-init"],
            L1Arch::Aarch64 => &["l1-init-arm64", "guest-init-arm64"],
        }
    }
}

/// Where the x86_64 L1 assets and job directories live.
pub fn nested_dir() -> PathBuf {
    nested_dir_of(L1Arch::X86_64)
}

/// Where the L1 assets and job directories of `arch` live (`NESTED_OUT`, `NESTED_ARM64_OUT`).
pub fn nested_dir_of(arch: L1Arch) -> PathBuf {
    let (var, default) = match arch {
        L1Arch::X86_64 => ("NESTED_OUT", "guest/out/nested"),
        L1Arch::Aarch64 => ("NESTED_ARM64_OUT", "guest/out/nested-arm64"),
    };
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join(default))
}

/// The x86_64 L1 kernel and initramfs ([`l1_assets_of`]).
pub fn l1_assets() -> Result<(PathBuf, PathBuf), String> {
    l1_assets_of(L1Arch::X86_64)
}

/// The L1 kernel and initramfs of `arch`, built by `tests/nested/build-l1.sh` when missing or
/// built from another version of that script or of L1's init.
pub fn l1_assets_of(arch: L1Arch) -> Result<(PathBuf, PathBuf), String> {
    // Tests in one process may ask at once: one of them checks and builds, the others wait.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = nested_dir_of(arch);
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    let sources = crate::workspace_root().join("tests/nested");
    let mut inputs = Vec::new();
    for name in std::iter::once(&"build-l1.sh").chain(arch.init_scripts()) {
        let path = sources.join(name);
        inputs.extend(std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?);
    }
    let current = std::fs::read(dir.join("inputs")).is_ok_and(|built| built == inputs);
    if !(current && kernel.is_file() && initrd.is_file()) {
        let script = sources.join("build-l1.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env("NESTED_OUT", &dir)
            .env("NESTED_ARCH", arch.debian_name())
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
    /// What L1's init found out about KVM before the job (`l1-info.txt`).
    pub l1_info: String,
    /// QEMU's run: the L1 console in `lines`, QEMU's own messages in `stderr`.
    pub qemu: Outcome,
    /// L1's uptime when the job started (its boot time), from the console.
    pub l1_boot: Option<Duration>,
    /// L1 was killed because its console stayed silent longer than the stall limit given to
    /// [`run_in_l1_watched`] (a hung job, or a hung L1), or its heartbeat stopped.
    pub stalled: bool,
    /// Why L1 was killed before its job ended (`stalled`): which silence, and for how long.
    pub hang: Option<String>,
    /// L1's own kernel crashed (an oops, a BUG, an RCU stall or a panic on its console, which
    /// the arm64 L1 keeps for its kernel alone): the first such line and what followed it.
    pub l1_crash: Option<String>,
}

impl L1Run {
    /// A full account for assertion messages.
    pub fn describe(&self) -> String {
        let tail: Vec<&str> = self.qemu.serial().collect();
        let tail = tail[tail.len().saturating_sub(40)..].join("\n");
        let crash = match &self.l1_crash {
            Some(text) => format!("\n--- L1's kernel crashed: ---\n{text}"),
            None => String::new(),
        };
        format!(
            "L1 job {} rc={:?} after {:?}{}{crash}\n--- L1 console (last 40 lines) ---\n{tail}\n--- QEMU stderr ---\n{}",
            self.dir.display(),
            self.rc,
            self.qemu.elapsed,
            match &self.hang {
                Some(why) => format!(" (KILLED: {why}; see hang.txt and l1-live.txt there)"),
                None if self.qemu.timed_out => " (KILLED at the deadline)".to_string(),
                None => String::new(),
            },
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

/// Runs `script` (POSIX sh) in the x86_64 L1 and waits for it ([`run_in_l1_on`]).
pub fn run_in_l1(script: &str, timeout: Duration) -> Result<L1Run, String> {
    run_in_l1_on(L1Arch::X86_64, script, timeout)
}

/// Runs `script` (POSIX sh) in an L1 machine of `arch` and waits for it. `Err` says why L1
/// could not be started (no QEMU: the message says "not installed"; the assets cannot be
/// built); a job that fails or hangs is an `Ok` with its status (`rc` is `None` when L1 was
/// killed or crashed).
pub fn run_in_l1_on(arch: L1Arch, script: &str, timeout: Duration) -> Result<L1Run, String> {
    run_in_l1_watched(arch, script, timeout, None)
}

/// [`run_in_l1_on`] with `kernel_args` added to L1's kernel command line (for arm64
/// `kvm-arm.mode=protected` runs KVM as Android's pKVM does).
pub fn run_in_l1_with(
    arch: L1Arch,
    script: &str,
    timeout: Duration,
    kernel_args: &str,
) -> Result<L1Run, String> {
    launch(arch, script, timeout, None, kernel_args)
}

/// Like [`run_in_l1_on`], and when `stall` is given, L1 is also killed as soon as its console
/// prints no line for that long (then `stalled` is set): a job that reports each step on the
/// console (libtest prints a line as each test ends) bounds every step, even when L1 itself
/// hangs and nothing inside it can end the step.
pub fn run_in_l1_watched(
    arch: L1Arch,
    script: &str,
    timeout: Duration,
    stall: Option<Duration>,
) -> Result<L1Run, String> {
    launch(arch, script, timeout, stall, "")
}

/// Boots L1 for `script` with `kernel_args` on its kernel command line ([`run_in_l1_watched`]).
fn launch(
    arch: L1Arch,
    script: &str,
    timeout: Duration,
    stall: Option<Duration>,
    kernel_args: &str,
) -> Result<L1Run, String> {
    let qemu = match (arch, std::env::var_os("NESTED_QEMU")) {
        (L1Arch::X86_64, Some(path)) => PathBuf::from(path),
        _ => crate::host::which(arch.qemu_binary())
            .ok_or_else(|| format!("{} is not installed", arch.qemu_binary()))?,
    };
    let (kernel, initrd) = l1_assets_of(arch)?;
    let runs = nested_dir_of(arch).join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| format!("create {}: {e}", runs.display()))?;
    let dir = runs.join(crate::host::unique_name("job"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("write job {name}: {e}"))
    };
    write("path", &format!("{}\n", dir.display()))?;
    write("repo", &format!("{}\n", crate::workspace_root().display()))?;
    write("run", script)?;

    let share = |path: &Path, tag: &str, ro: bool| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let mut cmd = Command::new(qemu);
    match arch {
        L1Arch::X86_64 => {
            cmd.arg("-accel")
                .arg(format!(
                    "tcg,thread={}",
                    env_or("NESTED_TCG_THREAD", "multi")
                ))
                .arg("-cpu")
                .arg(env_or("NESTED_CPU", "max"))
                .arg("-m")
                .arg(env_or("NESTED_MEM", "3G"))
                .arg("-smp")
                .arg(env_or("NESTED_SMP", "2"))
                .arg("-append")
                // no_timer_check: under TCG on a loaded host L1's kernel can miss the 8254
                // timer interrupts its IO-APIC check counts, and panics ("IO-APIC + timer
                // doesn't work!"); seen at load 5.
                .arg(format!(
                    "console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off no_timer_check \
                     {kernel_args}"
                ))
                .arg("-virtfs")
                .arg(share(Path::new("/"), "host", true));
        }
        L1Arch::Aarch64 => {
            // pauth-impdef=on: QEMU's cheap pointer-authentication algorithm (the default
            // one makes L1 about 3x slower).
            let mut append = format!("console=ttyAMA0 quiet loglevel=3 panic=-1 {kernel_args}");
            if let Ok(mode) = std::env::var("NESTED_ARM64_KVM_MODE") {
                append.push_str(&format!(" kvm-arm.mode={mode}"));
            }
            cmd.args(["-M", "virt,virtualization=on,gic-version=3"])
                .args(["-cpu", "max,pauth-impdef=on", "-accel", "tcg,thread=multi"])
                .arg("-m")
                .arg(env_or("NESTED_ARM64_MEM", "2G"))
                .arg("-smp")
                .arg(env_or("NESTED_ARM64_SMP", "2"))
                .arg("-append")
                .arg(append)
                .arg("-virtfs")
                .arg(share(&crate::workspace_root(), "repo", true));
        }
    }
    let monitor = crate::l1_watch::monitor_socket();
    cmd.args(["-display", "none", "-serial", "stdio", "-monitor"])
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .args(["-no-reboot", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-virtfs")
        .arg(share(&dir, "job", false));
    let mut vm = RunningVm::spawn(cmd, timeout);
    // The arm64 L1's console carries its kernel's messages alone (its /init prefixes the job's
    // lines), so a crash of L1's kernel can be told from a job that prints a guest's log.
    let crashes = arch == L1Arch::Aarch64;
    let mut crash = None;
    let hang = (stall.is_some() || crashes)
        .then(|| watch(&mut vm, &dir, stall, timeout, crashes.then_some(&mut crash)))
        .flatten();
    if let Some(why) = &hang {
        crate::l1_watch::write_hang_report(&dir, why, vm.pid(), &monitor);
    }
    let outcome = if hang.is_some() {
        vm.wait_for(Duration::ZERO)
    } else {
        vm.wait()
    };
    let _ = std::fs::remove_file(&monitor);
    // L1's console, kept with the job (a hung L1's last words are there and in l1-live.txt).
    let console: Vec<&str> = outcome.serial().collect();
    let _ = std::fs::write(dir.join("console.log"), console.join("\n") + "\n");

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
        stalled: hang.is_some(),
        hang,
        l1_crash: crash.map(|c: CrashLog| c.lines.join("\n")),
        output: read("output.log"),
        l1_dmesg: read("l1-dmesg.txt"),
        l1_info: read("l1-info.txt"),
        qemu: outcome,
        l1_boot,
        dir,
    })
}

/// How long a crashed L1 kernel may go on before L1 is killed: long enough for its job to end
/// by itself (a crash in another task), short against the deadline of a job it has wedged.
const CRASH_GRACE: Duration = Duration::from_secs(60);

/// The lines of a crash of L1's kernel, from its first line on.
struct CrashLog {
    lines: Vec<String>,
    since: Instant,
}

/// Whether a console line is L1's kernel reporting that it crashed or wedged: a timestamped
/// kernel line with an oops, a BUG, an RCU stall, a lockup or a panic.
fn is_kernel_crash(line: &str) -> bool {
    const SIGNS: [&str; 7] = [
        "Internal error:",
        "Unable to handle kernel",
        "Kernel panic",
        "BUG:",
        "rcu: INFO:",
        "soft lockup",
        "hard LOCKUP",
    ];
    line.trim_start().starts_with('[') && SIGNS.iter().any(|sign| line.contains(sign))
}

/// Watches a running L1 until its job ends; returns why L1 must be killed first, if it must:
/// its console printed no line for `stall` (a check over its budget, or L1 hung before its
/// heartbeat began), its heartbeat stood still for [`crate::l1_watch::heartbeat_limit`]
/// (L1 itself stopped), or (when `crash` is given, which collects the crash's lines) L1's
/// kernel crashed and the job had not ended [`CRASH_GRACE`] later.
fn watch(
    vm: &mut RunningVm,
    dir: &Path,
    stall: Option<Duration>,
    timeout: Duration,
    mut crash: Option<&mut Option<CrashLog>>,
) -> Option<String> {
    let limit = crate::l1_watch::heartbeat_limit();
    let mut heartbeat = crate::l1_watch::Heartbeat::new(dir);
    let mut last_line = Instant::now();
    loop {
        if let Some((_, line)) = vm.wait_for_line(Duration::from_secs(5), |_| true) {
            last_line = Instant::now();
            if let Some(crash) = crash.as_deref_mut() {
                match crash {
                    Some(log) if log.lines.len() < 60 => log.lines.push(line),
                    Some(_) => {}
                    None if is_kernel_crash(&line) => {
                        *crash = Some(CrashLog {
                            lines: vec![line],
                            since: Instant::now(),
                        })
                    }
                    None => {}
                }
            }
        } else if !vm.is_running() || Instant::now() >= vm.started() + timeout {
            return None;
        } else {
            // No line in 5 s, or a console already closed: do not spin on the latter.
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(log) = crash.as_deref().and_then(Option::as_ref) {
            if log.since.elapsed() >= CRASH_GRACE {
                return Some(format!(
                    "L1's kernel crashed ({}) and the job had not ended {CRASH_GRACE:?} later",
                    log.lines[0].trim()
                ));
            }
        }
        if let Some(stall) = stall.filter(|stall| last_line.elapsed() >= *stall) {
            return Some(format!(
                "its console printed nothing for {stall:?} (a check over its budget, or L1 hung)"
            ));
        }
        if let Some(still) = heartbeat.still_for().filter(|still| *still >= limit) {
            return Some(format!(
                "L1 itself stopped: its heartbeat stood still for {still:.0?} \
                 (NESTED_HEARTBEAT_LIMIT), its console for {:.0?}",
                last_line.elapsed()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_kernel_crash;

    #[test]
    fn kernel_crash_lines_are_the_kernels_own() {
        for line in [
            "[  591.894702] rcu: INFO: rcu_sched self-detected stall on CPU",
            "[   12.5] Internal error: Oops: 0000000096000004 [#1] SMP",
            "[    3.1] Unable to handle kernel NULL pointer dereference at virtual address 0",
            "[    3.2] Kernel panic - not syncing: sysrq triggered crash",
        ] {
            assert!(is_kernel_crash(line), "{line}");
        }
        for line in [
            "job| [    1.0] BUG: a guest's log printed by the job",
            "NESTED-L1 ready uptime=1.9 kvm=yes",
            "[    1.0] virtio_blk virtio0: [vda] 16384 512-byte logical blocks",
        ] {
            assert!(!is_kernel_crash(line), "{line}");
        }
    }
}
