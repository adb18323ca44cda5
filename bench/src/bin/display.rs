//! `display`: a screen over VNC, pocketvisor against QEMU (`-device virtio-gpu-pci -vnc`) on
//! the same probe guest, read by the same RFB client in the same run.
//!
//! ```text
//! cargo run -p bench --release --bin display -- [--runs 3] [--secs 5] [--size 720x1280]
//!     [--no-qemu] [--bin PATH] [--probe PATH]
//! ```
//!
//! The probe draws its home screen (`pv.mode=screen`) and redraws its ticking counter 30
//! times a second (`pv.screen.ms=33`), then, the issue's animation, moves a 200x200 square 30
//! times a second instead (`pv.screen.anim=square`). For each VMM and encoding (Raw, and ZRLE where the
//! client asks for it), per run: the time from connecting to the first full frame, the bytes
//! and updates the client receives while it asks for incremental updates for `--secs`
//! seconds (what a viewer of a live screen costs on the wire), and the VMM's RSS at the end.
//! Medians and ranges over `--runs`. Then the latency from a guest's flush to the update at
//! a viewer: the probe stamps each tick's number into pixels (0..32, 0) and prints `PROBE
//! stamp N` right before it transfers and flushes it (`pv.screen.stamp=1`); a Raw viewer notes
//! when an update first shows N, and the latency is that minus when the bench read the line
//! from the VMM's serial output (one clock, the bench's). Then an idle profile with a display
//! (the counter once a second, no viewer): the VMM's wakeups per second and the host's CPU,
//! against no VM at all.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::rfb::{Viewer, Watched};
use bench::util::{median, ms, Args, Proc};
use e2e::qemu::{Machine, QemuCommand};

const USAGE: &str = "\
usage: display [--runs N] [--secs N] [--size WxH] [--no-qemu] [--bin PATH] [--probe PATH]

A live probe screen over VNC, pocketvisor vs QEMU (virtio-gpu-pci, -vnc), Raw and ZRLE.
The pocketvisor binary defaults to $POCKETVISOR_BIN, else target/release/pocketvisor (built
first). Needs /dev/kvm.";

#[derive(Debug, Clone)]
struct Opts {
    runs: usize,
    secs: u64,
    size: (u16, u16),
    qemu: bool,
    bin: Option<PathBuf>,
    probe: Option<PathBuf>,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut o = Opts {
        runs: 3,
        secs: 5,
        size: (720, 1280),
        qemu: true,
        bin: None,
        probe: None,
    };
    let mut args = Args::new(args, USAGE);
    while let Some(arg) = args.next_flag() {
        match arg.as_str() {
            "--runs" => o.runs = args.parse("--runs")?,
            "--secs" => o.secs = args.parse("--secs")?,
            "--size" => {
                let v = args.value("--size")?;
                let (w, h) = v.split_once('x').context("--size is WxH")?;
                o.size = (w.parse()?, h.parse()?);
            }
            "--no-qemu" => o.qemu = false,
            "--bin" => o.bin = Some(args.value("--bin")?.into()),
            "--probe" => o.probe = Some(args.value("--probe")?.into()),
            other => return Err(args.unknown(other)),
        }
    }
    if o.runs == 0 || o.secs == 0 || o.size.0 < 64 || o.size.1 < 64 {
        bail!("--runs and --secs must be >= 1, --size at least 64x64");
    }
    Ok(o)
}

fn main() {
    let result = parse_args(std::env::args().skip(1)).and_then(run);
    if let Err(e) = result {
        eprintln!("display: error: {e:#}");
        std::process::exit(1);
    }
}

/// What one viewer saw.
#[derive(Debug, Clone, Copy)]
struct Sample {
    first_frame_ms: f64,
    bytes_per_s: f64,
    updates_per_s: f64,
    rss_mib: f64,
}

const CMDLINE: &str = "pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=33";
/// The issue's animation: a 200x200 square moving 30 times a second (only its old and new
/// places flushed).
const SQUARE_CMDLINE: &str =
    "pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=33 pv.screen.anim=square";
/// The idle screen: the counter ticks once a second, the probe sleeps on its TSC deadline.
const IDLE_CMDLINE: &str = "pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=1000";

