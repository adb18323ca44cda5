//! Where a jailed VMM finds the host paths its configuration names.
//!
//! Each part of a [`VmConfig`] declares the host paths it needs ([`VmConfig::host_paths`]);
//! [`jail_host_paths`] adds what the jailer itself needs (a snapshot being restored, the API
//! socket). [`JailPlan::new`] maps them, without touching the host, to the bind mounts of the
//! jail and to the paths the jailed VMM uses:
//!
//! | what                         | in the jail                         |
//! |------------------------------|-------------------------------------|
//! | `/dev/kvm`, `/dev/net/tun`   | the same path                       |
//! | kernel, initrd               | `/boot/kernel`, `/boot/initrd`      |
//! | disk *i*                     | `/disks/<i>` (read-only if the disk is) |
//! | a snapshot being restored    | `/snapshot` (read-only)             |
//! | serial log, vsock socket, API socket | `/run/<n>/<file name>`: each distinct directory is bound read-write once, numbered in that order |

use std::path::{Component, Path, PathBuf};

use crate::config::{DiskConfig, NetConfig, SerialConfig, VmConfig, VsockConfig};

/// `/dev/kvm`, in the host and in the jail.
pub const KVM_DEVICE: &str = "/dev/kvm";
/// The TAP clone device, in the host and in the jail.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Where the kernel appears in the jail.
pub const JAIL_KERNEL: &str = "/boot/kernel";
/// Where the initrd appears in the jail.
pub const JAIL_INITRD: &str = "/boot/initrd";
/// Where the firmware image appears in the jail.
pub const JAIL_FIRMWARE: &str = "/boot/firmware";
/// Where a snapshot being restored appears in the jail.
pub const JAIL_SNAPSHOT: &str = "/snapshot";
/// The directory holding disk *i* as `<i>`.
pub const JAIL_DISKS: &str = "/disks";
/// The directory holding each bound run-time directory as `<n>`.
pub const JAIL_RUN: &str = "/run";
/// A jailed VMM with a display serves VNC (RFB) on a unix socket of this name next to its
/// API socket (owner only), where the handset daemon reaches it.
pub const VNC_SOCKET_NAME: &str = "vnc.sock";

/// What a host path is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRole {
    /// `/dev/kvm`.
    Kvm,
    /// `/dev/net/tun` (any network device).
    Tun,
    /// The kernel image.
    Kernel,
    /// The initial ramdisk.
    Initrd,
    /// The firmware image.
    Firmware,
    /// Disk number *i*.
    Disk(usize),
    /// The serial log file.
    Serial,
    /// The vsock unix socket.
    Vsock,
    /// The control API socket.
    ApiSocket,
    /// A snapshot directory being restored.
    Snapshot,
}

/// How a host path is made visible in the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A device node, bound as is.
    Device,
    /// A file, bound as is.
    File,
    /// A directory, bound as is.
    Dir,
    /// A socket or log the VMM creates or appends to: its directory is bound read-write.
    InDir,
}

/// One host path a VM needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPath {
    /// What it is for.
    pub role: PathRole,
    /// The host path (absolute; see [`HostPath::canonical`]).
    pub path: PathBuf,
    /// How it is made visible.
    pub kind: PathKind,
    /// Whether the VMM only reads it.
    pub read_only: bool,
}

impl HostPath {
    fn new(role: PathRole, path: impl Into<PathBuf>, kind: PathKind, read_only: bool) -> Self {
        Self {
            role,
            path: path.into(),
            kind,
            read_only,
        }
    }

    /// The same path with symbolic links and `..` resolved (for [`PathKind::InDir`], in its
    /// directory: the file itself may not exist yet). Reads the host file system.
    pub fn canonical(&self) -> Result<HostPath, JailPathError> {
        let path = match self.kind {
            PathKind::InDir => {
                let name = self
                    .path
                    .file_name()
                    .ok_or_else(|| JailPathError::NoFileName(self.path.clone()))?;
                let parent = match self.path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                std::fs::canonicalize(parent)
                    .map_err(|e| JailPathError::Missing {
                        path: self.path.clone(),
                        reason: format!("its directory: {e}"),
                    })?
                    .join(name)
            }
            _ => std::fs::canonicalize(&self.path).map_err(|e| JailPathError::Missing {
                path: self.path.clone(),
                reason: e.to_string(),
            })?,
        };
        Ok(HostPath {
            path,
            ..self.clone()
        })
    }
}

