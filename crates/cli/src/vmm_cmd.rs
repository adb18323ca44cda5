//! `pocketvisor vmm`: one VM in a jail, the process the handset daemon starts per profile.
//!
//! The parent (outside every new namespace) prepares `<jail-root>/<id>/root` and the cgroup,
//! forks the child into a new pid namespace, moves it into the cgroup, then waits, forwarding
//! SIGTERM/SIGINT/SIGHUP, and finally removes the jail directory and the cgroup. The child
//! enters new mount/IPC/UTS namespaces and a new (or the given) network namespace, bind-mounts
//! what the VM needs, `pivot_root`s, builds the VM (opening /dev/kvm, files, taps, sockets
//! while still privileged), drops every privilege, installs the seccomp filter and runs the
//! guest. docs/jail.md has the details.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use jail::fsroot::{Bind, JailRoot};
use jail::supervise::{ChildExit, Forked};
use vmm::vmm_api::jail::{jail_host_paths, HostPath, JailPlan, PathKind, PathRole, JAIL_SNAPSHOT};
use vmm::{SerialConfig, Vm, VmConfig};

/// Environment variable for the hidden self-tests (see [`SelfTest`]).
const SELFTEST_ENV: &str = "POCKETVISOR_JAIL_SELFTEST";

/// Run one VM jailed: namespaces, private root, cgroup, no privileges, seccomp.
#[derive(Args, Debug)]
#[command(after_help = "\
EXAMPLES:
  pocketvisor vmm --config /var/lib/handset/work/vm.toml --jail-id work \\
      --api-socket /run/handset/work/api.sock --cgroup /sys/fs/cgroup/pocketvisor/work \\
      --memory-max 600M --cpu-weight 100 --uid 1001 --gid 1001
  pocketvisor vmm --restore /var/lib/handset/work/snap --disk /var/lib/handset/work/disk.img \\
      --serial file:/run/handset/work/serial.log --jail-id work --api-socket ...
  pocketvisor vmm --receive-from unix:twin/receive.sock --receive-key twin/receive.key \\
      --disk twin/disk0.img --serial file:twin/serial.log --api-socket twin/api.sock \\
      --jail-id twin-4242 --uid 1610612736 --gid 1610612736