fn run(o: Opts) -> Result<()> {
    let pv = bench::util::pocketvisor_bin(o.bin.as_deref(), false, "display")?;
    let probe = bench::util::probe_elf(o.probe.as_deref(), "display")?;
    let qemu = if o.qemu {
        let q = QemuCommand::find_binary();
        if q.is_none() {
            eprintln!("display: qemu-system-x86_64 is not installed: pocketvisor only");
        }
        q
    } else {
        None
    };
    eprintln!(
        "display: {} runs of {} s, {}x{}, host load {}",
        o.runs,
        o.secs,
        o.size.0,
        o.size.1,
        bench::util::loadavg()
    );
    let mut rows = Vec::new();
    for (anim, cmdline) in [("counter", CMDLINE), ("200x200 square", SQUARE_CMDLINE)] {
        for vmm in ["pocketvisor", "qemu"] {
            if vmm == "qemu" && qemu.is_none() {
                continue;
            }
            for zrle in [false, true] {
                let mut samples = Vec::new();
                for run in 0..o.runs {
                    let (proc, port, _serial) = if vmm == "pocketvisor" {
                        start_pocketvisor(&pv, &probe, o.size, cmdline)?
                    } else {
                        start_qemu(
                            qemu.as_ref().expect("checked"),
                            &probe,
                            o.size,
                            run,
                            cmdline,
                        )?
                    };
                    let sample = view(port, zrle, Duration::from_secs(o.secs), proc.0.id())
                        .with_context(|| format!("{vmm} run {run}"))?;
                    eprintln!("display: {anim} {vmm} zrle={zrle} run {run}: {sample:?}");
                    samples.push(sample);
                }
                rows.push((anim, vmm, zrle, samples));
            }
        }
    }
    println!(
        "\n| 30 fps animation | VMM | encoding | first full frame (ms) | bytes/s | bytes/update | updates/s | VMM RSS (MiB) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (anim, vmm, zrle, samples) in &rows {
        let col = |f: fn(&Sample) -> f64| {
            let v: Vec<f64> = samples.iter().map(f).collect();
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!(
                "{:.1} ({:.1}-{:.1})",
                median(&v).unwrap_or(f64::NAN),
                min,
                max
            )
        };
        println!(
            "| {anim} | {vmm} | {} | {} | {} | {} | {} | {} |",
            if *zrle { "ZRLE" } else { "Raw" },
            col(|s| s.first_frame_ms),
            col(|s| s.bytes_per_s),
            col(|s| s.bytes_per_s / s.updates_per_s.max(f64::MIN_POSITIVE)),
            col(|s| s.updates_per_s),
            col(|s| s.rss_mib),
        );
    }
    latency(&o, &pv, &probe, qemu.as_deref())?;
    idle(&o, &pv, &probe, qemu.as_deref())
}

/// The counter ticking 30 times a second with its stamp (`pv.screen.stamp=1`).
const STAMP_CMDLINE: &str = "pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=33 pv.screen.stamp=1";

