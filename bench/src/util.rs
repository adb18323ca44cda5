//! Helpers shared by the bench binaries: statistics, child processes, the pocketvisor binary,
//! command-line flags.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The median (mean of the middle two for even counts); non-finite samples are ignored.
pub fn median(samples: &[f64]) -> Option<f64> {
    let v = sorted(samples);
    if v.is_empty() {
        return None;
    }
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The `p`-th percentile (0..=100, nearest rank); non-finite samples are ignored.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let v = sorted(samples);
    if v.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    // In 0..=len (p is 0..=100), so the float-to-int conversion cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// A duration in milliseconds.
/// The host's 1, 5 and 15 minute load averages (`/proc/loadavg`), for a run's report.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion; fails with its stderr if it fails. Returns (stdout, time).
pub fn run_cmd(cmd: &mut Command) -> Result<(String, Duration)> {
    let t0 = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let t = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), t))
}

/// `cargo build --release -p pocketvisor` in the workspace `root`; `tag` prefixes the message.
pub fn build_release(root: &Path, tag: &str) -> Result<()> {
    eprintln!("{tag}: cargo build --release -p pocketvisor");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "pocketvisor"])
        .current_dir(root)
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("cargo build --release -p pocketvisor failed");
    }
    Ok(())
}

/// The pocketvisor binary: `explicit`, else $POCKETVISOR_BIN, else target/release/pocketvisor
/// (built first when `always_build`, or when missing).
pub fn pocketvisor_bin(explicit: Option<&Path>, always_build: bool, tag: &str) -> Result<PathBuf> {
    if let Some(b) = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("POCKETVISOR_BIN").map(PathBuf::from))
    {
        return Ok(b);
    }
    let b = e2e::paths::target_dir().join("release/pocketvisor");
    if always_build || !b.exists() {
        build_release(&e2e::paths::workspace_root(), tag)?;
    }
    Ok(b)
}

/// The probe guest: `explicit`, else guest/out/probe.elf (built with guest/build-probe.sh
/// when missing).
pub fn probe_elf(explicit: Option<&Path>, tag: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let root = e2e::paths::workspace_root();
    let p = root.join("guest/out/probe.elf");
    if !p.exists() {
        eprintln!("{tag}: guest/build-probe.sh");
        let st = Command::new("sh")
            .arg(root.join("guest/build-probe.sh"))
            .current_dir(&root)
            .status()
            .context("run guest/build-probe.sh")?;
        if !st.success() || !p.exists() {
            bail!("guest/build-probe.sh did not build {}", p.display());
        }
    }
    Ok(p)
}

/// A bench binary's command-line flags, read one by one; errors carry the usage text.
pub struct Args<I> {
    args: I,
    usage: &'static str,
}

impl<I: Iterator<Item = String>> Args<I> {
    /// Reads `args` (without the program name).
    pub fn new(args: I, usage: &'static str) -> Self {
        Args { args, usage }
    }

    /// The next flag, None at the end; `-h` and `--help` print the usage and exit the process.
    pub fn next_flag(&mut self) -> Option<String> {
        let flag = self.args.next()?;
        if flag == "-h" || flag == "--help" {
            println!("{}", self.usage);
            std::process::exit(0);
        }
        Some(flag)
    }

    /// The value following flag `name`.
    pub fn value(&mut self, name: &str) -> Result<String> {
        self.args
            .next()
            .with_context(|| format!("{name} needs a value\n{}", self.usage))
    }

    /// The value following flag `name`, parsed.
    pub fn parse<T>(&mut self, name: &str) -> Result<T>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let name = name.to_string();
        self.value(&name)?.parse().context(name)
    }

    /// The comma-separated list following flag `name`, each item parsed.
    pub fn list<T>(&mut self, name: &str) -> Result<Vec<T>>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let name = name.to_string();
        self.value(&name)?
            .split(',')
            .map(|item| item.trim().parse::<T>().context(name.clone()))
            .collect()
    }

    /// The error for a flag no arm knows.
    pub fn unknown(&self, flag: &str) -> anyhow::Error {
        anyhow::anyhow!("unknown argument {flag:?}\n{}", self.usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 95.0), Some(19.0));
        assert_eq!(percentile(&v, 100.0), Some(20.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&v, 101.0), None);
    }

    fn args(line: &str) -> Args<impl Iterator<Item = String>> {
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        Args::new(words.into_iter(), "usage: test")
    }

    #[test]
    fn flags_values_and_lists() {
        let mut a = args("--n 3 --l 2,4 --x");
        assert_eq!(a.next_flag().as_deref(), Some("--n"));
        assert_eq!(a.parse::<u32>("--n").unwrap(), 3);
        assert_eq!(a.next_flag().as_deref(), Some("--l"));
        assert_eq!(a.list::<u32>("--l").unwrap(), vec![2, 4]);
        assert_eq!(a.next_flag().as_deref(), Some("--x"));
        let e = a.value("--x").unwrap_err().to_string();
        assert_eq!(e, "--x needs a value\nusage: test");
        assert_eq!(a.next_flag(), None);
        let e = args("--n 2,x").list::<u8>("--n").unwrap_err();
        assert_eq!(e.to_string(), "--n");
        assert!(args("--n -1").parse::<u8>("--n").is_err());
        let u = args("").unknown("--bogus").to_string();
        assert_eq!(u, "unknown argument \"--bogus\"\nusage: test");
    }
}
