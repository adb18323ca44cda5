//! Boot, power-off, SMP, rng, config files and signals with the probe guest.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use e2e::{require_kvm, TempDir, VmCommand};

#[test]
fn boots_and_powers_off_cleanly() {
    if !require_kvm("boots_and_powers_off_cleanly") {
        return;
    }
    let cmdline = "pv.tests=pci pv.tag=hello";
    let out = VmCommand::probe(cmdline).run();
    let report = out.assert_clean_pass();
    report.expect(&["ready"]);
    let boot = report.expect(&["boot", "ok"]);
    assert_eq!(
        boot.field("cmdline"),
        Some(cmdline),
        "the guest saw a different command line\n{}",
        out.describe()
    );
}

fn all_vcpus_up(n: u32) {
    if !require_kvm(&format!("all_vcpus_come_up_with_{n}")) {
        return;
    }
    let out = VmCommand::probe("pv.tests=smp").vcpus(n).run();
    let report = out.assert_clean_pass();
    let smp = report.expect(&["smp", "ok"]);
    assert_eq!(
        smp.field_u64("count"),
        Some(u64::from(n)),
        "{}",
        out.describe()
    );
    let cpus: BTreeSet<String> = report
        .find_all(&["cpu"])
        .iter()
        .filter(|l| l.words.get(2).map(String::as_str) == Some("up"))
        .filter_map(|l| l.words.get(1).cloned())
        .collect();
    assert_eq!(
        cpus.len(),
        n as usize,
        "distinct `PROBE cpu <n> up` lines\n{}",
        out.describe()
    );
    let apics: BTreeSet<&str> = report
        .find_all(&["cpu"])
        .iter()
        .filter_map(|l| l.field("apic"))
        .collect();
    assert_eq!(
        apics.len(),
        n as usize,
        "distinct APIC ids\n{}",
        out.describe()
    );
}

#[test]
fn all_vcpus_come_up_with_1() {
    all_vcpus_up(1);
}

#[test]
fn all_vcpus_come_up_with_2() {
    all_vcpus_up(2);
}

#[test]
fn all_vcpus_come_up_with_4() {
    all_vcpus_up(4);
}

fn rng_bytes() -> String {
    let out = VmCommand::probe("pv.tests=rng").rng().run();
    let report = out.assert_clean_pass();
    let bytes = report
        .expect(&["rng", "ok"])
        .expect_field("bytes")
        .to_string();
    assert_eq!(bytes.len(), 64, "32 bytes as hex\n{}", out.describe());
    assert!(bytes.chars().all(|c| c.is_ascii_hexdigit()), "{bytes}");
    bytes
}

#[test]
fn rng_bytes_are_present_and_not_constant() {
    if !require_kvm("rng_bytes_are_present_and_not_constant") {
        return;
    }
    let first = rng_bytes();
    let pairs: BTreeSet<&str> = (0..32).map(|i| &first[2 * i..2 * i + 2]).collect();
    assert!(pairs.len() > 8, "rng bytes look constant: {first}");
    let second = rng_bytes();
    assert_ne!(first, second, "two boots got the same rng bytes");
}

#[test]
fn config_file_run_equals_flags_run() {
    if !require_kvm("config_file_run_equals_flags_run") {
        return;
    }
    let dir = TempDir::new();
    let (disk, _) = dir.disk("cfg.img", 64 * 1024, 11);
    let cmdline = "pv.tests=smp,blk,rng";
    let flags = VmCommand::probe(cmdline)
        .memory("96M")
        .vcpus(2)
        .disk(&disk, true)
        .rng()
        .run();
    let flags_report = flags.assert_clean_pass();

    let config = dir.join("vm.toml");
    let toml = format!(
        "kernel = {kernel:?}\ncmdline = {cmdline:?}\nmemory_mib = 96\nvcpus = 2\nrng = true\n\
         disks = [{{ path = {disk:?}, read_only = true }}]\n",
        kernel = e2e::probe_elf().display().to_string(),
        disk = disk.display().to_string(),
    );
    std::fs::write(&config, toml).unwrap();
    let mut from_file = VmCommand::bare();
    from_file.config = Some(config);
    let file_out = from_file.run();
    let file_report = file_out.assert_clean_pass();

    // Same results line for line, except what varies by run: rng bytes, TSC calibration
    // and interrupt statistics.
    let normalize = |r: &e2e::ProbeReport| -> Vec<String> {
        r.lines
            .iter()
            .filter(|l| !["rng", "info"].contains(&l.topic()) && l.field("irq").is_none())
            .map(|l| l.raw.clone())
            .collect()
    };
    assert_eq!(
        normalize(&flags_report),
        normalize(&file_report),
        "flags run:\n{}\nconfig run:\n{}",
        flags.describe(),
        file_out.describe()
    );
    assert!(
        file_report.find(&["rng", "ok"]).is_some(),
        "{}",
        file_out.describe()
    );
    assert_eq!(
        file_report.expect(&["blk", "ok"]).field("ro"),
        Some("1"),
        "{}",
        file_out.describe()
    );
}