/// Flush-to-viewer latency: the probe prints `PROBE stamp N` right before it transfers and
/// flushes tick N, whose pixels carry N; a Raw viewer asking for incremental updates notes
/// when an update first shows N. The latency of N is that time minus the time the bench read
/// the stamp line from the VMM's serial output (both clocks are the bench's).
fn latency(o: &Opts, pv: &Path, probe: &Path, qemu: Option<&Path>) -> Result<()> {
    let mut rows = Vec::new();
    for vmm in ["pocketvisor", "qemu"] {
        if vmm == "qemu" && qemu.is_none() {
            continue;
        }
        let mut runs = Vec::new();
        for run in 0..o.runs {
            let (proc, port, serial) = if vmm == "pocketvisor" {
                start_pocketvisor(pv, probe, o.size, STAMP_CMDLINE)?
            } else {
                start_qemu(qemu.expect("checked"), probe, o.size, run, STAMP_CMDLINE)?
            };
            let lat = stamp_latencies(port, &serial, Duration::from_secs(o.secs))
                .with_context(|| format!("latency {vmm} run {run}"))?;
            drop(proc);
            eprintln!(
                "display: latency {vmm} run {run}: {} ticks seen, median {:.2} ms",
                lat.len(),
                median(&lat).unwrap_or(f64::NAN)
            );
            runs.push(lat);
        }
        rows.push((vmm, runs));
    }
    println!(
        "\nFlush to viewer (the counter at 30 ticks/s with its stamp, a Raw viewer), {} s per run, {} runs:\n",
        o.secs, o.runs
    );
    println!("| VMM | ticks seen per run | median latency (ms), per run | p90 (ms), all runs |");
    println!("| --- | --- | --- | --- |");
    for (vmm, runs) in &rows {
        let all: Vec<f64> = runs.iter().flatten().copied().collect();
        let seen: Vec<String> = runs.iter().map(|r| r.len().to_string()).collect();
        let medians: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.2}", median(r).unwrap_or(f64::NAN)))
            .collect();
        println!(
            "| {vmm} | {} | {} | {:.2} |",
            seen.join(", "),
            medians.join(", "),
            bench::util::percentile(&all, 90.0).unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// Watches the stamp for `secs`: the latency (ms) of every tick whose stamp line was read
/// and whose pixels reached the viewer.
fn stamp_latencies(port: u16, serial: &Serial, secs: Duration) -> Result<Vec<f64>> {
    use std::collections::HashMap;
    let mut v = Viewer::connect(port, false)?;
    let mut stamp: Vec<Watched> = (0..32).map(|x| Watched::at(x, 0)).collect();
    let value = |stamp: &[Watched]| {
        stamp.iter().enumerate().fold(0u32, |acc, (i, p)| {
            acc | (u32::from(p.rgb == Some([255, 255, 255])) << i)
        })
    };
    v.request(false)?;
    v.read_update(&mut stamp)?;
    let mut shown: HashMap<u32, Instant> = HashMap::new();
    let start = Instant::now();
    while start.elapsed() < secs {
        v.request(true)?;
        v.read_update(&mut stamp)?;
        shown.entry(value(&stamp)).or_insert_with(Instant::now);
    }
    let mut out = Vec::new();
    for (at, line) in serial.try_iter() {
        let Some(n) = line
            .strip_prefix("PROBE stamp ")
            .and_then(|n| n.trim().parse::<u64>().ok())
        else {
            continue;
        };
        // The stamp is the counter's low 32 bits.
        let n = u32::try_from(n & u64::from(u32::MAX))?;
        if let Some(&seen) = shown.get(&n) {
            // Negative if the pixels came before the bench read the line (kept, not hidden).
            let ms = match seen.checked_duration_since(at) {
                Some(d) => d.as_secs_f64(),
                None => -at.duration_since(seen).as_secs_f64(),
            } * 1000.0;
            out.push(ms);
        }
    }
    if out.is_empty() {
        bail!("no tick's stamp reached the viewer (stamp lines or pixels missing)");
    }
    Ok(out)
}

/// What an idle profile with a display costs the host over `--secs` with no viewer: its VMM's
/// threads' context switches per second (each a wakeup: `voluntary_ctxt_switches` plus
/// `nonvoluntary_ctxt_switches` of every task) and the busy share of all CPUs from
/// `/proc/stat` (system-wide: per-process CPU over-reports under kvm_pvm), next to the same
/// with no VM running (what else the machine does).
fn idle(o: &Opts, pv: &Path, probe: &Path, qemu: Option<&Path>) -> Result<()> {
    let secs = Duration::from_secs(o.secs);
    let mut rows: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    for vmm in ["no VM", "pocketvisor", "qemu"] {
        if vmm == "qemu" && qemu.is_none() {
            continue;
        }
        let mut samples = Vec::new();
        for run in 0..o.runs {
            let proc = match vmm {
                "no VM" => None,
                "pocketvisor" => Some(start_pocketvisor(pv, probe, o.size, IDLE_CMDLINE)?.0),
                _ => Some(start_qemu(qemu.expect("checked"), probe, o.size, run, IDLE_CMDLINE)?.0),
            };
            // Past the first frames.
            std::thread::sleep(Duration::from_secs(1));
            let pid = proc.as_ref().map(|p| p.0.id());
            let (switches0, cpu0) = (pid.map_or(0, ctxt_switches), cpu_jiffies()?);
            std::thread::sleep(secs);
            let (switches1, cpu1) = (pid.map_or(0, ctxt_switches), cpu_jiffies()?);
            let wakeups = (switches1 - switches0) as f64 / secs.as_secs_f64();
            let busy = (cpu1.0 - cpu0.0) as f64 * 100.0 / (cpu1.1 - cpu0.1).max(1) as f64;
            eprintln!("display: idle {vmm} run {run}: {wakeups:.1} wakeups/s, host CPU {busy:.2}%");
            samples.push((wakeups, busy));
            drop(proc);
        }
        rows.push((vmm, samples));
    }
    println!(
        "\nIdle with a display (the counter ticks once a second, no viewer), {} s per run, {} runs:\n",
        o.secs, o.runs
    );
    println!("| VMM | VMM wakeups/s | host CPU, all cores (%) |");
    println!("| --- | --- | --- |");
    for (vmm, samples) in &rows {
        let col = |f: fn(&(f64, f64)) -> f64| {
            let v: Vec<f64> = samples.iter().map(f).collect();
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!(
                "{:.2} ({:.2}-{:.2})",
                median(&v).unwrap_or(f64::NAN),
                min,
                max
            )
        };
        let wakeups = if *vmm == "no VM" {
            "-".to_string()
        } else {
            col(|s| s.0)
        };
        println!("| {vmm} | {wakeups} | {} |", col(|s| s.1));
    }
    Ok(())
}

/// Context switches of every thread of process `pid` so far.
fn ctxt_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// (busy, total) jiffies of all CPUs from /proc/stat's first line (busy: all but idle and
/// iowait).
fn cpu_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let v: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        bail!("a short cpu line in /proc/stat");
    }
    let total: u64 = v.iter().take(8).sum();
    Ok((total - v[3] - v[4], total))
}

