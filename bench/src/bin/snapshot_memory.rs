//! `snapshot_memory`: snapshot and restore of a guest whose RAM is dirtied, pocketvisor
//! against QEMU (`migrate` to a file and `-incoming` from it) on the same probe guest.
//!
//! ```text
//! cargo run -p bench --release --bin snapshot_memory -- [--runs 3] [--mem 256,1024]
//!     [--words 2] [--no-qemu] [--json] [--bin PATH] [--probe PATH] [--work DIR]
//! ```
//!
//! The probe runs `pv.mode=mem`: it writes a per-page pattern into all its RAM above the
//! first 2 MiB, then, after an idle gap, reads every page back and checks it, pass after pass
//! (`guest/probe/PROTOCOL.md`). After the second pass (pages mapped: the guest's own read
//! speed, "warm pass") the VM is snapshotted during the idle gap, and restored in a new
//! process. Per size and VMM, medians and min-max over `--runs` of:
//!
//! - snapshot: `pocketvisor snapshot --stop` wall time; QEMU: QMP `stop` + `migrate
//!   exec:cat>FILE && sync FILE` until `completed` (QEMU 7.2 has no `file:` URI);
//! - restore to first byte: spawning the restore to the first serial byte (a `mem idle`
//!   line, printed every ms while the guest idles); QEMU: `-incoming exec:cat FILE`, then QMP
//!   `cont` as soon as the incoming migration completed;
//! - read-back: the restored guest's first pass over all of its memory (host time from its
//!   `start` line to its end line), which must end `ok`; restore to full read-back = first
//!   byte + read-back;
//! - beside them: the warm pass before the snapshot, and `cat memory.bin > /dev/null` from the
//!   page cache (for QEMU, the migration file).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::compare::{self, exit_on_error, field, lines, wait_lines, Common, Stat, Vmm};
use bench::qmp::Qmp;
use bench::util::{ms, run_cmd, Args, Proc};
use e2e::qemu::{Machine, QemuCommand};

const USAGE: &str = "\
usage: snapshot_memory [--runs N] [--mem MIB,MIB..] [--words N] [--gap MS] [--no-qemu] [--json]
                       [--bin PATH] [--probe PATH] [--work DIR]

Snapshot/restore of a probe guest that dirtied all its RAM (pv.mode=mem), pocketvisor vs
QEMU -M microvm. The pocketvisor binary defaults to $POCKETVISOR_BIN, else
target/release/pocketvisor (built first). Needs /dev/kvm.";

#[derive(Debug, Clone)]
struct Opts {
    common: Common,
    mem: Vec<u64>,
    words: u64,
    gap_ms: u64,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut o = Opts {
        common: Common::new(3),
        mem: vec![256, 1024],
        words: 2,
        gap_ms: 400,
    };
    let mut args = Args::new(args, USAGE);
    while let Some(arg) = args.next_flag() {
        if o.common.take(&arg, &mut args)? {
            continue;
        }
        match arg.as_str() {
            "--mem" => o.mem = args.list("--mem")?,
            "--words" => o.words = args.parse("--words")?,
            "--gap" => o.gap_ms = args.parse("--gap")?,
            other => return Err(args.unknown(other)),
        }
    }
    if o.common.runs == 0 || o.mem.iter().any(|&m| m < 64) || o.gap_ms < 50 {
        bail!("--runs must be >= 1, every --mem >= 64 and --gap >= 50");
    }
    if !(1..=512).contains(&o.words) || !o.words.is_power_of_two() {
        bail!("--words must be a power of two from 1 to 512");
    }
    Ok(o)
}

fn main() {
    exit_on_error(
        "snapshot_memory",
        parse_args(std::env::args().skip(1)).and_then(run),
    );
}

/// One run of one VMM and size, in ms.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    warm_pass: f64,
    snapshot: f64,
    first_byte: f64,
    read_back: f64,
    cat: f64,
}

/// The figures of one VMM and size.
#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    vmm: &'static str,
    memory_mib: u64,
    dirtied_mib: u64,
    runs: usize,
    warm_pass_ms: Stat,
    snapshot_ms: Stat,
    restore_to_first_byte_ms: Stat,
    read_back_after_restore_ms: Stat,
    restore_to_full_read_back_ms: Stat,
    cat_snapshot_file_ms: Stat,
    /// read-back after restore / warm pass: what the lazily mapped memory adds.
    read_back_over_warm: f64,
    /// (read-back after restore - warm pass) / cat of the snapshot file.
    restore_extra_over_cat: f64,
    errors: Vec<String>,
}

/// The set-up and the guest's pattern.
struct Setup {
    env: compare::Setup,
    words: u64,
    gap_ms: u64,
}

