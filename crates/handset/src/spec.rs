//! The profile spec (`profiles/<name>/profile.toml`) and the built-in templates.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Longest profile name.
pub const NAME_MAX: usize = 32;

/// The kernel value that means "the installed probe guest".
pub const PROBE_KERNEL: &str = "probe";
/// The largest `memory_max_mib` (2 TiB; twice the largest guest memory).
pub const MEMORY_MAX_MIB_LIMIT: u64 = 1 << 21;

/// For optional request fields: absent is `None` (with `#[serde(default)]`), a value is
/// `Some`, and an explicit `null` is refused like any other wrong type (the API document
/// does not call these fields nullable).
pub fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Everything that defines a profile: its VM and how the handset treats it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    /// `[a-z0-9-]{1,32}`.
    pub name: String,
    /// Kernel image: `probe` for the installed probe guest, or the file name of a guest asset
    /// in the handset's asset directory (`<state-dir>/assets/`, see [`check_asset`]). Empty
    /// (absent) when the profile boots [`firmware`](Self::firmware).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    /// Firmware booted instead of a kernel: the file name of a guest asset, like `kernel`
    /// (SeaBIOS's `bios.bin` copied into the asset directory). It boots the first disk's own
    /// boot loader, so that disk is normally made from a whole disk image
    /// ([`DiskSpec::image`]). x86_64 with hardware virtualization only.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub firmware: Option<String>,
    /// Optional initial ramdisk: the file name of a guest asset, like `kernel`.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Disk images, created under `profiles/<name>/disks/` as sparse files.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// TAP interface for the profile's network, if any.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub net: Option<String>,
    /// Screen size (used by the display).
    #[serde(default)]
    pub display: DisplaySpec,
    /// Give the guest a virtio-gpu display of `display`'s size and a virtio-input keyboard
    /// and touch screen (`profile screenshot` then captures it).
    #[serde(default)]
    pub screen: bool,
    /// What to do when the VM exits unexpectedly.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// What happens to the profile while another is in the foreground.
    #[serde(default)]
    pub background: BackgroundMode,
    /// CPU weights (cgroup `cpu.weight`, 1..=10000).
    #[serde(default)]
    pub cpu: CpuWeights,
    /// Host memory limit of the VMM process in MiB (`memory.max`); default memory_mib + 128.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_max_mib: Option<u64>,
    /// Which cross-profile channels may carry data out of this profile.
    #[serde(default)]
    pub channels: ChannelPolicy,
    /// Give the guest a virtio-balloon device (free page reporting hands idle memory back).
    #[serde(default = "yes")]
    pub balloon: bool,
    /// Mark guest RAM mergeable for the host's KSM (off by default: page sharing between
    /// profiles is a timing side channel).
    #[serde(default)]
    pub mergeable: bool,
    /// What a clean daemon stop (SIGTERM/SIGINT) does with the profile's running guest.
    #[serde(default)]
    pub on_shutdown: OnShutdown,
    /// Start the profile (resume it, if suspended) when the daemon starts.
    #[serde(default)]
    pub autostart: bool,
    /// Encrypt the profile's disks at rest (AES-256-XTS under a random per-profile data key
    /// wrapped by the handset's device key, see [`crate::disk_keys`]). Chosen at create and
    /// never changed afterwards.
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypt_at_rest: bool,
    /// Managed by the organisation's MDM (`handset --mdm`): it may push policies to, lock,
    /// unlock and wipe this profile, which its compliance reports name. A profile that is not
    /// managed (a personal one) is invisible to the MDM. Chosen at create.
    #[serde(default, skip_serializing_if = "is_false")]
    pub managed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a clean daemon stop does with a running (or paused) profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnShutdown {
    /// Stop the VM (the guest's memory is lost; its disks stay).
    #[default]
    Stop,
    /// Suspend the VM to disk; `resume` (or `autostart`) continues it.
    Suspend,
}

fn yes() -> bool {
    true
}

fn one() -> u8 {
    1
}

/// One disk image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// File name under `disks/` (`<name>.img`); `[a-z0-9-]{1,32}`.
    pub name: String,
    /// Size in MiB.
    pub size_mib: u64,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
    /// A guest asset (a whole disk image, like `debian.raw`) the disk starts as a copy of when
    /// the profile is created; `size_mib` 0 then means the image's size. Without it the disk
    /// starts empty.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub image: Option<String>,
    /// The SHA-256 of `image` as the handset copied it at create (written by the handset, any
    /// value given is replaced): what an IT policy's `boot.disk_images` is checked against.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub image_sha256: Option<String>,
}

