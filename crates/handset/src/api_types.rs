//! The request and response bodies of the REST API (documented in
//! `docs/api/handset.openapi.yaml`).

use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupInfo;
use crate::error::{Error, Result};
use crate::spec::{ProfileSpec, TemplateBoot};

/// A profile's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileState {
    /// No VMM process.
    Stopped,
    /// The VMM runs the guest.
    Running,
    /// The VMM is paused in memory: by the user (`profile pause`, detail `user`) or in the
    /// background (a `background = "pause"` profile; detail `background`).
    Paused,
    /// Saved to `profiles/<name>/snapshot/`, no process.
    Suspended,
    /// Crashed too often (restart limit) or could not be restarted.
    Failed,
    /// Migrated live to a cloud host (`profile offload`), where it runs as a twin; no
    /// process here. It runs here again only through `profile return`.
    Offloaded,
}

impl ProfileState {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileState::Stopped => "stopped",
            ProfileState::Running => "running",
            ProfileState::Paused => "paused",
            ProfileState::Suspended => "suspended",
            ProfileState::Failed => "failed",
            ProfileState::Offloaded => "offloaded",
        }
    }

    /// From the database spelling (unknown values read as `failed`).
    pub fn parse(s: &str) -> Self {
        match s {
            "stopped" => ProfileState::Stopped,
            "running" => ProfileState::Running,
            "paused" => ProfileState::Paused,
            "suspended" => ProfileState::Suspended,
            "offloaded" => ProfileState::Offloaded,
            _ => ProfileState::Failed,
        }
    }
}

/// `POST /v1/profiles`: a template (with a name) or a full spec.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProfile {
    /// Profile name (with `template`).
    #[serde(
        default,
        deserialize_with = "crate::spec::not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    /// `work` or `personal`.
    #[serde(
        default,
        deserialize_with = "crate::spec::not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub template: Option<String>,
    /// Kernel replacing the template's probe guest.
    #[serde(
        default,
        deserialize_with = "crate::spec::not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub kernel: Option<String>,
    /// Initial ramdisk (a guest asset's file name) replacing the template's or the spec's.
    #[serde(
        default,
        deserialize_with = "crate::spec::not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub initrd: Option<String>,
    /// Kernel command line replacing the template's or the spec's.
    #[serde(
        default,
        deserialize_with = "crate::spec::not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub cmdline: Option<String>,
    /// Firmware replacing the template's probe guest (with `disk_image`, the whole disk image
    /// it boots): both guest assets.
    #[serde(
        default,
        deserialize_with = "crate::spec::not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub firmware: Option<String>,
    /// The whole disk image a template's `firmware` boots (its `system` disk starts as a copy).
    #[serde(
        default,
        deserialize_with = "crate::spec::not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub disk_image: Option<String>,
    /// A complete spec (instead of `template`).
    #[serde(
        default,
        deserialize_with = "crate::spec::not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub spec: Option<ProfileSpec>,
    /// Encrypt the profile's disks at rest (sets the spec's `encrypt_at_rest`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypt_at_rest: bool,
    /// Put the profile under the MDM's management (sets the spec's `managed`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub managed: bool,
}

impl CreateProfile {
    /// The spec this request describes, validated.
    pub fn into_spec(self) -> Result<ProfileSpec> {
        let spec = self.described_spec()?;
        if spec.name == crate::channels::HOST {
            return Err(Error::BadRequest(format!(
                "profile name {:?} is reserved: it stands for the host in channel rules",
                crate::channels::HOST
            )));
        }
        if spec.name == crate::channels::CLOUD {
            return Err(Error::BadRequest(format!(
                "profile name {:?} is reserved: it stands for a profile's clone in channel rules",
                crate::channels::CLOUD
            )));
        }
        Ok(spec)
    }

