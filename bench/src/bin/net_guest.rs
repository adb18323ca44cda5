//! `net_guest`: a guest's network throughput through virtio-net with a 100-rule network
//! policy against none, in one run (issue 12: at least 0.9x).
//!
//! ```text
//! cargo run -p bench --release --bin net_guest -- [--runs 3] [--secs 3] [--bin PATH] [--probe PATH]
//! ```
//!
//! The probe guest (`pv.net.frames=... pv.net.flood=MS`) sends 1514-byte UDP/IPv4 frames
//! from 10.0.0.2 to 10.9.9.9 for `--secs` seconds through pocketvisor's virtio-net to a TAP in
//! a network namespace the bench makes, a transmit queue's worth (16) per notification,
//! polling until the VMM has used them all (taken each frame off the ring, checked it against
//! the policy and written it to the TAP), and counts them. Three cases, alternated run by run:
//!
//! - `none`: no `[net.filter]`;
//! - `100 rules, one flow`: default deny, 99 rules that do not match, the 100th allows
//!   10.9.0.0/16 UDP; one destination port, so after the first frame a flow-table hit;
//! - `100 rules, new flows`: the same policy, the destination port going up by one each frame
//!   over 4096 ports, so frames keep being decided by the rules.
//!
//! Needs root (a network namespace and a TAP), ip(8), /dev/net/tun and /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::compare::{exit_on_error, field, lines, wait_lines, Stat};
use bench::util::{Args, Proc};
use e2e::host::NetNs;

const USAGE: &str = "\
usage: net_guest [--runs N] [--secs S] [--bin PATH] [--probe PATH]

A probe guest's virtio-net throughput with a 100-rule network policy vs none. The pocketvisor
binary defaults to $POCKETVISOR_BIN, else target/release/pocketvisor (built first). Needs root,
ip(8), /dev/net/tun and /dev/kvm.";

const TAG: &str = "net_guest";
const TAP: &str = "pvbench0";
const GUEST_MAC: &str = "02:50:56:00:00:27";
const FRAME: usize = 1514;

/// One case of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    None,
    OneFlow,
    NewFlows,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::None => "none",
            Case::OneFlow => "100 rules, one flow",
            Case::NewFlows => "100 rules, new flows",
        }
    }
}

/// One guest run: frames per second and MiB/s of frame bytes, as the guest counted them.
#[derive(Debug, Clone, Copy)]
struct Sample {
    frames_per_s: f64,
    mib_per_s: f64,
}

fn main() {
    exit_on_error(TAG, run());
}