fn run(o: Opts) -> Result<()> {
    let s = Setup {
        env: compare::Setup::new(&o.common, "snapshot_memory", "snapmem")?,
        words: o.words,
        gap_ms: o.gap_ms,
    };
    let mut all = Vec::new();
    for &mib in &o.mem {
        let what = format!("{mib} MiB");
        let samples = compare::alternate(
            &s.env,
            "snapshot_memory",
            &what,
            o.common.runs,
            |vmm, dir| once(&s, vmm, mib, dir),
        )?;
        let dirtied = samples.ok.last().map_or(0, |(_, (_, d))| *d);
        for vmm in s.env.vmms() {
            let of = |f: fn(&Sample) -> f64| Stat::of(&samples.of(vmm, |(x, _)| f(x)));
            let warm = of(|s| s.warm_pass);
            let back = of(|s| s.read_back);
            let cat = of(|s| s.cat);
            all.push(Figures {
                vmm: vmm.label(),
                memory_mib: mib,
                dirtied_mib: dirtied >> 20,
                runs: samples.count(vmm),
                snapshot_ms: of(|s| s.snapshot),
                restore_to_first_byte_ms: of(|s| s.first_byte),
                restore_to_full_read_back_ms: of(|s| s.first_byte + s.read_back),
                read_back_over_warm: back.median / warm.median,
                restore_extra_over_cat: (back.median - warm.median) / cat.median,
                warm_pass_ms: warm,
                read_back_after_restore_ms: back,
                cat_snapshot_file_ms: cat,
                errors: samples.errors(vmm),
            });
        }
    }
    if o.common.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print!("{}", table(&all, &s.env.load, s.words));
    }
    Ok(())
}

fn table(all: &[Figures], load: &str, words: u64) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "| VMM | RAM MiB (dirtied) | runs | snapshot ms | restore -> first byte ms | \
         read-back after restore ms | restore -> full read-back ms | warm pass ms | \
         cat snapshot file ms | read-back / warm | (read-back - warm) / cat |\n{}\n",
        "|---".repeat(11) + "|"
    ));
    for x in all {
        t.push_str(&format!(
            "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} |\n",
            x.vmm,
            x.memory_mib,
            x.dirtied_mib,
            x.runs,
            x.snapshot_ms,
            x.restore_to_first_byte_ms,
            x.read_back_after_restore_ms,
            x.restore_to_full_read_back_ms,
            x.warm_pass_ms,
            x.cat_snapshot_file_ms,
            x.read_back_over_warm,
            x.restore_extra_over_cat,
        ));
        for e in &x.errors {
            t.push_str(&format!("  error ({}): {e}\n", x.vmm));
        }
    }
    t.push_str(&format!(
        "\nmedian (min-max); probe pv.mode=mem, {words} pattern words per 4 KiB page, 1 vCPU; \
         /proc/loadavg at start: {}",
        load
    ));
    t.push('\n');
    t
}

fn timeout_for(mib: u64) -> Duration {
    // About 0.15 ms per page touched under kvm_pvm (a fill and two passes), with a margin.
    Duration::from_secs(60 + mib / 2)
}

