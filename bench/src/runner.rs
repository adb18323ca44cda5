//! Starting either VMM on the probe guest with the same devices.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use e2e::qemu::{Machine, QemuCommand};
use e2e::{RunningVm, VmCommand};
use serde::Serialize;

use crate::Opts;

/// Which VMM a measurement runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// Ours.
    Pocketvisor,
    /// qemu-system-x86_64 with KVM on this machine type.
    Qemu(Machine),
}

/// What a measurement needs from a QEMU machine type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// The probe must enumerate virtio-pci devices (it uses ports 0xCF8/0xCFC).
    pub pci: bool,
    /// The probe's ACPI power-off (PM1a_CNT at 0x604) must end QEMU.
    pub poweroff: bool,
}

/// What the probe could do on one QEMU machine type.
#[derive(Debug, Clone, Serialize)]
pub struct MachineCheck {
    /// `-M` name.
    pub machine: String,
    /// The probe booted and printed `PROBE done ok`.
    pub boots: bool,
    /// PCI enumeration passed.
    pub pci: bool,
    /// QEMU exited 0 through ACPI power-off (else the probe fell back to debug-exit).
    pub poweroff: bool,
    /// What went wrong, if anything.
    pub detail: String,
    #[serde(skip)]
    kind: Option<Machine>,
}

/// What the guest gets.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Kernel command line.
    pub cmdline: String,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// One read-only virtio-blk disk.
    pub disk: Option<PathBuf>,
}

impl GuestSpec {
    /// The probe with `cmdline`, 128 MiB, no devices.
    pub fn new(cmdline: &str) -> GuestSpec {
        GuestSpec {
            cmdline: cmdline.to_string(),
            memory_mib: 128,
            disk: None,
        }
    }
}

/// The QEMU found.
#[derive(Debug, Clone, Serialize)]
pub struct QemuInfo {
    /// Binary path.
    pub bin: PathBuf,
    /// `qemu-system-x86_64 --version`, first line.
    pub version: String,
    /// What the probe could do on each machine type tried.
    pub machines: Vec<MachineCheck>,
}

/// Everything the measurements need, resolved once.
#[derive(Debug)]
pub struct Setup {
    /// pocketvisor binary.
    pub bin: PathBuf,
    /// Whether to measure pocketvisor at all.
    pub pocketvisor: bool,
    /// Probe guest ELF.
    pub probe: PathBuf,
    /// QEMU, when installed.
    pub qemu: Option<QemuInfo>,
    /// Why QEMU is absent, when it is.
    pub no_qemu_reason: Option<String>,
    /// Directory for the benchmark's files (`bench/out`).
    pub workdir: PathBuf,
}

