//! The probe guest is a plain PVH kernel: QEMU boots it and its selftest passes there too.

use e2e::qemu::{Machine, QemuCommand};
use e2e::{fnv1a64, require_kvm, skip, RunningVm, TempDir};

#[test]
fn probe_selftest_passes_under_qemu_too() {
    let name = "probe_selftest_passes_under_qemu_too";
    if !require_kvm(name) {
        return;
    }
    let Some(qemu) = QemuCommand::find_binary() else {
        skip("qemu-system-x86_64 is not installed", name);
        return;
    };
    let dir = TempDir::new();
    let (disk, bytes) = dir.disk("q.img", 1024 * 1024, 9);
    let mut cmd = QemuCommand::new(
        &qemu,
        Machine::Pc,
        &e2e::probe_elf(),
        "pv.tests=smp,pci,blk,rng",
    );
    cmd.vcpus = 2;
    cmd.rng = true;
    cmd.disks.push((disk.clone(), false));
    let out = RunningVm::spawn(cmd.command(), e2e::vm::default_timeout()).wait();
    let report = out.probe();
    assert!(!out.timed_out, "{}", out.describe());
    assert!(
        report.done_ok(),
        "no `PROBE done ok` under QEMU\n{}",
        out.describe()
    );
    assert_eq!(
        out.code().map(QemuCommand::guest_status),
        Some(0),
        "{}",
        out.describe()
    );
    assert_eq!(report.expect(&["smp", "ok"]).field_u64("count"), Some(2));
    assert_eq!(
        report.expect(&["blk", "ok"]).field("sector0_fnv"),
        Some(format!("{:016x}", fnv1a64(&bytes[..512])).as_str()),
        "{}",
        out.describe()
    );
    report.expect(&["rng", "ok"]);
}
