//! Export and import of a portable profile file against `zstd | openssl enc` pipes, like for
//! like (the portable part of `snapshot_portable`).
//!
//! A stopped profile with a disk of mixed data (half random, a quarter written zeros, a quarter
//! log-like text) is exported and imported by the pocketvisor binary with its default argon2id
//! passphrase slot and with one worker thread (`POCKETVISOR_THREADS=1`), and the same disk
//! goes through `zstd -3 -T1 | openssl enc -aes-256-ctr -pbkdf2` (and `zstd -T2`) and back
//! (openssl enc has no AEAD mode: the baselines are unauthenticated). Every contender syncs
//! what it writes (pocketvisor fsyncs; the pipes end with `sync FILE`). pocketvisor's key
//! derivation and data phase come from its `--json` `done` event; the pipes derive their key
//! (PBKDF2) in milliseconds. Runs are interleaved so a slow moment of the host hits every
//! contender alike; each figure is the median with the min-max spread, and `/proc/loadavg` is
//! printed before and after.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{median, run_cmd, Proc};

const PASSPHRASE: &str = "bench passphrase, not secret";

/// Median, min and max of some samples (seconds).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
}

impl Spread {
    fn of(samples: &[f64]) -> Option<Spread> {
        let finite: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        Some(Spread {
            median: median(&finite)?,
            min: finite.iter().copied().fold(f64::INFINITY, f64::min),
            max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

/// One contender's figures.
#[derive(Debug, serde::Serialize)]
pub struct Row {
    /// What ran.
    pub name: String,
    /// Wall time of the whole command.
    pub total: Spread,
    /// CPU time (user + system) of the command and its children: the work done, whatever
    /// the machine's load.
    pub cpu: Spread,
    /// pocketvisor only: the key derivation (argon2id).
    pub key: Option<Spread>,
    /// pocketvisor only: from the first data byte to the end of the vault's work.
    pub data: Option<Spread>,
    /// Size of the written file (export only).
    pub output_bytes: Option<u64>,
}

/// The whole comparison.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Size of the disk.
    pub disk_mib: u64,
    /// Runs per contender.
    pub runs: usize,
    /// Worker threads of pocketvisor's default.
    pub default_threads: usize,
    /// `/proc/loadavg` before and after each direction.
    pub load: Vec<String>,
    /// Export contenders, the pipe first.
    pub export: Vec<Row>,
    /// Import contenders, the pipe first.
    pub import: Vec<Row>,
}

/// One run of one contender: wall time, and pocketvisor's own key and data times.
struct Sample {
    total: f64,
    cpu: f64,
    key: Option<f64>,
    data: Option<f64>,
}

type Job<'a> = Box<dyn Fn(usize) -> Result<Sample> + 'a>;

/// The first line of `/proc/loadavg`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// User + system CPU seconds of the waited-for children of this process so far.
fn children_cpu() -> f64 {
    // SAFETY: `usage` is a valid, writable rusage that getrusage fills; all-zero bytes are a
    // valid rusage.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs `cmd`; returns its stdout, wall time and CPU time (with its children).
fn timed(cmd: &mut Command) -> Result<(String, f64, f64)> {
    let cpu0 = children_cpu();
    let (out, t) = run_cmd(cmd)?;
    Ok((out, t.as_secs_f64(), children_cpu() - cpu0))
}

fn sh(script: &str) -> Result<Sample> {
    let (_, total, cpu) = timed(Command::new("sh").args(["-c", script]))?;
    Ok(Sample {
        total,
        cpu,
        key: None,
        data: None,
    })
}

/// Runs pocketvisor with `--json` and reads the key and data times of its `done` event.
fn pocketvisor(cmd: &mut Command) -> Result<Sample> {
    let (out, total, cpu) = timed(cmd.arg("--json"))?;
    let done: serde_json::Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "done")
        .context("no done event")?;
    Ok(Sample {
        total,
        cpu,
        key: done["key_seconds"].as_f64(),
        data: done["data_seconds"].as_f64(),
    })
}

/// Writes the disk: half random, a quarter written zeros, a quarter log-like text.
fn fill_disk(path: &Path, mib: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "mallory"];
    const PATHS: [&str; 5] = [
        "/api/v1/mail",
        "/sync",
        "/calendar/events",
        "/login",
        "/files",
    ];
    const STATUS: [u16; 6] = [200, 200, 200, 304, 404, 500];
    // An index below `n` from some bits of `r`.
    let pick = |r: u64, n: usize| usize::try_from(r).unwrap_or(0) % n;
    for i in 0..mib {
        if i < mib / 2 {
            urandom.read_exact(&mut buf)?;
        } else if i < mib * 3 / 4 {
            buf.fill(0);
        } else {
            let mut text = String::with_capacity(buf.len() + 200);
            while text.len() < buf.len() {
                let r = next();
                text.push_str(&format!(
                    "2026-11-25T{:02}:{:02}:{:02}.{:03}Z INFO app[{}]: GET {} user={} status={} took {} ms\n",
                    r % 24,
                    (r >> 8) % 60,
                    (r >> 16) % 60,
                    (r >> 24) % 1000,
                    1000 + (r >> 34) % 9000,
                    PATHS[pick(r >> 40, PATHS.len())],
                    USERS[pick(r >> 44, USERS.len())],
                    STATUS[pick(r >> 48, STATUS.len())],
                    (r >> 52) % 900
                ));
            }
            let n = buf.len();
            buf.copy_from_slice(&text.as_bytes()[..n]);
        }
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Creates the profile `bench` with one `disk_mib` disk in `state` through a short-lived
/// handset daemon; returns the disk's path.
fn create_profile(bin: &Path, root: &Path, state: &Path, disk_mib: u64) -> Result<PathBuf> {
    let spec = root.join("bench.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"bench\"\nkernel = \"probe\"\nmemory_mib = 128\n\
             disks = [{{ name = \"data\", size_mib = {disk_mib} }}]\n"
        ),
    )?;
    let cgroup = format!("pv-bench-portable-{}", std::process::id());
    let mut daemon = Proc(
        Command::new(bin)
            .arg("handset")
            .arg("--state-dir")
            .arg(state)
            .args(["--cgroup-parent", &cgroup])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let sock = state.join("handset.sock");
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("the handset daemon does not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    run_cmd(
        Command::new(bin)
            .args(["profile", "--state-dir"])
            .arg(state)
            .args(["create", "--file"])
            .arg(&spec),
    )?;
    let pid = i32::try_from(daemon.0.id()).context("daemon pid")?;
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = daemon.0.wait();
    Ok(state.join("profiles/bench/disks/data.img"))
}

/// Runs every job `runs` times, interleaved.
fn measure(jobs: &[(String, Job, Option<PathBuf>)], runs: usize) -> Result<Vec<Row>> {
    let mut samples: Vec<Vec<Sample>> = jobs.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (i, (name, job, _)) in jobs.iter().enumerate() {
            let s = job(run).with_context(|| format!("{name}, run {run}"))?;
            samples[i].push(s);
        }
    }
    jobs.iter()
        .zip(samples)
        .map(|((name, _, output), s)| {
            let col =
                |f: fn(&Sample) -> Option<f64>| -> Vec<f64> { s.iter().filter_map(f).collect() };
            Ok(Row {
                name: name.clone(),
                total: Spread::of(&col(|x| Some(x.total))).context("no samples")?,
                cpu: Spread::of(&col(|x| Some(x.cpu))).context("no samples")?,
                key: Spread::of(&col(|x| x.key)),
                data: Spread::of(&col(|x| x.data)),
                output_bytes: output
                    .as_ref()
                    .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)),
            })
        })
        .collect()
}

/// Runs the comparison in `work` with the pocketvisor binary `bin`.
pub fn compare(bin: &Path, work: &Path, runs: usize, disk_mib: u64) -> Result<Report> {
    let root = work.join("portable");
    let state_a = root.join("a");
    std::fs::create_dir_all(&state_a)?;
    let pass = root.join("pass");
    std::fs::write(&pass, format!("{PASSPHRASE}\n"))?;
    let disk = create_profile(bin, &root, &state_a, disk_mib)?;
    eprintln!("snapshot_portable: writing a {disk_mib} MiB disk (1/2 random, 1/4 zeros, 1/4 text)");
    fill_disk(&disk, disk_mib)?;
    let default_threads = std::thread::available_parallelism()
        .map(|n| n.get().min(4))
        .unwrap_or(1);
    let q = |p: &Path| p.display().to_string();
    let pvp = root.join("bench.pvp");
    let pvp1 = root.join("bench-1thread.pvp");
    let enc = root.join("disk.zst.aes-ctr");
    let enc2 = root.join("disk.zst-t2.aes-ctr");
    let dec = root.join("decrypted.img");

    let export = |out: &Path, threads: Option<usize>| -> Result<Sample> {
        let mut c = Command::new(bin);
        c.args(["export", "bench", "--force", "-o"])
            .arg(out)
            .arg("--state-dir")
            .arg(&state_a)
            .arg("--passphrase-file")
            .arg(&pass);
        if let Some(n) = threads {
            c.env("POCKETVISOR_THREADS", n.to_string());
        }
        pocketvisor(&mut c)
    };
    let import = |file: &Path, threads: Option<usize>, run: usize| -> Result<Sample> {
        let dest = root.join(format!("b-{run}"));
        let mut c = Command::new(bin);
        c.arg("import")
            .arg(file)
            .arg("--state-dir")
            .arg(&dest)
            .arg("--passphrase-file")
            .arg(&pass);
        if let Some(n) = threads {
            c.env("POCKETVISOR_THREADS", n.to_string());
        }
        let s = pocketvisor(&mut c)?;
        if run == 0 {
            let copy = dest.join("profiles/bench/disks/data.img");
            sh(&format!("cmp -s {} {}", q(&disk), q(&copy)))
                .context("the imported disk differs from the exported one")?;
        }
        std::fs::remove_dir_all(&dest)?;
        Ok(s)
    };
    let pipe = |threads: u32, out: &Path| -> Result<Sample> {
        sh(&format!(
            "zstd -3 -T{threads} -q -c {} | openssl enc -aes-256-ctr -pbkdf2 -pass file:{} -out {} && sync {}",
            q(&disk),
            q(&pass),
            q(out),
            q(out)
        ))
    };
    let unpipe = |input: &Path| -> Result<Sample> {
        let s = sh(&format!(
            "openssl enc -d -aes-256-ctr -pbkdf2 -pass file:{} -in {} | zstd -d -q -f -o {} && sync {}",
            q(&pass),
            q(input),
            q(&dec),
            q(&dec)
        ))?;
        std::fs::remove_file(&dec)?;
        Ok(s)
    };

    let mut load = vec![format!("before export: {}", loadavg())];
    let exports: Vec<(String, Job, Option<PathBuf>)> = vec![
        (
            "zstd -3 -T1 | openssl enc -aes-256-ctr -pbkdf2".into(),
            Box::new(|_| pipe(1, &enc)),
            Some(enc.clone()),
        ),
        (
            "zstd -3 -T2 | openssl enc -aes-256-ctr -pbkdf2".into(),
            Box::new(|_| pipe(2, &enc2)),
            Some(enc2.clone()),
        ),
        (
            format!("pocketvisor export ({default_threads} threads)"),
            Box::new(|_| export(&pvp, None)),
            Some(pvp.clone()),
        ),
        (
            "pocketvisor export (1 thread)".into(),
            Box::new(|_| export(&pvp1, Some(1))),
            Some(pvp1.clone()),
        ),
    ];
    eprintln!("snapshot_portable: export contenders, {runs} runs");
    let export_rows = measure(&exports, runs)?;
    load.push(format!("after export: {}", loadavg()));
    let imports: Vec<(String, Job, Option<PathBuf>)> = vec![
        (
            "openssl enc -d -aes-256-ctr -pbkdf2 | zstd -d".into(),
            Box::new(|_| unpipe(&enc)),
            None,
        ),
        (
            format!("pocketvisor import ({default_threads} threads)"),
            Box::new(|r| import(&pvp, None, r)),
            None,
        ),
        (
            "pocketvisor import (1 thread)".into(),
            Box::new(|r| import(&pvp, Some(1), r)),
            None,
        ),
    ];
    eprintln!("snapshot_portable: import contenders, {runs} runs");
    let import_rows = measure(&imports, runs)?;
    load.push(format!("after import: {}", loadavg()));
    Ok(Report {
        disk_mib,
        runs,
        default_threads,
        load,
        export: export_rows,
        import: import_rows,
    })
}

impl Report {
    /// Prints the tables.
    pub fn print(&self) {
        let bytes = self.disk_mib << 20;
        let what = format!(
            "{} MiB disk: 1/2 random, 1/4 written zeros, 1/4 text; {} runs, seconds as median \
             [min-max]",
            self.disk_mib, self.runs
        );
        print_rows(&format!("export ({what})"), &self.export, bytes, true);
        println!();
        print_rows(&format!("import ({what})"), &self.import, bytes, false);
        println!(
            "\n  MB/s = disk bytes (10^6) per second of the row; 'vs pipe' = time / the -T1 \
             pipe's total;\n  cpu s = median user+system seconds of the command and its \
             children (the work, whatever the load).\n  pocketvisor: zstd-3 + XChaCha20-Poly1305 per 1 MiB chunk on \
             worker threads, fsync + rename, a\n  128 MiB argon2id (t=3) passphrase slot; \
             pipes: unauthenticated, PBKDF2 key, then `sync FILE`."
        );
        for l in &self.load {
            println!("  load average {l}");
        }
    }
}

fn print_rows(title: &str, rows: &[Row], bytes: u64, with_size: bool) {
    println!("{title}");
    println!(
        "  {:<48} {:>6} {:>13} {:>6} {:>9} {:>8} {:>6}",
        "contender",
        "median",
        "[min-max]",
        "MB/s",
        if with_size { "file MiB" } else { "" },
        "vs pipe",
        "cpu s"
    );
    let base = rows.first().map(|r| r.total.median).unwrap_or(f64::NAN);
    // The key derivation moves no bytes: no rate for it.
    let line = |name: &str, s: &Spread, size: Option<u64>, rate: bool, cpu: Option<&Spread>| {
        println!(
            "  {:<48} {:>6.2} {:>13} {:>6} {:>9} {:>7.2}x {:>6}",
            name,
            s.median,
            format!("[{:.2}-{:.2}]", s.min, s.max),
            if rate {
                format!("{:.0}", bytes as f64 / 1e6 / s.median)
            } else {
                String::new()
            },
            match size {
                Some(n) if with_size => format!("{:.1}", n as f64 / 1048576.0),
                _ => String::new(),
            },
            s.median / base,
            cpu.map(|c| format!("{:.2}", c.median)).unwrap_or_default()
        );
    };
    for r in rows {
        line(&r.name, &r.total, r.output_bytes, true, Some(&r.cpu));
        if let Some(k) = &r.key {
            line("  key derivation (argon2id)", k, None, false, None);
        }
        if let Some(d) = &r.data {
            line("  data phase", d, None, true, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_ignores_missing_samples() {
        let s = Spread::of(&[3.0, f64::NAN, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert!(Spread::of(&[]).is_none());
    }
}
