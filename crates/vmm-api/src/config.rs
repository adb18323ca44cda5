//! The VM configuration: what `pocketvisor run` takes as flags or as a TOML file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::limits::{
    CMDLINE_MAX, MAX_MEMORY_MIB, MAX_TAP_NAME, MAX_VCPUS, MIN_MEMORY_MIB, MIN_VSOCK_CID,
};

/// Everything needed to build one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: an ELF with a PVH entry note (vmlinux, the probe guest) or a bzImage.
    /// Empty when the guest boots [`firmware`](Self::firmware) instead.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub kernel: PathBuf,
    /// Firmware ROM booted instead of a kernel (SeaBIOS's `bios.bin`; OVMF's `OVMF.fd` is
    /// unproven, see README): it starts at the x86 reset vector and boots the first disk itself
    /// (x86_64 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    /// Optional initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Block devices, in order (the first is `vda`).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Network devices.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Optional vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Whether to add a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Whether to add a virtio-balloon device (free page reporting, guest statistics).
    #[serde(default)]
    pub balloon: bool,
    /// Optional virtio-gpu (2D) display.
    #[serde(default)]
    pub gpu: Option<GpuConfig>,
    /// Whether to add a virtio-input keyboard (`keyboard`) and multi-touch screen (`touch`,
    /// the size of the display).
    #[serde(default)]
    pub input: bool,
    /// Whether to mark guest RAM mergeable for the host's KSM (`MADV_MERGEABLE`).
    #[serde(default)]
    pub mergeable: bool,
    /// Where the guest's serial console goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// CPUID features to hide from the guest (see `arch::cpuid_feature_names`).
    #[serde(default)]
    pub cpuid_hide: Vec<String>,
}

fn default_memory_mib() -> u64 {
    256
}

fn default_vcpus() -> u8 {
    1
}

/// One virtio-blk disk backed by a raw file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file; its size must be a multiple of 512.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
    /// The image is encrypted at rest (AES-256-XTS per sector); the VM needs [`key`](Self::key).
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypted: bool,
    /// The data key of an encrypted image. Never serialized: it reaches the VMM over its start
    /// channel, not in a configuration file, snapshot or command line.
    #[serde(skip)]
    pub key: Option<DiskKeyMaterial>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A disk's 64-byte data key in clear, zeroized on drop and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DiskKeyMaterial(zeroize::Zeroizing<[u8; DISK_KEY_LEN]>);

/// Length of a disk data key.
pub const DISK_KEY_LEN: usize = 64;

impl DiskKeyMaterial {
    /// The key from its bytes.
    pub fn new(bytes: zeroize::Zeroizing<[u8; DISK_KEY_LEN]>) -> DiskKeyMaterial {
        DiskKeyMaterial(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; DISK_KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for DiskKeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskKeyMaterial(..)")
    }
}

/// One virtio-net device on a TAP interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP interface name (created if missing).
    pub tap: String,
    /// MAC address `aa:bb:cc:dd:ee:ff`; random if absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// The network policy the device enforces on every frame; none: everything passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<NetFilterConfig>,
}

/// A network policy for one virtio-net device (from a profile's signed IT policy,
/// docs/policy.md): the first rule that matches a connection decides, else `default`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetFilterConfig {
    /// What happens to traffic no rule matches.
    pub default: FilterAction,
    /// The rules, in order.
    #[serde(default)]
    pub rules: Vec<NetFilterRule>,
    /// The resolvers (IP addresses) whose UDP answers teach the addresses of `name` rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
}

/// Let through or drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterAction {
    /// Let it through.
    Allow,
    /// Drop it.
    Deny,
}

/// A rule's protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterProtocol {
    /// Any.
    #[default]
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
}

/// One rule of a [`NetFilterConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetFilterRule {
    /// What a match does.
    pub action: FilterAction,
    /// The remote address block (`10.0.0.0/8`, `2001:db8::/32`); none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// The remote's DNS name (`host.corp.example`, `*.corp.example`): the addresses a
    /// `dns_servers` resolver answered for it; none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The protocol.
    #[serde(default)]
    pub protocol: FilterProtocol,
    /// The service ports, first and last (TCP and UDP); none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<[u16; 2]>,
}

