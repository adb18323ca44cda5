//! `pocketvisor run`: boot one guest from flags or a TOML file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Context, Result};
use clap::Args;
use vmm::{DiskConfig, GpuConfig, NetConfig, RunOutcome, SerialConfig, Vm, VmConfig, VsockConfig};
use vmm_sys_util::eventfd::EventFd;

/// Boot a guest kernel with virtio devices.
#[derive(Args, Debug)]
#[command(after_help = "\
EXAMPLES:
  pocketvisor run --kernel guest/out/probe.elf --cmdline pv.mode=selftest --rng
  pocketvisor run --kernel vmlinux --initrd initrd.img --memory 512M --vcpus 2 \\
      --disk root.img --disk data.img,ro --net tap=tap0 --vsock cid=3,socket=/tmp/v.sock
  pocketvisor run --firmware /usr/share/seabios/bios.bin --disk debian.raw --memory 1G
  pocketvisor run --config vm.toml

The exit status is the guest's: 0 after an ACPI power-off, v after a write of v to the
debug-exit port 0xf4, 130/143 when stopped by SIGINT/SIGTERM, 1 on an error.")]
pub struct RunArgs {
    /// VM configuration file (TOML, the same fields as the flags); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Guest kernel: an ELF with a PVH note (vmlinux, probe guest) or a bzImage.
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Firmware to boot instead of a kernel: SeaBIOS (/usr/share/seabios/bios.bin), which
    /// boots the first disk's own boot loader (x86_64, hardware virtualization). OVMF
    /// (/usr/share/ovmf/OVMF.fd) gets the machine it expects but is unproven: under nested
    /// SVM on QEMU's TCG, QEMU itself aborts on its CR8 writes (README).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    firmware: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "TEXT")]
    cmdline: Option<String>,
    /// Guest RAM, e.g. 256M or 1G (a plain number means MiB) [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    memory: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    vcpus: Option<u8>,
    /// A virtio-blk disk backed by a raw file; append ",ro" for read-only. Repeatable.
    #[arg(long, value_name = "PATH[,ro]", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-net device on a TAP interface. Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// A virtio-vsock device; host side is a unix socket (send "CONNECT <port>\n").
    #[arg(long, value_name = "cid=N,socket=PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Add a virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Add a virtio-gpu (2D) display of WIDTHxHEIGHT pixels [default: 720x1280, portrait];
    /// query it through the API socket ({"op":"device","id":"gpu","request":{"op":"info"}}).
    #[arg(long, value_name = "WIDTHxHEIGHT", num_args = 0..=1, default_missing_value = "720x1280", value_parser = parse_gpu)]
    gpu: Option<GpuConfig>,
    /// Add a virtio-input keyboard and ten-finger touch screen (ids keyboard and touch); inject
    /// through the API socket ({"op":"device","id":"touch","request":{"op":"touch","slot":0,"x":10,"y":20}}).
    #[arg(long)]
    input: bool,
    /// Add a virtio-balloon device (free page reporting, guest memory statistics); set its
    /// size through the API socket ({"op":"balloon","target_mib":N}).
    #[arg(long)]
    balloon: bool,
    /// Mark guest RAM mergeable for the host's KSM (see `pocketvisor doctor`).
    #[arg(long)]
    mergeable: bool,
    /// Where the serial console goes: stdout, file:PATH or none [default: stdout].
    #[arg(long, value_name = "WHERE", value_parser = parse_serial)]
    serial: Option<SerialConfig>,
    /// CPUID features to hide from the guest, comma separated (e.g. xsave,avx512).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cpuid_hide: Vec<String>,
    /// Serve the control API (pause, resume, snapshot, stop, balloon, stats; one JSON line
    /// each) on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serve the display over VNC (RFB 3.8, no authentication) on a loopback HOST:PORT
    /// (port 0 picks a free one; the address is printed) or on unix:PATH; needs --gpu.
    /// Keys go to the keyboard and the left button to the touch screen (with --input).
    #[arg(long, value_name = "HOST:PORT|unix:PATH", value_parser = crate::vnc::parse_vnc)]
    vnc: Option<crate::vnc::VncAddr>,
    /// Read the 64-byte key of each encrypted disk (`encrypted = true` in --config), in disk
    /// order, from stdin, which then ends (as `pocketvisor vmm --disk-keys-stdin`).
    #[arg(long)]
    disk_keys_stdin: bool,
}

