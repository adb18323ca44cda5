//! The measurements, and medians over runs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use bench::util::ms;

use crate::runner::{GuestSpec, Needs, QemuInfo, Setup, Vmm};
use crate::Opts;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    /// Stable key for scripts.
    pub key: &'static str,
    /// Human name.
    pub name: &'static str,
    /// Unit of the values.
    pub unit: &'static str,
    /// Whether smaller is better.
    pub lower_is_better: bool,
    /// Median for pocketvisor.
    pub pocketvisor: Option<f64>,
    /// Median for QEMU.
    pub qemu: Option<f64>,
    /// The QEMU machine type measured for this metric.
    pub qemu_machine: Option<&'static str>,
    /// pocketvisor / QEMU.
    pub ratio: Option<f64>,
    /// Every sample.
    pub samples_pocketvisor: Vec<f64>,
    /// Every sample.
    pub samples_qemu: Vec<f64>,
    /// Runs that failed, with the reason.
    pub errors: Vec<String>,
}

impl Metric {
    fn new(
        key: &'static str,
        name: &'static str,
        unit: &'static str,
        lower_is_better: bool,
    ) -> Metric {
        Metric {
            key,
            name,
            unit,
            lower_is_better,
            pocketvisor: None,
            qemu: None,
            qemu_machine: None,
            ratio: None,
            samples_pocketvisor: Vec::new(),
            samples_qemu: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn record(&mut self, vmm: Vmm, value: Result<f64>) {
        match (vmm, value) {
            (Vmm::Pocketvisor, Ok(v)) => self.samples_pocketvisor.push(v),
            (Vmm::Qemu(m), Ok(v)) => {
                self.qemu_machine = Some(m.name());
                self.samples_qemu.push(v);
            }
            (vmm, Err(e)) => self.errors.push(format!("{vmm:?}: {e:#}")),
        }
    }

    fn finish(&mut self) {
        self.pocketvisor = median(&self.samples_pocketvisor);
        self.qemu = median(&self.samples_qemu);
        self.ratio = match (self.pocketvisor, self.qemu) {
            (Some(p), Some(q)) if q != 0.0 => Some(p / q),
            _ => None,
        };
    }
}

/// The host's own read of the block benchmark's file.
#[derive(Debug, Clone, Serialize)]
pub struct HostIo {
    /// The file.
    pub file: PathBuf,
    /// Buffered (page-cache) sequential read, MiB/s, median.
    pub cached_read_mib_s: Option<f64>,
    /// `dd bs=1M iflag=direct`, MiB/s, median (None when O_DIRECT is unsupported).
    pub direct_read_mib_s: Option<f64>,
}

/// Everything the benchmark found.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Runs per metric and VMM.
    pub runs: usize,
    /// The pocketvisor binary measured.
    pub pocketvisor_bin: PathBuf,
    /// The QEMU measured, if any.
    pub qemu: Option<QemuInfo>,
    /// Why there is no QEMU column.
    pub no_qemu_reason: Option<String>,
    /// The rows.
    pub metrics: Vec<Metric>,
    /// The host's I/O on the block benchmark's file.
    pub host_io: HostIo,
    /// What the numbers mean.
    pub notes: Vec<String>,
}

pub use bench::util::median;

/// Runs every measurement `opts.runs` times on each VMM, alternating the VMMs.
pub fn collect(setup: &Setup, opts: &Opts) -> Result<Results> {
    let mut ready = Metric::new("ready_ms", "start -> PROBE ready", "ms", true);
    let mut exit = Metric::new("exit_ms", "start -> exit (minimal selftest)", "ms", true);
    let mut rss = Metric::new("rss_mib", "VMM RSS, 256 MiB guest idle", "MiB", true);
    let mut rss_anon = Metric::new("rss_anon_mib", "  of which RssAnon", "MiB", true);
    let mut rss_file = Metric::new("rss_file_mib", "  of which RssFile", "MiB", true);
    let mut pio = Metric::new("pio_exit_us", "port-I/O exit round trip", "us", true);
    let mut pio_raw = Metric::new(
        "pio_exit_raw_us",
        "  raw KVM_RUN loop, same host (in pv column)",
        "us",
        true,
    );
    let mut pio_over_raw = Metric::new(
        "pio_exit_over_raw",
        "  round trip / raw loop (same run)",
        "x",
        true,
    );
    let mut blk = Metric::new(
        "blk_read_mib_s",
        "virtio-blk sequential read",
        "MiB/s",
        false,
    );

    let image = blk_image(&setup.workdir, opts.blk_mb)?;
    // Warm the page cache so every reader sees the same cache state.
    let _ = host_cached_read(&image);
    let mut host_cached = Vec::new();
    let mut host_direct = Vec::new();

    let any = Needs::default();
    let poweroff = Needs {
        poweroff: true,
        ..Needs::default()
    };
    let pci = Needs {
        pci: true,
        ..Needs::default()
    };
    for run in 0..opts.runs {
        let alternate = |mut v: Vec<Vmm>| {
            if run % 2 == 1 {
                v.reverse();
            }
            v
        };
        eprintln!("bench: run {}/{}", run + 1, opts.runs);
        // Boot: one run gives both times when the same VMM serves both metrics.
        let ready_vmms = setup.vmms(any);
        let exit_vmms = setup.vmms(poweroff);
        let mut boot_vmms = ready_vmms.clone();
        boot_vmms.extend(exit_vmms.iter().filter(|v| !ready_vmms.contains(v)));
        for vmm in alternate(boot_vmms) {
            match boot(setup, vmm) {
                Ok((r, e)) => {
                    if ready_vmms.contains(&vmm) {
                        ready.record(vmm, Ok(r));
                    }
                    if exit_vmms.contains(&vmm) {
                        exit.record(vmm, Ok(e));
                    }
                }
                Err(e) => ready.record(vmm, Err(e)),
            }
        }
        let raw = bench::rawexit::round_trip_us(bench::rawexit::LOOP_COUNTED, opts.pio_iters);
        pio_raw.record(
            Vmm::Pocketvisor,
            raw.as_ref()
                .map(|v| *v)
                .map_err(|e| anyhow::anyhow!("{e:#}")),
        );
        for vmm in alternate(setup.vmms(any)) {
            match resident(setup, vmm) {
                Ok((all, anon, file)) => {
                    rss.record(vmm, Ok(all));
                    rss_anon.record(vmm, Ok(anon));
                    rss_file.record(vmm, Ok(file));
                }
                Err(e) => rss.record(vmm, Err(e)),
            }
            let us = port_io(setup, vmm, opts.pio_iters);
            if let (Ok(us), Ok(raw)) = (&us, &raw) {
                pio_over_raw.record(vmm, Ok(us / raw));
            }
            pio.record(vmm, us);
        }
        for vmm in alternate(setup.vmms(pci)) {
            blk.record(vmm, block_read(setup, vmm, &image, opts.blk_mb));
        }
        if let Ok(v) = host_cached_read(&image) {
            host_cached.push(v);
        }
        if let Ok(v) = host_direct_read(&image) {
            host_direct.push(v);
        }
    }
    let mut metrics = vec![
        ready,
        exit,
        rss,
        rss_anon,
        rss_file,
        pio,
        pio_raw,
        pio_over_raw,
        blk,
    ];
    for m in &mut metrics {
        m.finish();
    }
    let mut notes = vec![
        format!(
            "guest: {} (the probe guest), 128 MiB and 1 vCPU unless noted; medians of {} runs",
            setup.probe.display(),
            opts.runs
        ),
        "start -> exit: `pv.tests=` (boot, report, ACPI power-off)".into(),
        "RSS: /proc/<pid>/status 1 s after the first counter line of pv.mode=counter; \
         it includes the guest pages the probe touched (the same guest on both VMMs)"
            .into(),
        format!(
            "port-I/O: host time between `PROBE pio start` and `PROBE pio end` / {} outb to port 0x80; \
             raw KVM_RUN loop: the same number of `out 0x80` exits of a minimal 64-bit VM running the \
             probe's loop (out; dec; jnz), driven by a bare ioctl loop in this process (bench/src/rawexit.rs), measured in the same run",
            opts.pio_iters
        ),
        format!(
            "virtio-blk: {} MiB read sequentially by the probe (pv.mode=blk-bench) from a read-only disk \
             on a raw file in the host page cache; host reads of the same file are listed below",
            opts.blk_mb
        ),
    ];
    if setup.qemu.is_some() {
        notes.push(
            "QEMU machine per metric: microvm where the probe needs neither PCI nor ACPI \
             power-off (no firmware, the fairer comparison), pc (SeaBIOS + PVH option ROM) \
             where it does; the probe reaches PCI through ports 0xCF8/0xCFC, which microvm lacks"
                .into(),
        );
    }
    Ok(Results {
        runs: opts.runs,
        pocketvisor_bin: setup.bin.clone(),
        qemu: setup.qemu.clone(),
        no_qemu_reason: setup.no_qemu_reason.clone(),
        metrics,
        host_io: HostIo {
            file: image,
            cached_read_mib_s: median(&host_cached),
            direct_read_mib_s: median(&host_direct),
        },
        notes,
    })
}

/// Describes a failed run by its last serial lines and stderr.
fn failure(what: &str, out: &e2e::Outcome) -> anyhow::Error {
    let tail: Vec<&str> = out.serial().collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
    let err = out
        .stderr_lines()
        .last()
        .map(|s| s.to_string())
        .unwrap_or_default();
    anyhow::anyhow!(
        "{what}: exit {:?}{}; serial: {tail}; stderr: {err}",
        out.code(),
        if out.timed_out { " (timed out)" } else { "" }
    )
}

/// (start -> `PROBE ready`, start -> exit) in ms for the minimal selftest.
fn boot(setup: &Setup, vmm: Vmm) -> Result<(f64, f64)> {
    let out = setup
        .spawn(vmm, &GuestSpec::new("pv.tests="), RUN_TIMEOUT)
        .wait();
    if !out.probe().done_ok() {
        return Err(failure("minimal selftest", &out));
    }
    let ready = out
        .lines
        .iter()
        .find(|(_, l)| l == "PROBE ready")
        .map(|(t, _)| *t)
        .ok_or_else(|| failure("no `PROBE ready`", &out))?;
    Ok((ms(ready), ms(out.elapsed)))
}

/// (VmRSS, RssAnon, RssFile) in MiB with a 256 MiB guest in counter mode.
fn resident(setup: &Setup, vmm: Vmm) -> Result<(f64, f64, f64)> {
    let mut spec = GuestSpec::new("pv.mode=counter pv.counter.ms=100");
    spec.memory_mib = 256;
    let mut vm = setup.spawn(vmm, &spec, RUN_TIMEOUT);
    if vm
        .wait_for_line(Duration::from_secs(30), |l| l.starts_with("PROBE counter"))
        .is_none()
    {
        let out = vm.wait_for(Duration::ZERO);
        return Err(failure("counter mode never counted", &out));
    }
    std::thread::sleep(Duration::from_secs(1));
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid()))
        .context("read /proc/<pid>/status")?;
    vm.signal(libc::SIGTERM);
    let _ = vm.wait_for(Duration::from_secs(5));
    let kib = |key: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in /proc/<pid>/status"))?;
        let n: f64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad line {line:?}"))?;
        Ok(n / 1024.0)
    };
    Ok((kib("VmRSS:")?, kib("RssAnon:")?, kib("RssFile:")?))
}