impl DiskSpec {
    /// An empty disk of `size_mib` MiB.
    pub fn empty(name: &str, size_mib: u64) -> Self {
        DiskSpec {
            name: name.into(),
            size_mib,
            read_only: false,
            image: None,
            image_sha256: None,
        }
    }
}

/// Screen size in pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplaySpec {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Default for DisplaySpec {
    fn default() -> Self {
        Self {
            width: 1080,
            height: 1920,
        }
    }
}

/// Restart policy after an unexpected exit (at most [`RESTART_LIMIT`] restarts a minute).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    Never,
    /// Restart when the VMM exits with a non-zero status or is killed.
    #[default]
    OnFailure,
    /// Restart whenever the VM ends without being asked to.
    Always,
}

/// Restarts allowed within [`RESTART_WINDOW_SECS`]; beyond that the profile is `failed`.
pub const RESTART_LIMIT: usize = 5;
/// The restart-limit window.
pub const RESTART_WINDOW_SECS: u64 = 60;

/// What a profile does in the background.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackgroundMode {
    /// Keep running with the background CPU weight.
    #[default]
    Run,
    /// Pause the VM in memory (state `paused`) until it is switched to; `"suspend"`, its
    /// old name, still reads as this (suspend means to disk everywhere else).
    #[serde(alias = "suspend")]
    Pause,
}

/// cgroup `cpu.weight` in the foreground and the background.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuWeights {
    /// Weight while in the foreground.
    #[serde(default = "fg_weight")]
    pub foreground: u32,
    /// Weight while in the background.
    #[serde(default = "bg_weight")]
    pub background: u32,
}

fn fg_weight() -> u32 {
    1000
}

fn bg_weight() -> u32 {
    100
}

impl Default for CpuWeights {
    fn default() -> Self {
        Self {
            foreground: fg_weight(),
            background: bg_weight(),
        }
    }
}

/// Per-direction permissions of the cross-profile channels (enforced by the channel code).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPolicy {
    /// Profiles this one may send clipboard data to.
    #[serde(default)]
    pub clipboard_to: Vec<String>,
    /// Profiles this one may send files to.
    #[serde(default)]
    pub files_to: Vec<String>,
    /// Profiles this one accepts clipboard data from; absent: any profile whose own
    /// `clipboard_to` names this one (see `channels::decide`).
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub clipboard_from: Option<Vec<String>>,
    /// Profiles this one accepts files from; absent: any profile whose `files_to` names it.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub files_from: Option<Vec<String>>,
}

/// The built-in templates.
pub const TEMPLATES: &[&str] = &["work", "personal"];

/// What a template's guest boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TemplateBoot<'a> {
    /// The probe guest running its agent (and counting).
    #[default]
    Probe,
    /// This kernel (a guest asset) with `console=ttyS0`.
    Kernel(&'a str),
    /// This firmware (a guest asset) booting a `system` disk made from `image` (a guest
    /// asset), with 1 GiB of RAM, the least a stock distribution's systemd boots in.
    Firmware {
        /// The firmware asset.
        firmware: &'a str,
        /// The whole disk image asset.
        image: &'a str,
    },
}

/// Guest RAM of a firmware-booted template.
pub const FIRMWARE_TEMPLATE_MEMORY_MIB: u64 = 1024;

