//! `migrate_live`: live migration of a running probe guest, pocketvisor (`run --api-socket`,
//! `receive`, `migrate --plain`) against QEMU's own (`-incoming tcp:` and QMP `migrate
//! tcp:`), both over TCP on loopback, on the same probe guest and memory size.
//!
//! ```text
//! cargo run -p bench --release --bin migrate_live -- [--runs 3] [--mem 512] [--dirty-mb 16]
//!     [--gap 50] [--tick-us 100] [--no-qemu] [--json] [--bin PATH] [--probe PATH] [--work DIR]
//! ```
//!
//! Two guests: idle (`pv.mode=counter`, a line every 20 ms, nearly all of its RAM never
//! written) and busy (`pv.mode=mem pv.mem.refill=1`: `--dirty-mb` MiB rewritten after every
//! `--gap` ms, its measured dirtying rate in the table). Per guest and VMM, medians and
//! min-max over `--runs` of: total time (pocketvisor: `total_ms` of its `migrated` line;
//! QEMU: `total-time` of `query-migrate`), downtime, and bytes on the wire (`bytes`; QEMU:
//! `ram.transferred`). QEMU is given pocketvisor's 30 ms downtime budget (`downtime-limit`) and
//! no bandwidth cap (`max-bandwidth` 10 GiB/s); a run counts only once the guest goes on at the
//! destination (a new counter line, or a memory pass that ends `ok`).
//!
//! Downtime is measured the same way for both VMMs, from outside them: as the time the guest
//! was not running, seen in its own output. Both guests run with `pv.tick.us=--tick-us`: the
//! probe writes a tick byte to COM1 every 100 µs of guest time and spins instead of halting
//! between ticks (in every loop of both modes), so its output never pauses for longer than
//! that while its vCPU runs. Each VMM writes the serial console into a FIFO
//! (`bench::serial_tap`: pocketvisor `--serial file:FIFO` on both ends, its own log writer
//! thread included; QEMU `-serial file:FIFO`) that the bench reads in a thread, timestamping
//! each read as it returns. The downtime is the gap from the last output of the source to the
//! first output of the destination: it holds the whole stop (the vCPU's pause, the last dirty
//! pages, the device state, the destination's load and checks, the hand-over, the vCPU running
//! again) and the serial path's latency at each end, is at most one tick (0.1 ms) longer than
//! the stop, and does not depend on what either VMM does with the guest's clock. The longest
//! silence of the source's output between the `migrate` command and its last output is a
//! column too (`stall`: live rounds, throttling, the host scheduling the vCPU away; at load it
//! is the noise floor of the gap). The VMMs' own figures are extra columns: pocketvisor's
//! `downtime_us` (from the source's pause to the destination's `Running`) and QEMU's
//! `downtime` from `query-migrate` (whole ms, ending at the source once it sent its last
//! byte, before the destination has loaded the device state).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::compare::{self, exit_on_error, field, lines, wait_until, Common, Stat, Vmm};
use bench::qmp::Qmp;
use bench::serial_tap::{self, SerialTap};
use bench::util::{Args, Proc};
use e2e::qemu::{Machine, QemuCommand};

const USAGE: &str = "\
usage: migrate_live [--runs N] [--mem MIB] [--dirty-mb MIB] [--gap MS] [--tick-us US] [--no-qemu]
                    [--json] [--bin PATH] [--probe PATH] [--work DIR]

Live migration of an idle and a busy probe guest over loopback TCP, pocketvisor vs QEMU -M
microvm (migrate tcp:). Downtime: the guest's silence across the switch, the
probe writing a tick byte every --tick-us (default 100) while it runs. The pocketvisor binary defaults to $POCKETVISOR_BIN, else
target/release/pocketvisor (built first). Needs /dev/kvm.";

#[derive(Debug, Clone)]
struct Opts {
    common: Common,
    mem: u64,
    dirty_mb: u64,
    gap_ms: u64,
    tick_us: u64,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut o = Opts {
        common: Common::new(3),
        mem: 512,
        dirty_mb: 16,
        gap_ms: 50,
        tick_us: 100,
    };
    let mut args = Args::new(args, USAGE);
    while let Some(arg) = args.next_flag() {
        if o.common.take(&arg, &mut args)? {
            continue;
        }
        match arg.as_str() {
            "--mem" => o.mem = args.parse("--mem")?,
            "--dirty-mb" => o.dirty_mb = args.parse("--dirty-mb")?,
            "--gap" => o.gap_ms = args.parse("--gap")?,
            "--tick-us" => o.tick_us = args.parse("--tick-us")?,
            other => return Err(args.unknown(other)),
        }
    }
    if o.common.runs == 0 || o.mem < 64 || o.dirty_mb == 0 || o.dirty_mb * 2 > o.mem {
        bail!("--runs must be >= 1, --mem >= 64 and --dirty-mb from 1 to half of --mem");
    }
    if !(10..=10_000).contains(&o.tick_us) {
        bail!("--tick-us must be from 10 to 10000");
    }
    Ok(o)
}

