//! virtio-blk seen from both sides: guest writes in the host file, host bytes in the guest.

use e2e::host::probe_blk_pattern;
use e2e::{fnv1a64, require_kvm, TempDir, VmCommand};

const DISK_LEN: usize = 1024 * 1024;

#[test]
fn guest_disk_write_lands_in_host_file_at_the_right_offset() {
    if !require_kvm("guest_disk_write_lands_in_host_file_at_the_right_offset") {
        return;
    }
    let dir = TempDir::new();
    let (disk, before) = dir.disk("w.img", DISK_LEN, 1);
    let sector = 40u64;
    let out = VmCommand::probe(&format!("pv.tests=blk pv.blk.write={sector}"))
        .disk(&disk, false)
        .run();
    let report = out.assert_clean_pass();
    let blk = report.expect(&["blk", "ok"]);
    assert_eq!(blk.field_u64("wrote"), Some(sector), "{}", out.describe());
    assert_eq!(blk.field("ro"), Some("0"), "{}", out.describe());

    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), DISK_LEN, "the disk file changed size");
    let at = usize::try_from(sector * 512).unwrap();
    let pattern = probe_blk_pattern(sector);
    assert!(
        after[at..at + 4096] == pattern[..],
        "sector {sector} does not hold the guest's pattern; it holds {:?}",
        String::from_utf8_lossy(&after[at..at + 64])
    );
    assert!(
        after[..at] == before[..at],
        "bytes before the write changed"
    );
    assert!(
        after[at + 4096..] == before[at + 4096..],
        "bytes after the write changed"
    );
}

#[test]
fn guest_reads_the_bytes_the_host_put_at_sector_0() {
    if !require_kvm("guest_reads_the_bytes_the_host_put_at_sector_0") {
        return;
    }
    let dir = TempDir::new();
    let (disk, bytes) = dir.disk("r.img", DISK_LEN, 2);
    let out = VmCommand::probe("pv.tests=blk").disk(&disk, false).run();
    let report = out.assert_clean_pass();
    let blk = report.expect(&["blk", "ok"]);
    assert_eq!(
        blk.field("sector0_fnv"),
        Some(format!("{:016x}", fnv1a64(&bytes[..512])).as_str()),
        "{}",
        out.describe()
    );
    assert_eq!(blk.field_u64("capacity"), Some((DISK_LEN / 512) as u64));
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        bytes,
        "a read-only selftest changed the disk"
    );
}

#[test]
fn read_only_disk_refuses_writes_and_file_is_unchanged() {
    if !require_kvm("read_only_disk_refuses_writes_and_file_is_unchanged") {
        return;
    }
    let dir = TempDir::new();
    let (disk, bytes) = dir.disk("ro.img", DISK_LEN, 3);
    let out = VmCommand::probe("pv.tests=blk pv.blk.write=8")
        .disk(&disk, true)
        .run();
    let report = out.assert_clean_pass();
    let blk = report.expect(&["blk", "ok"]);
    assert_eq!(blk.field("ro"), Some("1"), "{}", out.describe());
    assert!(
        blk.field("wrote").is_none(),
        "a read-only disk took a write\n{}",
        out.describe()
    );
    report.expect(&["blk", "ro-refused", "ok"]);
    assert!(
        std::fs::read(&disk).unwrap() == bytes,
        "the read-only disk file changed"
    );
}

#[test]
fn disk_size_not_multiple_of_512_is_rejected() {
    if !require_kvm("disk_size_not_multiple_of_512_is_rejected") {
        return;
    }
    let dir = TempDir::new();
    let (disk, _) = dir.disk("odd.img", 1000, 4);
    let out = VmCommand::probe("pv.tests=blk").disk(&disk, false).run();
    assert!(!out.timed_out, "{}", out.describe());
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    assert!(!out.panicked(), "{}", out.describe());
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "exactly one error line\n{}", out.describe());
    assert!(
        lines[0].contains("512"),
        "the error should say why: {}",
        lines[0]
    );
    assert!(
        out.probe().lines.is_empty(),
        "the guest ran\n{}",
        out.describe()
    );
}

#[test]
fn hostile_guest_leaves_vmm_alive_and_disk_unchanged() {
    if !require_kvm("hostile_guest_leaves_vmm_alive_and_disk_unchanged") {
        return;
    }
    let dir = TempDir::new();
    let (disk, bytes) = dir.disk("hostile.img", DISK_LEN, 5);
    let hash_before = fnv1a64(&bytes);
    let out = VmCommand::probe("pv.mode=hostile")
        .disk(&disk, false)
        .rng()
        .run();
    assert!(!out.timed_out, "{}", out.describe());
    assert!(!out.panicked(), "{}", out.describe());
    let report = out.probe();
    let sent: Vec<&str> = report
        .find_all(&["hostile"])
        .iter()
        .filter(|l| l.words.get(2).map(String::as_str) == Some("sent"))
        .filter_map(|l| l.words.get(1).map(String::as_str))
        .collect();
    assert!(
        sent.len() >= 10,
        "too few hostile cases ran\n{}",
        out.describe()
    );
    for case in &sent {
        assert!(
            report.find(&["hostile", case, "survived"]).is_some(),
            "hostile case {case} has no `survived` line\n{}",
            out.describe()
        );
    }
    // Malformed block requests must be refused (error status or device reset), never
    // completed as if they were fine. (virtio-rng has no status to refuse with.)
    for case in [
        "blk-desc-beyond-ram",
        "blk-desc-loop",
        "blk-hdr-writable",
        "blk-len-ffffffff",
        "blk-chain-too-long",
        "blk-indirect-bad-len",
    ] {
        if let Some(line) = report.find(&["hostile", case, "survived"]) {
            assert!(
                matches!(line.field("status"), Some("error" | "reset")),
                "hostile case {case} was not refused: {}\n{}",
                line.raw,
                out.describe()
            );
        }
    }
    let done = report.expect(&["hostile", "done", "ok"]);
    assert_eq!(
        done.field("sector0_fnv"),
        Some(format!("{:016x}", fnv1a64(&bytes[..512])).as_str()),
        "the guest no longer reads the original sector 0\n{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(
        fnv1a64(&after),
        hash_before,
        "the hostile guest changed the disk"
    );
}