impl ProfileSpec {
    /// The spec of template `template` (`work` or `personal`) named `name`, booting `boot`.
    pub fn from_template(template: &str, name: &str, boot: TemplateBoot) -> Result<Self, Error> {
        let (channels, background) = match template {
            // Defaults: personal -> work and host allowed, work -> anywhere denied.
            "personal" => (
                ChannelPolicy {
                    clipboard_to: vec!["work".into(), crate::channels::HOST.into()],
                    files_to: vec!["work".into(), crate::channels::HOST.into()],
                    ..ChannelPolicy::default()
                },
                BackgroundMode::Run,
            ),
            "work" => (ChannelPolicy::default(), BackgroundMode::Run),
            other => {
                return Err(Error::BadRequest(format!(
                    "unknown template {other:?} (known: {})",
                    TEMPLATES.join(", ")
                )))
            }
        };
        let data = DiskSpec::empty("data", 64);
        let (kernel, firmware, cmdline, memory_mib, disks) = match boot {
            TemplateBoot::Kernel(k) => (
                k.to_string(),
                None,
                "console=ttyS0".to_string(),
                128,
                vec![data],
            ),
            // The probe's agent (clipboard and files over vsock), counting to show it lives.
            TemplateBoot::Probe => (
                PROBE_KERNEL.to_string(),
                None,
                "pv.mode=agent pv.counter.ms=100".to_string(),
                128,
                vec![data],
            ),
            TemplateBoot::Firmware { firmware, image } => {
                let system = DiskSpec {
                    image: Some(image.to_string()),
                    ..DiskSpec::empty("system", 0)
                };
                (
                    String::new(),
                    Some(firmware.to_string()),
                    String::new(),
                    FIRMWARE_TEMPLATE_MEMORY_MIB,
                    vec![system, data],
                )
            }
        };
        let spec = Self {
            name: name.to_string(),
            kernel,
            firmware,
            initrd: None,
            cmdline,
            memory_mib,
            vcpus: 1,
            disks,
            net: None,
            display: DisplaySpec::default(),
            screen: false,
            restart: RestartPolicy::OnFailure,
            background,
            cpu: CpuWeights::default(),
            memory_max_mib: None,
            channels,
            balloon: true,
            mergeable: false,
            on_shutdown: OnShutdown::Suspend,
            autostart: false,
            encrypt_at_rest: false,
            managed: false,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a `profile.toml`.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let spec: Self = toml::from_str(text)
            .map_err(|e| Error::BadRequest(format!("bad profile spec: {}", e.message().trim())))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec as TOML.
    pub fn to_toml(&self) -> Result<String, Error> {
        toml::to_string(self).map_err(|e| Error::Internal(format!("cannot encode the spec: {e}")))
    }

    /// The host memory limit in MiB.
    pub fn memory_max(&self) -> u64 {
        self.memory_max_mib
            .unwrap_or(self.memory_mib.saturating_add(128))
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::BadRequest(m));
        check_name("profile name", &self.name)?;
        match &self.firmware {
            None if self.kernel.is_empty() => {
                return bad("give a kernel or a firmware to boot".into());
            }
            None if self.kernel != PROBE_KERNEL => check_asset("kernel", &self.kernel)?,
            None => {}
            Some(_) if !self.kernel.is_empty() => {
                return bad("give a kernel or a firmware to boot, not both".into());
            }
            Some(_) if self.initrd.is_some() || !self.cmdline.is_empty() => {
                return bad(
                    "an initrd and a cmdline go with a kernel; firmware boots the disk's own"
                        .into(),
                );
            }
            Some(firmware) => check_asset("firmware", firmware)?,
        }
        if let Some(initrd) = &self.initrd {
            let text = initrd.to_str().ok_or_else(|| {
                Error::BadRequest(format!("initrd {initrd:?} is not valid UTF-8"))
            })?;
            check_asset("initrd", text)?;
        }
        if !(64..=1 << 20).contains(&self.memory_mib) {
            return bad(format!(
                "memory_mib must be 64..=1048576, not {}",
                self.memory_mib
            ));
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return bad(format!("vcpus must be 1..=64, not {}", self.vcpus));
        }
        if self.cmdline.len() > 4096 {
            return bad("cmdline is longer than 4096 bytes".into());
        }
        if let Some(c) = self.cmdline.chars().find(|c| !matches!(c, ' '..='~')) {
            return bad(format!(
                "cmdline has {c:?}: a kernel command line is printable ASCII (space to ~)"
            ));
        }
        if self.disks.len() > 8 {
            return bad("at most 8 disks".into());
        }
        for (i, d) in self.disks.iter().enumerate() {
            check_name("disk name", &d.name)?;
            if let Some(image) = &d.image {
                check_asset("disk image", image)?;
            }
            let least = u64::from(d.image.is_none());
            if d.size_mib < least || d.size_mib > 1 << 22 {
                return bad(format!(
                    "disk {} size_mib must be {least}..=4194304, not {} (0: the size of its image)",
                    d.name, d.size_mib
                ));
            }
            if let Some(h) = &d.image_sha256 {
                if !is_sha256_hex(h) {
                    return bad(format!(
                        "disk {} image_sha256 {h:?} is not a SHA-256",
                        d.name
                    ));
                }
            }
            if self.disks[..i].iter().any(|o| o.name == d.name) {
                return bad(format!("disk name {} is used twice", d.name));
            }
        }
        if let Some(tap) = &self.net {
            let ok = !tap.is_empty()
                && tap.len() <= 15
                && tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return bad(format!("net {tap:?}: a TAP name is 1-15 of [A-Za-z0-9_-]"));
            }
        }
        let d = &self.display;
        if !(16..=8192).contains(&d.width) || !(16..=8192).contains(&d.height) {
            return bad(format!(
                "display {}x{} must be 16..=8192 each way",
                d.width, d.height
            ));
        }
        if self.screen && (d.width > 4095 || d.height > 4095) {
            return bad(format!(
                "display {}x{} is too large for a screen (at most 4095 each way)",
                d.width, d.height
            ));
        }
        for w in [self.cpu.foreground, self.cpu.background] {
            if !(1..=10000).contains(&w) {
                return bad(format!("cpu weight {w} must be 1..=10000"));
            }
        }
        if self.memory_max() > MEMORY_MAX_MIB_LIMIT {
            return bad(format!(
                "memory_max_mib {} is above {MEMORY_MAX_MIB_LIMIT}",
                self.memory_max()
            ));
        }
        if self.memory_max() < self.memory_mib {
            return bad(format!(
                "memory_max_mib {} is below memory_mib {}",
                self.memory_max(),
                self.memory_mib
            ));
        }
        for n in self
            .channels
            .clipboard_to
            .iter()
            .chain(&self.channels.files_to)
            .chain(self.channels.clipboard_from.iter().flatten())
            .chain(self.channels.files_from.iter().flatten())
        {
            check_name("channel peer", n)?;
        }
        Ok(())
    }
}