fn main() {
    exit_on_error(
        "migrate_live",
        parse_args(std::env::args().skip(1)).and_then(run),
    );
}

/// Which guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    Idle,
    Busy,
}

/// One migration.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    total_ms: f64,
    /// The guest's silence across the switch, seen by the bench.
    downtime_ms: f64,
    /// The longest silence of the source before the switch, seen by the bench.
    stall_ms: f64,
    /// The downtime the VMM reports.
    vmm_downtime_ms: f64,
    mib_on_wire: f64,
    /// The busy guest's rate of rewriting its memory before the migration, MiB/s.
    dirty_mib_s: f64,
}

/// The figures of one guest and VMM.
#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    vmm: &'static str,
    guest: &'static str,
    memory_mib: u64,
    runs: usize,
    dirty_mib_per_s: Stat,
    total_ms: Stat,
    downtime_ms: Stat,
    stall_ms: Stat,
    vmm_downtime_ms: Stat,
    mib_on_wire: Stat,
    errors: Vec<String>,
}

/// The set-up and the guests' sizes.
struct Setup {
    env: compare::Setup,
    mem: u64,
    dirty_mb: u64,
    gap_ms: u64,
    tick_us: u64,
}

impl Setup {
    fn cmdline(&self, guest: Guest) -> String {
        let mode = match guest {
            Guest::Idle => "pv.mode=counter pv.counter.ms=20".into(),
            // One `mem idle` line per gap (tick > gap), not one per ms.
            Guest::Busy => format!(
                "pv.mode=mem pv.mem.refill=1 pv.mem.mb={} pv.mem.gap={} pv.mem.tick=100000",
                self.dirty_mb, self.gap_ms
            ),
        };
        format!("{mode} pv.tick.us={}", self.tick_us)
    }
}

fn run(o: Opts) -> Result<()> {
    let s = Setup {
        env: compare::Setup::new(&o.common, "migrate_live", "migrate")?,
        mem: o.mem,
        dirty_mb: o.dirty_mb,
        gap_ms: o.gap_ms,
        tick_us: o.tick_us,
    };
    let mut all = Vec::new();
    for guest in [Guest::Idle, Guest::Busy] {
        let what = format!("{guest:?}");
        let samples =
            compare::alternate(&s.env, "migrate_live", &what, o.common.runs, |vmm, dir| {
                once(&s, vmm, guest, dir)
            })?;
        for vmm in s.env.vmms() {
            let of = |f: fn(&Sample) -> f64| Stat::of(&samples.of(vmm, f));
            all.push(Figures {
                vmm: vmm.label(),
                guest: match guest {
                    Guest::Idle => "idle",
                    Guest::Busy => "busy",
                },
                memory_mib: s.mem,
                runs: samples.count(vmm),
                dirty_mib_per_s: of(|s| s.dirty_mib_s),
                total_ms: of(|s| s.total_ms),
                downtime_ms: of(|s| s.downtime_ms),
                stall_ms: of(|s| s.stall_ms),
                vmm_downtime_ms: of(|s| s.vmm_downtime_ms),
                mib_on_wire: of(|s| s.mib_on_wire),
                errors: samples.errors(vmm),
            });
        }
    }
    if o.common.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print!("{}", table(&all, &s));
    }
    Ok(())
}

fn table(all: &[Figures], s: &Setup) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "| VMM | guest | RAM MiB | runs | dirtying MiB/s | total ms | downtime ms (guest silent) | \
         stall before ms | VMM's downtime ms | MiB on the wire |\n{}\n",
        "|---".repeat(10) + "|"
    ));
    for x in all {
        let dirty = if x.guest == "busy" {
            x.dirty_mib_per_s.to_string()
        } else {
            "-".into()
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {dirty} | {} | {} | {} | {} | {} |\n",
            x.vmm,
            x.guest,
            x.memory_mib,
            x.runs,
            x.total_ms,
            x.downtime_ms,
            x.stall_ms,
            x.vmm_downtime_ms,
            x.mib_on_wire,
        ));
        for e in &x.errors {
            t.push_str(&format!("  error ({} {}): {e}\n", x.vmm, x.guest));
        }
    }
    t.push_str(&format!(
        "\nmedian (min-max); downtime: the guest's serial output silent across the switch (a tick \
         every {} us while it runs); stall: the longest silence of the source before it; busy: {} \
         MiB rewritten after every {} ms gap; 1 vCPU, loopback TCP, no TLS; QEMU downtime-limit \
         30 ms; /proc/loadavg at start: {}\n",
        s.tick_us, s.dirty_mb, s.gap_ms, s.env.load
    ));
    t
}