Inside the jail the kernel is /boot/kernel, the initrd /boot/initrd, a restored snapshot
/snapshot (read-only), disk i /disks/<i>, and the directory of each socket or log file
/run/<n> (API snapshot requests name directories there, e.g. /run/0/snap). The exit status is the VM's; 128+N
when signal N killed the jailed process (159: SIGSYS, a syscall outside the allowlist).")]
#[command(group(clap::ArgGroup::new("arrives").args(["restore", "receive_from"])))]
pub struct VmmArgs {
    /// VM configuration file (TOML, the fields of `pocketvisor run --config`).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["restore", "receive_from"],
        conflicts_with_all = ["restore", "receive_from"]
    )]
    config: Option<PathBuf>,
    /// Restore this snapshot directory instead of booting (bind-mounted read-only).
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Receive the VM by a live migration instead of booting: from the proxy on this host
    /// at unix:PATH (the cloud host's `cloud twin`, which carries a device's offload on to
    /// this jailed VMM), in the directory of --api-socket. Receives inside the jail before
    /// the privileges are dropped; every check of a receive is made here. Needs
    /// --receive-key; the disks (--disk, each an existing file of the announced size) are
    /// in the directory of --api-socket too (the received disk replaces each at the commit).
    #[arg(long, value_name = "unix:PATH", requires = "receive_key")]
    receive_from: Option<String>,
    /// With --receive-from: the key file of that connection (64 hexadecimal digits), in the
    /// directory of --api-socket.
    #[arg(long, value_name = "FILE", requires = "receive_from")]
    receive_key: Option<PathBuf>,
    /// With --receive-from: the vsock CID the received guest gets in place of the one it
    /// had (a clone's fresh identity; its vsock device tells the guest with a transport
    /// reset).
    #[arg(long, value_name = "CID", requires = "receive_from", value_parser = clap::value_parser!(u64).range(3..=u64::from(u32::MAX)))]
    vsock_cid: Option<u64>,
    /// With --restore or --receive-from: where the serial console goes: stdout, file:PATH or
    /// none.
    #[arg(long, value_name = "WHERE", requires = "arrives", value_parser = crate::run::parse_serial)]
    serial: Option<SerialConfig>,
    /// With --restore: the snapshot is the copy kept when the twin NAME was offloaded to a
    /// cloud host, and the guest comes back from that twin onto it (a return): its state
    /// arrives through --return-from before the guest runs here (only what differs from
    /// the kept copy and the disks is sent). Needs --return-from and --return-key.
    #[arg(
        long,
        value_name = "NAME",
        requires_all = ["restore", "return_from", "return_key"]
    )]
    return_twin: Option<String>,
    /// With --return-twin: the relay of the cloud host on this host, unix:PATH (the handset
    /// daemon's, inside its TLS), in the directory of --api-socket.
    #[arg(long, value_name = "unix:PATH", requires = "return_twin")]
    return_from: Option<String>,
    /// With --return-twin: the migration key file (64 hexadecimal digits), in the directory
    /// of --api-socket.
    #[arg(long, value_name = "FILE", requires = "return_twin")]
    return_key: Option<PathBuf>,
    /// With --restore or --receive-from: disk image paths replacing the saved (or announced)
    /// ones, in order (with --return-twin or --receive-from, in the directory of
    /// --api-socket: the arriving disk replaces the file there). Repeatable.
    #[arg(long, value_name = "PATH", requires = "arrives")]
    disk: Vec<PathBuf>,
    /// With --restore: TAP names replacing the saved ones, in order. With --receive-from:
    /// the same, each TAP opened (created if missing) in the network namespace this command
    /// starts in, before the jail's own: a host TAP the jailed VM keeps while it sees no
    /// interface of the host's (the cloud host's twins). Repeatable.
    #[arg(long, value_name = "NAME", requires = "arrives")]
    tap: Vec<String>,
    /// With --receive-from: MAC addresses replacing the received ones, in order (a clone's
    /// fresh identity; its driver reads it at its next probe). Repeatable.
    #[arg(long, value_name = "MAC", requires = "receive_from", value_parser = parse_mac_arg)]
    mac: Vec<[u8; 6]>,
    /// With --restore or --receive-from: the vsock unix socket path.
    #[arg(long, value_name = "PATH", requires = "arrives")]
    vsock_socket: Option<PathBuf>,
    /// Serve the control API on this unix socket (host path; its directory is bind-mounted).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// The jail's name: [a-z0-9-]{1,64}; names <jail-root>/<id>.
    #[arg(long, value_name = "NAME")]
    jail_id: String,
    /// Directory holding the jails.
    #[arg(long, value_name = "DIR", default_value = "/srv/pocketvisor/jail")]
    jail_root: PathBuf,
    /// cgroup v2 directory to run in (created if missing, removed at the end if created).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// cpu.weight of the cgroup (1-10000).
    #[arg(long, value_name = "N", requires = "cgroup", value_parser = clap::value_parser!(u32).range(1..=10000))]
    cpu_weight: Option<u32>,
    /// memory.max of the cgroup: bytes, with K/M/G suffix, or "max".
    #[arg(long, value_name = "SIZE", requires = "cgroup", value_parser = parse_memory_max)]
    memory_max: Option<String>,
    /// Network namespace to join (e.g. /var/run/netns/NAME, holding the VM's tap); default:
    /// a new empty one, where the VM's taps are created.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// User id to run as after the VM is built (needs --gid).
    #[arg(long, value_name = "N", requires = "gid")]
    uid: Option<u32>,
    /// Group id to run as after the VM is built (needs --uid).
    #[arg(long, value_name = "N", requires = "uid")]
    gid: Option<u32>,
    /// Do not install the seccomp filter (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Read the 64-byte key of each encrypted disk (`encrypted = true` in the configuration,
    /// or in the restored snapshot's), in disk order, from stdin, which then ends (the
    /// handset's pipe: keys are never on a command line, in the environment or in a file).
    #[arg(long)]
    disk_keys_stdin: bool,
}

/// Hidden self-tests for the jail's tests, chosen by `POCKETVISOR_JAIL_SELFTEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SelfTest {
    /// `forbidden-syscall`: after the filter is installed, make a syscall outside the
    /// allowlist (`socket(AF_INET)`); the process must die of SIGSYS.
    ForbiddenSyscall,
    /// `open:<host path>[:<host path>...]`: after pivot_root, try to open each path and report
    /// on stderr.
    Open(Vec<PathBuf>),
    /// `write:<jail path>[:<jail path>...]`: once privileges are dropped, try to write each
    /// path (a file opened write-only, nothing truncated; in a directory a new file created
    /// and removed) and report on stderr.
    Write(Vec<PathBuf>),
}

/// Tries to write `path` as the jailed process (see [`SelfTest::Write`]).
fn try_write(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        let probe = path.join(".pv-selftest");
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&probe)?;
        std::fs::remove_file(&probe)
    } else {
        std::fs::File::options().write(true).open(path).map(drop)
    }
}

