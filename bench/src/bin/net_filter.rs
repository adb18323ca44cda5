//! `net_filter`: what the VMM's network policy costs per frame, with 100 rules vs none.
//!
//! ```text
//! cargo run -p bench --release --bin net_filter -- [--frames 2000000] [--runs 5]
//! ```
//!
//! Each run pushes `--frames` 1514-byte UDP/IPv4 frames from the guest side through
//! [`devices::virtio::net::Filter::check`] plus a copy of the frame (what the device does with
//! every frame anyway), and reports frames per second and Gbit/s of frame bytes:
//!
//! - `none`: no filter, the copy alone (the device without a policy);
//! - `100 rules, one flow`: the frames of one allowed flow (after the first, a flow-table hit);
//! - `100 rules, new flows`: every frame a new destination port, so each is decided by the
//!   100 rules (the 100th allows it) and remembered: the worst case.
//!
//! This measures the filter in the device's path on this host, not a guest's end-to-end
//! network throughput (the probe guest has no traffic generator yet).

use std::time::{Duration, Instant};

use anyhow::Result;
use bench::util::{median, Args};
use devices::virtio::net::{Direction, Filter, IpNet, Proto, Rule, Verdict};

const USAGE: &str = "usage: net_filter [--frames N] [--runs N]";
const FRAME: usize = 1514;

fn frame(dst_port: u16) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 7]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45, 0, 0x05, 0xdc, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&[10, 0, 0, 2, 10, 9, 9, 9]);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.resize(FRAME, 0x5a);
    f
}

/// 99 rules that do not match 10.9.9.9, then one that allows it.
fn hundred_rules() -> Filter {
    let mut rules: Vec<Rule> = (0..99u8)
        .map(|i| Rule {
            verdict: Verdict::Allow,
            net: Some(IpNet::parse(&format!("172.16.{i}.0/24")).unwrap_or(IpNet {
                addr: std::net::Ipv4Addr::UNSPECIFIED.into(),
                prefix: 32,
            })),
            name: None,
            proto: Proto::Tcp,
            ports: Some((443, 443)),
        })
        .collect();
    rules.push(Rule {
        verdict: Verdict::Allow,
        net: IpNet::parse("10.9.0.0/16").ok(),
        name: None,
        proto: Proto::Udp,
        ports: None,
    });
    Filter::new(Verdict::Deny, rules)
}

/// Frames per second for `frames` frames through `filter` (none: the copy alone).
fn run(mut filter: Option<Filter>, frames: u64, new_flows: bool) -> f64 {
    let mut src = frame(7000);
    let mut dst = vec![0u8; FRAME];
    let t0 = Instant::now();
    let mut allowed = 0u64;
    for i in 0..frames {
        if new_flows {
            let port = u16::try_from(i % 60_000).unwrap_or(0) + 1024;
            src[36..38].copy_from_slice(&port.to_be_bytes());
        }
        let ok = match filter.as_mut() {
            None => true,
            Some(f) => f.check(&src, Direction::Out, t0) == Verdict::Allow,
        };
        if ok {
            dst.copy_from_slice(&src);
            allowed += 1;
        }
    }
    let secs = t0.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
    assert_eq!(allowed, frames, "every frame is allowed in this bench");
    std::hint::black_box(&dst);
    frames as f64 / secs
}

fn main() -> Result<()> {
    let mut args = Args::new(std::env::args().skip(1), USAGE);
    let (mut frames, mut runs) = (2_000_000u64, 5usize);
    while let Some(arg) = args.next_flag() {
        match arg.as_str() {
            "--frames" => frames = args.parse("--frames")?,
            "--runs" => runs = args.parse("--runs")?,
            other => return Err(args.unknown(other)),
        }
    }
    println!("| case | frames/s (median of {runs}) | Gbit/s of 1514-byte frames | vs none |");
    println!("| --- | --- | --- | --- |");
    let mut base = None;
    for (name, filtered, new_flows) in [
        ("none", false, false),
        ("100 rules, one flow", true, false),
        ("100 rules, new flows", true, true),
    ] {
        let samples: Vec<f64> = (0..runs)
            .map(|_| run(filtered.then(hundred_rules), frames, new_flows))
            .collect();
        let fps = median(&samples).unwrap_or(0.0);
        let base = *base.get_or_insert(fps);
        let gbit = fps * (FRAME * 8) as f64 / 1e9;
        println!(
            "| {name} | {fps:.0} | {gbit:.1} | {:.2}x |",
            if base > 0.0 { fps / base } else { 0.0 }
        );
    }
    Ok(())
}
