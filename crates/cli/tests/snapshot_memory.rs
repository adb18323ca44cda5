//! End-to-end: a guest that dirtied its memory (probe `pv.mode=mem`) is snapshotted, restored
//! in a new process, and reads every page back intact; a page damaged in `memory.bin` is
//! refused by the restore before the guest runs.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing or the probe cannot be built.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, read, wait_exit, wait_for, Scratch, Vmm};

const SCRATCH: &str = "pv-snapmemtest";
/// MiB the guest dirties: 1024 pages (each page costs about 0.1 ms to touch under kvm_pvm).
const DIRTY_MIB: u64 = 4;

/// The first complete `PROBE mem pass` line of a pass whose `start` line is in `log`.
fn first_full_pass(log: &str) -> Option<String> {
    // Complete lines only: the serial port writes byte by byte, so the last line may be cut.
    let lines = || {
        log.split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .map(str::trim_end)
    };
    let start = lines()
        .find_map(|l| l.strip_prefix("PROBE mem pass n=")?.strip_suffix(" start"))?
        .to_string();
    let done = format!("PROBE mem pass n={start} ");
    lines()
        .find(|l| l.starts_with(&done) && !l.ends_with(" start"))
        .map(str::to_string)
}

/// Restores `snap` with the serial console in `log` and waits for the first pass that ran
/// wholly in the restored process; returns that line.
fn restore_and_read_back(snap: &Path, log: &Path) -> String {
    let mut dst = common::spawn(
        &[
            "restore",
            snap.to_str().unwrap(),
            "--serial",
            &format!("file:{}", log.display()),
        ],
        Stdio::piped(),
    );
    let t0 = Instant::now();
    let line = loop {
        if let Some(l) = first_full_pass(&read(log)) {
            break l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no complete pass after restore: {:?}",
            read(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = dst.0.kill();
    line
}

#[test]
fn a_dirtied_guest_reads_all_its_memory_back_after_restore() {
    let Some(probe) = common::probe(true) else {
        return;
    };
    let s = Scratch::new(SCRATCH, "dirty");
    let (log, sock, snap) = (s.path("src.log"), s.path("src.sock"), s.path("snap"));
    let cmdline = format!("pv.mode=mem pv.mem.mb={DIRTY_MIB} pv.mem.gap=20 pv.mem.tick=5");
    let mut src: Vmm = common::spawn(
        &[
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--memory",
            "64M",
            "--cmdline",
            &cmdline,
            "--serial",
            &format!("file:{}", log.display()),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        Stdio::piped(),
    );
    assert!(
        wait_for(&log, "PROBE mem pass n=1 ok", Duration::from_secs(60)),
        "the source guest never checked its memory: {:?}",
        read(&log)
    );
    let before = read(&log);
    let filled = before
        .lines()
        .find_map(|l| l.strip_prefix("PROBE mem filled "))
        .expect("filled line")
        .to_string();
    assert!(
        filled.contains(&format!("bytes={}", DIRTY_MIB << 20)),
        "{filled}"
    );
    let start = filled
        .split(' ')
        .find_map(|kv| kv.strip_prefix("start="))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .expect("start= on the filled line");

    let out = Command::new(bin())
        .args(["snapshot", "--api-socket", sock.to_str().unwrap()])
        .args(["-o", snap.to_str().unwrap(), "--stop"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_exit(&mut src, Duration::from_secs(10)), Some(0));
    // Every dirtied page is in memory.bin (holes are left only for zero pages).
    let memory = snap.join("memory.bin");
    let allocated = std::fs::metadata(&memory).unwrap().blocks() * 512;
    assert!(
        allocated >= DIRTY_MIB << 20,
        "memory.bin holds {allocated} bytes"
    );

    let line = restore_and_read_back(&snap, &s.path("dst.log"));
    assert!(
        line.contains(" ok ") && line.contains(&format!("bytes={}", DIRTY_MIB << 20)),
        "{line}"
    );

    // One page of guest RAM overwritten in memory.bin: state.bin holds a digest of every
    // MiB of memory.bin, so restore refuses it before any vCPU runs, naming the place.
    let damaged = start + (1 << 20);
    // The first region (guest address 0) starts memory.bin, so the file offset is the address.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .write_all_at(&[0xA5; 4096], damaged)
        .unwrap();
    let bad_log = s.path("bad.log");
    let out = Command::new(bin())
        .args(["restore", snap.to_str().unwrap(), "--serial"])
        .arg(format!("file:{}", bad_log.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a damaged memory.bin restored: {err}"
    );
    let piece = damaged & !((1 << 20) - 1);
    assert!(
        err.contains("memory.bin is damaged") && err.contains(&format!("{piece:#x}")),
        "{err}"
    );
    assert!(!read(&bad_log).contains("PROBE"), "the guest ran");
}