fn selftest() -> Option<SelfTest> {
    let v = std::env::var(SELFTEST_ENV).ok()?;
    if v == "forbidden-syscall" {
        return Some(SelfTest::ForbiddenSyscall);
    }
    let paths = |p: &str| p.split(':').map(PathBuf::from).collect();
    if let Some(p) = v.strip_prefix("write:") {
        return Some(SelfTest::Write(paths(p)));
    }
    v.strip_prefix("open:").map(|p| SelfTest::Open(paths(p)))
}

/// Runs the jailed VM; returns the exit status.
pub fn main(args: VmmArgs) -> Result<i32> {
    let started = Instant::now();
    jail::id::validate(&args.jail_id)?;
    let mut cfg = match (&args.config, &args.restore, &args.receive_from) {
        (Some(path), _, _) => load_config(path)?,
        (None, Some(dir), _) => restored_config(&args, dir)?,
        (None, None, Some(_)) => received_config(&args),
        (None, None, None) => {
            bail!("--config FILE, --restore DIR or --receive-from unix:PATH is required")
        }
    };
    if args.disk_keys_stdin {
        read_disk_keys(&mut std::io::stdin().lock(), &mut cfg)?;
    }
    let mut root = JailRoot::create(&args.jail_root, &args.jail_id)?;
    let prepared = prepare(&mut root, &cfg, &args).and_then(|mut jailed| {
        let cg = setup_cgroup(&args)?;
        jailed.taps_ahead = open_taps_ahead(&args)?;
        Ok((jailed, cg))
    });
    let (jailed, cg) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = root.remove();
            return Err(e);
        }
    };
    let result = fork_and_run(&args, &root, jailed, cg.as_ref(), started);
    if let Some(cg) = &cg {
        if let Err(e) = cg.remove() {
            eprintln!("pocketvisor: warning: {e}");
        }
    }
    let dir = root.dir().to_path_buf();
    if let Err(e) = root.remove() {
        eprintln!("pocketvisor: warning: cleaning up {}: {e}", dir.display());
    }
    result
}

/// Gives every encrypted disk of `cfg`, in order, its key: 64 bytes each from `input`, which
/// must then end (a short or a long input is refused, nothing is guessed).
pub(crate) fn read_disk_keys(input: &mut impl Read, cfg: &mut VmConfig) -> Result<()> {
    use vmm::vmm_api::config::{DiskKeyMaterial, DISK_KEY_LEN};
    for (i, d) in cfg.disks.iter_mut().enumerate() {
        if !d.encrypted {
            continue;
        }
        let mut key = zeroize::Zeroizing::new([0u8; DISK_KEY_LEN]);
        input
            .read_exact(&mut key[..])
            .with_context(|| format!("cannot read the key of disk {i} from stdin"))?;
        d.key = Some(DiskKeyMaterial::new(key));
    }
    let mut extra = [0u8; 1];
    if input.read(&mut extra).context("cannot read stdin")? != 0 {
        bail!("stdin holds more than the keys of the encrypted disks");
    }
    Ok(())
}

/// The configuration and API socket path as the jailed process sees them.
struct Jailed {
    cfg: VmConfig,
    api_socket: Option<PathBuf>,
    /// A return's relay or a receive's proxy, and the key file (see
    /// [`VmmArgs::return_twin`], [`VmmArgs::receive_from`]).
    relay: Option<(PathBuf, PathBuf)>,
    /// The descriptors of the TAPs opened before the jail (see [`open_taps_ahead`]).
    taps_ahead: Vec<std::os::fd::RawFd>,
}

/// With --receive-from, opens each --tap in this network namespace (the host's, or the one
/// the caller started this command in) before the jailed child enters its own, and returns
/// their descriptors, which the child keeps: its receive takes them by name. A TAP that
/// cannot be opened fails the start, before anything is received.
fn open_taps_ahead(args: &VmmArgs) -> Result<Vec<std::os::fd::RawFd>> {
    if args.receive_from.is_none() {
        return Ok(Vec::new());
    }
    args.tap
        .iter()
        .map(|t| {
            devices::virtio::net::open_tap_ahead(t)
                .with_context(|| format!("cannot open the TAP {t:?} before the jail"))
        })
        .collect()
}

/// A `--mac` value: `aa:bb:cc:dd:ee:ff`, unicast.
fn parse_mac_arg(s: &str) -> Result<[u8; 6], String> {
    let mac = vmm::config::parse_mac(s).map_err(|e| e.to_string())?;
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(mac)
}

fn load_config(path: &Path) -> Result<VmConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let cfg: VmConfig = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "bad configuration file {}: {}",
            path.display(),
            e.message().trim()
        )
    })?;
    cfg.validate().map_err(anyhow::Error::msg)?;
    crate::run::check_boot_image(&cfg)?;
    Ok(cfg)
}

