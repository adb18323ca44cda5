//! What the pocketvisor-vs-QEMU bench binaries share: their common flags, the set-up before the
//! first run (binaries, probe, work directory), the probe's start on pocketvisor, runs that
//! alternate the two VMMs, the median and range of a figure, and reading a guest's serial log
//! or a server's stderr while it runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use e2e::qemu::QemuCommand;

use crate::util::{Args, Proc};

/// Which VMM a sample is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Pocketvisor,
    Qemu,
}

impl Vmm {
    /// The name in tables and JSON (QEMU runs as `-M microvm`).
    pub fn label(self) -> &'static str {
        match self {
            Vmm::Pocketvisor => "pocketvisor",
            Vmm::Qemu => "qemu-microvm",
        }
    }
}

/// The flags every comparing bench takes: `--runs N --no-qemu --json --bin PATH --probe PATH
/// --work DIR`.
#[derive(Debug, Clone)]
pub struct Common {
    pub runs: usize,
    pub qemu: bool,
    pub json: bool,
    pub bin: Option<PathBuf>,
    pub probe: Option<PathBuf>,
    pub work: Option<PathBuf>,
}

impl Common {
    /// The defaults: `runs` runs, QEMU included, a table on stdout.
    pub fn new(runs: usize) -> Common {
        Common {
            runs,
            qemu: true,
            json: false,
            bin: None,
            probe: None,
            work: None,
        }
    }

    /// Takes `flag` (and its value) if it is one of the common flags; false if it is not.
    pub fn take<I: Iterator<Item = String>>(
        &mut self,
        flag: &str,
        args: &mut Args<I>,
    ) -> Result<bool> {
        match flag {
            "--runs" => self.runs = args.parse("--runs")?,
            "--no-qemu" => self.qemu = false,
            "--json" => self.json = true,
            "--bin" => self.bin = Some(args.value("--bin")?.into()),
            "--probe" => self.probe = Some(args.value("--probe")?.into()),
            "--work" => self.work = Some(args.value("--work")?.into()),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Ends a bench binary: on an error prints `tag: error: ...` and exits with status 1.
pub fn exit_on_error(tag: &str, result: Result<()>) {
    if let Err(e) = result {
        eprintln!("{tag}: error: {e:#}");
        std::process::exit(1);
    }
}

/// What a run needs: the pocketvisor binary (release, built first), the probe guest, QEMU
/// when asked for and found, and an empty work directory, removed again on drop.
pub struct Setup {
    pub bin: PathBuf,
    pub probe: PathBuf,
    pub qemu: Option<PathBuf>,
    pub work: PathBuf,
    /// `/proc/loadavg` before the first run, for the table's footnote.
    pub load: String,
}

impl Setup {
    /// Checks for /dev/kvm and finds everything; `name` names the default work directory
    /// (`$TMPDIR/pv-bench-NAME-PID`).
    pub fn new(c: &Common, tag: &str, name: &str) -> Result<Setup> {
        if !Path::new("/dev/kvm").exists() {
            bail!("/dev/kvm is missing");
        }
        let bin = crate::util::pocketvisor_bin(c.bin.as_deref(), true, tag)?;
        let probe = crate::util::probe_elf(c.probe.as_deref(), tag)?;
        let qemu = if c.qemu {
            QemuCommand::find_binary()
        } else {
            None
        };
        if c.qemu && qemu.is_none() {
            eprintln!("{tag}: qemu-system-x86_64 not found, pocketvisor only");
        }
        let work = c.work.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("pv-bench-{name}-{}", std::process::id()))
        });
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        Ok(Setup {
            bin,
            probe,
            qemu,
            work,
            load: load.trim().to_string(),
        })
    }