    fn described_spec(self) -> Result<ProfileSpec> {
        let mut spec = match (self.template, self.spec) {
            (Some(t), None) => {
                let name = self.name.ok_or_else(|| {
                    Error::BadRequest("\"name\" is required with \"template\"".into())
                })?;
                let boot = match (
                    self.kernel.as_deref(),
                    self.firmware.as_deref(),
                    self.disk_image.as_deref(),
                ) {
                    (None, None, None) => TemplateBoot::Probe,
                    (Some(k), None, None) => TemplateBoot::Kernel(k),
                    (None, Some(firmware), Some(image)) => {
                        TemplateBoot::Firmware { firmware, image }
                    }
                    (None, Some(_), None) | (None, None, Some(_)) => {
                        return Err(Error::BadRequest(
                            "\"firmware\" and \"disk_image\" go together".into(),
                        ))
                    }
                    (Some(_), _, _) => {
                        return Err(Error::BadRequest(
                            "give \"kernel\" or \"firmware\", not both".into(),
                        ))
                    }
                };
                ProfileSpec::from_template(&t, &name, boot)?
            }
            (None, Some(_)) if self.firmware.is_some() || self.disk_image.is_some() => {
                return Err(Error::BadRequest(
                    "\"firmware\" and \"disk_image\" go with \"template\"; a spec names its own"
                        .into(),
                ))
            }
            (None, Some(mut spec)) => {
                if let Some(n) = self.name {
                    spec.name = n;
                }
                if let Some(k) = self.kernel {
                    spec.kernel = k;
                }
                spec
            }
            _ => {
                return Err(Error::BadRequest(
                    "give exactly one of \"template\" and \"spec\"".into(),
                ))
            }
        };
        if let Some(initrd) = self.initrd {
            spec.initrd = Some(initrd.into());
        }
        if let Some(cmdline) = self.cmdline {
            spec.cmdline = cmdline;
        }
        spec.encrypt_at_rest |= self.encrypt_at_rest;
        spec.managed |= self.managed;
        spec.validate()?;
        Ok(spec)
    }
}

/// `POST /v1/profiles/{name}/unlock` and `PUT /v1/profiles/{name}/passcode`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Passcode {
    /// The passcode (4 to 1024 bytes; never logged or stored in clear).
    pub passcode: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for Passcode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passcode(..)")
    }
}

/// A profile as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileInfo {
    /// Profile name.
    pub name: String,
    /// Lifecycle state.
    pub state: ProfileState,
    /// VMM process id while running or paused.
    pub pid: Option<i32>,
    /// Whether it is the foreground profile.
    pub foreground: bool,
    /// The guest's vsock context id.
    pub vsock_cid: u32,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
    /// Last start, ms since the epoch.
    pub started_ms: Option<i64>,
    /// Why it is in its state (exit reason, restart limit, ...), or empty.
    pub detail: String,
    /// CPU weight in effect while running.
    pub cpu_weight: Option<u32>,
    /// Resident memory of the VMM process in KiB while running.
    pub rss_kib: Option<u64>,
    /// The guest's serial console log.
    pub serial_log: String,
    /// The file an export moved the profile to: it does not start or resume here without
    /// `reclaim` (so the guest does not run twice).
    pub moved_to: Option<String>,
    /// The cloud host (`HOST:PORT`) an offloaded profile runs at (`profile offload`).
    #[serde(default)]
    pub offloaded_to: Option<String>,
    /// The cloud host (`HOST:PORT`) the profile's clone runs at, recorded by the last
    /// successful `profile clone` (files move to and from it: `profile file from-clone`,
    /// `to-clone`).
    #[serde(default)]
    pub cloned_to: Option<String>,
    /// The in-guest agent that answered while the VMM runs (`null`: none answered, or no
    /// VMM).
    #[serde(default)]
    pub agent: Option<crate::agents::AgentStatus>,
    /// Locked: paused until its passcode unlocks it (`profile unlock`).
    #[serde(default)]
    pub locked: bool,
    /// The profile spec.
    pub spec: ProfileSpec,
}

/// `GET /v1/handset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// Daemon version.
    pub version: String,
    /// Daemon process id.
    pub pid: u32,
    /// The state directory.
    pub state_dir: String,
    /// Database schema version.
    pub schema_version: i64,
    /// cgroup mode.
    pub cgroups: CgroupInfo,
    /// The probe guest used for `kernel = "probe"`, if installed.
    pub probe: Option<String>,
    /// The foreground profile.
    pub foreground: Option<String>,
    /// Number of profiles.
    pub profiles: usize,
    /// Number of profiles with a VMM process.
    pub running: usize,
    /// The browser phone's page with the daemon's token, if the phone listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// How the link to the organisation's MDM stands (`handset --mdm`), if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdm: Option<crate::mdm_link::MdmStatus>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, one line.
    pub error: String,
}

/// `?limit=` of the event routes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LimitQuery {
    /// At most this many records, newest ones (default 100, at most 10000).
    pub limit: Option<u32>,
}

/// `?limit=&profile=` of `GET /v1/events`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventsQuery {
    /// At most this many records, newest ones (default 100, at most 10000).
    pub limit: Option<u32>,
    /// Only this profile's events (also a deleted profile's history).
    pub profile: Option<String>,
}

/// `?discard=` of `POST /v1/profiles/{name}/stop`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StopQuery {
    /// Stop a suspended profile too, discarding its snapshot (default false: refused).
    pub discard: Option<bool>,
}

/// `?reclaim=` of `POST /v1/profiles/{name}/start` and `/resume`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ReclaimQuery {
    /// Start (or resume) a profile marked as moved by an export, removing the mark.
    pub reclaim: Option<bool>,
}