/// The configuration a restore of `dir` runs with, in host paths: the saved one with the
/// command line's overrides applied (a snapshot taken in a jail holds jail paths, which the
/// overrides replace).
fn restored_config(args: &VmmArgs, dir: &Path) -> Result<VmConfig> {
    let mut cfg =
        vmm::snapshot::inspect(dir).with_context(|| format!("cannot restore {}", dir.display()))?;
    if let Some(s) = &args.serial {
        cfg.serial = s.clone();
    }
    if args.disk.len() > cfg.disks.len() {
        bail!(
            "{} disks given, the snapshot has {}",
            args.disk.len(),
            cfg.disks.len()
        );
    }
    for (d, p) in cfg.disks.iter_mut().zip(&args.disk) {
        d.path = p.clone();
    }
    if args.tap.len() > cfg.net.len() {
        bail!(
            "{} taps given, the snapshot has {} network devices",
            args.tap.len(),
            cfg.net.len()
        );
    }
    for (n, t) in cfg.net.iter_mut().zip(&args.tap) {
        n.tap = t.clone();
    }
    if let Some(p) = &args.vsock_socket {
        match &mut cfg.vsock {
            Some(v) => v.socket = p.clone(),
            None => bail!("the snapshot has no vsock device"),
        }
    }
    Ok(cfg)
}

/// What the jail is built for when the VM arrives by a migration (`--receive-from`): no
/// kernel (the guest's memory arrives), the overrides' disks, serial log and vsock socket.
/// The rest of the configuration is the source's, announced on the connection.
fn received_config(args: &VmmArgs) -> VmConfig {
    let mut cfg = VmConfig::new(PathBuf::new());
    cfg.disks = args
        .disk
        .iter()
        .map(|p| vmm::DiskConfig {
            path: p.clone(),
            read_only: false,
            encrypted: false,
            key: None,
        })
        .collect();
    cfg.serial = args.serial.clone().unwrap_or(SerialConfig::None);
    cfg.vsock = args
        .vsock_socket
        .as_ref()
        .map(|socket| vmm::vmm_api::config::VsockConfig {
            cid: args.vsock_cid.unwrap_or(3),
            socket: socket.clone(),
        });
    cfg
}

/// The overrides that make a restore inside the jail use the jail's paths for everything.
fn jail_overrides(jailed: &VmConfig) -> vmm::RestoreOverrides {
    vmm::RestoreOverrides {
        serial: Some(jailed.serial.clone()),
        disks: jailed.disks.iter().map(|d| d.path.clone()).collect(),
        vsock_socket: jailed.vsock.as_ref().map(|v| v.socket.clone()),
        taps: jailed.net.iter().map(|n| n.tap.clone()).collect(),
        disk_keys: jailed.disks.iter().map(|d| d.key.clone()).collect(),
        vsock_cid: None,
        macs: Vec::new(),
    }
}

/// Binds everything `cfg` uses (and the snapshot being restored, and the API socket) into the
/// jail, as `vmm_api::jail` maps them, and rewrites the paths to the jail's. A return's disks
/// are seen through their directory (the API socket's), not bound one by one: the returned
/// disk is renamed over each at the commit, which a bind mount's target does not allow.
fn prepare(root: &mut JailRoot, cfg: &VmConfig, args: &VmmArgs) -> Result<Jailed> {
    let returning = args.return_twin.is_some() || args.receive_from.is_some();
    let mut host = jail_host_paths(cfg, args.restore.as_deref(), args.api_socket.as_deref());
    if returning {
        for p in &mut host {
            if matches!(p.role, PathRole::Disk(_)) {
                p.kind = PathKind::InDir;
            }
        }
    }
    let host: Vec<HostPath> = host
        .iter()
        .map(HostPath::canonical)
        .collect::<Result<_, _>>()?;
    let plan = JailPlan::new(&host)?;
    let relay = match (
        (&args.return_from, &args.return_key),
        (&args.receive_from, &args.receive_key),
    ) {
        ((Some(from), Some(key)), _) if args.return_twin.is_some() => {
            Some(relay_paths(&plan, &host, ("--return-from", from), key)?)
        }
        (_, (Some(from), Some(key))) => {
            Some(relay_paths(&plan, &host, ("--receive-from", from), key)?)
        }
        _ => None,
    };
    for b in &plan.binds {
        root.add(Bind {
            source: b.source.clone(),
            target: b.target.clone(),
            read_only: b.read_only,
            dir: b.dir,
            device: b.device,
        })?;
    }
    Ok(Jailed {
        cfg: plan.apply(cfg),
        api_socket: plan.jail_path(PathRole::ApiSocket).map(Path::to_path_buf),
        relay,
        taps_ahead: Vec::new(),
    })
}