/// Reads `n` counter lines, checks they count up by one, then stops the VMM with `signal`.
fn counter_then_signal(signal: i32) {
    let mut vm = VmCommand::probe("pv.mode=counter pv.counter.ms=20").spawn();
    let mut counts = Vec::new();
    while counts.len() < 5 {
        let Some((_, line)) =
            vm.wait_for_line(Duration::from_secs(20), |l| l.starts_with("PROBE counter "))
        else {
            panic!(
                "counter stopped after {counts:?}; serial so far:\n{}\nstderr: {}",
                vm.drain(),
                vm.stderr_so_far()
            );
        };
        let n: u64 = line["PROBE counter ".len()..]
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad counter line {line:?}"));
        counts.push(n);
    }
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "counter not consecutive: {counts:?}"
    );
    let signalled = Instant::now();
    vm.signal(signal);
    let out = vm.wait_for(Duration::from_secs(5));
    let took = signalled.elapsed();
    assert!(
        !out.timed_out,
        "signal {signal} did not stop the VMM\n{}",
        out.describe()
    );
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
    assert!(!out.panicked(), "{}", out.describe());
    assert_eq!(
        out.code(),
        Some(128 + signal),
        "documented status for signal {signal}\n{}",
        out.describe()
    );
}

#[test]
fn counter_mode_counts_and_sigterm_stops_cleanly() {
    if require_kvm("counter_mode_counts_and_sigterm_stops_cleanly") {
        counter_then_signal(libc::SIGTERM);
    }
}

#[test]
fn sigint_stops_the_vmm_like_ctrl_c() {
    if require_kvm("sigint_stops_the_vmm_like_ctrl_c") {
        counter_then_signal(libc::SIGINT);
    }
}

#[test]
fn serial_to_a_file_receives_the_console() {
    if !require_kvm("serial_to_a_file_receives_the_console") {
        return;
    }
    let dir = TempDir::new();
    let log = dir.join("serial.log");
    let mut cmd = VmCommand::probe("pv.tests=pci");
    cmd.serial = Some(format!("file:{}", log.display()));
    let out = cmd.run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.probe().lines.is_empty(),
        "serial went to stdout too\n{}",
        out.describe()
    );
    let text = std::fs::read_to_string(&log).expect("the serial file exists");
    let report = e2e::ProbeReport::from_lines(text.lines());
    assert!(report.done_ok(), "serial file:\n{text}");
    report.expect(&["pci", "ok"]);
}

#[test]
fn boots_with_ram_split_around_the_mmio_hole() {
    if !require_kvm("boots_with_ram_split_around_the_mmio_hole") {
        return;
    }
    // 4 GiB: 3 GiB below the PCI hole and 1 GiB from 4 GiB up; devices still work.
    let dir = TempDir::new();
    let (disk, bytes) = dir.disk("big.img", 64 * 1024, 12);
    let out = VmCommand::probe("pv.tests=pci,blk")
        .memory("4G")
        .disk(&disk, false)
        .run();
    let report = out.assert_clean_pass();
    assert_eq!(
        report.expect(&["blk", "ok"]).field("sector0_fnv"),
        Some(format!("{:016x}", e2e::fnv1a64(&bytes[..512])).as_str()),
        "{}",
        out.describe()
    );
}

/// The host's TSC rate in kHz, measured against the monotonic clock over 200 ms.
#[cfg(target_arch = "x86_64")]
fn host_tsc_khz() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let tsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(200));
    let (c1, t1) = (tsc(), Instant::now());
    let us = u64::try_from((t1 - t0).as_micros()).expect("200 ms fits u64");
    (c1 - c0) * 1000 / us
}

/// A host that stops the guest for longer than the PIT's 16-bit counter takes to wrap
/// (55 ms) while the probe calibrates its TSC must not make the guest's clock wrong: before
/// the fix the probe counted only the ticks after the wrap and measured the TSC many times
/// too fast (97 GHz on a 2.6 GHz host under load), so every guest wait lasted tens of times
/// longer (the jail test's vsock wait of 2 s took over a minute).
#[cfg(target_arch = "x86_64")]
#[test]
fn a_guest_stopped_while_it_calibrates_still_keeps_time() {
    if !require_kvm("a_guest_stopped_while_it_calibrates_still_keeps_time") {
        return;
    }
    let host = host_tsc_khz();
    let mut vm = VmCommand::probe("pv.tests=pci").spawn();
    // Stop the whole VMM for 70 ms (a PIT wrap and more) after every 15 ms it runs, until
    // the guest reports the rate it measured.
    let mut stops = 0;
    let info = loop {
        if let Some(l) = vm.wait_for_line(Duration::from_millis(15), |l| {
            l.starts_with("PROBE info tsc_khz=")
        }) {
            break l.1;
        }
        assert!(
            vm.is_running() && stops < 1000,
            "no info line after {stops} stops\n{}\nstderr: {}",
            vm.drain(),
            vm.stderr_so_far()
        );
        vm.signal(libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(70));
        vm.signal(libc::SIGCONT);
        stops += 1;
    };
    let out = vm.wait();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let guest: u64 = e2e::probe::ProbeLine::parse(&info)
        .and_then(|l| l.field_u64("tsc_khz"))
        .unwrap_or_else(|| panic!("bad info line {info:?}"));
    eprintln!("MEASURE tsc_khz guest={guest} host={host} after {stops} stops of 70 ms");
    assert!(
        guest.abs_diff(host) * 10 < host,
        "the guest measured {guest} kHz, the host's TSC runs at {host} kHz ({stops} stops)"
    );
}