/// Why the host paths cannot be mapped into a jail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JailPathError {
    /// A path that is not absolute (canonicalise first).
    #[error("{0} is not an absolute path")]
    NotAbsolute(PathBuf),
    /// A socket or log path without a file name.
    #[error("{0} names no file")]
    NoFileName(PathBuf),
    /// A socket or log not bound through its directory.
    #[error("{0}: a socket or log is bound through its directory")]
    NotInDir(PathBuf),
    /// A path that cannot be used.
    #[error("cannot use {path} in the jail: {reason}")]
    Missing {
        /// The host path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One bind mount of the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailBind {
    /// The host path.
    pub source: PathBuf,
    /// Where it appears in the jail.
    pub target: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
    /// A directory (else a file or device node).
    pub dir: bool,
    /// A device node.
    pub device: bool,
}

/// The bind mounts of a jail and where each host path appears in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    /// The bind mounts, in mount order.
    pub binds: Vec<JailBind>,
    /// Each role's path in the jail.
    paths: Vec<(PathRole, PathBuf)>,
}

impl DiskConfig {
    /// The host path disk number `index` needs: its image, read-only if the disk is.
    pub fn host_path(&self, index: usize) -> HostPath {
        HostPath::new(
            PathRole::Disk(index),
            &self.path,
            PathKind::File,
            self.read_only,
        )
    }
}

impl NetConfig {
    /// The host path a network device needs: the TAP clone device.
    pub fn host_path(&self) -> HostPath {
        HostPath::new(PathRole::Tun, TUN_DEVICE, PathKind::Device, false)
    }
}

impl VsockConfig {
    /// The host path the vsock device needs: its socket (created at run time).
    pub fn host_path(&self) -> HostPath {
        HostPath::new(PathRole::Vsock, &self.socket, PathKind::InDir, false)
    }
}

impl SerialConfig {
    /// The host path the serial console needs: its log file, if it writes one.
    pub fn host_path(&self) -> Option<HostPath> {
        match self {
            SerialConfig::File(p) => {
                Some(HostPath::new(PathRole::Serial, p, PathKind::InDir, false))
            }
            SerialConfig::Stdout | SerialConfig::None => None,
        }
    }
}

impl VmConfig {
    /// The host paths this configuration needs, each part declaring its own: `/dev/kvm`,
    /// `/dev/net/tun` with any network device, the kernel and initrd (or the firmware), each disk, the serial
    /// log file, the vsock socket.
    pub fn host_paths(&self) -> Vec<HostPath> {
        let mut out = vec![HostPath::new(
            PathRole::Kvm,
            KVM_DEVICE,
            PathKind::Device,
            false,
        )];
        // One clone device serves every TAP.
        out.extend(self.net.first().map(NetConfig::host_path));
        if !self.kernel.as_os_str().is_empty() {
            out.push(HostPath::new(
                PathRole::Kernel,
                &self.kernel,
                PathKind::File,
                true,
            ));
        }
        if let Some(firmware) = &self.firmware {
            out.push(HostPath::new(
                PathRole::Firmware,
                firmware,
                PathKind::File,
                true,
            ));
        }
        if let Some(initrd) = &self.initrd {
            out.push(HostPath::new(
                PathRole::Initrd,
                initrd,
                PathKind::File,
                true,
            ));
        }
        out.extend(self.disks.iter().enumerate().map(|(i, d)| d.host_path(i)));
        out.extend(self.serial.host_path());
        out.extend(self.vsock.as_ref().map(VsockConfig::host_path));
        out
    }
}