/// The virtio-vsock device, reachable from the host through a unix socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// Host unix socket path (Firecracker's protocol: `CONNECT <port>\n`).
    pub socket: PathBuf,
}

/// The virtio-gpu display: one scanout of this mode (a portrait phone screen by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// Width in pixels (1..=4095).
    #[serde(default = "default_gpu_width")]
    pub width: u32,
    /// Height in pixels (1..=4095).
    #[serde(default = "default_gpu_height")]
    pub height: u32,
    /// Most host memory the guest's display buffers may take, in MiB.
    #[serde(default = "default_gpu_memory_mib")]
    pub memory_mib: u32,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            width: default_gpu_width(),
            height: default_gpu_height(),
            memory_mib: default_gpu_memory_mib(),
        }
    }
}

fn default_gpu_width() -> u32 {
    720
}

fn default_gpu_height() -> u32 {
    1280
}

fn default_gpu_memory_mib() -> u32 {
    64
}

/// Where the serial console's output goes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    /// The VMM's standard output (and standard input when it is a terminal).
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            firmware: None,
            initrd: None,
            cmdline: String::new(),
            memory_mib: default_memory_mib(),
            vcpus: default_vcpus(),
            disks: vec![],
            net: vec![],
            vsock: None,
            rng: false,
            balloon: false,
            gpu: None,
            input: false,
            mergeable: false,
            serial: SerialConfig::default(),
            cpuid_hide: vec![],
        }
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.firmware, path_is_empty(&self.kernel)) {
            (None, true) => return Err(ConfigError::NoBootImage),
            (Some(_), false) => return Err(ConfigError::KernelAndFirmware),
            (Some(_), true) if self.initrd.is_some() || !self.cmdline.is_empty() => {
                return Err(ConfigError::FirmwareWithKernelArgs)
            }
            _ => {}
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::TooLittleMemory(self.memory_mib));
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(ConfigError::TooMuchMemory(self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.cmdline.len() >= CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong);
        }
        if let Some(v) = &self.vsock {
            if v.cid < MIN_VSOCK_CID || v.cid > u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(v.cid));
            }
        }
        for n in &self.net {
            if n.tap.is_empty() || n.tap.len() > MAX_TAP_NAME {
                return Err(ConfigError::TapName(n.tap.clone()));
            }
            if let Some(mac) = &n.mac {
                parse_mac(mac)?;
            }
        }
        Ok(())
    }
}

