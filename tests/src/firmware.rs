//! Firmware-booted whole disk images: the Debian image of `guest/build-disk-image.sh`, the
//! firmware files Debian ships (SeaBIOS, OVMF), and the second disk whose shell script the
//! image runs once it is up (`pv-disk-script.service`).

use std::path::{Path, PathBuf};

use crate::host::TempDir;
use crate::vm::Outcome;

/// Debian's SeaBIOS (`apt-get install seabios`).
pub const SEABIOS: &str = "/usr/share/seabios/bios.bin";
/// Debian's OVMF code (`apt-get install ovmf`), 2 MiB, without a separate variable store.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
/// Debian's OVMF variable store template.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";
/// Debian's combined OVMF image (code and variable store in one 2 MiB file): mapped as a ROM
/// like SeaBIOS, it keeps its variables in RAM (nothing persists across boots).
pub const OVMF_COMBINED: &str = "/usr/share/ovmf/OVMF.fd";
/// What the check script prints first on the guest's console, before its fields.
pub const CHECK_MARKER: &str = "PV-CHECK";

/// The Debian disk image (`guest/out/disk/debian.raw`, or `$DISK_IMAGE`), if it is built.
pub fn debian_image() -> Option<PathBuf> {
    let path = std::env::var_os("DISK_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("guest/out/disk/debian.raw"));
    path.is_file().then_some(path)
}

/// `path` if that firmware file exists.
pub fn firmware(path: &str) -> Option<PathBuf> {
    Path::new(path).is_file().then(|| PathBuf::from(path))
}

/// Writes the 1 MiB second disk holding the check script: it prints `PV-CHECK` with the
/// kernel release, the number of CPUs online, the root device, the system's state and the
/// serial autologin's, then powers the guest off.
pub fn check_script_disk(dir: &TempDir) -> PathBuf {
    let script = format!(
        "#!/bin/sh\n\
         echo \"{CHECK_MARKER} kernel=$(uname -r) cpus=$(nproc) root=$(findmnt -no SOURCE /) \
         state=$(systemctl is-system-running) autologin=$(systemctl is-active serial-getty@ttyS0)\"\n\
         systemctl poweroff\n"
    );
    let mut bytes = script.into_bytes();
    bytes.resize(1 << 20, 0);
    let path = dir.join("check-script.img");
    std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// The check script's line in `out`, if the guest printed it.
pub fn check_line(out: &Outcome) -> Option<&str> {
    out.serial()
        .filter_map(|l| l.find(CHECK_MARKER).map(|at| &l[at..]))
        .find(|l| l.contains("kernel="))
}