/// Every host path a jailed VMM needs: `cfg`'s (without kernel and initrd when restoring:
/// they are in the snapshot's memory), the snapshot directory `restore`, the `api_socket`.
pub fn jail_host_paths(
    cfg: &VmConfig,
    restore: Option<&Path>,
    api_socket: Option<&Path>,
) -> Vec<HostPath> {
    let mut out: Vec<HostPath> = cfg
        .host_paths()
        .into_iter()
        .filter(|p| restore.is_none() || !matches!(p.role, PathRole::Kernel | PathRole::Initrd))
        .collect();
    if let Some(dir) = restore {
        // In place of the kernel, after the devices.
        let at = out
            .iter()
            .position(|p| !matches!(p.role, PathRole::Kvm | PathRole::Tun))
            .unwrap_or(out.len());
        out.insert(
            at,
            HostPath::new(PathRole::Snapshot, dir, PathKind::Dir, true),
        );
    }
    if let Some(api) = api_socket {
        out.push(HostPath::new(
            PathRole::ApiSocket,
            api,
            PathKind::InDir,
            false,
        ));
    }
    out
}

impl JailPlan {
    /// Maps `paths` (absolute, e.g. from [`HostPath::canonical`]) into the jail. Pure: the
    /// host is not looked at.
    pub fn new(paths: &[HostPath]) -> Result<JailPlan, JailPathError> {
        let mut binds = Vec::new();
        let mut run_dirs: Vec<PathBuf> = Vec::new();
        let mut mapped = Vec::new();
        for p in paths {
            if !p.path.is_absolute() {
                return Err(JailPathError::NotAbsolute(p.path.clone()));
            }
            let fixed = |target: &str| JailBind {
                source: p.path.clone(),
                target: target.into(),
                read_only: p.read_only,
                dir: p.kind == PathKind::Dir,
                device: p.kind == PathKind::Device,
            };
            let bind = match (p.kind, p.role) {
                (PathKind::InDir, _) => {
                    let (dir, name) = match (p.path.parent(), p.path.file_name()) {
                        (Some(dir), Some(name)) => (dir, name),
                        _ => return Err(JailPathError::NoFileName(p.path.clone())),
                    };
                    let n = match run_dirs.iter().position(|d| d == dir) {
                        Some(n) => n,
                        None => {
                            run_dirs.push(dir.to_path_buf());
                            run_dirs.len() - 1
                        }
                    };
                    mapped.push((p.role, run_dir(n).join(name)));
                    continue;
                }
                (_, PathRole::Kvm) => fixed(KVM_DEVICE),
                (_, PathRole::Tun) => fixed(TUN_DEVICE),
                (_, PathRole::Kernel) => fixed(JAIL_KERNEL),
                (_, PathRole::Initrd) => fixed(JAIL_INITRD),
                (_, PathRole::Firmware) => fixed(JAIL_FIRMWARE),
                (_, PathRole::Snapshot) => fixed(JAIL_SNAPSHOT),
                (_, PathRole::Disk(i)) => fixed(&format!("{JAIL_DISKS}/{i}")),
                // A socket or log bound by itself would be replaced, not shared: only its
                // directory can be bound.
                (_, PathRole::Serial | PathRole::Vsock | PathRole::ApiSocket) => {
                    return Err(JailPathError::NotInDir(p.path.clone()))
                }
            };
            mapped.push((p.role, bind.target.clone()));
            binds.push(bind);
        }
        for (n, dir) in run_dirs.into_iter().enumerate() {
            binds.push(JailBind {
                source: dir,
                target: run_dir(n),
                read_only: false,
                dir: true,
                device: false,
            });
        }
        Ok(JailPlan {
            binds,
            paths: mapped,
        })
    }

