//! The QEMU command line that runs a guest the way a pocketvisor run does.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Which QEMU machine type to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `-M microvm,pcie=on`: no firmware PCI setup, PCIe ECAM at 0xE000_0000.
    Microvm,
    /// `-M pc`: i440FX + PIIX, the PC QEMU has always had.
    Pc,
}

impl Machine {
    /// The `-M` value.
    pub fn arg(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm,pcie=on,rtc=on",
            Machine::Pc => "pc",
        }
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Pc => "pc",
        }
    }
}

/// A QEMU invocation equivalent to `pocketvisor run`.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    /// The QEMU binary (`qemu-system-x86_64`).
    pub bin: PathBuf,
    /// Machine type.
    pub machine: Machine,
    /// `-kernel` (an ELF with a PVH note, or a bzImage).
    pub kernel: PathBuf,
    /// `-initrd`.
    pub initrd: Option<PathBuf>,
    /// `-append`.
    pub cmdline: String,
    /// `-m` in MiB.
    pub memory_mib: u64,
    /// `-smp`.
    pub vcpus: u32,
    /// virtio-blk-pci disks (path, read-only).
    pub disks: Vec<(PathBuf, bool)>,
    /// A virtio-rng-pci device.
    pub rng: bool,
    /// Use KVM (`-accel kvm -cpu host`), else TCG.
    pub kvm: bool,
    /// More arguments, appended last (devices, a monitor socket).
    pub extra: Vec<String>,
}

impl QemuCommand {
    /// QEMU booting `kernel` with `cmdline` on `machine`, 128 MiB, one vCPU, KVM.
    pub fn new(bin: &Path, machine: Machine, kernel: &Path, cmdline: &str) -> QemuCommand {
        QemuCommand {
            bin: bin.to_path_buf(),
            machine,
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: cmdline.to_string(),
            memory_mib: 128,
            vcpus: 1,
            disks: Vec::new(),
            rng: false,
            kvm: true,
            extra: Vec::new(),
        }
    }

    /// `qemu-system-x86_64` from `$PATH`, if installed.
    pub fn find_binary() -> Option<PathBuf> {
        crate::host::which("qemu-system-x86_64")
    }

    /// The arguments after the binary.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-M", self.machine.arg()]);
        if self.kvm {
            // kvm_pvm refuses MSR 0x10a (IA32_ARCH_CAPABILITIES), which `-cpu host` sets and
            // then aborts on; the probe has no use for it, so leave it out everywhere.
            push(&["-accel", "kvm", "-cpu", "host,-arch-capabilities"]);
        } else {
            push(&["-accel", "tcg"]);
        }
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&["-smp", &self.vcpus.to_string()]);
        push(&["-kernel", &self.kernel.display().to_string()]);
        if let Some(initrd) = &self.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        push(&["-append", &self.cmdline]);
        for (i, (path, ro)) in self.disks.iter().enumerate() {
            let ro = if *ro { ",readonly=on" } else { "" };
            push(&[
                "-drive",
                &format!("file={},if=none,id=disk{i},format=raw{ro}", path.display()),
                "-device",
                &format!("virtio-blk-pci,drive=disk{i},disable-legacy=on"),
            ]);
        }
        if self.rng {
            push(&[
                "-object",
                "rng-random,id=rng0,filename=/dev/urandom",
                "-device",
                "virtio-rng-pci,rng=rng0,disable-legacy=on",
            ]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// The process to spawn.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.args());
        cmd
    }

    /// The guest's own exit value from QEMU's status: isa-debug-exit turns a write of `v`
    /// into `(v << 1) | 1`; a power-off exits 0.
    pub fn guest_status(code: i32) -> i32 {
        if code & 1 == 1 {
            code >> 1
        } else {
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_status_is_decoded() {
        assert_eq!(QemuCommand::guest_status(0), 0);
        assert_eq!(QemuCommand::guest_status(1), 0);
        assert_eq!(QemuCommand::guest_status(5), 2);
    }

    #[test]
    fn args_carry_devices() {
        let mut q = QemuCommand::new(
            Path::new("/usr/bin/qemu-system-x86_64"),
            Machine::Pc,
            Path::new("/k.elf"),
            "pv.tests=blk",
        );
        q.disks.push((PathBuf::from("/d.img"), true));
        q.rng = true;
        let args = q.args().join(" ");
        assert!(args.contains("-M pc "));
        assert!(args.contains("file=/d.img,if=none,id=disk0,format=raw,readonly=on"));
        assert!(args.contains("virtio-rng-pci,rng=rng0,disable-legacy=on"));
        assert!(args.contains("-append pv.tests=blk"));
    }
}
