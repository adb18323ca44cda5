//! The Debian Linux guest from guest/build-linux.sh.
//!
//! On pocketvisor it needs hardware KVM (doctor says so); the build machines have kvm_pvm,
//! which cannot run a stock kernel, so there the test skips loudly. The same assets are
//! also checked under QEMU's TCG emulator, which runs anywhere.

use std::process::Command;

use e2e::paths::linux_assets;
use e2e::qemu::{Machine, QemuCommand};
use e2e::{skip, RunningVm, TempDir, VmCommand};

/// (whether `doctor` says Linux runs here, the KVM kind it reports).
fn doctor_says_linux_runs() -> Result<(bool, String), String> {
    let out = Command::new(e2e::pocketvisor_bin())
        .args(["doctor", "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("doctor --json: {e}"))?;
    let kind = match v["kvm"].as_str() {
        Some("pvm") => "kvm_pvm".to_string(),
        Some(other) => other.to_string(),
        None => "unknown".to_string(),
    };
    Ok((v["guests"]["linux"].as_bool() == Some(true), kind))
}

#[test]
fn linux_guest_boots_and_loads_virtio_modules() {
    let name = "linux_guest_boots_and_loads_virtio_modules";
    match doctor_says_linux_runs() {
        Ok((true, _)) => {}
        Ok((false, kind)) => {
            e2e::host::loud(&format!(
                "SKIP: Linux guest needs hardware KVM (this host has {kind}): {name}"
            ));
            return;
        }
        Err(e) => panic!("pocketvisor doctor failed: {e}"),
    }
    let Some((kernel, initrd)) = linux_assets() else {
        panic!("hardware KVM is here but guest/out/linux is not built: run guest/build-linux.sh");
    };
    let dir = TempDir::new();
    let (disk, _) = dir.disk("linux.img", 8 * 1024 * 1024, 21);
    let mut cmd = VmCommand::bare()
        .memory("512M")
        .vcpus(2)
        .disk(&disk, false)
        .rng();
    cmd.kernel = Some(kernel);
    cmd.initrd = Some(initrd);
    cmd.cmdline = Some("console=ttyS0 quiet".into());
    let out = cmd.run();
    e2e::linux::assert_selftest(&out);
}

#[test]
fn linux_assets_boot_under_qemu_tcg() {
    let name = "linux_assets_boot_under_qemu_tcg";
    let Some((kernel, initrd)) = linux_assets() else {
        skip("guest/out/linux not built; run guest/build-linux.sh", name);
        return;
    };
    let Some(qemu) = QemuCommand::find_binary() else {
        skip("qemu-system-x86_64 is not installed", name);
        return;
    };
    let dir = TempDir::new();
    let (disk, _) = dir.disk("linux.img", 8 * 1024 * 1024, 22);
    let mut cmd = QemuCommand::new(&qemu, Machine::Pc, &kernel, "console=ttyS0 quiet");
    cmd.kvm = false;
    cmd.initrd = Some(initrd);
    cmd.memory_mib = 512;
    cmd.vcpus = 2;
    cmd.rng = true;
    cmd.disks.push((disk, false));
    let out = RunningVm::spawn(cmd.command(), std::time::Duration::from_secs(240)).wait();
    e2e::linux::assert_selftest(&out);
}
