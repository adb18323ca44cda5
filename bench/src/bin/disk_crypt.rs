//! `disk_crypt`: what encryption at rest costs a guest's disk reads (issue 12), against the
//! same data through QEMU's LUKS driver, and the cipher alone, in one run.
//!
//! ```text
//! cargo run -p bench --release --bin disk_crypt -- [--runs 5] [--mb 256] [--no-qemu]
//!     [--bin PATH] [--probe PATH]
//! ```
//!
//! The probe guest reads `--mb` MiB sequentially from a read-only virtio-blk disk
//! (`pv.mode=blk-bench`; MiB/s between its start and end lines). Per run, in turn:
//!
//! - pocketvisor, a plain image;
//! - pocketvisor, the same data encrypted at rest (`encrypted = true`, AES-256-XTS per 512-byte
//!   sector, the key on stdin as the handset gives it: `run --config --disk-keys-stdin`);
//! - QEMU (`-M pc`), the plain image, and the same data in a LUKS image (QEMU's own
//!   `aes-256-xts-plain64` driver, the format dm-crypt reads);
//! - the host alone: our cipher decrypting the image in memory, and OpenSSL's AES-256-XTS
//!   (`openssl speed -evp aes-256-xts` over 4 KiB blocks; `openssl enc` has no XTS).
//!
//! Medians and ranges over `--runs`; the ratio that matters is encrypted / plain on
//! pocketvisor (goal: at least 0.8).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::util::{median, Args};
use devices::virtio::block::crypt::{DiskKey, SectorCipher};
use e2e::qemu::{Machine, QemuCommand};
use e2e::RunningVm;

const USAGE: &str = "\
usage: disk_crypt [--runs N] [--mb N] [--no-qemu] [--bin PATH] [--probe PATH]

virtio-blk sequential read by the probe guest: plain vs encrypted at rest on pocketvisor,
plain vs LUKS on QEMU, and the cipher alone (ours in memory, openssl speed aes-256-xts).
The pocketvisor binary defaults to $POCKETVISOR_BIN, else target/release/pocketvisor (built
first). Needs /dev/kvm.";

#[derive(Debug, Clone)]
struct Opts {
    runs: usize,
    mb: u64,
    qemu: bool,
    bin: Option<PathBuf>,
    probe: Option<PathBuf>,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut o = Opts {
        runs: 5,
        mb: 256,
        qemu: true,
        bin: None,
        probe: None,
    };
    let mut args = Args::new(args, USAGE);
    while let Some(arg) = args.next_flag() {
        match arg.as_str() {
            "--runs" => o.runs = args.parse("--runs")?,
            "--mb" => o.mb = args.parse("--mb")?,
            "--no-qemu" => o.qemu = false,
            "--bin" => o.bin = Some(args.value("--bin")?.into()),
            "--probe" => o.probe = Some(args.value("--probe")?.into()),
            other => return Err(args.unknown(other)),
        }
    }
    if o.runs == 0 || o.mb == 0 {
        bail!("--runs and --mb must be at least 1");
    }
    Ok(o)
}

fn main() {
    let result = parse_args(std::env::args().skip(1)).and_then(run);
    if let Err(e) = result {
        eprintln!("disk_crypt: error: {e:#}");
        std::process::exit(1);
    }
}

/// The files one run reads: a plain image, its encrypted twin for pocketvisor, and a LUKS
/// image of the same data for QEMU; the key, on disk only for the bench's own use.
struct Images {
    plain: PathBuf,
    encrypted: PathBuf,
    key_file: PathBuf,
    key: DiskKey,
    luks: Option<PathBuf>,
}

/// A LUKS passphrase for QEMU's bench image (not a secret: the image holds test data).
const LUKS_SECRET: &str = "pocketvisor-bench";

fn random_key() -> Result<DiskKey> {
    let mut bytes = [0u8; 64];
    let mut f = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut bytes)?;
    DiskKey::from_slice(&bytes).context("a random disk key")
}

