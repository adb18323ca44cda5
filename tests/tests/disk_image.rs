//! The whole Debian disk image of `guest/build-disk-image.sh` boots under QEMU (TCG, no KVM
//! needed) with Debian's own firmware: SeaBIOS through GRUB's BIOS boot sector and OVMF
//! through the EFI system partition, each to systemd, the check script on the second disk,
//! and a clean power-off. This proves the image, so a failure of the same boot on pocketvisor
//! (`nested.rs`, `firmware_*`) is the VMM's.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::firmware::{
    check_line, check_script_disk, debian_image, firmware, OVMF_CODE, OVMF_VARS, SEABIOS,
};
use e2e::qemu::QemuCommand;
use e2e::{skip, RunningVm, TempDir};

/// TCG boots of the image took 26-30 s on a loaded 2-core machine; generous.
const TIMEOUT: Duration = Duration::from_secs(400);

/// QEMU (TCG) with the image read-only below a throwaway overlay (`snapshot=on`), the check
/// disk, and the serial console on stdout.
fn qemu(bin: &Path, image: &Path, check: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "-accel", "tcg", "-m", "1G", "-display", "none", "-monitor", "none",
    ])
    .args(["-serial", "stdio", "-no-reboot", "-nodefaults"])
    .arg("-drive")
    .arg(format!(
        "file={},if=virtio,format=raw,snapshot=on",
        image.display()
    ))
    .arg("-drive")
    .arg(format!(
        "file={},if=virtio,format=raw,snapshot=on",
        check.display()
    ));
    cmd
}

fn boot_and_check(name: &str, mut cmd: Command) {
    cmd.stdin(std::process::Stdio::null());
    let out = RunningVm::spawn(cmd, TIMEOUT).wait();
    assert!(
        !out.timed_out,
        "{name}: no power-off within {TIMEOUT:?}\n{}",
        out.describe()
    );
    let line =
        check_line(&out).unwrap_or_else(|| panic!("{name}: no check line\n{}", out.describe()));
    assert!(line.contains("root=/dev/vda3"), "{line}");
    assert!(line.contains("autologin=active"), "{line}");
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    e2e::host::loud(&format!(
        "{name}: powered off after {:.1?}: {line}",
        out.elapsed
    ));
}

/// The image and QEMU, or a loud skip.
fn inputs(name: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let Some(bin) = QemuCommand::find_binary() else {
        skip("qemu-system-x86_64 is not installed", name);
        return None;
    };
    let Some(image) = debian_image() else {
        skip("no disk image: run guest/build-disk-image.sh", name);
        return None;
    };
    Some((bin, image))
}

#[test]
fn debian_image_boots_under_qemu_with_seabios() {
    let name = "debian_image_boots_under_qemu_with_seabios";
    let Some((bin, image)) = inputs(name) else {
        return;
    };
    let Some(bios) = firmware(SEABIOS) else {
        skip("SeaBIOS is not installed (apt-get install seabios)", name);
        return;
    };
    let dir = TempDir::new();
    let mut cmd = qemu(&bin, &image, &check_script_disk(&dir));
    cmd.arg("-bios").arg(bios);
    boot_and_check(name, cmd);
}

#[test]
fn debian_image_boots_under_qemu_with_ovmf() {
    let name = "debian_image_boots_under_qemu_with_ovmf";
    let Some((bin, image)) = inputs(name) else {
        return;
    };
    let (Some(code), Some(vars)) = (firmware(OVMF_CODE), firmware(OVMF_VARS)) else {
        skip("OVMF is not installed (apt-get install ovmf)", name);
        return;
    };
    let dir = TempDir::new();
    let vars_copy = dir.join("vars.fd");
    std::fs::copy(&vars, &vars_copy).expect("copy the OVMF variable store");
    let mut cmd = qemu(&bin, &image, &check_script_disk(&dir));
    cmd.arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,readonly=on,file={}",
            code.display()
        ))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars_copy.display()));
    boot_and_check(name, cmd);
}