/// Where the jailed VMM finds a return's relay or a receive's proxy socket (`from`: the
/// option and its `unix:PATH`) and its key file: both in the directory of the API socket,
/// and the disks too (each must be a file there).
fn relay_paths(
    plan: &JailPlan,
    host: &[HostPath],
    (option, from): (&str, &str),
    key: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let key_option = option.replace("-from", "-key");
    let api_dir = host
        .iter()
        .find(|p| p.role == PathRole::ApiSocket)
        .and_then(|p| p.path.parent())
        .with_context(|| format!("{option} needs --api-socket"))?;
    let in_api_dir = |what: &str, p: &Path| -> Result<PathBuf> {
        let canonical = HostPath {
            role: PathRole::ApiSocket,
            path: p.to_path_buf(),
            kind: PathKind::InDir,
            read_only: false,
        }
        .canonical()?;
        if canonical.path.parent() != Some(api_dir) {
            bail!(
                "{what} {} is not in the directory of --api-socket ({})",
                p.display(),
                api_dir.display()
            );
        }
        plan.to_jail(&canonical.path)
            .with_context(|| format!("{what} {} is not visible in the jail", p.display()))
    };
    for d in host.iter().filter(|p| matches!(p.role, PathRole::Disk(_))) {
        in_api_dir("an arriving disk", &d.path)?;
    }
    let Some(socket) = from.strip_prefix(vmm::migration::LOCAL_PREFIX) else {
        bail!("{option} {from:?}: expected unix:PATH (on this host)");
    };
    Ok((
        in_api_dir(option, Path::new(socket))?,
        in_api_dir(&key_option, key)?,
    ))
}

fn setup_cgroup(args: &VmmArgs) -> Result<Option<jail::cgroup::Cgroup>> {
    let Some(path) = &args.cgroup else {
        return Ok(None);
    };
    let mut settings = Vec::new();
    if let Some(w) = args.cpu_weight {
        settings.push(("cpu.weight", w.to_string()));
    }
    if let Some(m) = &args.memory_max {
        settings.push(("memory.max", m.clone()));
    }
    Ok(Some(jail::cgroup::Cgroup::setup(path, &settings)?))
}

fn fork_and_run(
    args: &VmmArgs,
    root: &JailRoot,
    jailed: Jailed,
    cg: Option<&jail::cgroup::Cgroup>,
    started: Instant,
) -> Result<i32> {
    let (go_read, go_write) = pipe()?;
    let cg_dir = cg.map(|c| c.open_dir()).transpose()?;
    let (forked, in_cgroup) =
        jail::supervise::fork_into_pid_namespace(cg_dir.as_ref().map(|d| d.as_raw_fd()))?;
    drop(cg_dir);
    match forked {
        Forked::Child => {
            drop(go_write);
            // Also closes the jail directory's lock (a directory outside the jail) and
            // whatever the daemon let us inherit.
            let keep: Vec<_> = std::iter::once(go_read.as_raw_fd())
                .chain(jailed.taps_ahead.iter().copied())
                .collect();
            if let Err(e) = jail::supervise::close_fds_except(&keep) {
                eprintln!("pocketvisor: error: jailed vmm: {e}");
                std::process::exit(1);
            }
            let code = match child(args, root, jailed, go_read, started) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("pocketvisor: error: jailed vmm: {}", crate::one_line(&e));
                    1
                }
            };
            std::process::exit(code);
        }
        Forked::Parent(pid) => {
            drop(go_read);
            // The child has the TAPs opened ahead: they go with it.
            devices::virtio::net::forget_taps_ahead();
            if let Some(cg) = cg.filter(|_| !in_cgroup) {
                if let Err(e) = cg.join(pid) {
                    // The child sees the pipe close without a byte and gives up.
                    drop(go_write);
                    let _ = jail::supervise::wait_forwarding_signals(pid);
                    return Err(e.into());
                }
            }
            write_byte(&go_write)?;
            drop(go_write);
            let exit = jail::supervise::wait_forwarding_signals(pid)?;
            if let ChildExit::Killed(sig) = exit {
                eprintln!(
                    "pocketvisor: jailed vmm {} killed by signal {sig}{}",
                    args.jail_id,
                    if sig == libc::SIGSYS {
                        " (SIGSYS: a syscall outside the seccomp allowlist)"
                    } else {
                        ""
                    }
                );
            }
            Ok(exit.code())
        }
    }
}

/// A stop signal that came before `run_vm` installed its own handlers.
static EARLY_STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_early_stop(sig: libc::c_int) {
    EARLY_STOP.store(sig, Ordering::SeqCst);
}