/// Time between two serial lines of one guest run.
fn between(
    setup: &Setup,
    vmm: Vmm,
    spec: &GuestSpec,
    start: &str,
    end: &str,
) -> Result<(Duration, e2e::ProbeLine)> {
    let out = setup.spawn(vmm, spec, RUN_TIMEOUT).wait();
    let t0 = out
        .lines
        .iter()
        .find(|(_, l)| l.starts_with(start))
        .map(|(t, _)| *t)
        .ok_or_else(|| failure(&format!("no `{start}`"), &out))?;
    let (t1, line) = out
        .lines
        .iter()
        .find(|(_, l)| l.starts_with(end))
        .ok_or_else(|| failure(&format!("no `{end}`"), &out))?;
    let parsed = e2e::ProbeLine::parse(line).context("unparsable end line")?;
    Ok((t1.saturating_sub(t0), parsed))
}

/// Microseconds per `outb` to port 0x80.
fn port_io(setup: &Setup, vmm: Vmm, iters: u64) -> Result<f64> {
    let spec = GuestSpec::new(&format!("pv.mode=pio-bench pv.pio.iters={iters}"));
    let (took, end) = between(setup, vmm, &spec, "PROBE pio start", "PROBE pio end")?;
    let done = end.field_u64("iters").unwrap_or(iters);
    if done == 0 {
        bail!("the guest did 0 iterations");
    }
    Ok(took.as_secs_f64() * 1e6 / done as f64)
}