/// Whether `h` is a SHA-256 in 64 lower-case hex digits.
pub fn is_sha256_hex(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks `[a-z0-9-]{1,32}`, not beginning with `-` (it would read as an option).
pub fn check_name(what: &str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "{what} {name:?} must be 1-{NAME_MAX} of a-z, 0-9 and -, not beginning with -"
        )))
    }
}

/// Longest guest asset file name.
pub const ASSET_NAME_MAX: usize = 128;

/// Checks that `value` names a guest asset: a file name (no directory) in the handset's asset
/// directory, 1-128 of `A-Z a-z 0-9 . _ -`, not beginning with `.` or `-`.
///
/// This is the confinement rule of guest assets: a spec (created, imported or restored) never
/// names a free host path, so a profile can load neither a host file nor another profile's
/// disk into its guest, whatever its spec says.
pub fn check_asset(what: &str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= ASSET_NAME_MAX
        && !value.starts_with(['.', '-'])
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "{what} {value:?} is not allowed: a guest asset is the file name of a file in the \
             handset's asset directory (<state-dir>/assets/; copy it there first), 1-{ASSET_NAME_MAX} \
             of A-Z, a-z, 0-9, '.', '_' and '-' not beginning with '.' or '-'; or \"{PROBE_KERNEL}\" \
             as the kernel"
        )))
    }
}

/// A guest asset that a spec written before assets were confined names by a host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyAsset {
    /// `kernel` or `initrd`.
    pub field: &'static str,
    /// The host path the old spec names.
    pub path: String,
    /// Its file name: the asset name the spec names instead once migrated.
    pub file: String,
}