/// The jailed side: namespaces, root, VM, privileges, seccomp, run.
fn child(
    args: &VmmArgs,
    root: &JailRoot,
    jailed: Jailed,
    go: std::fs::File,
    started: Instant,
) -> Result<i32> {
    // Every thread starts after the privileges are dropped (each thread has its own
    // capabilities and bounding set): none ahead of need.
    devices::threads::start_threads_late();
    // As pid 1 of its namespace the child ignores signals it has no handler for, so a stop
    // asked for while the jail is being built is noted here and honoured before the guest runs.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_early_stop as *const () as libc::sighandler_t) };
    }
    let mut byte = [0u8; 1];
    use std::io::Read;
    if (&go).read(&mut byte).context("wait for the parent")? != 1 {
        bail!("the parent gave up before the jail was ready");
    }
    drop(go);
    let net = match &args.netns {
        Some(p) => jail::ns::Net::Join(p),
        None => jail::ns::Net::New,
    };
    jail::ns::enter(net, &args.jail_id)?;
    root.enter()?;
    let test = selftest();
    if let Some(SelfTest::Open(paths)) = &test {
        for p in paths {
            match std::fs::File::open(p) {
                Ok(_) => eprintln!("jail-selftest open {}: opened", p.display()),
                Err(e) => eprintln!(
                    "jail-selftest open {}: failed errno={} ({e})",
                    p.display(),
                    e.raw_os_error().unwrap_or(0)
                ),
            }
        }
    }
    let vm = match (&args.restore, &jailed.relay, &args.return_twin) {
        (None, Some((socket, key)), _) if args.receive_from.is_some() => {
            receive_offloaded(socket, key, &jailed.cfg, args)?
        }
        (None, _, _) => Vm::new(&jailed.cfg)?,
        (Some(_), Some((socket, key)), Some(twin)) => {
            receive_returned(twin, socket, key, &jailed.cfg)?
        }
        (Some(_), _, _) => Vm::restore(Path::new(JAIL_SNAPSHOT), &jail_overrides(&jailed.cfg))
            .context("cannot restore the snapshot")?,
    };
    let ids = match (args.uid, args.gid) {
        (Some(uid), Some(gid)) => Some(jail::privileges::Ids { uid, gid }),
        _ => None,
    };
    jail::privileges::drop_all(ids)?;
    if let Some(SelfTest::Write(paths)) = &test {
        for p in paths {
            match try_write(p) {
                Ok(()) => eprintln!("jail-selftest write {}: written", p.display()),
                Err(e) => eprintln!(
                    "jail-selftest write {}: failed errno={} ({e})",
                    p.display(),
                    e.raw_os_error().unwrap_or(0)
                ),
            }
        }
    }
    if args.no_seccomp {
        eprintln!("pocketvisor: warning: running without the seccomp filter (--no-seccomp)");
    } else {
        jail::seccomp::install()?;
        // Every vCPU, device worker and API thread started from here on narrows itself, and
        // so do the workers a restore started; workers are created by a spawner thread
        // started here, so they never inherit a vCPU's filter.
        devices::threads::set_start_hook(narrow_thread).context("start the thread spawner")?;
    }
    tracing::info!(
        "jail {} ready in {} us",
        args.jail_id,
        started.elapsed().as_micros()
    );
    if test == Some(SelfTest::ForbiddenSyscall) {
        eprintln!("jail-selftest forbidden-syscall: calling socket(AF_INET)");
        // SAFETY: socket(2) with integer arguments; the filter should kill us here.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        eprintln!("jail-selftest forbidden-syscall: survived (fd {fd})");
        return Ok(3);
    }
    match EARLY_STOP.load(Ordering::SeqCst) {
        0 => {
            let _vnc = crate::vnc::start_next_to_api(&vm, jailed.api_socket.as_deref())?;
            crate::run::run_vm(vm, jailed.api_socket.as_deref())
        }
        sig => {
            eprintln!("pocketvisor: stopped by signal {sig} before the guest started");
            Ok(128 + sig)
        }
    }
}

/// A return in the jail (see [`VmmArgs::return_twin`]): the twin's migration, asked for
/// through the relay at `socket`, onto the kept copy at `/snapshot` and the disks of `cfg`.
/// Every wait is bounded (the relay's connection has the migration's I/O timeout): a relay
/// that is gone or silent ends this VMM, and nothing runs.
fn receive_returned(twin: &str, socket: &Path, key: &Path, cfg: &VmConfig) -> Result<Vm> {
    let key = vmm::migration::wire::read_key(key).map_err(anyhow::Error::msg)?;
    let from = format!("{}{}", vmm::migration::LOCAL_PREFIX, socket.display());
    let returned = vmm::migration::receive_returned(
        &from,
        &key,
        None,
        &format!("return {twin}"),
        &jail_overrides(cfg),
        Some(Path::new(JAIL_SNAPSHOT)),
    )
    .with_context(|| format!("the return of {twin:?} failed; nothing runs here"))?;
    outln!(
        "returned bytes_received={} bytes_sent={}",
        returned.bytes_received,
        returned.bytes_sent
    );
    Ok(returned.vm)
}