    /// Starts `pocketvisor run` of the probe with `cmdline` and `mem_mib` MiB of RAM, its serial
    /// log at `log` and its API socket at `api`; stdin, stdout and stderr closed.
    pub fn run_probe(&self, cmdline: &str, mem_mib: u64, log: &Path, api: &Path) -> Result<Proc> {
        Ok(Proc(
            Command::new(&self.bin)
                .args(["run", "--kernel"])
                .arg(&self.probe)
                .args(["--cmdline", cmdline, "--memory", &mem_mib.to_string()])
                .arg("--serial")
                .arg(format!("file:{}", log.display()))
                .arg("--api-socket")
                .arg(api)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    }

    /// The VMMs to run: pocketvisor, and QEMU when it was found.
    pub fn vmms(&self) -> Vec<Vmm> {
        let mut v = vec![Vmm::Pocketvisor];
        if self.qemu.is_some() {
            v.push(Vmm::Qemu);
        }
        v
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// The samples of a series of runs, and the errors of the runs that failed.
#[derive(Debug)]
pub struct Samples<S> {
    pub ok: Vec<(Vmm, S)>,
    pub errors: Vec<(Vmm, String)>,
}

impl<S> Samples<S> {
    /// Figure `f` of each of `vmm`'s samples.
    pub fn of(&self, vmm: Vmm, f: impl Fn(&S) -> f64) -> Vec<f64> {
        self.ok
            .iter()
            .filter(|(v, _)| *v == vmm)
            .map(|(_, s)| f(s))
            .collect()
    }

    /// How many of `vmm`'s runs gave a sample.
    pub fn count(&self, vmm: Vmm) -> usize {
        self.ok.iter().filter(|(v, _)| *v == vmm).count()
    }

    /// The errors of `vmm`'s failed runs.
    pub fn errors(&self, vmm: Vmm) -> Vec<String> {
        self.errors
            .iter()
            .filter(|(v, _)| *v == vmm)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

/// Runs `once` `runs` times per VMM, alternating which VMM goes first so neither always runs
/// on a warmer machine. Each run gets a fresh directory `work/<vmm>-<what>-<run>` (removed
/// after it); a failed run is kept as an error, not a sample.
pub fn alternate<S>(
    setup: &Setup,
    tag: &str,
    what: &str,
    runs: usize,
    mut once: impl FnMut(Vmm, &Path) -> Result<S>,
) -> Result<Samples<S>> {
    let vmms = setup.vmms();
    let mut samples = Samples {
        ok: Vec::new(),
        errors: Vec::new(),
    };
    for run in 0..runs {
        let mut order = vmms.clone();
        if run % 2 == 1 {
            order.reverse();
        }
        for vmm in order {
            eprintln!("{tag}: {what} run {}/{runs} {vmm:?}", run + 1);
            let dir = setup
                .work
                .join(format!("{vmm:?}-{what}-{run}").replace(' ', "-"));
            std::fs::create_dir_all(&dir)?;
            match once(vmm, &dir) {
                Ok(s) => samples.ok.push((vmm, s)),
                Err(e) => samples.errors.push((vmm, format!("{e:#}"))),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(samples)
}

/// Median and range of one figure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// The median, minimum and maximum of the finite values of `v` (NaN and infinities when
    /// there are none).
    pub fn of(v: &[f64]) -> Stat {
        let finite = || v.iter().copied().filter(|x| x.is_finite());
        Stat {
            median: crate::util::median(v).unwrap_or(f64::NAN),
            min: finite().fold(f64::INFINITY, f64::min),
            max: finite().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

impl std::fmt::Display for Stat {
    /// `median (min-max)`, one decimal.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} ({:.1}-{:.1})", self.median, self.min, self.max)
    }
}

/// The complete lines of a serial log (the part after the last newline is left out).
pub fn lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut v: Vec<String> = text.split('\n').map(|l| l.trim_end().to_string()).collect();
    v.pop();
    v
}

/// Polls the lines of `path` every 0.2 ms until `find` returns something; that and the time
/// since `t0`. Fails after `timeout` with the log's last lines.
pub fn wait_lines<T>(
    path: &Path,
    t0: Instant,
    timeout: Duration,
    what: &str,
    find: impl Fn(&[String]) -> Option<T>,
) -> Result<(Duration, T)> {
    loop {
        if let Some(v) = find(&lines(path)) {
            return Ok((t0.elapsed(), v));
        }
        if t0.elapsed() > timeout {
            let tail = lines(path);
            let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
            bail!("timed out waiting for {what} in {}: {tail}", path.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Polls the lines of `path` until `pred` holds for them; fails after `timeout`.
pub fn wait_until(
    path: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) -> Result<()> {
    wait_lines(path, Instant::now(), timeout, what, |l| {
        pred(l).then_some(())
    })?;
    Ok(())
}

/// Polls `stderr` (a listening process's) every 5 ms until it says `says` and an address up to
/// the end of that line; that address. Fails after `timeout`, saying that `who` did not listen.
pub fn listen_address(stderr: &Path, says: &str, timeout: Duration, who: &str) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(stderr).unwrap_or_default();
        if let Some((addr, _)) = text.split(says).nth(1).and_then(|r| r.split_once('\n')) {
            return Ok(addr.trim().to_string());
        }
        if t0.elapsed() > timeout {
            bail!("{who} did not listen: {text}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The value of field `key=` in a line of space-separated fields.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_keeps_finite_values_for_the_range() {
        let s = Stat::of(&[3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.to_string(), "2.0 (1.0-3.0)");
        assert!(Stat::of(&[]).median.is_nan());
    }

    #[test]
    fn fields_and_lines() {
        assert_eq!(field("PROBE x a=1 b=22", "b"), Some("22"));
        assert_eq!(field("PROBE x ab=1", "a"), None);
        let dir = std::env::temp_dir().join(format!("pv-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        std::fs::write(&log, "one\ntwo\r\nthr").unwrap();
        assert_eq!(lines(&log), vec!["one", "two"]);
        let (_, n) = wait_lines(&log, Instant::now(), Duration::from_secs(1), "two", |l| {
            l.iter().position(|x| x == "two")
        })
        .unwrap();
        assert_eq!(n, 1);
        let e = wait_lines(&log, Instant::now(), Duration::ZERO, "four", |l| {
            l.iter().position(|x| x == "four")
        })
        .unwrap_err();
        assert!(e.to_string().contains("timed out waiting for four"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn common_flags_are_taken_and_others_left() {
        let words: Vec<String> = "--runs 5 --json --probe p --mem 3"
            .split_whitespace()
            .map(String::from)
            .collect();
        let mut args = Args::new(words.into_iter(), "usage");
        let mut c = Common::new(3);
        let mut left = Vec::new();
        while let Some(f) = args.next_flag() {
            if !c.take(&f, &mut args).unwrap() {
                left.push(f);
                args.value("--mem").unwrap();
            }
        }
        assert_eq!((c.runs, c.json, c.qemu), (5, true, true));
        assert_eq!(c.probe.as_deref(), Some(Path::new("p")));
        assert_eq!(left, vec!["--mem"]);
    }
}