/// Good memory passes in `lines`.
fn good_passes(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.starts_with("PROBE mem pass n=") && l.contains(" ok "))
        .count()
}

/// Counter lines in `lines`.
fn counter_lines(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.starts_with("PROBE counter "))
        .count()
}

/// Whether any line says a memory check failed.
fn bad_pass(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|l| l.starts_with("PROBE mem pass n=") && l.contains(" bad "))
}

const LIMIT: Duration = Duration::from_secs(120);

/// One boot and migration of `guest` on `vmm`.
fn once(s: &Setup, vmm: Vmm, guest: Guest, dir: &Path) -> Result<Sample> {
    let src_log = dir.join("src.log");
    let dst_log = dir.join("dst.log");
    // The VMMs write into FIFOs the taps read (and copy into the logs without the ticks).
    let (src_fifo, dst_fifo) = (dir.join("src.fifo"), dir.join("dst.fifo"));
    let src_tap = SerialTap::start(&src_fifo, &src_log)?;
    let dst_tap = SerialTap::start(&dst_fifo, &dst_log)?;
    let cmdline = s.cmdline(guest);
    let _source = match vmm {
        Vmm::Pocketvisor => s
            .env
            .run_probe(&cmdline, s.mem, &src_fifo, &dir.join("api.sock"))?,
        Vmm::Qemu => Proc(
            qemu_command(s, &cmdline, &src_fifo, &dir.join("qmp.sock"), None)
                .spawn()
                .context("start qemu")?,
        ),
    };
    // Running: for the busy guest, its rate of rewriting memory over 3 s.
    let mut dirty_mib_s = f64::NAN;
    match guest {
        Guest::Idle => wait_until(&src_log, LIMIT, "counter lines", |l| counter_lines(l) >= 5)?,
        Guest::Busy => {
            wait_until(&src_log, LIMIT, "two memory passes", |l| {
                good_passes(l) >= 2
            })?;
            let (t0, n0) = (Instant::now(), good_passes(&lines(&src_log)));
            std::thread::sleep(Duration::from_secs(3));
            let passes = good_passes(&lines(&src_log)) - n0;
            dirty_mib_s = (passes as u64 * s.dirty_mb) as f64 / t0.elapsed().as_secs_f64();
        }
    }
    let (mut sample, _dest, asked) = match vmm {
        Vmm::Pocketvisor => migrate_pocketvisor(s, dir, &dst_fifo)?,
        Vmm::Qemu => migrate_qemu(s, dir, &cmdline, &dst_fifo)?,
    };
    sample.dirty_mib_s = dirty_mib_s;
    // It counts only if the guest goes on at the destination.
    match guest {
        Guest::Idle => wait_until(&dst_log, LIMIT, "a counter line", |l| counter_lines(l) >= 1)?,
        Guest::Busy => wait_until(&dst_log, LIMIT, "a good memory pass", |l| {
            good_passes(l) >= 1 || bad_pass(l)
        })?,
    }
    if bad_pass(&lines(&dst_log)) {
        bail!("a memory check failed at the destination");
    }
    let (src, dst) = (src_tap.finish(), dst_tap.finish());
    let seen = serial_tap::switch(&src, &dst, asked)
        .context("no output from the source before the destination's first")?;
    sample.downtime_ms = seen.gap_ms;
    sample.stall_ms = seen.before_ms;
    Ok(sample)
}

/// The VMM's figures of the migration, the destination (kept running until the caller has
/// seen the guest there) and when the migration was asked for; the destination's serial
/// console goes to `dst_serial`.
fn migrate_pocketvisor(
    s: &Setup,
    dir: &Path,
    dst_serial: &Path,
) -> Result<(Sample, Proc, Instant)> {
    let key = dir.join("key");
    std::fs::write(&key, "5a".repeat(32) + "\n")?;
    let dst_err = dir.join("dst.stderr");
    let dest = Proc(
        Command::new(&s.env.bin)
            .args(["receive", "--listen", "127.0.0.1:0", "--plain", "--key"])
            .arg(&key)
            .arg("--serial")
            .arg(format!("file:{}", dst_serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&dst_err)?)
            .spawn()?,
    );
    let addr = compare::listen_address(
        &dst_err,
        "waiting for a migration on ",
        LIMIT,
        "the destination",
    )?;
    let asked = Instant::now();
    let out = Command::new(&s.env.bin)
        .args(["migrate", "--plain", "--api-socket"])
        .arg(dir.join("api.sock"))
        .args(["--to", &addr, "--key"])
        .arg(&key)
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("pocketvisor migrate failed: {}", said.trim());
    }
    let num = |key: &str| -> Result<f64> {
        field(&said, key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in: {said}"))
    };
    let sample = Sample {
        total_ms: num("total_ms")?,
        vmm_downtime_ms: num("downtime_us")? / 1000.0,
        mib_on_wire: num("bytes")? / f64::from(1 << 20),
        ..Sample::default()
    };
    Ok((sample, dest, asked))
}