/// Whether `p` is the empty path (no kernel: the guest boots firmware).
fn path_is_empty(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Neither a kernel nor firmware.
    #[error("nothing to boot: give a kernel or a firmware image")]
    NoBootImage,
    /// Both a kernel and firmware.
    #[error("give a kernel or a firmware image, not both")]
    KernelAndFirmware,
    /// Firmware with an initrd or a command line, which only a kernel takes.
    #[error("an initrd and a kernel command line go with a kernel; firmware boots the disk's own")]
    FirmwareWithKernelArgs,
    /// Less guest memory than the platform needs.
    #[error("memory {0} MiB is too little: at least {MIN_MEMORY_MIB} MiB is needed")]
    TooLittleMemory(u64),
    /// More guest memory than supported.
    #[error("memory {0} MiB is more than 1 TiB")]
    TooMuchMemory(u64),
    /// A vCPU count out of range.
    #[error("vcpus must be 1..={MAX_VCPUS}, not {0}")]
    Vcpus(u8),
    /// The command line does not fit.
    #[error("the kernel command line is too long")]
    CmdlineTooLong,
    /// A reserved or too large vsock context id.
    #[error("vsock cid must be 3..=4294967295, not {0}")]
    VsockCid(u64),
    /// A TAP name the kernel would refuse.
    #[error("tap name {0:?} must be 1-15 bytes")]
    TapName(String),
    /// A malformed MAC address.
    #[error("bad MAC address {0:?}: expected aa:bb:cc:dd:ee:ff")]
    BadMac(String),
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::BadMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Formats a MAC address as [`parse_mac`] reads it: `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_formatted_mac_parses_back() {
        let m = [0x02, 0xab, 0x00, 0x10, 0xfe, 0x7f];
        assert_eq!(format_mac(&m), "02:ab:00:10:fe:7f");
        assert_eq!(parse_mac(&format_mac(&m)).unwrap(), m);
    }

    #[test]
    fn toml_round_trips_and_defaults_apply() {
        let cfg: VmConfig = toml::from_str(
            r#"
            kernel = "k.elf"
            vcpus = 2
            rng = true
            balloon = true
            gpu = { height = 1600 }
            input = true
            disks = [{ path = "d.img", read_only = true }]
            serial = { file = "/tmp/s.log" }
            "#,
        )
        .unwrap();
        assert_eq!(cfg.memory_mib, 256);
        assert_eq!(cfg.vcpus, 2);
        assert!(cfg.balloon && !cfg.mergeable);
        let gpu = cfg.gpu.unwrap();
        assert_eq!((gpu.width, gpu.height, gpu.memory_mib), (720, 1600, 64));
        assert!(cfg.input);
        assert!(cfg.disks[0].read_only);
        assert_eq!(cfg.serial, SerialConfig::File("/tmp/s.log".into()));
        let back: VmConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(toml::from_str::<VmConfig>("kernel = \"k\"\nbogus = 1").is_err());
    }

    #[test]
    fn firmware_boots_instead_of_a_kernel_and_round_trips() {
        let cfg: VmConfig = toml::from_str(
            "firmware = \"/usr/share/seabios/bios.bin\"\ndisks = [{ path = \"d.raw\" }]",
        )
        .unwrap();
        assert_eq!(cfg.firmware, Some("/usr/share/seabios/bios.bin".into()));
        assert!(cfg.kernel.as_os_str().is_empty());
        assert_eq!(cfg.validate(), Ok(()));
        let text = toml::to_string(&cfg).unwrap();
        assert!(!text.contains("kernel"), "{text}");
        assert_eq!(toml::from_str::<VmConfig>(&text).unwrap(), cfg);
        // A kernel configuration does not name firmware.
        let text = toml::to_string(&VmConfig::new("k".into())).unwrap();
        assert!(!text.contains("firmware"), "{text}");

        let mut both = cfg.clone();
        both.kernel = "k".into();
        assert_eq!(both.validate(), Err(ConfigError::KernelAndFirmware));
        let mut neither = cfg.clone();
        neither.firmware = None;
        assert_eq!(neither.validate(), Err(ConfigError::NoBootImage));
        let mut with_cmdline = cfg.clone();
        with_cmdline.cmdline = "console=ttyS0".into();
        assert_eq!(
            with_cmdline.validate(),
            Err(ConfigError::FirmwareWithKernelArgs)
        );
        let mut with_initrd = cfg;
        with_initrd.initrd = Some("i".into());
        assert_eq!(
            with_initrd.validate(),
            Err(ConfigError::FirmwareWithKernelArgs)
        );
    }

    #[test]
    fn validation_rejects_bad_values() {
        let mut cfg = VmConfig::new("k".into());
        assert!(cfg.validate().is_ok());
        cfg.memory_mib = 1;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("too little"));
        cfg.memory_mib = 256;
        cfg.vcpus = 0;
        assert!(cfg.validate().is_err());
        cfg.vcpus = 1;
        cfg.vsock = Some(VsockConfig {
            cid: 2,
            socket: "s".into(),
        });
        assert_eq!(cfg.validate(), Err(ConfigError::VsockCid(2)));
        cfg.vsock = None;
        cfg.cmdline = "x".repeat(CMDLINE_MAX);
        assert_eq!(cfg.validate(), Err(ConfigError::CmdlineTooLong));
        cfg.cmdline.clear();
        cfg.net = vec![NetConfig {
            filter: None,
            tap: "tap-with-a-very-long-name".into(),
            mac: None,
        }];
        assert!(matches!(cfg.validate(), Err(ConfigError::TapName(_))));
        cfg.net[0].tap = "tap0".into();
        cfg.net[0].mac = Some("02:00".into());
        assert!(matches!(cfg.validate(), Err(ConfigError::BadMac(_))));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:00:aa:bb:0c").unwrap(),
            [2, 0, 0, 0xaa, 0xbb, 0xc]
        );
        assert!(parse_mac("02:00:00:aa:bb").is_err());
        assert!(parse_mac("02:00:00:aa:bb:cc:dd").is_err());
        assert!(parse_mac("zz:00:00:aa:bb:cc").is_err());
    }
}
