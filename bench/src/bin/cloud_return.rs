//! `cloud_return`: what a return from the cloud host costs against a full move (issue 13:
//! "Return after an offload of 60 s of work: bytes sent vs a full move"). A probe guest with
//! real data in its RAM runs in `pocketvisor run --api-socket`; `pocketvisor migrate --twin
//! --keep` offloads it to `pocketvisor cloud serve` on loopback (TLS), keeping its copy; the
//! twin works at the host for `--work-s` seconds; `pocketvisor cloud return --base` brings it
//! back onto the kept copy.
//!
//! ```text
//! cargo run -p bench --release --bin cloud_return -- [--runs 3] [--mem 512] [--data-mb 448]
//!     [--dirty-mb 32] [--work-s 60] [--words 8] [--json] [--bin PATH] [--probe PATH]
//!     [--work DIR]
//! ```
//!
//! Two guests, as in `replica`: idle (`--data-mb` MiB written once, then only read) and
//! dirtying (`--dirty-mb` MiB rewritten every 50 ms). Per guest, medians and min-max over the
//! runs: the offload's bytes (the full move: every page that is not zero, the same data a
//! move without a kept copy sends), the return's bytes each way (`returned bytes_received=N
//! bytes_sent=N`: the twin's pages and chunks that differ from the kept copy, and the
//! device's digests of that copy), the saving, and the return's time from the command's start
//! to its `returned` line (the guest then runs on the device).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::cloud;
use bench::compare::{self, exit_on_error, field, wait_lines, Stat};
use bench::util::{Args, Proc};

const USAGE: &str = "\
usage: cloud_return [--runs N] [--mem MIB] [--data-mb MIB] [--dirty-mb MIB] [--work-s S]
                    [--words N] [--json] [--bin PATH] [--probe PATH] [--work DIR]

An idle and a dirtying probe guest with data in its RAM offloaded to cloud serve on loopback,
left to work there --work-s seconds, and returned onto the copy kept at the offload: the
return's bytes against the full move's. The pocketvisor binary defaults to $POCKETVISOR_BIN,
else target/release/pocketvisor (built first). Needs /dev/kvm.";

#[derive(Debug, Clone)]
struct Opts {
    common: compare::Common,
    mem: u64,
    data_mb: u64,
    dirty_mb: u64,
    work_s: u64,
    words: u64,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut o = Opts {
        common: compare::Common::new(3),
        mem: 512,
        data_mb: 448,
        dirty_mb: 32,
        work_s: 60,
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
            "--work-s" => o.work_s = args.parse("--work-s")?,
            "--words" => o.words = args.parse("--words")?,
            other => return Err(args.unknown(other)),
        }
    }
    if o.common.runs == 0
        || o.mem < 64
        || o.data_mb + 32 > o.mem
        || o.dirty_mb == 0
        || o.dirty_mb + 32 > o.mem
        || o.work_s > 3600
    {
        bail!("bad options\n{USAGE}");
    }
    Ok(o)
}