/// As [`migrate_pocketvisor`], with two QEMU processes.
fn migrate_qemu(
    s: &Setup,
    dir: &Path,
    cmdline: &str,
    dst_serial: &Path,
) -> Result<(Sample, Proc, Instant)> {
    let port = free_port()?;
    let dest = Proc(
        qemu_command(
            s,
            cmdline,
            dst_serial,
            &dir.join("qmp2.sock"),
            Some(&format!("tcp:127.0.0.1:{port}")),
        )
        .spawn()
        .context("start qemu -incoming")?,
    );
    // The destination listens once its QMP socket answers.
    let _q2 = Qmp::connect_within(&dir.join("qmp2.sock"), LIMIT)?;
    let mut q = Qmp::connect(&dir.join("qmp.sock"))?;
    q.exec(
        r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":30,"max-bandwidth":10737418240}}"#,
    )?;
    let asked = Instant::now();
    q.exec(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
    ))?;
    q.wait_migration("completed", LIMIT)?;
    let r = q.exec(r#"{"execute":"query-migrate"}"#)?;
    let v: serde_json::Value = serde_json::from_str(&r).context("query-migrate's answer")?;
    let ret = &v["return"];
    let num = |x: &serde_json::Value, what: &str| {
        x.as_f64()
            .with_context(|| format!("no {what} in query-migrate: {r}"))
    };
    let sample = Sample {
        total_ms: num(&ret["total-time"], "total-time")?,
        vmm_downtime_ms: num(&ret["downtime"], "downtime")?,
        mib_on_wire: num(&ret["ram"]["transferred"], "ram.transferred")? / f64::from(1 << 20),
        ..Sample::default()
    };
    Ok((sample, dest, asked))
}

/// A TCP port free on loopback just now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// QEMU on microvm, serial to `serial`, QMP on `qmp`, `-incoming URI` when receiving.
fn qemu_command(
    s: &Setup,
    cmdline: &str,
    serial: &Path,
    qmp: &Path,
    incoming: Option<&str>,
) -> Command {
    let bin = s.env.qemu.clone().unwrap_or_default();
    let mut q = QemuCommand::new(&bin, Machine::Microvm, &s.env.probe, cmdline);
    q.memory_mib = s.mem;
    let mut args = q.args();
    if let Some(i) = args.iter().position(|a| a == "stdio") {
        args[i] = format!("file:{}", serial.display());
    }
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(uri) = incoming {
        args.push("-incoming".into());
        args.push(uri.into());
    }
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> impl Iterator<Item = String> + '_ {
        s.split_whitespace().map(String::from)
    }

    #[test]
    fn flags() {
        let o = parse_args(args("")).unwrap();
        assert_eq!(
            (o.common.runs, o.mem, o.dirty_mb, o.gap_ms, o.tick_us),
            (3, 512, 16, 50, 100)
        );
        assert_eq!(parse_args(args("--tick-us 250")).unwrap().tick_us, 250);
        assert!(parse_args(args("--tick-us 5")).is_err());
        let o = parse_args(args("--runs 2 --mem 256 --dirty-mb 4 --gap 50 --no-qemu")).unwrap();
        assert_eq!(
            (o.common.runs, o.mem, o.dirty_mb, o.gap_ms, o.common.qemu),
            (2, 256, 4, 50, false)
        );
        assert!(parse_args(args("--mem 32")).is_err());
        assert!(parse_args(args("--dirty-mb 300")).is_err());
        assert!(parse_args(args("--frob")).is_err());
    }

    #[test]
    fn the_lines_it_reads() {
        let l: Vec<String> = [
            "PROBE mem pass n=1 start",
            "PROBE mem pass n=1 ok bytes=4096 us=17",
            "PROBE counter 4",
            "PROBE mem idle",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            (good_passes(&l), counter_lines(&l), bad_pass(&l)),
            (1, 1, false)
        );
        let migrated = "migrated rounds=3 bytes=1048576 downtime_us=2500 total_ms=40";
        assert_eq!(field(migrated, "downtime_us"), Some("2500"));
        assert_eq!(field(migrated, "bytes"), Some("1048576"));
        assert_eq!(field(migrated, "rounds"), Some("3"));
    }
}