/// If `text` is a spec from before guest assets were confined (its `kernel` or `initrd` an
/// absolute host path), the spec with each such path replaced by its file name, and what was
/// replaced. None for any other text (a valid spec, or one wrong in another way).
pub fn legacy_asset_paths(text: &str) -> Option<(String, Vec<LegacyAsset>)> {
    let mut table: toml::Table = toml::from_str(text).ok()?;
    let mut found = Vec::new();
    for field in ["kernel", "initrd"] {
        let Some(toml::Value::String(path)) = table.get(field) else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        let file = std::path::Path::new(path)
            .file_name()
            .and_then(|f| f.to_str())
            .filter(|f| check_asset(field, f).is_ok())?
            .to_string();
        found.push(LegacyAsset {
            field,
            path: path.clone(),
            file: file.clone(),
        });
        table.insert(field.into(), toml::Value::String(file));
    }
    if found.is_empty() {
        return None;
    }
    let migrated = toml::to_string(&table).ok()?;
    ProfileSpec::from_toml(&migrated).ok()?;
    Some((migrated, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_asset_paths_become_file_names() {
        let old = "name = \"w\"\nkernel = \"/boot/vmlinux-6.1\"\ninitrd = \"/srv/i.img\"\n\
                   memory_mib = 64\n";
        assert!(ProfileSpec::from_toml(old).is_err());
        let (new, found) = legacy_asset_paths(old).unwrap();
        let spec = ProfileSpec::from_toml(&new).unwrap();
        assert_eq!(spec.kernel, "vmlinux-6.1");
        assert_eq!(spec.initrd.as_deref(), Some(std::path::Path::new("i.img")));
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].field, found[0].path.as_str()),
            ("kernel", "/boot/vmlinux-6.1")
        );
        // Not legacy: a valid spec, a relative path, a file name that is no asset name.
        let valid = "name = \"w\"\nkernel = \"probe\"\nmemory_mib = 64\n";
        assert_eq!(legacy_asset_paths(valid), None);
        assert_eq!(legacy_asset_paths(&old.replace("/boot/", "../")), None);
        assert_eq!(legacy_asset_paths(&old.replace("vmlinux-6.1", "-x")), None);
    }

    #[test]
    fn templates_are_valid_and_round_trip() {
        let w = ProfileSpec::from_template("work", "w1", TemplateBoot::Probe).unwrap();
        assert_eq!(w.kernel, PROBE_KERNEL);
        assert!(w.channels.clipboard_to.is_empty());
        let p = ProfileSpec::from_template("personal", "p1", TemplateBoot::Probe).unwrap();
        assert_eq!(p.channels.clipboard_to, vec!["work", "host"]);
        let back = ProfileSpec::from_toml(&p.to_toml().unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.memory_max(), 128 + 128);
        // A clean daemon stop keeps the templates' guests (suspended to disk).
        assert_eq!(
            (w.on_shutdown, p.on_shutdown),
            (OnShutdown::Suspend, OnShutdown::Suspend)
        );
        assert!(!w.autostart);
        assert!(ProfileSpec::from_template("gaming", "g", TemplateBoot::Probe).is_err());
    }

    #[test]
    fn a_firmware_template_boots_a_system_disk_made_from_its_image() {
        let boot = TemplateBoot::Firmware {
            firmware: "bios.bin",
            image: "debian.raw",
        };
        let w = ProfileSpec::from_template("work", "w", boot).unwrap();
        assert_eq!(
            (w.kernel.as_str(), w.firmware.as_deref()),
            ("", Some("bios.bin"))
        );
        assert_eq!((w.cmdline.as_str(), w.initrd.as_ref()), ("", None));
        assert_eq!(w.memory_mib, FIRMWARE_TEMPLATE_MEMORY_MIB);
        let system = &w.disks[0];
        assert_eq!(
            (
                system.name.as_str(),
                system.size_mib,
                system.image.as_deref()
            ),
            ("system", 0, Some("debian.raw"))
        );
        let text = w.to_toml().unwrap();
        assert!(!text.contains("kernel"), "{text}");
        assert_eq!(ProfileSpec::from_toml(&text).unwrap(), w);
        // The firmware and the image are guest assets like a kernel.
        for (firmware, image) in [("/usr/share/seabios/bios.bin", "d.raw"), ("b", "../d.raw")] {
            let boot = TemplateBoot::Firmware { firmware, image };
            let e = ProfileSpec::from_template("work", "w", boot).unwrap_err();
            assert!(e.to_string().contains("asset directory"), "{e}");
        }
    }

    #[test]
    fn a_spec_boots_a_kernel_or_firmware() {
        let base = "name = \"a\"\nmemory_mib = 64\n";
        let ok = |extra: &str| ProfileSpec::from_toml(&format!("{base}{extra}"));
        assert!(ok(
            "firmware = \"bios.bin\"\ndisks = [{name=\"s\", size_mib=0, image=\"d.raw\"}]\n"
        )
        .is_ok());
        for (bad, why) in [
            ("", "kernel or a firmware"),
            ("kernel = \"probe\"\nfirmware = \"bios.bin\"\n", "not both"),
            (
                "firmware = \"bios.bin\"\ncmdline = \"quiet\"\n",
                "go with a kernel",
            ),
            (
                "firmware = \"bios.bin\"\ninitrd = \"i\"\n",
                "go with a kernel",
            ),
            ("firmware = \"../bios.bin\"\n", "asset directory"),
            (
                "kernel = \"probe\"\ndisks = [{name=\"s\", size_mib=0}]\n",
                "size_mib must be 1",
            ),
            (
                "kernel = \"probe\"\ndisks = [{name=\"s\", size_mib=1, image=\"/d.raw\"}]\n",
                "asset directory",
            ),
            (
                "kernel = \"probe\"\ndisks = [{name=\"s\", size_mib=1, image_sha256=\"AB\"}]\n",
                "not a SHA-256",
            ),
        ] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_and_validation() {
        let s =
            ProfileSpec::from_toml("name = \"a\"\nkernel = \"probe\"\nmemory_mib = 64\n").unwrap();
        assert_eq!(s.restart, RestartPolicy::OnFailure);
        assert_eq!(s.background, BackgroundMode::Run);
        assert_eq!(s.cpu.foreground, 1000);
        assert_eq!(s.cpu.background, 100);
        assert_eq!(s.vcpus, 1);
        assert!(s.balloon && !s.mergeable);
        assert_eq!((s.on_shutdown, s.autostart), (OnShutdown::Stop, false));
        assert!(!s.screen, "no screen unless asked for");
        let big = "name = \"a\"\nkernel = \"probe\"\nmemory_mib = 64\n\
                   display = { width = 4096, height = 1920 }\n";
        assert!(
            ProfileSpec::from_toml(big).is_ok(),
            "a big display without a screen"
        );
        for bad in [
            &format!("{big}screen = true\n")[..],
            "name = \"A\"\nkernel = \"probe\"\nmemory_mib = 64\n",
            "name = \"a/b\"\nkernel = \"probe\"\nmemory_mib = 64\n",
            "name = \"a\"\nkernel = \"probe\"\nmemory_mib = 8\n",
            "name = \"a\"\nkernel = \"probe\"\nmemory_mib = 64\nbogus = 1\n",
            "name = \"a\"\nkernel = \"probe\"\nmemory_mib = 64\nrestart = \"sometimes\"\n",
            "name = \"a\"\nkernel = \"probe\"\nmemory_mib = 64\nnet = \"tap 0\"\n",
            "name = \"a\"\nkernel = \"probe\"\nmemory_mib = 64\ndisks = [{name=\"x\", size_mib=0}]\n",
            "name = \"a\"\nkernel = \"probe\"\nmemory_mib = 64\nmemory_max_mib = 10\n",
        ] {
            assert!(ProfileSpec::from_toml(bad).is_err(), "accepted: {bad}");
        }
        assert!(check_name("n", &"a".repeat(32)).is_ok());
        assert!(check_name("n", &"a".repeat(33)).is_err());
        assert!(check_name("n", "").is_err());
        assert!(check_name("n", "-x").is_err());
        assert!(check_name("n", "a-b").is_ok());
    }

    #[test]
    fn guest_assets_are_file_names_in_the_asset_directory() {
        let spec = |kernel: &str, initrd: &str| {
            let initrd = if initrd.is_empty() {
                String::new()
            } else {
                format!("initrd = {initrd:?}\n")
            };
            ProfileSpec::from_toml(&format!(
                "name = \"a\"\nkernel = {kernel:?}\n{initrd}memory_mib = 64\n"
            ))
        };
        assert!(spec("probe", "").is_ok());
        assert!(spec("vmlinux-6.1", "initramfs.cpio.gz").is_ok());
        for (kernel, initrd) in [
            ("/etc/shadow", ""),
            ("../vmlinux", ""),
            ("profiles/w/disks/data.img", ""),
            (".hidden", ""),
            ("-x", ""),
            (
                "vmlinux",
                "/var/lib/pocketvisor/profiles/work/disks/data.img",
            ),
            ("vmlinux", "../../profiles/work/disks/data.img"),
            ("vmlinux", ".."),
        ] {
            let e = spec(kernel, initrd).unwrap_err().to_string();
            assert!(e.contains("asset directory"), "{kernel} {initrd}: {e}");
        }
    }
}
