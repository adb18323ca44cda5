//! End-to-end snapshot and restore with the probe guest, each side in its own process.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing or the probe cannot be built.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, counters, read, skip, wait_exit, wait_for, Scratch, Vmm};

/// Scratch directories' prefix.
const SCRATCH: &str = "pv-snaptest";

/// The probe kernel, built if missing; None (after a SKIP line) when KVM or the probe is missing.
fn probe() -> Option<PathBuf> {
    common::probe(true)
}

fn spawn(args: &[&str]) -> Vmm {
    common::spawn(args, Stdio::piped())
}

/// Waits for a socket file to appear.
fn wait_socket(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cli(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run pocketvisor")
}

/// Snapshots the VM behind `sock` into `snap` with `--stop`, asserting that the snapshot
/// succeeded and the VMM `vm` then exited with status 0.
fn snapshot_and_stop(sock: &Path, snap: &Path, vm: &mut Vmm) {
    wait_socket(sock);
    let out = cli(&[
        "snapshot",
        "--api-socket",
        sock.to_str().unwrap(),
        "-o",
        snap.to_str().unwrap(),
        "--stop",
    ]);
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_exit(vm, Duration::from_secs(10)), Some(0));
}

/// Runs a counter guest with `--api-socket`, snapshots it into `snap` and stops it; returns
/// the source's serial output.
fn counter_snapshot(s: &Scratch, probe: &Path, snap: &Path) -> String {
    let disk = s.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (log, sock) = (s.path("src.log"), s.path("src.sock"));
    let mut src = spawn(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        "pv.mode=counter pv.counter.ms=100",
        "--disk",
        disk.to_str().unwrap(),
        "--rng",
        "--serial",
        &format!("file:{}", log.display()),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert!(
        wait_for(&log, "PROBE counter 3\n", Duration::from_secs(30)),
        "source never counted to 3: {:?}",
        read(&log)
    );
    snapshot_and_stop(&sock, snap, &mut src);
    read(&log)
}

#[test]
fn counter_continues_in_a_new_process() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "counter");
    let snap = s.path("snap");
    let before = counter_snapshot(&s, &probe, &snap);
    let last = *counters(&before).last().expect("counter lines before");
    for f in ["state.bin", "memory.bin", "COMPLETE"] {
        assert!(snap.join(f).is_file(), "{f} missing");
    }

    let log = s.path("dst.log");
    let mut dst = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file:{}", log.display()),
    ]);
    let want = format!("PROBE counter {}\n", last + 3);
    let ok = wait_for(&log, &want, Duration::from_secs(30));
    let after = read(&log);
    let _ = dst.0.kill();
    assert!(ok, "restored guest did not count on: {after:?}");
    // The output of both processes together is one unbroken count (a line cut in half by the
    // pause is finished by the restored guest).
    let all = counters(&format!("{before}{after}"));
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
    let first_after = counters(&after).first().copied();
    assert!(
        first_after == Some(last + 1) || first_after == Some(last + 2),
        "first counter after restore {first_after:?}, last before {last}"
    );
}

#[test]
fn block_requests_in_flight_complete_after_restore() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "blk");
    let disk = s.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(384 << 20)
        .unwrap();
    let (log, sock, snap) = (s.path("src.log"), s.path("src.sock"), s.path("snap"));
    let mut src = spawn(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        "pv.mode=blk-bench pv.blk.mb=384",
        "--disk",
        disk.to_str().unwrap(),
        "--serial",
        &format!("file:{}", log.display()),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert!(wait_for(
        &log,
        "PROBE blk-bench start",
        Duration::from_secs(30)
    ));
    wait_socket(&sock);
    std::thread::sleep(Duration::from_millis(300));
    snapshot_and_stop(&sock, &snap, &mut src);
    if read(&log).contains("blk-bench end") {
        skip("the read finished before the snapshot; nothing was in flight");
        return;
    }

    let log2 = s.path("dst.log");
    let mut dst = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file:{}", log2.display()),
    ]);
    let code = wait_exit(&mut dst, Duration::from_secs(60));
    let after = read(&log2);
    assert!(
        after.contains(&format!("PROBE blk-bench end bytes={}", 384 << 20)),
        "{after:?}"
    );
    // Interrupts work after the restore: at most a few completions were found by polling
    // (on kvm_pvm the guest's TSC follows the host's across the restore, so a guest that was
    // waiting for an interrupt at the snapshot can time out its 20 ms wait at once).
    let polled: u64 = after
        .split_whitespace()
        .find_map(|w| w.strip_prefix("polled="))
        .and_then(|n| n.parse().ok())
        .expect("polled= in the bench line");
    assert!(polled <= 4, "{after:?}");
    assert!(after.contains("PROBE done ok"), "{after:?}");
    assert_eq!(code, Some(0));
}