/// `POST /v1/profiles/{name}/offload` and `/clone`: where the profile (or its copy) goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadRequest {
    /// The cloud host, `HOST:PORT` (`pocketvisor cloud serve`; its certificate must name
    /// HOST).
    pub to: String,
}

/// `POST /v1/profiles/{name}/replicate`: the daemon takes a checkpoint of the running
/// profile every `every_s` seconds, sealed for `recipients`, and stores it at `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicateRequest {
    /// The cloud host, `HOST:PORT` (`pocketvisor cloud serve`; its certificate must name
    /// HOST).
    pub to: String,
    /// Seconds between checkpoints (1 to 86400).
    pub every_s: u32,
    /// The keys that open the checkpoints (`pvp-public-` and 64 hexadecimal digits; 1 to 16).
    pub recipients: Vec<String>,
    /// A new chain (a full checkpoint) after this many (1 to 100000; default 120).
    #[serde(default)]
    pub full_every: Option<u32>,
}

/// `GET /v1/profiles/{name}/replicate`: the profile's replication and how it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// The setting (none: the profile is not replicated).
    pub setting: Option<crate::db::Replication>,
    /// Whether checkpoints are being taken now (the profile runs and its replication is up).
    pub active: bool,
    /// The last result this daemon recorded (`replicated seq=..`, or why one failed).
    pub last: Option<String>,
}

/// `?force=` of `DELETE /v1/profiles/{name}`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct DeleteQuery {
    /// Delete a suspended profile too, with its snapshot (default false: refused).
    pub force: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_requests() {
        let t = CreateProfile {
            name: Some("w".into()),
            template: Some("work".into()),
            ..Default::default()
        };
        assert_eq!(t.into_spec().unwrap().name, "w");
        let none = CreateProfile::default();
        assert!(none.into_spec().is_err());
        let nameless = CreateProfile {
            template: Some("work".into()),
            ..Default::default()
        };
        assert!(nameless.into_spec().is_err());
        // The channel rules' own peers are no profile names.
        for reserved in ["host", "cloud"] {
            let r = CreateProfile {
                name: Some(reserved.into()),
                template: Some("work".into()),
                ..Default::default()
            };
            let e = r.into_spec().unwrap_err().to_string();
            assert!(e.contains("is reserved"), "{e}");
        }
        // A Linux guest from a template: its kernel, initramfs and command line.
        let linux = CreateProfile {
            name: Some("w".into()),
            template: Some("work".into()),
            kernel: Some("vmlinux".into()),
            initrd: Some("initramfs.cpio.gz".into()),
            cmdline: Some("console=ttyS0 quiet".into()),
            ..Default::default()
        }
        .into_spec()
        .unwrap();
        assert_eq!(
            (linux.kernel.as_str(), linux.cmdline.as_str()),
            ("vmlinux", "console=ttyS0 quiet")
        );
        assert_eq!(
            linux.initrd.as_deref(),
            Some(std::path::Path::new("initramfs.cpio.gz"))
        );
        assert_eq!(linux.channels.clipboard_to, Vec::<String>::new());
        // The overrides are checked like the spec's own fields.
        for (initrd, cmdline) in [("../etc/passwd", "x"), ("i.img", "bad\ncmdline")] {
            let bad = CreateProfile {
                name: Some("w".into()),
                template: Some("personal".into()),
                kernel: Some("vmlinux".into()),
                initrd: Some(initrd.into()),
                cmdline: Some(cmdline.into()),
                ..Default::default()
            };
            assert!(bad.into_spec().is_err(), "{initrd:?} {cmdline:?}");
        }
        let firmware = |f: Option<&str>, i: Option<&str>, k: Option<&str>| CreateProfile {
            name: Some("w".into()),
            template: Some("work".into()),
            kernel: k.map(Into::into),
            firmware: f.map(Into::into),
            disk_image: i.map(Into::into),
            ..Default::default()
        };
        let spec = firmware(Some("bios.bin"), Some("debian.raw"), None)
            .into_spec()
            .unwrap();
        assert_eq!(spec.firmware.as_deref(), Some("bios.bin"));
        assert_eq!(spec.disks[0].image.as_deref(), Some("debian.raw"));
        for (f, i, k, why) in [
            (Some("bios.bin"), None, None, "go together"),
            (None, Some("debian.raw"), None, "go together"),
            (Some("bios.bin"), Some("d.raw"), Some("vmlinux"), "not both"),
        ] {
            let e = firmware(f, i, k).into_spec().unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        for s in ["stopped", "running", "paused", "suspended", "failed"] {
            assert_eq!(ProfileState::parse(s).as_str(), s);
        }
    }
}
