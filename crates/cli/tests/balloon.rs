//! End-to-end: `--balloon` and `--mergeable` with the probe guest: the API's `balloon` and
//! `stats` ops, guest RAM marked mergeable, and the balloon target surviving a snapshot and
//! restore into a new process (counter mode, so no balloon driver runs); then the probe's
//! balloon driver (`pv.tests=balloon`): free page reporting and inflating to the API's target
//! give memory back to the host, measured as the VMM's resident set; and `pocketvisor
//! balloon`, the command that sets the target and waits for the guest's driver.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm or the probe guest is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Scratch, Vmm};

/// Scratch directories' prefix.
const SCRATCH: &str = "pv-balloon";

fn spawn(args: &[&str]) -> Vmm {
    common::spawn(args, Stdio::null())
}

/// A probe guest's VMM started by [`start`]: its serial log `vm.log` and API socket `vm.sock`
/// in the scratch directory `s`.
struct Guest {
    vm: Vmm,
    log: PathBuf,
    sock: PathBuf,
    s: Scratch,
}

/// Runs the probe with `cmdline` and the flags `flags` (memory, balloon) in a new scratch
/// directory `name`; None (skipped) where the probe is missing.
fn start(name: &str, cmdline: &str, flags: &[&str]) -> Option<Guest> {
    let probe = common::probe(false)?;
    let s = Scratch::new(SCRATCH, name);
    let (log, sock) = (s.path("vm.log"), s.path("vm.sock"));
    let serial = format!("file:{}", log.display());
    let mut args = vec![
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ];
    args.extend(flags);
    args.extend(["--serial", &serial, "--api-socket", sock.to_str().unwrap()]);
    Some(Guest {
        vm: spawn(&args),
        log,
        sock,
        s,
    })
}

fn wait_for(path: &Path, needle: &str) -> bool {
    common::wait_for(path, needle, Duration::from_secs(30))
}

fn wait_exit(vmm: &mut Vmm) -> Option<i32> {
    common::wait_exit(vmm, Duration::from_secs(10))
}

/// Sends one API request line; returns the answer as JSON.
fn api(sock: &Path, req: &str) -> Value {
    let t0 = Instant::now();
    let s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => panic!("API socket: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    (&s).write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{req}: bad answer {line:?}: {e}"))
}

/// The `stats` op's info, decoded.
fn stats(sock: &Path) -> Value {
    let answer = api(sock, r#"{"op":"stats"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    serde_json::from_str(answer["info"].as_str().unwrap()).unwrap()
}

/// Whether any mapping of process `pid` is marked mergeable (VmFlags `mg`).
fn has_mergeable_mapping(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("VmFlags:"))
        .any(|f| f.split_whitespace().any(|x| x == "mg"))
}