/// The eventfd the signal handler writes to stop the VM, and the signal that came.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64 of 8 bytes.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Runs the guest; returns the process exit status.
pub fn main(args: RunArgs) -> Result<i32> {
    let api_socket = args.api_socket.clone();
    let vnc = args.vnc.clone();
    let keys_on_stdin = args.disk_keys_stdin;
    let mut cfg = build_config(args)?;
    if keys_on_stdin {
        crate::vmm_cmd::read_disk_keys(&mut std::io::stdin().lock(), &mut cfg)?;
    }
    let vm = Vm::new(&cfg)?;
    let _vnc = vnc.map(|a| crate::vnc::start(&vm, &a)).transpose()?;
    run_vm(vm, api_socket.as_deref())
}

/// Runs a built (or restored) VM until it ends, serving the API on `api_socket` if given;
/// returns the process exit status.
pub fn run_vm(vm: Vm, api_socket: Option<&std::path::Path>) -> Result<i32> {
    let controller = vmm::Controller::new().context("create the API channel")?;
    let _guard = api_socket
        .map(|p| crate::api::serve(p, controller.clone()))
        .transpose()?;
    let stop = EventFd::new(libc::EFD_NONBLOCK).context("create stop event")?;
    STOP_FD.store(std::os::fd::AsRawFd::as_raw_fd(&stop), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only does async-signal-safe work (atomics and write(2)).
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let outcome = vm.run_with_control(&stop, Some(&controller))?;
    Ok(match outcome {
        RunOutcome::Guest(exit) => exit.status(),
        RunOutcome::Stopped => match STOP_SIGNAL.load(Ordering::SeqCst) {
            0 => {
                eprintln!("pocketvisor: stopped through the API");
                0
            }
            sig => {
                eprintln!("pocketvisor: stopped by signal {sig}");
                128 + sig
            }
        },
        RunOutcome::Migrated => {
            crate::api::wait_for_answers(std::time::Duration::from_secs(2));
            eprintln!("pocketvisor: migrated; the guest runs at the destination");
            0
        }
    })
}

fn build_config(a: RunArgs) -> Result<VmConfig> {
    let mut cfg = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str::<VmConfig>(&text).map_err(|e| {
                let line = e
                    .span()
                    .map(|s| format!(" line {}", text[..s.start].matches('\n').count() + 1))
                    .unwrap_or_default();
                anyhow::anyhow!(
                    "bad configuration file {}{line}: {}",
                    path.display(),
                    e.message().trim()
                )
            })?
        }
        None => match (&a.kernel, &a.firmware) {
            (Some(k), _) => VmConfig::new(k.clone()),
            (None, Some(_)) => VmConfig::new(PathBuf::new()),
            (None, None) => bail!("--kernel FILE, --firmware FILE or --config FILE is required"),
        },
    };
    if let Some(k) = a.kernel {
        cfg.kernel = k;
        cfg.firmware = None;
    }
    if let Some(f) = a.firmware {
        cfg.firmware = Some(f);
        cfg.kernel = PathBuf::new();
    }
    if a.initrd.is_some() {
        cfg.initrd = a.initrd;
    }
    if let Some(c) = a.cmdline {
        cfg.cmdline = c;
    }
    if let Some(m) = a.memory {
        cfg.memory_mib = m;
    }
    if let Some(v) = a.vcpus {
        cfg.vcpus = v;
    }
    cfg.disks.extend(a.disk);
    cfg.net.extend(a.net);
    if a.vsock.is_some() {
        cfg.vsock = a.vsock;
    }
    cfg.rng |= a.rng;
    cfg.input |= a.input;
    if a.gpu.is_some() {
        cfg.gpu = a.gpu;
    }
    cfg.balloon |= a.balloon;
    cfg.mergeable |= a.mergeable;
    if let Some(s) = a.serial {
        cfg.serial = s;
    }
    cfg.cpuid_hide.extend(a.cpuid_hide);
    cfg.validate().map_err(anyhow::Error::msg)?;
    check_boot_image(&cfg)?;
    Ok(cfg)
}