    /// Where the path for `role` appears in the jail.
    pub fn jail_path(&self, role: PathRole) -> Option<&Path> {
        self.paths
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, p)| p.as_path())
    }

    /// Where the host path `host` (a bound path or anything under a bound directory) appears
    /// in the jail; `None` if the jail cannot see it.
    pub fn to_jail(&self, host: &Path) -> Option<PathBuf> {
        if host
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return None;
        }
        self.binds.iter().find_map(|b| {
            let rest = host.strip_prefix(&b.source).ok()?;
            (b.dir || rest.as_os_str().is_empty()).then(|| b.target.join(rest))
        })
    }

    /// `cfg` with every path it names replaced by the jail's.
    pub fn apply(&self, cfg: &VmConfig) -> VmConfig {
        let mut out = cfg.clone();
        for (role, p) in &self.paths {
            match role {
                PathRole::Kernel => out.kernel = p.clone(),
                PathRole::Initrd => out.initrd = Some(p.clone()),
                PathRole::Firmware => out.firmware = Some(p.clone()),
                PathRole::Disk(i) => {
                    if let Some(d) = out.disks.get_mut(*i) {
                        d.path = p.clone();
                    }
                }
                PathRole::Serial => out.serial = SerialConfig::File(p.clone()),
                PathRole::Vsock => {
                    if let Some(v) = out.vsock.as_mut() {
                        v.socket = p.clone();
                    }
                }
                PathRole::Kvm | PathRole::Tun | PathRole::ApiSocket | PathRole::Snapshot => {}
            }
        }
        out
    }
}

