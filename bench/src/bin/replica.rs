//! `replica`: what a replica's checkpoints cost (issue 13): a probe guest with real data in
//! its RAM runs in `pocketvisor run --api-socket`; `pocketvisor cloud replicate` sends its
//! checkpoints to `pocketvisor cloud serve` on loopback (TLS, sealed for a recipient key);
//! then `pocketvisor cloud recover` fetches and rebuilds the chain.
//!
//! ```text
//! cargo run -p bench --release --bin replica -- [--runs 3] [--mem 512] [--data-mb 448]
//!     [--dirty-mb 32] [--checkpoints 5] [--every-ms 2000] [--words 8] [--json] [--bin PATH]
//!     [--probe PATH] [--work DIR]
//! ```
//!
//! Two guests: idle (`pv.mode=mem`, `--data-mb` MiB filled once with `--words` pattern words
//! per 4 KiB page, then only read back) and dirtying (`--dirty-mb` MiB rewritten every 50 ms,
//! the rest of RAM zero). The plaintext counts whole pages; the sealed size depends on how
//! well the pattern compresses (zstd before sealing): more words, less compressible, but the
//! probe fills them slower. Per guest, medians and min-max over every checkpoint of every run, the first
//! (full) ones apart from the later (incremental) ones: the guest's pause (`pause_us` of the
//! VMM's answer), the checkpoint's plaintext bytes (pages, disk chunks, state), its sealed
//! bytes (what the host stores) and the checkpoint's whole time at the VMM; and the time of a
//! recovery of the run's chain.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bench::cloud;
use bench::compare::{self, exit_on_error, field, Stat};
use bench::util::Args;

const USAGE: &str = "\
usage: replica [--runs N] [--mem MIB] [--data-mb MIB] [--dirty-mb MIB] [--checkpoints N]
               [--every-ms MS] [--words N] [--json] [--bin PATH] [--probe PATH] [--work DIR]

A replica's checkpoints of an idle and a dirtying probe guest with data in its RAM, sent to
cloud serve on loopback, then recovered. The pocketvisor binary defaults to $POCKETVISOR_BIN,
else target/release/pocketvisor (built first). Needs /dev/kvm.";

#[derive(Debug, Clone)]
struct Opts {
    common: compare::Common,
    mem: u64,
    data_mb: u64,
    dirty_mb: u64,
    checkpoints: u64,
    every_ms: u64,
    words: u64,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut o = Opts {
        common: compare::Common::new(3),
        mem: 512,
        data_mb: 448,
        dirty_mb: 32,
        checkpoints: 5,
        every_ms: 2000,
        words: 8,
    };
    o.common.qemu = false;
    let mut args = Args::new(args, USAGE);
    while let Some(arg) = args.next_flag() {
        if arg != "--no-qemu" && o.common.take(&arg, &mut args)? {
            continue;
        }
        match arg.as_str() {
            "--mem" => o.mem = args.parse("--mem")?,
            "--data-mb" => o.data_mb = args.parse("--data-mb")?,
            "--dirty-mb" => o.dirty_mb = args.parse("--dirty-mb")?,
            "--checkpoints" => o.checkpoints = args.parse("--checkpoints")?,
            "--every-ms" => o.every_ms = args.parse("--every-ms")?,
            "--words" => o.words = args.parse("--words")?,
            other => return Err(args.unknown(other)),
        }
    }
    if o.common.runs == 0
        || o.mem < 64
        || o.data_mb + 32 > o.mem
        || o.dirty_mb == 0
        || o.dirty_mb + 32 > o.mem
        || o.checkpoints < 2
        || o.every_ms < 100
        || !(1..=512).contains(&o.words)
    {
        bail!(
            "--runs >= 1, --mem >= 64, --data-mb and --dirty-mb from 1 to --mem - 32, \
             --checkpoints >= 2, --every-ms >= 100, --words from 1 to 512"
        );
    }
    Ok(o)
}

fn main() {
    exit_on_error(
        "replica",
        parse_args(std::env::args().skip(1)).and_then(run),
    );
}

/// One stored checkpoint, from `cloud replicate`'s line.
#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    full: bool,
    pause_ms: f64,
    plain_kib: f64,
    sealed_kib: f64,
    total_ms: f64,
}

fn parse_line(line: &str) -> Option<Checkpoint> {
    let num = |k: &str| field(line, k).and_then(|v| v.parse::<f64>().ok());
    Some(Checkpoint {
        full: field(line, "full")? == "true",
        pause_ms: num("pause_us")? / 1000.0,
        plain_kib: num("bytes")? / 1024.0,
        sealed_kib: num("sealed_bytes")? / 1024.0,
        total_ms: num("total_ms")?,
    })
}

/// The figures of one guest and kind of checkpoint.
#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    guest: &'static str,
    kind: &'static str,
    memory_mib: u64,
    checkpoints: usize,
    pause_ms: Stat,
    plaintext_kib: Stat,
    sealed_kib: Stat,
    checkpoint_ms: Stat,
}

/// A guest's runs: every checkpoint, and each run's recovery time.
#[derive(Default)]
struct Runs {
    checkpoints: Vec<Checkpoint>,
    recover_ms: Vec<f64>,
    errors: Vec<String>,
}