#[test]
fn balloon_target_and_stats_through_the_api_survive_a_snapshot() {
    let Some(mut src) = start(
        "api",
        "pv.mode=counter pv.counter.ms=50",
        &["--memory", "128M", "--balloon", "--mergeable"],
    ) else {
        return;
    };
    let (s, log, sock) = (&src.s, src.log.clone(), src.sock.clone());
    let snap = s.path("snap");
    assert!(wait_for(&log, "PROBE counter 2\n"), "the guest did not run");

    let st = stats(&sock);
    assert_eq!(st["memory_mib"], 128);
    assert_eq!(st["mergeable"], true);
    assert_eq!(st["balloon"]["target_mib"], 0);
    if Path::new("/sys/kernel/mm/ksm").exists() {
        assert!(
            has_mergeable_mapping(src.vm.0.id()),
            "guest RAM not MADV_MERGEABLE"
        );
    }

    let ok = api(&sock, r#"{"op":"balloon","target_mib":32}"#);
    assert_eq!(ok["ok"], true, "{ok}");
    let too_big = api(&sock, r#"{"op":"balloon","target_mib":129}"#);
    assert_eq!(too_big["ok"], false);
    assert!(
        too_big["error"].as_str().unwrap().contains("128 MiB"),
        "{too_big}"
    );
    let st = stats(&sock);
    assert_eq!(st["balloon"]["target_mib"], 32);
    assert_eq!(st["balloon"]["target_pages"], 32 * 256);
    assert_eq!(
        st["balloon"]["actual_pages"], 0,
        "counter mode has no driver"
    );

    let snap_req = format!(r#"{{"op":"snapshot","dir":"{}"}}"#, snap.display());
    let answer = api(&sock, &snap_req);
    assert_eq!(answer["ok"], true, "{answer}");
    api(&sock, r#"{"op":"stop"}"#);
    assert_eq!(wait_exit(&mut src.vm), Some(0));

    let (log2, sock2) = (s.path("dst.log"), s.path("dst.sock"));
    let mut dst = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file:{}", log2.display()),
        "--api-socket",
        sock2.to_str().unwrap(),
    ]);
    assert!(
        wait_for(&log2, "PROBE counter"),
        "the restored guest did not run"
    );
    let st = stats(&sock2);
    assert_eq!(st["balloon"]["target_mib"], 32, "{st}");
    assert_eq!(st["mergeable"], true);
    api(&sock2, r#"{"op":"stop"}"#);
    assert_eq!(wait_exit(&mut dst), Some(0));
}

#[test]
fn without_a_balloon_the_op_is_refused() {
    let Some(mut g) = start("none", "pv.mode=counter pv.counter.ms=50", &[]) else {
        return;
    };
    let (log, sock) = (g.log.clone(), g.sock.clone());
    assert!(wait_for(&log, "PROBE counter 1\n"), "the guest did not run");
    let answer = api(&sock, r#"{"op":"balloon","target_mib":8}"#);
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"].as_str().unwrap().contains("no balloon"),
        "{answer}"
    );
    let st = stats(&sock);
    assert!(st["balloon"].is_null(), "{st}");
    assert_eq!(st["mergeable"], false);
    // The command says what is missing and how to get it, in one line, status 1.
    let out = balloon_cmd(&sock, &["--target-mib", "8"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("pocketvisor: error: cannot set the balloon's target to 8 MiB: ")
            && err.contains("no balloon device (start it with --balloon)"),
        "{err}"
    );
    api(&sock, r#"{"op":"stop"}"#);
    assert_eq!(wait_exit(&mut g.vm), Some(0));
}

/// Resident set of process `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn note(what: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{what}");
}

#[test]
fn free_page_reporting_gives_touched_memory_back() {
    let Some(mut g) = start(
        "report",
        "pv.tests=balloon pv.balloon.mb=32 pv.balloon.wait=1500",
        &["--memory", "128M", "--balloon"],
    ) else {
        return;
    };
    let log = g.log.clone();
    let pid = g.vm.0.id();
    assert!(
        wait_for(&log, "PROBE balloon touched mb=32\n"),
        "the guest did not touch its region"
    );
    let touched = rss_kib(pid);
    assert!(
        wait_for(&log, "PROBE balloon reported mb=32\n"),
        "the guest did not report"
    );
    let reported = rss_kib(pid);
    note(format_args!(
        "free page reporting: VMM RSS {touched} KiB after touching 32 MiB, {reported} KiB after reporting it"
    ));
    assert!(
        touched >= reported + 24 * 1024,
        "RSS {touched} KiB -> {reported} KiB: less than 24 MiB given back"
    );
    assert_eq!(wait_exit(&mut g.vm), Some(0));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("PROBE balloon ok "), "{out}");
    assert!(out.contains("PROBE done ok"), "{out}");
}

#[test]
fn inflating_to_the_api_target_gives_memory_back() {
    let Some(mut g) = start(
        "inflate",
        "pv.tests=balloon pv.balloon.mb=8 pv.balloon.wait=300 pv.balloon.follow=1 pv.balloon.follow_ms=30000",
        &["--memory", "128M", "--balloon"],
    ) else {
        return;
    };
    let (log, sock) = (g.log.clone(), g.sock.clone());
    let pid = g.vm.0.id();
    assert!(
        wait_for(&log, "PROBE balloon following max_pages="),
        "the guest did not start following the target"
    );
    let before = rss_kib(pid);
    let st = stats(&sock);
    assert_eq!(st["balloon"]["reported_bytes"], 8 << 20, "{st}");
    assert_eq!(st["balloon"]["actual_pages"], 0, "{st}");
    // The statistics the guest sent at start (the worker may still be reading them).
    let out = std::fs::read_to_string(&log).unwrap();
    let sent = out
        .lines()
        .find_map(|l| l.strip_prefix("PROBE balloon stats sent "))
        .unwrap_or_else(|| panic!("no statistics line: {out}"));
    let field = |k: &str| -> u64 {
        sent.split(' ')
            .find_map(|kv| kv.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {sent:?}"))
    };
    let (total, free) = (field("total="), field("free="));
    let t0 = Instant::now();
    let mut st = stats(&sock);
    while st["balloon"]["stats_updates"] == 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        st = stats(&sock);
    }
    let guest = &st["balloon"]["guest_stats"];
    assert_eq!(guest["total_memory"], total, "{st}");
    assert_eq!(guest["free_memory"], free, "{st}");
    assert_eq!(guest["available_memory"], free, "{st}");
    assert!(total > 120 << 20 && total <= 128 << 20, "{st}");

    let ok = api(&sock, r#"{"op":"balloon","target_mib":24}"#);
    assert_eq!(ok["ok"], true, "{ok}");
    assert!(
        wait_for(&log, "PROBE balloon inflated pages=6144\n"),
        "the guest did not inflate to the target"
    );
    let inflated = rss_kib(pid);
    note(format_args!(
        "inflate: VMM RSS {before} KiB before, {inflated} KiB with 24 MiB in the balloon"
    ));
    assert!(
        before >= inflated + 20 * 1024,
        "RSS {before} KiB -> {inflated} KiB: less than 20 MiB given back"
    );
    let st = stats(&sock);
    assert_eq!(st["balloon"]["actual_pages"], 6144, "{st}");
    assert_eq!(st["balloon"]["actual_mib"], 24, "{st}");
    assert_eq!(st["balloon"]["inflated_pages"], 6144, "{st}");
    assert_eq!(st["balloon"]["rejected"], 0, "{st}");

    let ok = api(&sock, r#"{"op":"balloon","target_mib":0}"#);
    assert_eq!(ok["ok"], true, "{ok}");
    assert!(
        wait_for(&log, "PROBE balloon deflated pages=0\n"),
        "the guest did not deflate"
    );
    // The probe waits `pv.balloon.wait` ms before it powers off.
    let st = stats(&sock);
    assert_eq!(st["balloon"]["actual_pages"], 0, "{st}");
    assert_eq!(st["balloon"]["deflated_pages"], 6144, "{st}");
    // Deflated to zero after inflating: the probe's part ends.
    assert_eq!(wait_exit(&mut g.vm), Some(0));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("PROBE done ok"), "{out}");
}

/// Runs `pocketvisor balloon --api-socket SOCK ARGS...` to its end.
fn balloon_cmd(sock: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::bin())
        .args(["balloon", "--api-socket", sock.to_str().unwrap()])
        .args(args)
        .output()
        .expect("run pocketvisor balloon")
}

/// The command's one output line, `balloon target=T MiB actual=A MiB (P pages)`.
fn balloon_line(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().count(), 1, "{text}");
    text.trim_end().to_string()
}

#[test]
fn the_balloon_command_inflates_and_deflates_the_guest_and_refuses_bad_targets() {
    let Some(mut g) = start(
        "command",
        "pv.tests=balloon pv.balloon.mb=8 pv.balloon.wait=300 pv.balloon.follow=1 pv.balloon.follow_ms=60000",
        &["--memory", "128M", "--balloon"],
    ) else {
        return;
    };
    let (log, sock) = (g.log.clone(), g.sock.clone());
    assert!(
        wait_for(&log, "PROBE balloon following max_pages="),
        "the guest did not start following the target"
    );
    // Without a target it shows the balloon and changes nothing.
    assert_eq!(
        balloon_line(&balloon_cmd(&sock, &[])),
        "balloon target=0 MiB actual=0 MiB (0 pages)"
    );
    // Bad targets: more than the guest's RAM (the VMM refuses), not a number (the command
    // line does); one error line each, status 1, and the target stays where it was.
    for (arg, says) in [
        (
            "129",
            "balloon target 129 MiB is more than the guest's 128 MiB of RAM",
        ),
        ("-1", "invalid value '-1' for '--target-mib <MIB>'"),
        ("lots", "invalid value 'lots' for '--target-mib <MIB>'"),
    ] {
        let out = balloon_cmd(&sock, &["--target-mib", arg]);
        assert_eq!(out.status.code(), Some(1), "{arg}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{arg}: {err}");
    }
    // --wait returns once the guest's driver holds the target, and says so.
    let out = balloon_cmd(&sock, &["--target-mib", "24", "--wait", "60"]);
    assert_eq!(
        balloon_line(&out),
        "balloon target=24 MiB actual=24 MiB (6144 pages)"
    );
    // The guest prints its count once it has told the VMM.
    assert!(
        wait_for(&log, "PROBE balloon inflated pages=6144\n"),
        "the guest's own count is not 24 MiB:\n{}",
        common::read(&log)
    );
    assert_eq!(stats(&sock)["balloon"]["inflated_pages"], 6144);
    let out = balloon_cmd(&sock, &["--target-mib", "0", "--wait", "60"]);
    assert_eq!(
        balloon_line(&out),
        "balloon target=0 MiB actual=0 MiB (0 pages)"
    );
    assert!(
        wait_for(&log, "PROBE balloon deflated pages=0\n"),
        "the guest did not deflate"
    );
    assert_eq!(wait_exit(&mut g.vm), Some(0));
    assert!(common::read(&log).contains("PROBE done ok"));
}