fn run_dir(n: usize) -> PathBuf {
    Path::new(JAIL_RUN).join(n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        let mut cfg = VmConfig::new("/img/kernel.elf".into());
        cfg.initrd = Some("/img/initrd".into());
        cfg.disks = vec![
            DiskConfig {
                path: "/p/disks/root.img".into(),
                read_only: true,
                encrypted: false,
                key: None,
            },
            DiskConfig {
                path: "/p/disks/data.img".into(),
                read_only: false,
                encrypted: false,
                key: None,
            },
        ];
        cfg.net = vec![NetConfig {
            tap: "tap0".into(),
            mac: None,
            filter: None,
        }];
        cfg.vsock = Some(VsockConfig {
            cid: 3,
            socket: "/p/run/vsock.sock".into(),
        });
        cfg.serial = SerialConfig::File("/logs/serial.log".into());
        cfg
    }

    fn bind(source: &str, target: &str, read_only: bool, dir: bool, device: bool) -> JailBind {
        JailBind {
            source: source.into(),
            target: target.into(),
            read_only,
            dir,
            device,
        }
    }

    #[test]
    fn a_booting_vm_sees_its_files_at_fixed_places() {
        let cfg = config();
        let plan = JailPlan::new(&jail_host_paths(
            &cfg,
            None,
            Some(Path::new("/p/run/api.sock")),
        ))
        .unwrap();
        assert_eq!(
            plan.binds,
            [
                bind("/dev/kvm", "/dev/kvm", false, false, true),
                bind("/dev/net/tun", "/dev/net/tun", false, false, true),
                bind("/img/kernel.elf", "/boot/kernel", true, false, false),
                bind("/img/initrd", "/boot/initrd", true, false, false),
                bind("/p/disks/root.img", "/disks/0", true, false, false),
                bind("/p/disks/data.img", "/disks/1", false, false, false),
                // The serial log's directory first, then the sockets' (shared) one.
                bind("/logs", "/run/0", false, true, false),
                bind("/p/run", "/run/1", false, true, false),
            ]
        );
        let jailed = plan.apply(&cfg);
        assert_eq!(jailed.kernel, Path::new("/boot/kernel"));
        assert_eq!(jailed.initrd.as_deref(), Some(Path::new("/boot/initrd")));
        assert_eq!(jailed.disks[0].path, Path::new("/disks/0"));
        assert!(jailed.disks[0].read_only);
        assert_eq!(jailed.disks[1].path, Path::new("/disks/1"));
        assert_eq!(
            jailed.serial,
            SerialConfig::File("/run/0/serial.log".into())
        );
        assert_eq!(
            jailed.vsock.as_ref().unwrap().socket,
            Path::new("/run/1/vsock.sock")
        );
        assert_eq!(jailed.net, cfg.net, "tap names are not paths");
        assert_eq!(
            plan.jail_path(PathRole::ApiSocket),
            Some(Path::new("/run/1/api.sock"))
        );
        assert_eq!(plan.jail_path(PathRole::Snapshot), None);
    }

    #[test]
    fn a_restore_binds_the_snapshot_instead_of_the_kernel() {
        let mut cfg = config();
        cfg.net.clear();
        cfg.serial = SerialConfig::File("/p/run/serial.log".into());
        let plan = JailPlan::new(&jail_host_paths(
            &cfg,
            Some(Path::new("/p/snapshot")),
            Some(Path::new("/p/run/api.sock")),
        ))
        .unwrap();
        let targets: Vec<&Path> = plan.binds.iter().map(|b| b.target.as_path()).collect();
        assert_eq!(
            targets,
            ["/dev/kvm", "/snapshot", "/disks/0", "/disks/1", "/run/0"].map(Path::new)
        );
        assert_eq!(
            plan.binds[1],
            bind("/p/snapshot", "/snapshot", true, true, false)
        );
        assert_eq!(plan.jail_path(PathRole::Kernel), None);
        assert_eq!(
            plan.jail_path(PathRole::Snapshot),
            Some(Path::new(JAIL_SNAPSHOT))
        );
        // The kernel path stays as saved: the restore does not use it.
        assert_eq!(plan.apply(&cfg).kernel, cfg.kernel);
    }

    #[test]
    fn host_paths_translate_through_bound_directories_only() {
        let cfg = config();
        let plan = JailPlan::new(&jail_host_paths(
            &cfg,
            None,
            Some(Path::new("/p/run/api.sock")),
        ))
        .unwrap();
        assert_eq!(
            plan.to_jail(Path::new("/p/run/snapshot")),
            Some("/run/1/snapshot".into())
        );
        assert_eq!(
            plan.to_jail(Path::new("/p/disks/root.img")),
            Some("/disks/0".into())
        );
        // Beside a bound file, outside every bind, or escaping one: invisible.
        assert_eq!(plan.to_jail(Path::new("/p/disks/other.img")), None);
        assert_eq!(plan.to_jail(Path::new("/etc/passwd")), None);
        assert_eq!(plan.to_jail(Path::new("/p/run/../../etc/passwd")), None);
        assert_eq!(plan.to_jail(Path::new("/p/running")), None);
    }

    #[test]
    fn host_paths_follow_the_config() {
        let mut cfg = VmConfig::new("/k".into());
        cfg.serial = SerialConfig::Stdout;
        let roles: Vec<PathRole> = cfg.host_paths().iter().map(|p| p.role).collect();
        assert_eq!(roles, [PathRole::Kvm, PathRole::Kernel]);
        let roles: Vec<PathRole> = config().host_paths().iter().map(|p| p.role).collect();
        assert_eq!(
            roles,
            [
                PathRole::Kvm,
                PathRole::Tun,
                PathRole::Kernel,
                PathRole::Initrd,
                PathRole::Disk(0),
                PathRole::Disk(1),
                PathRole::Serial,
                PathRole::Vsock
            ]
        );
    }

    #[test]
    fn bad_paths_are_refused() {
        let rel = VmConfig::new("kernel.elf".into());
        assert_eq!(
            JailPlan::new(&rel.host_paths()),
            Err(JailPathError::NotAbsolute("kernel.elf".into()))
        );
        let root_log = [HostPath::new(PathRole::Serial, "/", PathKind::InDir, false)];
        assert!(matches!(
            JailPlan::new(&root_log),
            Err(JailPathError::NoFileName(_))
        ));
        let socket_alone = [HostPath::new(
            PathRole::ApiSocket,
            "/p/api.sock",
            PathKind::File,
            false,
        )];
        assert_eq!(
            JailPlan::new(&socket_alone),
            Err(JailPathError::NotInDir("/p/api.sock".into()))
        );
    }

    #[test]
    fn canonical_resolves_the_directory_of_a_socket() {
        let dir = std::env::temp_dir();
        let p = HostPath::new(
            PathRole::ApiSocket,
            dir.join(".").join("no-such.sock"),
            PathKind::InDir,
            false,
        );
        let c = p.canonical().unwrap();
        assert_eq!(
            c.path,
            std::fs::canonicalize(&dir).unwrap().join("no-such.sock")
        );
        let missing = HostPath::new(PathRole::Kernel, "/no/such/kernel", PathKind::File, true);
        assert!(matches!(
            missing.canonical(),
            Err(JailPathError::Missing { .. })
        ));
    }
}