fn run(o: Opts) -> Result<()> {
    let env = compare::Setup::new(&o.common, "replica", "replica")?;
    cloud::certificates(&env.work)?;
    let guests = cloud::mem_guests(o.data_mb, o.dirty_mb, o.words);
    let mut table = Vec::new();
    let mut recoveries = Vec::new();
    for (guest, cmdline) in &guests {
        let mut r = Runs::default();
        for i in 0..o.common.runs {
            let dir = env.work.join(format!("{guest}-{i}"));
            std::fs::create_dir_all(&dir)?;
            match once(&o, &env, cmdline, &dir) {
                Ok((c, rec)) => {
                    r.checkpoints.extend(c);
                    r.recover_ms.push(rec);
                }
                Err(e) => {
                    eprintln!("replica: {guest} run {i}: {e:#}");
                    r.errors.push(format!("{e:#}"));
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        for (kind, full) in [("full", true), ("incremental", false)] {
            let of = |f: fn(&Checkpoint) -> f64| {
                Stat::of(
                    &r.checkpoints
                        .iter()
                        .filter(|c| c.full == full)
                        .map(f)
                        .collect::<Vec<_>>(),
                )
            };
            table.push(Figures {
                guest,
                kind,
                memory_mib: o.mem,
                checkpoints: r.checkpoints.iter().filter(|c| c.full == full).count(),
                pause_ms: of(|c| c.pause_ms),
                plaintext_kib: of(|c| c.plain_kib),
                sealed_kib: of(|c| c.sealed_kib),
                checkpoint_ms: of(|c| c.total_ms),
            });
        }
        recoveries.push((*guest, Stat::of(&r.recover_ms), r.errors));
    }
    if o.common.json {
        let rec: Vec<_> = recoveries
            .iter()
            .map(|(g, s, e)| serde_json::json!({"guest": g, "recover_ms": s, "errors": e}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"checkpoints": table, "recoveries": rec})
            )?
        );
        return Ok(());
    }
    println!(
        "| guest | checkpoint | RAM MiB | n | guest pause ms | plaintext KiB | sealed KiB | checkpoint ms |\n{}",
        "|---".repeat(8) + "|"
    );
    for x in &table {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            x.guest,
            x.kind,
            x.memory_mib,
            x.checkpoints,
            x.pause_ms,
            x.plaintext_kib,
            x.sealed_kib,
            x.checkpoint_ms
        );
    }
    println!();
    for (g, s, errors) in &recoveries {
        println!(
            "recovery of a {}-checkpoint chain, {g}: {s} ms",
            o.checkpoints
        );
        for e in errors {
            println!("  error ({g}): {e}");
        }
    }
    println!(
        "\nmedian (min-max) over {} runs; idle: {} MiB of data written once; dirtying: {} MiB \
         rewritten every 50 ms; {} pattern words per page; a checkpoint every {} ms; 1 vCPU, \
         no disk, loopback TLS; /proc/loadavg at start: {}",
        o.common.runs, o.data_mb, o.dirty_mb, o.words, o.every_ms, env.load
    );
    Ok(())
}

const LIMIT: Duration = Duration::from_secs(120);

/// One run: boot, replicate `--checkpoints` times, recover. Returns the checkpoints and the
/// recovery's time in ms.
fn once(
    o: &Opts,
    env: &compare::Setup,
    cmdline: &str,
    dir: &Path,
) -> Result<(Vec<Checkpoint>, f64)> {
    let certs = &env.work;
    let keygen = Command::new(&env.bin)
        .args(["keygen", "-o"])
        .arg(dir.join("recovery.key"))
        .output()?;
    if !keygen.status.success() {
        bail!("keygen: {}", String::from_utf8_lossy(&keygen.stderr));
    }
    let recipient = String::from_utf8(keygen.stdout)?.trim().to_string();
    let log = dir.join("guest.log");
    let _guest = env.run_probe(cmdline, o.mem, &log, &dir.join("api.sock"))?;
    cloud::wait_for_data(&log, LIMIT)?;
    let (_serve, addr) = cloud::serve(&env.bin, certs, dir, LIMIT)?;
    let out = Command::new(&env.bin)
        .args(["cloud", "replicate", "bench", "--api-socket"])
        .arg(dir.join("api.sock"))
        .args(["--to", &addr, "--every", &format!("{}ms", o.every_ms)])
        .args(["--recipient", &recipient, "--work"])
        .arg(dir.join("work"))
        .args(["--count", &o.checkpoints.to_string()])
        .args(cloud::tls(certs, "phone"))
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "cloud replicate failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let checkpoints: Vec<Checkpoint> = said.lines().filter_map(parse_line).collect();
    if checkpoints.len() as u64 != o.checkpoints || !checkpoints[0].full {
        bail!("unexpected checkpoints: {said}");
    }
    let t0 = Instant::now();
    let rec = Command::new(&env.bin)
        .args(["cloud", "recover", "bench", "--from", &addr, "--identity"])
        .arg(dir.join("recovery.key"))
        .arg("-o")
        .arg(dir.join("recovered"))
        .args(cloud::tls(certs, "phone"))
        .output()?;
    let recover_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !rec.status.success() {
        bail!(
            "cloud recover failed: {}",
            String::from_utf8_lossy(&rec.stderr)
        );
    }
    Ok((checkpoints, recover_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_lines() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse_args(a("").into_iter()).unwrap();
        assert_eq!((o.common.runs, o.mem, o.checkpoints), (3, 512, 5));
        assert!(parse_args(a("--data-mb 500").into_iter()).is_err());
        assert!(parse_args(a("--checkpoints 1").into_iter()).is_err());
        assert!(parse_args(a("--no-qemu").into_iter()).is_err());
        let c = parse_line(
            "stored seq=2 chain=ab sealed_bytes=2097152 full=false pages=3 disk_chunks=0 \
             bytes=1048576 pause_us=1500 total_ms=9",
        )
        .unwrap();
        assert!(!c.full);
        assert_eq!(
            (c.pause_ms, c.plain_kib, c.sealed_kib, c.total_ms),
            (1.5, 1024.0, 2048.0, 9.0)
        );
        assert!(parse_line("stored seq=1").is_none());
    }
}