/// A receive in the jail (see [`VmmArgs::receive_from`]): the VM the proxy at `socket`
/// carries here, onto the disks, serial log and vsock socket of `cfg` (jail paths) and the
/// TAPs opened ahead, the guest given --vsock-cid and --mac if set. Every wait is bounded (the migration's I/O timeout): a
/// proxy that is gone or silent ends this VMM, and nothing runs.
fn receive_offloaded(socket: &Path, key: &Path, cfg: &VmConfig, args: &VmmArgs) -> Result<Vm> {
    let key = vmm::migration::wire::read_key(key).map_err(anyhow::Error::msg)?;
    let from = format!("{}{}", vmm::migration::LOCAL_PREFIX, socket.display());
    let mut overrides = jail_overrides(cfg);
    overrides.vsock_cid = args.vsock_cid;
    // The TAPs were opened before the jail (`open_taps_ahead`): the restore takes them by
    // name. The received policy of each network device stays as it came.
    overrides.taps.clone_from(&args.tap);
    overrides.macs.clone_from(&args.mac);
    vmm::migration::receive_from_proxy(&from, &key, &overrides)
        .context("the receive failed; nothing runs here")
}

fn pipe() -> Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("create a pipe");
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

fn write_byte(f: &std::fs::File) -> Result<()> {
    use std::io::Write;
    (&*f).write_all(&[1]).context("start the jailed vmm")
}

/// `memory.max` values: `max`, or a byte count with an optional K/M/G suffix.
fn parse_memory_max(s: &str) -> Result<String, String> {
    if s == "max" {
        return Ok(s.into());
    }
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad memory size {s:?}: expected e.g. 512M, 2G or max"))?;
    n.checked_mul(1u64 << shift)
        .map(|b| b.to_string())
        .ok_or_else(|| format!("memory size {s:?} is too large"))
}