fn make_images(dir: &Path, mb: u64, qemu_img: Option<&Path>) -> Result<Images> {
    std::fs::create_dir_all(dir)?;
    // The probe reads `mb` MiB starting past sector 0: one more MiB of data.
    let len = usize::try_from((mb + 1) * 1024 * 1024)?;
    let plain_data = e2e::host::pattern_bytes(0xc0de, len);
    let plain = dir.join(format!("crypt-plain-{mb}m.img"));
    std::fs::write(&plain, &plain_data)?;

    let key = random_key()?;
    let cipher = SectorCipher::new(&key);
    let mut data = plain_data;
    for (i, chunk) in data.chunks_mut(1024 * 1024).enumerate() {
        cipher
            .encrypt(chunk, i as u64 * 2048)
            .context("encrypt the image")?;
    }
    let encrypted = dir.join(format!("crypt-xts-{mb}m.img"));
    std::fs::write(&encrypted, &data)?;
    let key_file = dir.join("crypt-bench.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_file)?;
        f.write_all(key.as_bytes())?;
    }

    let luks = match qemu_img {
        None => None,
        Some(qemu_img) => {
            let luks = dir.join(format!("crypt-luks-{mb}m.img"));
            let _ = std::fs::remove_file(&luks);
            let out = Command::new(qemu_img)
                .args(["convert", "--object"])
                .arg(format!("secret,id=sec0,data={LUKS_SECRET}"))
                .args(["-f", "raw", "-O", "luks", "-o"])
                .arg("key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=200")
                .arg(&plain)
                .arg(&luks)
                .output()
                .context("run qemu-img")?;
            if !out.status.success() {
                bail!(
                    "qemu-img convert to LUKS failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Some(luks)
        }
    };
    Ok(Images {
        plain,
        encrypted,
        key_file,
        key,
        luks,
    })
}

/// MiB/s between the probe's `blk-bench start` and `end` lines.
fn probe_read(mut vm: RunningVm, what: &str) -> Result<f64> {
    let timeout = Duration::from_secs(300);
    let start = vm
        .wait_for_line(timeout, |l| l.starts_with("PROBE blk-bench start"))
        .with_context(|| format!("{what}: no blk-bench start\n{}", vm.drain()))?;
    let end = vm
        .wait_for_line(timeout, |l| l.starts_with("PROBE blk-bench end"))
        .with_context(|| {
            format!(
                "{what}: no blk-bench end\n{}\n{}",
                vm.drain(),
                vm.stderr_so_far()
            )
        })?;
    let bytes: f64 = e2e::ProbeLine::parse(&end.1)
        .and_then(|p| p.field_u64("bytes"))
        .context("no bytes= on blk-bench end")? as f64;
    let took = end.0.saturating_sub(start.0).as_secs_f64();
    let _ = vm.wait_for(Duration::from_secs(30));
    if bytes == 0.0 || took == 0.0 {
        bail!("{what}: nothing read");
    }
    Ok(bytes / (1024.0 * 1024.0) / took)
}

fn cmdline(mb: u64) -> String {
    format!("pv.mode=blk-bench pv.blk.mb={mb}")
}

/// pocketvisor on `disk`; an encrypted one gets its key on stdin from `key_file`.
fn pocketvisor(
    bin: &Path,
    probe: &Path,
    mb: u64,
    disk: &Path,
    key_file: Option<&Path>,
) -> Result<f64> {
    let dir = disk.parent().context("the image's directory")?;
    let config = dir.join(if key_file.is_some() {
        "crypt-xts.toml"
    } else {
        "crypt-plain.toml"
    });
    let encrypted = if key_file.is_some() {
        ", encrypted = true"
    } else {
        ""
    };
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\ncmdline = {:?}\nmemory_mib = 128\n\
             disks = [{{ path = {:?}, read_only = true{encrypted} }}]\n",
            probe.display().to_string(),
            cmdline(mb),
            disk.display().to_string()
        ),
    )?;
    // RunningVm gives the VMM no stdin: a shell redirects the key file into it.
    let mut cmd = Command::new("sh");
    cmd.arg("-c");
    match key_file {
        Some(_) => cmd.arg(r#"exec "$0" run --config "$1" --disk-keys-stdin < "$2""#),
        None => cmd.arg(r#"exec "$0" run --config "$1""#),
    };
    cmd.arg(bin).arg(&config);
    if let Some(k) = key_file {
        cmd.arg(k);
    }
    let what = if key_file.is_some() {
        "pocketvisor encrypted"
    } else {
        "pocketvisor plain"
    };
    probe_read(RunningVm::spawn(cmd, Duration::from_secs(300)), what)
}

fn qemu(qemu_bin: &Path, probe: &Path, mb: u64, disk: &Path, luks: bool) -> Result<f64> {
    let mut q = QemuCommand::new(qemu_bin, Machine::Pc, probe, &cmdline(mb));
    if luks {
        q.extra.extend([
            "-object".to_string(),
            format!("secret,id=sec0,data={LUKS_SECRET}"),
            "-blockdev".to_string(),
            format!(
                "driver=file,filename={},node-name=f0,read-only=on",
                disk.display()
            ),
            "-blockdev".to_string(),
            "driver=luks,file=f0,key-secret=sec0,node-name=d0,read-only=on".to_string(),
            "-device".to_string(),
            "virtio-blk-pci,drive=d0,disable-legacy=on".to_string(),
        ]);
    } else {
        q.disks.push((disk.to_path_buf(), true));
    }
    let what = if luks { "QEMU LUKS" } else { "QEMU plain" };
    probe_read(
        RunningVm::spawn(q.command(), Duration::from_secs(300)),
        what,
    )
}

/// Our cipher alone: decrypting the encrypted image in memory, 1 MiB at a time.
fn cipher_in_memory(images: &Images) -> Result<f64> {
    let mut data = std::fs::read(&images.encrypted)?;
    let cipher = SectorCipher::new(&images.key);
    let start = Instant::now();
    for (i, chunk) in data.chunks_mut(1024 * 1024).enumerate() {
        cipher.decrypt(chunk, i as u64 * 2048)?;
    }
    let took = start.elapsed().as_secs_f64();
    Ok(data.len() as f64 / (1024.0 * 1024.0) / took)
}

/// OpenSSL's AES-256-XTS on this CPU: `openssl speed -evp aes-256-xts` over 4 KiB blocks
/// (`openssl enc` has no XTS), in MiB/s.
fn openssl() -> Result<f64> {
    let out = Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "aes-256-xts",
            "-seconds",
            "1",
            "-bytes",
            "4096",
        ])
        .output()
        .context("run openssl speed")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "AES-256-XTS    6860044.61k" (thousands of bytes per second).
    let kb: f64 = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("AES-256-XTS"))
        .and_then(|v| v.trim().strip_suffix('k'))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no AES-256-XTS figure from openssl speed: {text}"))?;
    Ok(kb * 1000.0 / (1024.0 * 1024.0))
}