/// One boot, snapshot and restore; the sample and the bytes dirtied.
fn once(s: &Setup, vmm: Vmm, mib: u64, dir: &Path) -> Result<(Sample, u64)> {
    let serial = dir.join("src.log");
    let cmdline = format!(
        "pv.mode=mem pv.mem.words={} pv.mem.gap={} pv.mem.tick=1",
        s.words, s.gap_ms
    );
    let limit = timeout_for(mib);
    let t0 = Instant::now();
    let mut vm = Proc(match vmm {
        Vmm::Pocketvisor => Command::new(&s.env.bin)
            .arg("run")
            .arg("--kernel")
            .arg(&s.env.probe)
            .args(["--cmdline", &cmdline, "--memory", &mib.to_string()])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
        Vmm::Qemu => qemu_command(s, mib, &cmdline, &serial, &dir.join("qmp.sock"), None)
            .spawn()
            .context("start qemu")?,
    });
    // Pass 2 is the warm reference: pass 1 follows the fill, and ran slower in our runs.
    let (_, (filled, warm)) = wait_lines(&serial, t0, limit, "mem pass n=2", |l| {
        let filled = l.iter().find(|l| l.starts_with("PROBE mem filled "))?;
        let pass = l
            .iter()
            .find(|l| l.starts_with("PROBE mem pass n=2 ") && !l.ends_with(" start"))?;
        Some((filled.clone(), pass.clone()))
    })?;
    if !warm.contains(" ok ") {
        bail!("the guest's second pass failed: {warm}");
    }
    let dirtied: u64 = field(&filled, "bytes")
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    let warm_us: f64 = field(&warm, "us")
        .and_then(|b| b.parse().ok())
        .unwrap_or(f64::NAN);

    // Snapshot during the idle gap after pass 2.
    let snap = dir.join("snap");
    let t = Instant::now();
    let snap_file = match vmm {
        Vmm::Pocketvisor => {
            run_cmd(
                Command::new(&s.env.bin)
                    .args(["snapshot", "--api-socket"])
                    .arg(dir.join("api.sock"))
                    .arg("-o")
                    .arg(&snap)
                    .arg("--stop"),
            )?;
            snap.join("memory.bin")
        }
        Vmm::Qemu => {
            let file = dir.join("migration.bin");
            let mut q = Qmp::connect(&dir.join("qmp.sock"))?;
            q.exec(r#"{"execute":"stop"}"#)?;
            q.exec(&format!(
                r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {0} && sync {0}"}}}}"#,
                file.display()
            ))?;
            q.wait_migration("completed", limit)?;
            let _ = q.exec(r#"{"execute":"quit"}"#);
            file
        }
    };
    let snapshot = ms(t.elapsed());
    let _ = vm.0.wait();
    drop(vm);
    let last_pass: u64 = lines(&serial)
        .iter()
        .filter_map(|l| l.strip_prefix("PROBE mem pass n=")?.strip_suffix(" start"))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(1);

    // The page cache reference: the whole snapshot file read once.
    let _ = run_cmd(Command::new("cat").arg(&snap_file).stdout(Stdio::null()));
    let (_, cat) = run_cmd(Command::new("cat").arg(&snap_file).stdout(Stdio::null()))?;

    // Restore.
    let log = dir.join("dst.log");
    let t0 = Instant::now();
    let vm = Proc(match vmm {
        Vmm::Pocketvisor => Command::new(&s.env.bin)
            .arg("restore")
            .arg(&snap)
            .arg("--serial")
            .arg(format!("file:{}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
        Vmm::Qemu => qemu_command(
            s,
            mib,
            &cmdline,
            &log,
            &dir.join("qmp2.sock"),
            Some(&snap_file),
        )
        .spawn()
        .context("start qemu -incoming")?,
    });
    if vmm == Vmm::Qemu {
        let mut q = Qmp::connect_within(&dir.join("qmp2.sock"), limit)?;
        q.wait_migration("completed", limit)?;
        q.exec(r#"{"execute":"cont"}"#)?;
    }
    let first_byte = loop {
        if std::fs::metadata(&log).is_ok_and(|m| m.len() > 0) {
            break t0.elapsed();
        }
        if t0.elapsed() > limit {
            bail!("the restored guest printed nothing");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let n = last_pass + 1;
    let start_line = format!("PROBE mem pass n={n} start");
    let end_prefix = format!("PROBE mem pass n={n} ");
    let (t_start, _) = wait_lines(&log, t0, limit, &start_line, |l| {
        l.contains(&start_line).then_some(())
    })?;
    let (t_end, end) = wait_lines(&log, t0, limit, "the pass end", |l| {
        l.iter()
            .find(|l| l.starts_with(&end_prefix) && !l.ends_with(" start"))
            .cloned()
    })?;
    drop(vm);
    if !end.contains(" ok ") {
        bail!("the restored guest's pass failed: {end}");
    }
    Ok((
        Sample {
            warm_pass: warm_us / 1000.0,
            snapshot,
            first_byte: ms(first_byte),
            read_back: ms(t_end - t_start),
            cat: ms(cat),
        },
        dirtied,
    ))
}

/// QEMU on microvm (the probe's mem mode needs neither PCI nor ACPI), serial to `serial`,
/// QMP on `qmp`, and `-incoming exec:cat FILE` when restoring.
fn qemu_command(
    s: &Setup,
    mib: u64,
    cmdline: &str,
    serial: &Path,
    qmp: &Path,
    incoming: Option<&Path>,
) -> Command {
    let bin = s.env.qemu.clone().unwrap_or_default();
    let mut q = QemuCommand::new(&bin, Machine::Microvm, &s.env.probe, cmdline);
    q.memory_mib = mib;
    let mut args = q.args();
    if let Some(i) = args.iter().position(|a| a == "stdio") {
        args[i] = format!("file:{}", serial.display());
    }
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(f) = incoming {
        args.push("-incoming".into());
        args.push(format!("exec:cat {}", f.display()));
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
            (o.common.runs, o.mem.clone(), o.words),
            (3, vec![256, 1024], 2)
        );
        let o = parse_args(args("--runs 2 --mem 64 --words 512 --no-qemu")).unwrap();
        assert_eq!(
            (o.common.runs, o.mem, o.words, o.common.qemu),
            (2, vec![64], 512, false)
        );
        assert!(parse_args(args("--words 3")).is_err());
        assert!(parse_args(args("--mem 32")).is_err());
        assert!(parse_args(args("--frob")).is_err());
    }

    #[test]
    fn fields_of_a_pass_line() {
        let l = "PROBE mem pass n=3 ok bytes=4096 us=17";
        assert_eq!(field(l, "us"), Some("17"));
        assert_eq!(field(l, "n"), Some("3"));
        assert_eq!(field(l, "u"), None);
    }
}