/// Installs the seccomp filter of a new thread's kind; a thread that cannot narrow itself
/// ends the process (fail closed).
fn narrow_thread(kind: devices::threads::ThreadKind) {
    use devices::threads::ThreadKind as Device;
    use jail::seccomp::threads::ThreadKind as Jail;
    let kind = match kind {
        Device::Vcpu => Jail::Vcpu,
        Device::DeviceWorker => Jail::DeviceWorker,
        Device::Api => Jail::Api,
        Device::Display => Jail::Display,
        Device::LogWriter => Jail::LogWriter,
    };
    if let Err(e) = jail::seccomp::threads::install_thread(kind) {
        eprintln!("pocketvisor: error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_keys_come_from_stdin_in_disk_order() {
        let disk = |encrypted| vmm::DiskConfig {
            path: "/d.img".into(),
            read_only: false,
            encrypted,
            key: None,
        };
        let mut cfg = VmConfig::new("k".into());
        cfg.disks = vec![disk(true), disk(false), disk(true)];
        let input: Vec<u8> = [[1u8; 64], [2u8; 64]].concat();
        let mut with_keys = cfg.clone();
        read_disk_keys(&mut &input[..], &mut with_keys).unwrap();
        let keys: Vec<_> = with_keys
            .disks
            .iter()
            .map(|d| d.key.as_ref().map(|k| k.as_bytes()[0]))
            .collect();
        assert_eq!(keys, [Some(1), None, Some(2)]);
        // A short input, or one with more than the keys, is refused.
        assert!(read_disk_keys(&mut &input[..127], &mut cfg.clone()).is_err());
        let long = [&input[..], b"x"].concat();
        assert!(read_disk_keys(&mut &long[..], &mut cfg.clone()).is_err());
        // No encrypted disk: nothing is read, and stdin must be empty.
        let mut plain = VmConfig::new("k".into());
        read_disk_keys(&mut &b""[..], &mut plain).unwrap();
        assert!(read_disk_keys(&mut &input[..], &mut plain).is_err());
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        vmm: VmmArgs,
    }

    fn parse(args: &[&str]) -> Result<VmmArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(["vmm", "--jail-id", "t"].iter().chain(args)).map(|c| c.vmm)
    }

    #[test]
    fn a_receive_takes_its_key_and_the_overrides_and_nothing_to_boot() {
        let a = parse(&[
            "--receive-from",
            "unix:d/receive.sock",
            "--receive-key",
            "d/receive.key",
            "--disk",
            "d/disk0.img",
            "--serial",
            "file:d/serial.log",
            "--vsock-socket",
            "d/vsock.sock",
            "--vsock-cid",
            "77",
            "--api-socket",
            "d/api.sock",
        ])
        .unwrap();
        assert_eq!(a.receive_from.as_deref(), Some("unix:d/receive.sock"));
        assert_eq!(a.vsock_cid, Some(77));
        let cfg = received_config(&a);
        assert_eq!(cfg.disks[0].path, Path::new("d/disk0.img"));
        assert_eq!(cfg.serial, SerialConfig::File("d/serial.log".into()));
        assert!(
            cfg.kernel.as_os_str().is_empty(),
            "nothing to boot is bound"
        );
        let key = ["--receive-key", "k"];
        for bad in [
            // No key, or a key without a receive.
            &["--receive-from", "unix:s"][..],
            &key[..],
            // Not both a receive and something else to run.
            &[
                "--receive-from",
                "unix:s",
                "--receive-key",
                "k",
                "--config",
                "c",
            ],
            &[
                "--receive-from",
                "unix:s",
                "--receive-key",
                "k",
                "--restore",
                "r",
            ],
            // Overrides need something that arrives; a CID only a receive.
            &["--config", "c", "--disk", "d.img"],
            &["--config", "c", "--serial", "none"],
            &["--restore", "r", "--vsock-cid", "9"],
            &[
                "--receive-from",
                "unix:s",
                "--receive-key",
                "k",
                "--vsock-cid",
                "2",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&["--restore", "r", "--disk", "d.img"]).is_ok());
        // A receive's host TAPs and a clone's MACs; a MAC only with a receive, unicast.
        let a = parse(&[
            "--receive-from",
            "unix:s",
            "--receive-key",
            "k",
            "--tap",
            "pvt0123456789ab",
            "--mac",
            "06:01:02:03:04:05",
        ])
        .unwrap();
        assert_eq!(a.tap, ["pvt0123456789ab"]);
        assert_eq!(a.mac, [[6, 1, 2, 3, 4, 5]]);
        assert!(parse(&["--config", "c", "--tap", "t"]).is_err());
        assert!(parse(&["--restore", "r", "--mac", "06:01:02:03:04:05"]).is_err());
        for bad in ["07:01:02:03:04:05", "06:01:02:03:04", "zz:01:02:03:04:05"] {
            let args = [
                "--receive-from",
                "unix:s",
                "--receive-key",
                "k",
                "--mac",
                bad,
            ];
            assert!(parse(&args).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_receive_sees_its_socket_key_and_disks_in_the_api_directory() {
        let tmp = std::env::temp_dir().join(format!("pv-vmm-recv-{}", std::process::id()));
        let d = tmp.join("twin");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("disk0.img"), [0; 512]).unwrap();
        let at = |f: &str| d.join(f).display().to_string();
        let args = |socket: &str| {
            parse(&[
                "--receive-from",
                &format!("unix:{socket}"),
                "--receive-key",
                &at("receive.key"),
                "--disk",
                &at("disk0.img"),
                "--serial",
                &format!("file:{}", at("serial.log")),
                "--api-socket",
                &at("api.sock"),
                "--jail-root",
                &tmp.join("jail").display().to_string(),
            ])
            .unwrap()
        };
        let a = args(&at("receive.sock"));
        let mut root = JailRoot::create(&a.jail_root, "t").unwrap();
        let jailed = prepare(&mut root, &received_config(&a), &a).unwrap();
        assert_eq!(
            jailed.relay,
            Some(("/run/0/receive.sock".into(), "/run/0/receive.key".into()))
        );
        // The disk is seen through its directory: the arriving disk is renamed over it.
        assert_eq!(jailed.cfg.disks[0].path, Path::new("/run/0/disk0.img"));
        assert_eq!(
            jailed.api_socket.as_deref(),
            Some(Path::new("/run/0/api.sock"))
        );
        root.remove().unwrap();
        // A proxy socket elsewhere is not in the jail.
        let a = args(&tmp.join("receive.sock").display().to_string());
        let mut root = JailRoot::create(&a.jail_root, "t").unwrap();
        let err = prepare(&mut root, &received_config(&a), &a).err().unwrap();
        assert!(err.to_string().contains("not in the directory"), "{err}");
        root.remove().unwrap();
        let _ = std::fs::remove_dir_all(tmp);
    }

    #[test]
    fn memory_max_values() {
        assert_eq!(parse_memory_max("max").unwrap(), "max");
        assert_eq!(parse_memory_max("512M").unwrap(), "536870912");
        assert_eq!(parse_memory_max("4096").unwrap(), "4096");
        assert!(parse_memory_max("lots").is_err());
        assert!(parse_memory_max("99999999999G").is_err());
    }
}