/// Lines of a guest's serial, each with the time the bench read it.
type Serial = std::sync::mpsc::Receiver<(Instant, String)>;

/// Waits for the probe's first frame on `proc`'s serial (its stdout); the lines after it
/// keep coming on the returned channel.
fn wait_first_frame(proc: &mut Proc) -> Result<Serial> {
    let stdout = proc.0.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (later_tx, later) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let mut first = true;
        while let Some(Ok(l)) = lines.next() {
            if first {
                if l.starts_with("PROBE screen frame n=1") {
                    first = false;
                    let _ = tx.send(());
                }
            } else if later_tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow::anyhow!("the probe drew no frame within 60 s"))?;
    Ok(later)
}

fn start_pocketvisor(
    pv: &Path,
    probe: &Path,
    (w, h): (u16, u16),
    cmdline: &str,
) -> Result<(Proc, u16, Serial)> {
    let mut proc = Proc(
        Command::new(pv)
            .args(["run", "--memory", "128M", "--kernel"])
            .arg(probe)
            .args(["--cmdline", cmdline, &format!("--gpu={w}x{h}"), "--input"])
            .arg("--vnc=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start pocketvisor")?,
    );
    let mut stderr = proc.0.stderr.take().context("no stderr")?;
    let serial = wait_first_frame(&mut proc)?;
    // The port line comes before the first frame; read what stderr holds so far.
    let mut buf = vec![0u8; 4096];
    let n = stderr.read(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix("pocketvisor: VNC server on 127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("no VNC address printed: {text}"))?;
    Ok((proc, port, serial))
}

fn start_qemu(
    qemu: &Path,
    probe: &Path,
    (w, h): (u16, u16),
    run: usize,
    cmdline: &str,
) -> Result<(Proc, u16, Serial)> {
    let display = 40 + u16::try_from(run % 50).unwrap_or(0);
    let mut cmd = QemuCommand::new(qemu, Machine::Pc, probe, cmdline);
    cmd.memory_mib = 128;
    cmd.extra = [
        "-device".to_string(),
        format!("virtio-gpu-pci,xres={w},yres={h}"),
        "-device".into(),
        "virtio-keyboard-pci".into(),
        "-device".into(),
        "virtio-tablet-pci".into(),
        "-vnc".into(),
        format!("127.0.0.1:{display}"),
    ]
    .to_vec();
    let mut c = cmd.command();
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut proc = Proc(c.spawn().context("start QEMU")?);
    let serial = wait_first_frame(&mut proc)?;
    Ok((proc, 5900 + display, serial))
}

/// Connects an RFB 3.8 client, takes a full frame, then asks for incremental updates for
/// `secs`, counting what arrives.
fn view(port: u16, zrle: bool, secs: Duration, pid: u32) -> Result<Sample> {
    let t0 = Instant::now();
    let mut v = Viewer::connect(port, zrle)?;
    v.request(false)?;
    v.read_update(&mut [])?;
    let first_frame_ms = ms(t0.elapsed());
    let (mut bytes, mut updates) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < secs {
        v.request(true)?;
        bytes += v.read_update(&mut [])?;
        updates += 1;
    }
    let took = start.elapsed().as_secs_f64();
    let rss_kib: f64 = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    Ok(Sample {
        first_frame_ms,
        bytes_per_s: bytes as f64 / took,
        updates_per_s: updates as f64 / took,
        rss_mib: rss_kib / 1024.0,
    })
}
