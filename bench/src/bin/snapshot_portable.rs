//! `snapshot_portable`: snapshot, restore and portable-file figures, in one run.
//!
//! ```text
//! cargo run -p bench --release --bin snapshot_portable -- [--runs 3] [--mem 256,1024]
//!     [--disk-mib 1024] [--portable-runs 5] [--no-vm] [--no-portable] [--json] [--bin PATH]
//!     [--probe PATH]
//! ```
//!
//! 1. Snapshot and restore of the probe guest (counter mode, one line every 2 ms) with each
//!    `--mem` size: `pocketvisor snapshot --stop` wall time (and the VMM's own pause-to-fsync
//!    time), the snapshot's apparent and allocated size, and the time from spawning
//!    `pocketvisor restore` to the first serial byte and to the first complete counter line
//!    of the restored guest. A cold boot to the first counter line is given for reference.
//! 2. Export and import of a stopped profile with a `--disk-mib` disk of mixed data (half
//!    random, a quarter written zeros, a quarter log-like text), against
//!    `zstd -3 -T1 | openssl enc -aes-256-ctr -pbkdf2` and `... -chacha20 ...` (openssl enc
//!    has no AEAD modes, so the baselines are unauthenticated) run on the same disk file in the
//!    same run, each followed by `sync FILE` since pocketvisor fsyncs what it writes.
//!
//! Medians over `--runs`; the page cache is warm for every contender.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::util::{ms, run_cmd, Args, Proc};

const USAGE: &str = "\
usage: snapshot_portable [--runs N] [--mem MIB,MIB..] [--disk-mib N] [--portable-runs N]
                         [--no-vm] [--no-portable] [--json] [--bin PATH] [--probe PATH]
                         [--work DIR]

The pocketvisor binary defaults to $POCKETVISOR_BIN, else target/release/pocketvisor (built
with `cargo build --release -p pocketvisor` first). Needs /dev/kvm for the VM part, zstd and
openssl for the baselines.";

#[derive(Debug, Clone)]
struct Opts {
    runs: usize,
    mem: Vec<u64>,
    disk_mib: u64,
    portable_runs: usize,
    vm: bool,
    portable: bool,
    json: bool,
    bin: Option<PathBuf>,
    probe: Option<PathBuf>,
    work: Option<PathBuf>,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut o = Opts {
        runs: 3,
        mem: vec![256, 1024],
        disk_mib: 1024,
        portable_runs: 5,
        vm: true,
        portable: true,
        json: false,
        bin: None,
        probe: None,
        work: None,
    };
    let mut args = Args::new(args, USAGE);
    while let Some(arg) = args.next_flag() {
        match arg.as_str() {
            "--runs" => o.runs = args.parse("--runs")?,
            "--mem" => o.mem = args.list("--mem")?,
            "--disk-mib" => o.disk_mib = args.parse("--disk-mib")?,
            "--portable-runs" => o.portable_runs = args.parse("--portable-runs")?,
            "--no-vm" => o.vm = false,
            "--no-portable" => o.portable = false,
            "--json" => o.json = true,
            "--bin" => o.bin = Some(args.value("--bin")?.into()),
            "--probe" => o.probe = Some(args.value("--probe")?.into()),
            "--work" => o.work = Some(args.value("--work")?.into()),
            other => return Err(args.unknown(other)),
        }
    }
    if o.runs == 0 || o.portable_runs == 0 || o.disk_mib < 4 || o.mem.iter().any(|&m| m < 64) {
        bail!("--runs and --portable-runs must be >= 1, --disk-mib >= 4 and every --mem >= 64");
    }
    Ok(o)
}

fn main() {
    let result = parse_args(std::env::args().skip(1)).and_then(run);
    if let Err(e) = result {
        eprintln!("snapshot_portable: error: {e:#}");
        std::process::exit(1);
    }
}

/// Median of `v`, NaN when empty.
fn median(v: &[f64]) -> f64 {
    bench::util::median(v).unwrap_or(f64::NAN)
}

