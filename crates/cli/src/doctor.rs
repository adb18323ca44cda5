//! `pocketvisor doctor`: what this host can run.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

/// Report host capabilities.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The host's KVM, as far as guests are concerned.
#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum KvmKind {
    /// Hardware virtualization (Intel VMX or AMD SVM).
    Hardware,
    /// `kvm_pvm`: software nested virtualization with shadow paging.
    Pvm,
    /// /dev/kvm works but the kind is unknown.
    Unknown,
    /// No usable /dev/kvm.
    Absent,
}

#[derive(Serialize)]
struct Report {
    kvm: KvmKind,
    kvm_detail: String,
    kvm_api_version: Option<i32>,
    max_vcpus: Option<usize>,
    tap: bool,
    vsock: bool,
    vhost_vsock: bool,
    qemu: bool,
    ksm: Ksm,
    /// Running as root (the handset daemon needs it: jails, cgroups, TAP).
    root: bool,
    /// What the handset daemon would use for cgroups here (tried with a throwaway group).
    cgroups: handset::cgroup::CgroupInfo,
    guests: Guests,
}

/// Tries what the handset daemon does at start (a parent group in the cpu and memory
/// controllers) with a throwaway group, removed again: `none` with the reason when it
/// cannot write there.
fn cgroups() -> handset::cgroup::CgroupInfo {
    use handset::cgroup::Cgroups;
    let c = Cgroups::detect(&format!("pocketvisor-doctor-{}", std::process::id()));
    let made = match &c {
        Cgroups::V2 { dir } => vec![dir.clone()],
        Cgroups::V1 { cpu, memory } => vec![cpu.clone(), memory.clone()],
        Cgroups::Disabled { .. } => vec![],
    };
    for dir in made {
        let _ = std::fs::remove_dir(dir);
    }
    c.info()
}

/// The host's kernel samepage merging (what `--mergeable` guest RAM relies on).
#[derive(Serialize)]
struct Ksm {
    /// The kernel has KSM (`/sys/kernel/mm/ksm` exists).
    available: bool,
    /// ksmd is merging (`/sys/kernel/mm/ksm/run` is 1).
    running: bool,
    /// Pages currently shared (`pages_sharing`), if readable.
    pages_sharing: Option<u64>,
}

fn ksm() -> Ksm {
    let dir = Path::new("/sys/kernel/mm/ksm");
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    Ksm {
        available: dir.is_dir(),
        running: read("run") == Some(1),
        pages_sharing: read("pages_sharing"),
    }
}

#[derive(Serialize)]
struct Guests {
    probe: bool,
    linux: bool,
    why: String,
}

/// Prints the report; exits 0 when at least the probe guest can run.
pub fn main(args: DoctorArgs) -> Result<i32> {
    let r = report();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let yes = |b: bool| if b { "yes" } else { "no" };
        outln!("KVM:          {:?} ({})", r.kvm, r.kvm_detail);
        if let (Some(v), Some(n)) = (r.kvm_api_version, r.max_vcpus) {
            outln!("KVM API:      version {v}, up to {n} vCPUs per VM");
        }
        outln!("TAP:          {}", yes(r.tap));
        outln!(
            "vsock:        {} (unix-socket backend, built in)",
            yes(r.vsock)
        );
        outln!("vhost-vsock:  {} (only QEMU uses it)", yes(r.vhost_vsock));
        outln!("QEMU:         {} (for benchmarks)", yes(r.qemu));
        outln!(
            "KSM:          {}",
            match (r.ksm.available, r.ksm.running) {
                (false, _) => "no (--mergeable has no effect)".to_string(),
                (true, false) => {
                    "available, not running (echo 1 > /sys/kernel/mm/ksm/run)".to_string()
                }
                (true, true) =>
                    format!("running, {} pages shared", r.ksm.pages_sharing.unwrap_or(0)),
            }
        );
        outln!(
            "root:         {}",
            if r.root {
                "yes"
            } else {
                "no (the handset daemon needs root: jails, cgroups, TAP devices)"
            }
        );
        let cg = &r.cgroups;
        outln!(
            "cgroups:      {}",
            match cg.mode.as_str() {
                "none" => format!(
                    "none: profiles run without CPU weights or memory limits ({})",
                    cg.note.as_deref().unwrap_or("no usable cgroup interface")
                ),
                mode => format!("{mode}, a group can be made (tried and removed)"),
            }
        );
        outln!("probe guest:  {}", yes(r.guests.probe));
        outln!("Linux guest:  {}", yes(r.guests.linux));
        outln!("              {}", r.guests.why);
    }
    Ok(if r.guests.probe { 0 } else { 1 })
}

fn report() -> Report {
    let cpu_flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("flags"))
                .map(|l| l.to_string())
        })
        .unwrap_or_default();
    let has_flag = |f: &str| cpu_flags.split_whitespace().any(|x| x == f);
    let module = |m: &str| Path::new("/sys/module").join(m).exists();

    let kvm = kvm_ioctls::Kvm::new();
    let (kind, detail, api, max) = match &kvm {
        Err(e) => (KvmKind::Absent, format!("/dev/kvm: {e}"), None, None),
        Ok(k) => {
            let (kind, detail) = if module("kvm_pvm") {
                (
                    KvmKind::Pvm,
                    "kvm_pvm: software virtualization, shadow paging".to_string(),
                )
            } else if has_flag("vmx") || module("kvm_intel") {
                (KvmKind::Hardware, "Intel VMX (kvm_intel)".to_string())
            } else if has_flag("svm") || module("kvm_amd") {
                (KvmKind::Hardware, "AMD SVM (kvm_amd)".to_string())
            } else {
                (
                    KvmKind::Unknown,
                    "no VMX/SVM flag, no known module".to_string(),
                )
            };
            (
                kind,
                detail,
                Some(k.get_api_version()),
                Some(k.get_max_vcpus()),
            )
        }
    };
    let why = match kind {
        KvmKind::Hardware => "hardware virtualization: Linux and the probe guest run".into(),
        KvmKind::Pvm => "kvm_pvm cannot run a stock Linux kernel (KVM emulation failures); \
                         the probe guest runs"
            .into(),
        KvmKind::Unknown => "unknown KVM: the probe guest should run; Linux may not".into(),
        KvmKind::Absent => "no usable /dev/kvm: no guest can run".into(),
    };
    let probe = kind != KvmKind::Absent;
    let linux = kind == KvmKind::Hardware;
    let qemu = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()));
    Report {
        kvm: kind,
        kvm_detail: detail,
        kvm_api_version: api,
        max_vcpus: max,
        tap: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .is_ok(),
        vsock: true,
        vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
        qemu,
        ksm: ksm(),
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        root: unsafe { libc::geteuid() } == 0,
        cgroups: cgroups(),
        guests: Guests { probe, linux, why },
    }
}