fn run() -> Result<()> {
    let mut args = Args::new(std::env::args().skip(1), USAGE);
    let (mut runs, mut secs) = (3usize, 3u64);
    let (mut bin, mut probe) = (None::<PathBuf>, None::<PathBuf>);
    while let Some(arg) = args.next_flag() {
        match arg.as_str() {
            "--runs" => runs = args.parse("--runs")?,
            "--secs" => secs = args.parse("--secs")?,
            "--bin" => bin = Some(args.value("--bin")?.into()),
            "--probe" => probe = Some(args.value("--probe")?.into()),
            other => return Err(args.unknown(other)),
        }
    }
    if runs == 0 || secs == 0 {
        bail!("--runs and --secs must be at least 1");
    }
    if !Path::new("/dev/kvm").exists() || !Path::new("/dev/net/tun").exists() {
        bail!("needs /dev/kvm and /dev/net/tun");
    }
    if e2e::host::which("ip").is_none() {
        bail!("needs ip(8) (iproute2)");
    }
    let bin = bench::util::pocketvisor_bin(bin.as_deref(), true, TAG)?;
    let probe = bench::util::probe_elf(probe.as_deref(), TAG)?;
    let ns = NetNs::create().context("create a network namespace (needs root)")?;
    ns.add_tap(TAP).context("create the tap in the namespace")?;
    let work = std::env::temp_dir().join(format!("pv-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let cases = [Case::None, Case::OneFlow, Case::NewFlows];
    let mut samples: Vec<(Case, Sample)> = Vec::new();
    let mut errors: Vec<(Case, String)> = Vec::new();
    for run in 0..runs {
        let mut order = cases.to_vec();
        if run % 2 == 1 {
            order.reverse();
        }
        for case in order {
            eprintln!("{TAG}: run {}/{runs} {}", run + 1, case.label());
            match once(&bin, &probe, ns.name(), &work, case, secs) {
                Ok(s) => samples.push((case, s)),
                Err(e) => errors.push((case, format!("{e:#}"))),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);

    let of = |case: Case, f: fn(&Sample) -> f64| -> Vec<f64> {
        samples
            .iter()
            .filter(|(c, _)| *c == case)
            .map(|(_, s)| f(s))
            .collect()
    };
    let base = Stat::of(&of(Case::None, |s| s.frames_per_s)).median;
    println!("| policy | runs | frames/s | MiB/s of frames | vs none |");
    println!("|---|---|---|---|---|");
    for case in cases {
        let fps = Stat::of(&of(case, |s| s.frames_per_s));
        let mib = Stat::of(&of(case, |s| s.mib_per_s));
        println!(
            "| {} | {} | {:.0} ({:.0}-{:.0}) | {mib} | {:.2}x |",
            case.label(),
            of(case, |s| s.frames_per_s).len(),
            fps.median,
            fps.min,
            fps.max,
            fps.median / base
        );
        for (_, e) in errors.iter().filter(|(c, _)| *c == case) {
            println!("  error ({}): {e}", case.label());
        }
    }
    println!(
        "\nmedian (min-max); {FRAME}-byte UDP frames for {secs} s per run, 16 per notification, \
         each burst used before the next; 1 vCPU; /proc/loadavg at start: {}",
        load.trim()
    );
    Ok(())
}

/// The VM configuration: the probe, a NIC on the tap, and the case's policy.
fn config(probe: &Path, case: Case) -> String {
    let mut c = format!(
        "kernel = {:?}\n[[net]]\ntap = \"{TAP}\"\nmac = \"{GUEST_MAC}\"\n",
        probe.display()
    );
    if case != Case::None {
        c.push_str("[net.filter]\ndefault = \"deny\"\nrules = [\n");
        for i in 0..99 {
            c.push_str(&format!(
                "{{ action = \"allow\", cidr = \"172.16.{i}.0/24\", protocol = \"tcp\", ports = [443, 443] }},\n"
            ));
        }
        c.push_str("{ action = \"allow\", cidr = \"10.9.0.0/16\", protocol = \"udp\" },\n]\n");
    }
    c
}

/// A 1514-byte UDP/IPv4 frame from the guest (10.0.0.2:4000) to 10.9.9.9:7000, as hex.
fn frame_hex() -> String {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0x50, 0x56, 0x00, 0x00, 0x27]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = u16::try_from(FRAME - 14).unwrap_or(0);
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 9, 9, 9]);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&7000u16.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(FRAME, 0x5a);
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// One guest flooding the tap under `case`'s policy.
fn once(bin: &Path, probe: &Path, ns: &str, work: &Path, case: Case, secs: u64) -> Result<Sample> {
    let cfg = work.join("vm.toml");
    std::fs::write(&cfg, config(probe, case))?;
    let log = work.join("serial.log");
    let _ = std::fs::remove_file(&log);
    let ports = if case == Case::NewFlows { 4096 } else { 1 };
    let cmdline = format!(
        "pv.tests=net pv.net.wait=1 pv.net.frames={} pv.net.flood={} pv.net.flood.ports={ports}",
        frame_hex(),
        secs * 1000
    );
    let _vm = Proc(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .args(["--cmdline", &cmdline, "--memory", "128M"])
            .arg("--serial")
            .arg(format!("file:{}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start pocketvisor")?,
    );
    let limit = Duration::from_secs(secs + 60);
    let (_, line) = wait_lines(&log, Instant::now(), limit, "the flood's end", |l| {
        l.iter()
            .find(|x| x.starts_with("PROBE net flood ") || x.contains(" fail "))
            .cloned()
    })?;
    if !line.starts_with("PROBE net flood ") {
        bail!("the guest failed: {line} ({})", lines(&log).join(" | "));
    }
    let num = |k: &str| -> Result<f64> {
        field(&line, k)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no {k} in {line}"))
    };
    let (frames, bytes, us) = (num("frames")?, num("bytes")?, num("us")?);
    if frames < 1.0 || us < 1.0 {
        bail!("no frames sent: {line}");
    }
    Ok(Sample {
        frames_per_s: frames / (us / 1e6),
        mib_per_s: bytes / (us / 1e6) / f64::from(1 << 20),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_a_whole_udp_datagram_the_last_rule_allows() {
        let hex = frame_hex();
        assert_eq!(hex.len(), FRAME * 2);
        let b: Vec<u8> = (0..FRAME)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(u16::from_be_bytes([b[16], b[17]]) as usize, FRAME - 14);
        assert_eq!(u16::from_be_bytes([b[38], b[39]]) as usize, FRAME - 34);
        assert_eq!(&b[30..34], &[10, 9, 9, 9]);
        let c = config(Path::new("/p"), Case::OneFlow);
        assert_eq!(c.matches("action = \"allow\"").count(), 100);
        assert!(!config(Path::new("/p"), Case::None).contains("filter"));
    }
}