impl Setup {
    /// Finds the binaries, builds pocketvisor if needed and checks QEMU's machine types.
    pub fn new(opts: &Opts) -> Result<Setup> {
        let root = e2e::workspace_root();
        let bin = match opts
            .bin
            .clone()
            .or_else(|| std::env::var_os("POCKETVISOR_BIN").map(PathBuf::from))
        {
            Some(b) => b,
            None => {
                let b = e2e::paths::target_dir().join("release/pocketvisor");
                if !b.exists() && !opts.no_pocketvisor {
                    bench::util::build_release(&root, "bench")?;
                }
                b
            }
        };
        if !bin.exists() && !opts.no_pocketvisor {
            bail!("{} does not exist", bin.display());
        }
        let probe = opts
            .probe
            .clone()
            .unwrap_or_else(|| root.join("guest/out/probe.elf"));
        if !probe.exists() {
            bail!(
                "{} does not exist: run guest/build-probe.sh",
                probe.display()
            );
        }
        let workdir = root.join("bench/out");
        std::fs::create_dir_all(&workdir)
            .with_context(|| format!("create {}", workdir.display()))?;
        let mut setup = Setup {
            bin,
            pocketvisor: !opts.no_pocketvisor,
            probe,
            qemu: None,
            no_qemu_reason: None,
            workdir,
        };
        if opts.no_qemu {
            setup.no_qemu_reason = Some("--no-qemu given".into());
            return Ok(setup);
        }
        let Some(qbin) = QemuCommand::find_binary() else {
            setup.no_qemu_reason = Some(
                "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
            );
            return Ok(setup);
        };
        let version = Command::new(&qbin)
            .arg("--version")
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout);
                text.lines().next().unwrap_or("").to_string()
            })
            .unwrap_or_default();
        let candidates = match opts.qemu_machine {
            Some(m) => vec![m],
            None => vec![Machine::Microvm, Machine::Pc],
        };
        let machines = candidates
            .into_iter()
            .map(|m| setup.check_machine(&qbin, m))
            .collect::<Vec<_>>();
        if machines.iter().any(|m| m.boots) {
            setup.qemu = Some(QemuInfo {
                bin: qbin,
                version,
                machines,
            });
        } else {
            let why: Vec<String> = machines
                .iter()
                .map(|m| format!("{}: {}", m.machine, m.detail))
                .collect();
            setup.no_qemu_reason = Some(format!(
                "QEMU cannot run the probe guest ({})",
                why.join("; ")
            ));
        }
        Ok(setup)
    }

    /// Boots the probe's PCI selftest on `machine` and records what worked.
    fn check_machine(&self, qbin: &Path, machine: Machine) -> MachineCheck {
        let spec = GuestSpec::new("pv.tests=pci");
        let mut q = QemuCommand::new(qbin, machine, &self.probe, &spec.cmdline);
        q.memory_mib = spec.memory_mib;
        let out = RunningVm::spawn(q.command(), Duration::from_secs(60)).wait();
        let report = out.probe();
        let boots = report.find(&["ready"]).is_some() && !out.timed_out;
        let pci = report.find(&["pci", "ok"]).is_some();
        let poweroff = report.done_ok() && out.code() == Some(0);
        let mut detail = Vec::new();
        if let Some(fail) = report
            .lines
            .iter()
            .find(|l| l.words.get(1).map(String::as_str) == Some("fail"))
        {
            detail.push(fail.raw.clone());
        }
        if report.done_ok() && !poweroff {
            detail.push(format!(
                "no ACPI power-off at port 0x604 (exit {:?} through debug-exit)",
                out.code()
            ));
        }
        if !boots {
            detail.push(format!("did not boot (exit {:?})", out.code()));
        }
        MachineCheck {
            machine: machine.name().to_string(),
            boots,
            pci,
            poweroff,
            detail: detail.join("; "),
            kind: Some(machine),
        }
    }

    /// The first QEMU machine type (microvm before pc) that has what a measurement needs.
    pub fn qemu_for(&self, needs: Needs) -> Option<Machine> {
        self.qemu.as_ref()?.machines.iter().find_map(|m| {
            let ok = m.boots && (!needs.pci || m.pci) && (!needs.poweroff || m.poweroff);
            if ok {
                m.kind
            } else {
                None
            }
        })
    }

    /// The VMMs to measure for a metric with `needs`, pocketvisor first.
    pub fn vmms(&self, needs: Needs) -> Vec<Vmm> {
        let mut v = Vec::new();
        if self.pocketvisor {
            v.push(Vmm::Pocketvisor);
        }
        if let Some(m) = self.qemu_for(needs) {
            v.push(Vmm::Qemu(m));
        }
        v
    }

    /// Starts `vmm` on the probe with `spec`; killed after `timeout`.
    pub fn spawn(&self, vmm: Vmm, spec: &GuestSpec, timeout: Duration) -> RunningVm {
        match vmm {
            Vmm::Pocketvisor => {
                let mut cmd = VmCommand::with_bin(self.bin.clone());
                cmd.kernel = Some(self.probe.clone());
                cmd.cmdline = Some(spec.cmdline.clone());
                cmd.memory = Some(format!("{}M", spec.memory_mib));
                if let Some(disk) = &spec.disk {
                    cmd.disks.push((disk.clone(), true));
                }
                cmd.timeout = timeout;
                cmd.spawn()
            }
            Vmm::Qemu(machine) => {
                let bin = self
                    .qemu
                    .as_ref()
                    .map(|q| q.bin.clone())
                    .unwrap_or_default();
                let mut q = QemuCommand::new(&bin, machine, &self.probe, &spec.cmdline);
                q.memory_mib = spec.memory_mib;
                if let Some(disk) = &spec.disk {
                    q.disks.push((disk.clone(), true));
                }
                RunningVm::spawn(q.command(), timeout)
            }
        }
    }
}
