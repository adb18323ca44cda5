//! `bench`: pocketvisor against QEMU on the same probe guest, in one run.
//!
//! ```text
//! cargo run -p bench --release -- [--runs 5] [--json] [--qemu-machine auto|microvm|pc]
//! ```
//!
//! Metrics (medians over `--runs`): time from process start to `PROBE ready`, time from
//! start to exit of a minimal selftest, VMM RSS with a 256 MiB guest idling in counter
//! mode, the port-I/O exit round trip, and virtio-blk sequential read throughput (with the
//! host's own read of the same file for reference).

mod metrics;
mod report;
mod runner;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use e2e::qemu::Machine;

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Runs per metric and VMM.
    pub runs: usize,
    /// Print JSON instead of a table.
    pub json: bool,
    /// QEMU machine type; `None` picks the first that passes the probe selftest.
    pub qemu_machine: Option<Machine>,
    /// Skip QEMU even if installed.
    pub no_qemu: bool,
    /// Measure QEMU only (pocketvisor not built, or to calibrate).
    pub no_pocketvisor: bool,
    /// The pocketvisor binary.
    pub bin: Option<PathBuf>,
    /// The probe guest.
    pub probe: Option<PathBuf>,
    /// `outb` iterations of the port-I/O benchmark.
    pub pio_iters: u64,
    /// MiB read by the block benchmark.
    pub blk_mb: u64,
}

const USAGE: &str = "\
usage: bench [--runs N] [--json] [--qemu-machine auto|microvm|pc] [--no-qemu] [--no-pocketvisor]
             [--bin PATH] [--probe PATH] [--pio-iters N] [--blk-mb N]

Compares pocketvisor with qemu-system-x86_64 on guest/out/probe.elf.
The pocketvisor binary defaults to $POCKETVISOR_BIN, else target/release/pocketvisor
(built with `cargo build --release -p pocketvisor` when missing).";

fn parse_args(args: impl Iterator<Item = String>) -> Result<Opts> {
    let mut opts = Opts {
        runs: 5,
        json: false,
        qemu_machine: None,
        no_qemu: false,
        no_pocketvisor: false,
        bin: None,
        probe: None,
        pio_iters: 20_000,
        blk_mb: 64,
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--runs" => opts.runs = value("--runs")?.parse().context("--runs")?,
            "--json" => opts.json = true,
            "--no-qemu" => opts.no_qemu = true,
            "--no-pocketvisor" => opts.no_pocketvisor = true,
            "--qemu-machine" => {
                opts.qemu_machine = match value("--qemu-machine")?.as_str() {
                    "auto" => None,
                    "microvm" => Some(Machine::Microvm),
                    "pc" => Some(Machine::Pc),
                    other => bail!("unknown machine {other:?}\n{USAGE}"),
                }
            }
            "--bin" => opts.bin = Some(value("--bin")?.into()),
            "--probe" => opts.probe = Some(value("--probe")?.into()),
            "--pio-iters" => {
                opts.pio_iters = value("--pio-iters")?.parse().context("--pio-iters")?
            }
            "--blk-mb" => opts.blk_mb = value("--blk-mb")?.parse().context("--blk-mb")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if opts.no_qemu && opts.no_pocketvisor {
        bail!("--no-qemu and --no-pocketvisor leave nothing to measure");
    }
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if opts.blk_mb == 0 || opts.pio_iters == 0 {
        bail!("--blk-mb and --pio-iters must be at least 1");
    }
    Ok(opts)
}

fn main() {
    let result = parse_args(std::env::args().skip(1)).and_then(run);
    if let Err(e) = result {
        eprintln!("bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(opts: Opts) -> Result<()> {
    let setup = runner::Setup::new(&opts)?;
    let results = metrics::collect(&setup, &opts)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", report::table(&results));
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
    fn defaults_and_flags() {
        let o = parse_args(args("")).unwrap();
        assert_eq!(o.runs, 5);
        assert!(!o.json);
        let o = parse_args(args("--runs 3 --json --qemu-machine pc --blk-mb 8")).unwrap();
        assert_eq!(o.runs, 3);
        assert!(o.json);
        assert_eq!(o.qemu_machine, Some(Machine::Pc));
        assert_eq!(o.blk_mb, 8);
    }

    #[test]
    fn bad_flags_are_errors() {
        assert!(parse_args(args("--runs")).is_err());
        assert!(parse_args(args("--runs 0")).is_err());
        assert!(parse_args(args("--qemu-machine q99")).is_err());
        assert!(parse_args(args("--frobnicate")).is_err());
    }
}