fn main() {
    exit_on_error(
        "cloud_return",
        parse_args(std::env::args().skip(1)).and_then(run),
    );
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Once {
    full_mib: f64,
    in_kib: f64,
    out_kib: f64,
    return_ms: f64,
}

#[derive(Debug, serde::Serialize)]
struct Figures {
    guest: &'static str,
    memory_mib: u64,
    work_s: u64,
    runs: usize,
    full_move_mib: Stat,
    return_in_kib: Stat,
    return_out_kib: Stat,
    saving_pct: Stat,
    return_ms: Stat,
    errors: Vec<String>,
}

fn run(o: Opts) -> Result<()> {
    let env = compare::Setup::new(&o.common, "cloud_return", "cloud_return")?;
    cloud::certificates(&env.work)?;
    let guests = cloud::mem_guests(o.data_mb, o.dirty_mb, o.words);
    let mut table = Vec::new();
    for (guest, cmdline) in &guests {
        let (mut ok, mut errors) = (Vec::new(), Vec::new());
        for i in 0..o.common.runs {
            let dir = env.work.join(format!("{guest}-{i}"));
            std::fs::create_dir_all(&dir)?;
            match once(&o, &env, cmdline, &dir) {
                Ok(x) => ok.push(x),
                Err(e) => {
                    eprintln!("cloud_return: {guest} run {i}: {e:#}");
                    errors.push(format!("{e:#}"));
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        let of = |f: fn(&Once) -> f64| Stat::of(&ok.iter().map(f).collect::<Vec<_>>());
        table.push(Figures {
            guest,
            memory_mib: o.mem,
            work_s: o.work_s,
            runs: ok.len(),
            full_move_mib: of(|x| x.full_mib),
            return_in_kib: of(|x| x.in_kib),
            return_out_kib: of(|x| x.out_kib),
            saving_pct: of(|x| 100.0 * (1.0 - (x.in_kib + x.out_kib) / 1024.0 / x.full_mib)),
            return_ms: of(|x| x.return_ms),
            errors,
        });
    }
    if o.common.json {
        println!("{}", serde_json::to_string_pretty(&table)?);
        return Ok(());
    }
    println!(
        "| guest | RAM MiB | work s | runs | full move MiB | return in KiB | return out KiB | saving % | return ms |\n{}",
        "|---".repeat(9) + "|"
    );
    for x in &table {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.guest,
            x.memory_mib,
            x.work_s,
            x.runs,
            x.full_move_mib,
            x.return_in_kib,
            x.return_out_kib,
            x.saving_pct,
            x.return_ms
        );
        for e in &x.errors {
            println!("  error ({}): {e}", x.guest);
        }
    }
    println!(
        "\nmedian (min-max) over the runs; idle: {} MiB of data written once; dirtying: {} MiB \
         rewritten every 50 ms; {} pattern words per page; 1 vCPU, no disk, loopback TLS; \
         return in: the twin's bytes to the device, out: the device's digests of its kept \
         copy; /proc/loadavg at start: {}",
        o.data_mb, o.dirty_mb, o.words, env.load
    );
    Ok(())
}

const LIMIT: Duration = Duration::from_secs(120);

fn mib(bytes: &str) -> Result<f64> {
    Ok(bytes.parse::<f64>()? / f64::from(1u32 << 20))
}

fn kib(bytes: &str) -> Result<f64> {
    Ok(bytes.parse::<f64>()? / 1024.0)
}

/// One run: boot, offload keeping a copy, `--work-s` s at the host, return.
fn once(o: &Opts, env: &compare::Setup, cmdline: &str, dir: &Path) -> Result<Once> {
    let certs = &env.work;
    let log = dir.join("guest.log");
    let api = dir.join("api.sock");
    let _guest = env.run_probe(cmdline, o.mem, &log, &api)?;
    cloud::wait_for_data(&log, LIMIT)?;
    let (_serve, addr) = cloud::serve(&env.bin, certs, dir, LIMIT)?;
    let kept = dir.join("kept");
    let out = Command::new(&env.bin)
        .args(["migrate", "--api-socket"])
        .arg(&api)
        .args(["--to", &addr, "--twin", "bench", "--keep"])
        .arg(&kept)
        .args(cloud::tls(certs, "phone"))
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "the offload failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let full = field(&said, "bytes").context("the offload's answer has no bytes=")?;
    std::thread::sleep(Duration::from_secs(o.work_s));
    let back_log = dir.join("back.stdout");
    let t0 = Instant::now();
    let _back = Proc(
        Command::new(&env.bin)
            .args(["cloud", "return", "bench", "--from", &addr, "--base"])
            .arg(&kept)
            .arg("--serial")
            .arg(format!("file:{}", dir.join("back.log").display()))
            .arg("--api-socket")
            .arg(dir.join("back.sock"))
            .args(cloud::tls(certs, "phone"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&back_log)?)
            .stderr(std::fs::File::create(dir.join("back.stderr"))?)
            .spawn()?,
    );
    let (took, line) = wait_lines(&back_log, t0, LIMIT, "the returned line", |l| {
        l.iter()
            .find(|l| l.starts_with("returned bytes_received="))
            .cloned()
    })
    .with_context(|| std::fs::read_to_string(dir.join("back.stderr")).unwrap_or_default())?;
    Ok(Once {
        full_mib: mib(full)?,
        in_kib: kib(field(&line, "bytes_received").context("no bytes_received=")?)?,
        out_kib: kib(field(&line, "bytes_sent").context("no bytes_sent=")?)?,
        return_ms: took.as_secs_f64() * 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse_args(a("").into_iter()).unwrap();
        assert_eq!((o.common.runs, o.mem, o.work_s), (3, 512, 60));
        let o = parse_args(a("--runs 2 --work-s 5").into_iter()).unwrap();
        assert_eq!((o.common.runs, o.work_s), (2, 5));
        assert!(parse_args(a("--data-mb 500").into_iter()).is_err());
        assert!(parse_args(a("--no-qemu").into_iter()).is_err());
        assert!(parse_args(a("--work-s 4000").into_iter()).is_err());
    }
}