/// Refuses a kernel or firmware path that is not a file, naming it.
pub(crate) fn check_boot_image(cfg: &VmConfig) -> anyhow::Result<()> {
    let (what, path) = match &cfg.firmware {
        Some(f) => ("firmware", f),
        None => ("kernel", &cfg.kernel),
    };
    if !path.is_file() {
        bail!("{what} {} does not exist or is not a file", path.display());
    }
    // kvm_pvm runs no real mode: firmware would spin at the reset vector without a word.
    if cfg.firmware.is_some() && Path::new("/sys/module/kvm_pvm").exists() {
        bail!(
            "firmware starts in real mode, which this host's KVM (kvm_pvm) cannot run; it needs \
             hardware virtualization (see `pocketvisor doctor`)"
        );
    }
    Ok(())
}

/// `256M`, `1G`, `512` (MiB), `2048K`.
fn parse_mib(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 0),
        Some((i, 'M' | 'm')) => (&s[..i], 1),
        Some((i, 'G' | 'g')) => (&s[..i], 1024),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected e.g. 256M or 1G"))?;
    if mult == 0 {
        return Ok(n / 1024);
    }
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        Some((_, opt)) => return Err(format!("unknown disk option {opt:?} (only ro or rw)")),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    Ok(DiskConfig {
        path: path.into(),
        read_only,
        encrypted: false,
        key: None,
    })
}

/// Splits `k=v,k=v` into pairs, rejecting keys not in `known`.
fn key_values<'a>(s: &'a str, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    s.split(',')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {kv:?}"))?;
            if !known.contains(&k) {
                return Err(format!("unknown key {k:?} (known: {})", known.join(", ")));
            }
            Ok((k, v))
        })
        .collect()
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut net = NetConfig {
        tap: String::new(),
        mac: None,
        filter: None,
    };
    for (k, v) in key_values(s, &["tap", "mac"])? {
        match k {
            "tap" => net.tap = v.to_string(),
            _ => net.mac = Some(v.to_string()),
        }
    }
    if net.tap.is_empty() {
        return Err("tap=NAME is required".into());
    }
    Ok(net)
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut socket) = (None, None);
    for (k, v) in key_values(s, &["cid", "socket"])? {
        match k {
            "cid" => cid = Some(v.parse().map_err(|_| format!("bad cid {v:?}"))?),
            _ => socket = Some(PathBuf::from(v)),
        }
    }
    Ok(VsockConfig {
        cid: cid.ok_or("cid=N is required")?,
        socket: socket.ok_or("socket=PATH is required")?,
    })
}

fn parse_gpu(s: &str) -> Result<GpuConfig, String> {
    let bad = || format!("bad display size {s:?}: expected WIDTHxHEIGHT, each 1..=4095");
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (width, height): (u32, u32) =
        (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if !(1..=4095).contains(&width) || !(1..=4095).contains(&height) {
        return Err(bad());
    }
    Ok(GpuConfig {
        width,
        height,
        ..GpuConfig::default()
    })
}

pub(crate) fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    match s {
        "stdout" => Ok(SerialConfig::Stdout),
        "none" => Ok(SerialConfig::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(p.into())),
            _ => Err(format!(
                "bad serial {s:?}: expected stdout, file:PATH or none"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_mib("256M"), Ok(256));
        assert_eq!(parse_mib("1G"), Ok(1024));
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("2048K"), Ok(2));
        assert!(parse_mib("lots").is_err());
        assert!(parse_mib("99999999999999999999G").is_err());
    }

    #[test]
    fn display_sizes() {
        let g = parse_gpu("1080x1920").unwrap();
        assert_eq!((g.width, g.height, g.memory_mib), (1080, 1920, 64));
        for bad in ["", "720", "0x1280", "720x4096", "axb", "720x1280x3"] {
            assert!(parse_gpu(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_flags() {
        assert!(parse_disk("a.img,ro").unwrap().read_only);
        assert!(!parse_disk("a.img").unwrap().read_only);
        assert!(parse_disk("a.img,bogus").is_err());
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.tap, "tap0");
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=x,color=red").is_err());
        let v = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!(v.cid, 3);
        assert!(parse_vsock("cid=3").is_err());
        assert_eq!(
            parse_serial("file:/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert!(parse_serial("file:").is_err());
    }
}