/// Samples of one row of the table.
struct Row {
    name: &'static str,
    samples: Vec<f64>,
}

fn run(o: Opts) -> Result<()> {
    let bin = bench::util::pocketvisor_bin(o.bin.as_deref(), true, "disk_crypt")?;
    let probe = bench::util::probe_elf(o.probe.as_deref(), "disk_crypt")?;
    let qemu_bin = if o.qemu {
        QemuCommand::find_binary()
    } else {
        None
    };
    let qemu_img = qemu_bin.as_ref().and_then(|_| e2e::host::which("qemu-img"));
    if o.qemu && qemu_img.is_none() {
        eprintln!("disk_crypt: QEMU or qemu-img is not installed: its rows are left out");
    }
    let dir = e2e::workspace_root().join("bench/out");
    eprintln!(
        "disk_crypt: writing {} MiB images in {}",
        o.mb + 1,
        dir.display()
    );
    let images = make_images(&dir, o.mb, qemu_img.as_deref())?;
    let has_openssl = e2e::host::which("openssl").is_some();

    let mut rows = [
        Row {
            name: "pocketvisor, plain",
            samples: vec![],
        },
        Row {
            name: "pocketvisor, encrypted (AES-256-XTS)",
            samples: vec![],
        },
        Row {
            name: "QEMU -M pc, plain",
            samples: vec![],
        },
        Row {
            name: "QEMU -M pc, LUKS (aes-256-xts-plain64)",
            samples: vec![],
        },
        Row {
            name: "host: our cipher in memory",
            samples: vec![],
        },
        Row {
            name: "host: openssl speed -evp aes-256-xts, 4 KiB",
            samples: vec![],
        },
    ];
    for run in 1..=o.runs {
        eprintln!("disk_crypt: run {run} of {}", o.runs);
        rows[0]
            .samples
            .push(pocketvisor(&bin, &probe, o.mb, &images.plain, None)?);
        rows[1].samples.push(pocketvisor(
            &bin,
            &probe,
            o.mb,
            &images.encrypted,
            Some(&images.key_file),
        )?);
        if let (Some(q), Some(luks)) = (&qemu_bin, &images.luks) {
            rows[2]
                .samples
                .push(qemu(q, &probe, o.mb, &images.plain, false)?);
            rows[3].samples.push(qemu(q, &probe, o.mb, luks, true)?);
        }
        rows[4].samples.push(cipher_in_memory(&images)?);
        if has_openssl {
            rows[5].samples.push(openssl()?);
        }
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\ndisk_crypt: {} MiB read sequentially by the probe from a read-only disk, {} runs, \
         load {}",
        o.mb,
        o.runs,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("\n| path | MiB/s, median (range) |");
    println!("| --- | --- |");
    for row in rows.iter().filter(|r| !r.samples.is_empty()) {
        let min = row.samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = row.samples.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {:.0} ({:.0}-{:.0}) |",
            row.name,
            median(&row.samples).unwrap_or(0.0),
            min,
            max
        );
    }
    let ratio = |a: usize, b: usize| -> Option<Vec<f64>> {
        let (x, y) = (&rows[a].samples, &rows[b].samples);
        (!x.is_empty() && x.len() == y.len()).then(|| x.iter().zip(y).map(|(e, p)| e / p).collect())
    };
    if let Some(r) = ratio(1, 0) {
        println!(
            "\npocketvisor encrypted / plain, per run: median {:.2} ({})",
            median(&r).unwrap_or(0.0),
            r.iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(r) = ratio(3, 2) {
        println!(
            "QEMU LUKS / plain, per run: median {:.2} ({})",
            median(&r).unwrap_or(0.0),
            r.iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> impl Iterator<Item = String> + '_ {
        s.split_whitespace().map(String::from)
    }

    #[test]
    fn flags_parse_and_bad_ones_are_errors() {
        let o = parse_args(args("--runs 2 --mb 8 --no-qemu")).unwrap();
        assert_eq!((o.runs, o.mb, o.qemu), (2, 8, false));
        assert!(parse_args(args("--mb 0")).is_err());
        assert!(parse_args(args("--bogus")).is_err());
    }
}
