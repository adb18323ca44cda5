//! Starting either VMM on the probe guest with the same devices.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use e2e::qemu::{Machine, QemuCommand};
use e2e::{RunningVm, VmCommand};

use crate::Opts;

/// Which VMM a measurement runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// Ours.
    Pocketvisor,
    /// qemu-system-x86_64 with KVM.
    Qemu,
}

/// What the guest gets.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Kernel command line.
    pub cmdline: String,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// One virtio-blk disk.
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

/// The chosen QEMU.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QemuInfo {
    /// Binary path.
    pub bin: PathBuf,
    /// `qemu-system-x86_64 --version`, first line.
    pub version: String,
    /// Machine type used.
    pub machine: String,
    /// Why this machine (and not another) was picked.
    pub why: String,
    #[serde(skip)]
    machine_kind: Option<Machine>,
}

/// Everything the measurements need, resolved once.
#[derive(Debug)]
pub struct Setup {
    /// pocketvisor binary.
    pub bin: PathBuf,
    /// Probe guest ELF.
    pub probe: PathBuf,
    /// QEMU, when installed and able to run the probe.
    pub qemu: Option<QemuInfo>,
    /// Why QEMU is absent, when it is.
    pub no_qemu_reason: Option<String>,
    /// Directory for the benchmark's files (`bench/out`).
    pub workdir: PathBuf,
}

impl Setup {
    /// Finds the binaries, builds pocketvisor if needed and picks a QEMU machine.
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
                if !b.exists() {
                    eprintln!(
                        "bench: building {} (cargo build --release -p pocketvisor)",
                        b.display()
                    );
                    let status =
                        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                            .args(["build", "--release", "-p", "pocketvisor"])
                            .current_dir(&root)
                            .status()
                            .context("run cargo")?;
                    if !status.success() {
                        bail!("cargo build --release -p pocketvisor failed");
                    }
                }
                b
            }
        };
        if !bin.exists() {
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
            probe,
            qemu: None,
            no_qemu_reason: None,
            workdir,
        };
        if opts.no_qemu {
            setup.no_qemu_reason = Some("--no-qemu given".into());
        } else {
            match QemuCommand::find_binary() {
                None => {
                    setup.no_qemu_reason = Some(
                        "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
                            .into(),
                    )
                }
                Some(qbin) => match setup.pick_machine(&qbin, opts.qemu_machine) {
                    Ok(info) => setup.qemu = Some(info),
                    Err(e) => setup.no_qemu_reason = Some(format!("{e:#}")),
                },
            }
        }
        Ok(setup)
    }

    /// The first machine (microvm, then pc) on which the probe enumerates PCI and powers off
    /// through ACPI; or the one the user named.
    fn pick_machine(&mut self, qbin: &Path, wanted: Option<Machine>) -> Result<QemuInfo> {
        let version = Command::new(qbin)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        let mut info = QemuInfo {
            bin: qbin.to_path_buf(),
            version,
            machine: String::new(),
            why: String::new(),
            machine_kind: None,
        };
        let candidates = match wanted {
            Some(m) => vec![m],
            None => vec![Machine::Microvm, Machine::Pc],
        };
        let mut rejected = Vec::new();
        for machine in candidates {
            info.machine_kind = Some(machine);
            info.machine = machine.name().to_string();
            self.qemu = Some(info.clone());
            let out = self
                .spawn(
                    Vmm::Qemu,
                    &GuestSpec::new("pv.tests=pci"),
                    Duration::from_secs(30),
                )
                .wait();
            let report = out.probe();
            if report.done_ok() && out.code() == Some(0) && !out.timed_out {
                info.why = if rejected.is_empty() {
                    format!(
                        "{}: the probe's PCI selftest passes and ACPI power-off works",
                        machine.name()
                    )
                } else {
                    format!("{} ({})", machine.name(), rejected.join("; "))
                };
                return Ok(info);
            }
            let reason = if let Some(fail) = report
                .lines
                .iter()
                .find(|l| l.words.get(1).map(String::as_str) == Some("fail"))
            {
                format!("{} rejected: {}", machine.name(), fail.raw)
            } else if report.done_ok() {
                format!(
                    "{} rejected: no ACPI power-off at port 0x604 (exit {:?})",
                    machine.name(),
                    out.code()
                )
            } else {
                format!(
                    "{} rejected: selftest did not finish (exit {:?})",
                    machine.name(),
                    out.code()
                )
            };
            if wanted.is_some() {
                // The user asked for this one: use it anyway, say what is off.
                info.why = reason;
                return Ok(info);
            }
            rejected.push(reason);
        }
        self.qemu = None;
        bail!("QEMU cannot run the probe guest: {}", rejected.join("; "))
    }

    /// Starts `vmm` on the probe with `spec`; killed after `timeout`.
    pub fn spawn(&self, vmm: Vmm, spec: &GuestSpec, timeout: Duration) -> RunningVm {
        match vmm {
            Vmm::Pocketvisor => {
                let mut cmd = VmCommand::bare();
                cmd.bin = self.bin.clone();
                cmd.kernel = Some(self.probe.clone());
                cmd.cmdline = Some(spec.cmdline.clone());
                cmd.memory = Some(format!("{}M", spec.memory_mib));
                if let Some(disk) = &spec.disk {
                    cmd.disks.push((disk.clone(), true));
                }
                cmd.timeout = timeout;
                cmd.spawn()
            }
            Vmm::Qemu => {
                let info = self.qemu.as_ref().expect("QEMU runs only when present");
                let machine = info.machine_kind.unwrap_or(Machine::Pc);
                let mut q = QemuCommand::new(&info.bin, machine, &self.probe, &spec.cmdline);
                q.memory_mib = spec.memory_mib;
                if let Some(disk) = &spec.disk {
                    q.disks.push((disk.clone(), true));
                }
                RunningVm::spawn(q.command(), timeout)
            }
        }
    }

    /// The VMMs to measure, pocketvisor first.
    pub fn vmms(&self) -> Vec<Vmm> {
        let mut v = vec![Vmm::Pocketvisor];
        if self.qemu.is_some() {
            v.push(Vmm::Qemu);
        }
        v
    }
}