/// MiB/s of the probe reading `mb` MiB from a read-only virtio-blk disk.
fn block_read(setup: &Setup, vmm: Vmm, image: &Path, mb: u64) -> Result<f64> {
    let mut spec = GuestSpec::new(&format!("pv.mode=blk-bench pv.blk.mb={mb}"));
    spec.disk = Some(image.to_path_buf());
    let (took, end) = between(
        setup,
        vmm,
        &spec,
        "PROBE blk-bench start",
        "PROBE blk-bench end",
    )?;
    let bytes = end
        .field_u64("bytes")
        .context("no bytes= on blk-bench end")?;
    if bytes == 0 || took.is_zero() {
        bail!("no data read ({bytes} bytes in {took:?})");
    }
    Ok(bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64())
}

/// A raw image of `mb` + 1 MiB of non-zero data, reused across runs.
fn blk_image(dir: &Path, mb: u64) -> Result<PathBuf> {
    let path = dir.join(format!("blk-{mb}m.img"));
    let len = (mb + 1) * 1024 * 1024;
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(len) {
        let chunk = e2e::host::pattern_bytes(0xb10c, 1024 * 1024);
        let mut data = Vec::with_capacity(usize::try_from(len)?);
        for _ in 0..=mb {
            data.extend_from_slice(&chunk);
        }
        std::fs::write(&path, data).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(path)
}

/// Buffered sequential read of the whole file, MiB/s.
fn host_cached_read(path: &Path) -> Result<f64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1024 * 1024];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}

/// `dd bs=1M iflag=direct` of the whole file, MiB/s.
fn host_direct_read(path: &Path) -> Result<f64> {
    let len = std::fs::metadata(path)?.len();
    let start = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["of=/dev/null", "bs=1M", "iflag=direct", "status=none"])
        .output()
        .context("run dd")?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("dd: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(len as f64 / (1024.0 * 1024.0) / took.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use e2e::qemu::Machine;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
    }

    #[test]
    fn ratio_is_pv_over_qemu() {
        let mut m = Metric::new("k", "n", "ms", true);
        m.record(Vmm::Pocketvisor, Ok(10.0));
        m.record(Vmm::Qemu(Machine::Pc), Ok(40.0));
        m.record(Vmm::Qemu(Machine::Pc), Err(anyhow::anyhow!("boom")));
        m.finish();
        assert_eq!(m.ratio, Some(0.25));
        assert_eq!(m.qemu_machine, Some("pc"));
        assert_eq!(m.errors.len(), 1);
        assert!(m.errors[0].contains("boom"), "{:?}", m.errors);
    }
}