/// Polls `path` every 0.2 ms until `pred` holds for its contents; the time it took from `t0`.
fn wait_file(
    path: &Path,
    t0: Instant,
    timeout: Duration,
    pred: impl Fn(&[u8]) -> bool,
) -> Result<Duration> {
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            if pred(&bytes) {
                return Ok(t0.elapsed());
            }
        }
        if t0.elapsed() > timeout {
            bail!("timed out waiting for {}", path.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn has_counter_line(bytes: &[u8]) -> bool {
    bytes
        .split_inclusive(|&b| b == b'\n')
        .any(|l| l.ends_with(b"\n") && l.starts_with(b"PROBE counter "))
}

/// Apparent and allocated bytes of the files in `dir`.
fn dir_size(dir: &Path) -> Result<(u64, u64)> {
    let mut apparent = 0;
    let mut allocated = 0;
    for e in std::fs::read_dir(dir)? {
        let m = e?.metadata()?;
        if m.is_file() {
            apparent += m.len();
            allocated += m.blocks() * 512;
        }
    }
    Ok((apparent, allocated))
}

struct Setup {
    bin: PathBuf,
    probe: PathBuf,
    work: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn setup(o: &Opts) -> Result<Setup> {
    let root = e2e::paths::workspace_root();
    let bin = bench::util::pocketvisor_bin(o.bin.as_deref(), true, "snapshot_portable")?;
    let probe = o
        .probe
        .clone()
        .unwrap_or_else(|| root.join("guest/out/probe.elf"));
    let work = o.work.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pv-bench-portable-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    Ok(Setup { bin, probe, work })
}

/// Snapshot and restore figures of one guest size.
#[derive(Debug, Default, serde::Serialize)]
struct VmFigures {
    memory_mib: u64,
    boot_to_first_counter_ms: f64,
    snapshot_cli_ms: f64,
    snapshot_vmm_ms: f64,
    state_bytes: f64,
    snapshot_apparent_bytes: f64,
    snapshot_allocated_bytes: f64,
    restore_to_first_byte_ms: f64,
    restore_to_first_counter_ms: f64,
}

fn vm_once(s: &Setup, mib: u64, run: usize) -> Result<[f64; 8]> {
    let dir = s.work.join(format!("vm-{mib}-{run}"));
    std::fs::create_dir_all(&dir)?;
    let (serial, api) = (dir.join("serial.log"), dir.join("api.sock"));
    let t0 = Instant::now();
    let mut vm = Proc(
        Command::new(&s.bin)
            .arg("run")
            .arg("--kernel")
            .arg(&s.probe)
            .args(["--cmdline", "pv.mode=counter pv.counter.ms=2"])
            .args(["--memory", &mib.to_string()])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let boot = wait_file(&serial, t0, Duration::from_secs(60), has_counter_line)?;
    wait_file(&serial, t0, Duration::from_secs(60), |b| {
        String::from_utf8_lossy(b).contains("PROBE counter 20\n")
    })?;
    let snap = dir.join("snap");
    let (out, snap_t) = run_cmd(
        Command::new(&s.bin)
            .arg("snapshot")
            .arg("--api-socket")
            .arg(&api)
            .arg("-o")
            .arg(&snap)
            .arg("--stop"),
    )?;
    let vmm_ms: f64 = out
        .split_whitespace()
        .find_map(|w| w.trim_end_matches(')').strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let t_exit = Instant::now();
    while vm.0.try_wait()?.is_none() {
        if t_exit.elapsed() > Duration::from_secs(10) {
            bail!("the VM did not stop after its snapshot");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (apparent, allocated) = dir_size(&snap)?;
    let state = std::fs::metadata(snap.join("state.bin"))?.len();

    let serial2 = dir.join("serial2.log");
    std::fs::File::create(&serial2)?;
    let t1 = Instant::now();
    let _restored = Proc(
        Command::new(&s.bin)
            .arg("restore")
            .arg(&snap)
            .arg("--serial")
            .arg(format!("file:{}", serial2.display()))
            .arg("--api-socket")
            .arg(dir.join("api2.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let first_byte = wait_file(&serial2, t1, Duration::from_secs(60), |b| !b.is_empty())?;
    let first_line = wait_file(&serial2, t1, Duration::from_secs(60), has_counter_line)?;
    drop(_restored);
    let _ = std::fs::remove_dir_all(&dir);
    Ok([
        ms(boot),
        ms(snap_t),
        vmm_ms,
        state as f64,
        apparent as f64,
        allocated as f64,
        ms(first_byte),
        ms(first_line),
    ])
}

fn vm_figures(s: &Setup, o: &Opts, mib: u64) -> Result<VmFigures> {
    let mut cols: Vec<Vec<f64>> = vec![Vec::new(); 8];
    for run in 0..o.runs {
        let r = vm_once(s, mib, run).with_context(|| format!("{mib} MiB guest, run {run}"))?;
        for (c, v) in cols.iter_mut().zip(r) {
            c.push(v);
        }
    }
    let m: Vec<f64> = cols.iter().map(|c| median(c)).collect();
    Ok(VmFigures {
        memory_mib: mib,
        boot_to_first_counter_ms: m[0],
        snapshot_cli_ms: m[1],
        snapshot_vmm_ms: m[2],
        state_bytes: m[3],
        snapshot_apparent_bytes: m[4],
        snapshot_allocated_bytes: m[5],
        restore_to_first_byte_ms: m[6],
        restore_to_first_counter_ms: m[7],
    })
}

fn run(o: Opts) -> Result<()> {
    let s = setup(&o)?;
    let mut vms = Vec::new();
    if o.vm {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("snapshot_portable: SKIP the VM part: no /dev/kvm");
        } else if !s.probe.is_file() {
            eprintln!(
                "snapshot_portable: SKIP the VM part: {} missing (guest/build-probe.sh)",
                s.probe.display()
            );
        } else {
            for &mib in &o.mem {
                eprintln!("snapshot_portable: {mib} MiB guest, {} runs", o.runs);
                vms.push(vm_figures(&s, &o, mib)?);
            }
        }
    }
    let transfers = if o.portable {
        Some(bench::portable::compare(
            &s.bin,
            &s.work,
            o.portable_runs,
            o.disk_mib,
        )?)
    } else {
        None
    };
    if o.json {
        let v = serde_json::json!({
            "runs": o.runs,
            "snapshot_restore": vms,
            "portable": transfers,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !vms.is_empty() {
        println!(
            "snapshot and restore, probe guest in counter mode (medians of {} runs)",
            o.runs
        );
        println!(
            "  {:>6} {:>10} {:>10} {:>10} {:>9} {:>12} {:>12} {:>10} {:>11}",
            "guest",
            "boot->ctr",
            "snap cli",
            "snap vmm",
            "state",
            "snap appar.",
            "snap alloc",
            "rst->byte",
            "rst->line"
        );
        for v in &vms {
            println!(
                "  {:>5}M {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>7.0}KiB {:>10.1}MiB {:>10.2}MiB {:>8.1}ms {:>9.1}ms",
                v.memory_mib,
                v.boot_to_first_counter_ms,
                v.snapshot_cli_ms,
                v.snapshot_vmm_ms,
                v.state_bytes / 1024.0,
                v.snapshot_apparent_bytes / 1048576.0,
                v.snapshot_allocated_bytes / 1048576.0,
                v.restore_to_first_byte_ms,
                v.restore_to_first_counter_ms
            );
        }
        println!();
    }
    if let Some(report) = &transfers {
        report.print();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_args() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let o = parse_args(
            ["--runs", "2", "--mem", "256", "--no-vm"]
                .map(String::from)
                .into_iter(),
        )
        .unwrap();
        assert_eq!((o.runs, o.mem.as_slice(), o.vm), (2, &[256u64][..], false));
        assert!(parse_args(["--runs", "0"].map(String::from).into_iter()).is_err());
        assert!(parse_args(["--bogus"].map(String::from).into_iter()).is_err());
    }

    #[test]
    fn counter_lines_must_be_complete() {
        assert!(!has_counter_line(b"PROBE counter 1"));
        assert!(has_counter_line(b"x\nPROBE counter 1\n"));
        assert!(!has_counter_line(b"PROBE ready\n"));
    }
}