#[test]
fn damaged_snapshots_are_refused_before_any_vm_runs() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "bad");
    let snap = s.path("snap");
    counter_snapshot(&s, &probe, &snap);
    let state = std::fs::read(snap.join("state.bin")).unwrap();

    let restore_with = |what: &str, extra: &[&str]| {
        let log = s.path(&format!("{what}.log"));
        let serial = format!("file:{}", log.display());
        let mut args = vec!["restore", snap.to_str().unwrap(), "--serial", &serial];
        args.extend_from_slice(extra);
        let out = cli(&args);
        assert!(read(&log).is_empty(), "{what}: the guest ran");
        assert_eq!(out.status.code(), Some(1), "{what}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let restore = |what: &str| restore_with(what, &[]);

    // A disk of another size than the one the guest knows.
    let other = s.path("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let err = restore_with("disk-size", &["--disk", other.to_str().unwrap()]);
    assert!(err.contains("configuration differs"), "{err}");

    let mut flipped = state.clone();
    let at = state.len() / 2;
    flipped[at] ^= 0x01;
    std::fs::write(snap.join("state.bin"), &flipped).unwrap();
    let err = restore("flipped");
    assert!(err.contains("corrupted (checksum mismatch)"), "{err}");

    let mut future = state.clone();
    future[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(snap.join("state.bin"), &future).unwrap();
    let err = restore("version");
    assert!(err.contains("format version 2 is not supported"), "{err}");

    std::fs::write(snap.join("state.bin"), &state).unwrap();
    std::fs::remove_file(snap.join("COMPLETE")).unwrap();
    let err = restore("incomplete");
    assert!(err.contains("not a complete snapshot"), "{err}");
}

#[test]
fn pause_holds_the_guest_and_resume_lets_it_go_on() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "pause");
    let (log, sock) = (s.path("src.log"), s.path("src.sock"));
    let _vmm = spawn(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        "pv.mode=counter pv.counter.ms=20",
        "--serial",
        &format!("file:{}", log.display()),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert!(wait_for(&log, "PROBE counter 2\n", Duration::from_secs(30)));
    wait_socket(&sock);
    let ctl = |op: &str| {
        let out = cli(&[op, "--api-socket", sock.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl("pause");
    let held = read(&log);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read(&log), held, "the guest ran while paused");
    ctl("pause"); // Pausing a paused VM is fine.
    ctl("resume");
    let last = *counters(&held).last().unwrap();
    assert!(wait_for(
        &log,
        &format!("PROBE counter {}\n", last + 2),
        Duration::from_secs(10)
    ));
    // An idle client does not block the others; a bad request gets an error answer, and the
    // VMM goes on serving.
    let _idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    {
        use std::io::{BufRead, BufReader};
        let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        conn.write_all(b"{\"op\":\"explode\"}\n").unwrap();
        let mut answer = String::new();
        BufReader::new(&conn).read_line(&mut answer).unwrap();
        assert!(answer.starts_with("{\"ok\":false"), "{answer}");
        assert!(answer.contains("unknown op"), "{answer}");
    }
    ctl("resume");
}

#[test]
fn restore_refuses_a_host_without_the_guests_cpu_features() {
    use vmm::snapshot::format::{self, SectionKind, Writer};
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "cpu");
    let snap = s.path("snap");
    counter_snapshot(&s, &probe, &snap);
    // Rewrite state.bin (with a valid checksum) claiming the guest saw every leaf 7 feature.
    let sections = format::read(&std::fs::read(snap.join("state.bin")).unwrap()).unwrap();
    let mut w = Writer::new();
    let mut patched = 0;
    for sec in &sections {
        let mut payload = sec.payload.clone();
        if sec.kind == SectionKind::Vcpu {
            let mut v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            for e in v["cpuid"].as_array_mut().unwrap() {
                let b = e.as_array_mut().unwrap();
                let word = |b: &[serde_json::Value], at: usize| {
                    (0..4).fold(0u64, |acc, i| acc | b[at + i].as_u64().unwrap() << (8 * i))
                };
                if word(b, 0) == 7 && word(b, 4) == 0 {
                    for byte in &mut b[16..20] {
                        *byte = 0xff.into();
                    }
                    patched += 1;
                }
            }
            payload = serde_json::to_vec(&v).unwrap();
        }
        w.add_raw(sec.kind as u32, sec.kind.version(), &payload);
    }
    assert!(patched > 0, "no CPUID leaf 7 in the snapshot");
    std::fs::write(snap.join("state.bin"), w.finish()).unwrap();
    let log = s.path("dst.log");
    let out = cli(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file:{}", log.display()),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("this host lacks CPU features the guest uses: leaf 0x7.0 ebx"),
        "{err}"
    );
    assert!(read(&log).is_empty());
}

#[test]
fn a_restored_vm_snapshots_again_into_its_own_directory() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "again");
    let snap = s.path("snap");
    let first = counter_snapshot(&s, &probe, &snap);
    // Restore, run a little, and snapshot into the directory the memory is mapped from.
    let (log, sock) = (s.path("mid.log"), s.path("mid.sock"));
    let mut mid = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file:{}", log.display()),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    let last = *counters(&first).last().unwrap();
    assert!(wait_for(
        &log,
        &format!("PROBE counter {}\n", last + 2),
        Duration::from_secs(30)
    ));
    snapshot_and_stop(&sock, &snap, &mut mid);
    let second = read(&log);

    let log3 = s.path("last.log");
    let _end = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file:{}", log3.display()),
    ]);
    let last2 = *counters(&second).last().unwrap();
    assert!(wait_for(
        &log3,
        &format!("PROBE counter {}\n", last2 + 2),
        Duration::from_secs(30)
    ));
    let all = counters(&format!("{first}{second}{}", read(&log3)));
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
}
