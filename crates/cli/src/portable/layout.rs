//! Which files of a profile go into a `.pvp` file, under which names, and the manifest's
//! `config` document.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use handset::{ProfileSpec, StateDir};
use serde::{Deserialize, Serialize};
use vault::{EntryKind, EntrySource};

/// Tag of the manifest `config` of a profile without an organisation policy.
pub const CONFIG_FORMAT: &str = "pocketvisor-profile/1";
/// Tag of the manifest `config` of a governed profile: the file carries its signed policy
/// ([`POLICY_ENTRY`]). A pocketvisor that predates it refuses the file (an unknown format)
/// instead of importing the profile without its policy.
pub const GOVERNED_FORMAT: &str = "pocketvisor-profile/2";

/// Entry name of a governed profile's signed policy (`profiles/<name>/policy.pvpol`).
pub const POLICY_ENTRY: &str = "policy.pvpol";

/// Entry name of the profile spec.
pub const SPEC_ENTRY: &str = "profile.toml";
/// Directory (entry name prefix) of the disks.
pub const DISKS_DIR: &str = "disks";
/// Directory (entry name prefix) of the snapshot.
pub const SNAPSHOT_DIR: &str = "snapshot";

/// The state a profile is exported in (and imported as).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SavedState {
    /// No snapshot: the profile boots afresh on `start`.
    Stopped,
    /// With its snapshot: `resume` continues the guest.
    Suspended,
}

impl SavedState {
    /// The handset database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SavedState::Stopped => "stopped",
            SavedState::Suspended => "suspended",
        }
    }
}

/// The manifest's `config`: everything the importing side needs besides the files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// [`CONFIG_FORMAT`], or [`GOVERNED_FORMAT`] when the file carries a policy.
    pub format: String,
    /// The profile's state.
    pub state: SavedState,
    /// The guest's vsock CID on the exporting side (the snapshot keeps it).
    pub vsock_cid: u32,
    /// The pocketvisor version that wrote the file.
    pub exported_by: String,
    /// The profile spec (the same as the `profile.toml` entry).
    pub spec: ProfileSpec,
    /// An encrypted profile's disk data key (`spec.encrypt_at_rest`), in clear inside the
    /// file's encrypted manifest: the importing handset wraps it under its own device key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_key: Option<TravellingKey>,
}

/// A disk data key inside a `.pvp` manifest: 128 hex digits, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct TravellingKey(pub handset::disk_keys::DiskKeyBytes);

impl std::fmt::Debug for TravellingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TravellingKey(..)")
    }
}

impl Serialize for TravellingKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut text = zeroize::Zeroizing::new(String::with_capacity(2 * self.0.len()));
        for b in self.0.iter() {
            use std::fmt::Write;
            let _ = write!(text, "{b:02x}");
        }
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for TravellingKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use handset::disk_keys::DISK_KEY_LEN;
        let text = zeroize::Zeroizing::new(String::deserialize(d)?);
        let bad = || serde::de::Error::custom("a data key is 128 lower-case hex digits");
        if text.len() != 2 * DISK_KEY_LEN {
            return Err(bad());
        }
        let mut key = zeroize::Zeroizing::new([0u8; DISK_KEY_LEN]);
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => key[i] = h << 4 | l,
                _ => return Err(bad()),
            }
        }
        Ok(TravellingKey(key))
    }
}

impl ProfileConfig {
    /// Decodes and checks a manifest's `config`.
    pub fn from_manifest(config: &serde_json::Value) -> Result<Self> {
        let format = config.get("format").and_then(|v| v.as_str());
        if format != Some(CONFIG_FORMAT) && format != Some(GOVERNED_FORMAT) {
            bail!(
                "the file holds a profile of format {}, this pocketvisor reads {CONFIG_FORMAT} \
                 and {GOVERNED_FORMAT}",
                format.unwrap_or("(none)")
            );
        }
        let c: ProfileConfig = serde_json::from_value(config.clone())
            .context("the file's profile description is invalid")?;
        c.spec
            .validate()
            .context("the file's profile spec is invalid")?;
        if c.spec.encrypt_at_rest != c.data_key.is_some() {
            bail!(
                "the file's profile is {}encrypted at rest but the file {} its data key",
                if c.spec.encrypt_at_rest { "" } else { "not " },
                if c.data_key.is_some() {
                    "carries"
                } else {
                    "does not carry"
                }
            );
        }
        Ok(c)
    }

    /// Whether the profile is governed: the file carries its signed policy.
    pub fn governed(&self) -> bool {
        self.format == GOVERNED_FORMAT
    }
}

/// The entry name of disk `disk`.
pub fn disk_entry(disk: &str) -> String {
    format!("{DISKS_DIR}/{disk}.img")
}

/// The files of profile `name` to export: spec, its policy if `governed`, disks, and the
/// snapshot if `with_snapshot`.
pub fn entries(
    dir: &StateDir,
    name: &str,
    spec: &ProfileSpec,
    governed: bool,
    with_snapshot: bool,
) -> Result<Vec<EntrySource>> {
    let mut out = vec![EntrySource {
        name: SPEC_ENTRY.into(),
        kind: EntryKind::Other,
        path: dir.spec(name),
    }];
    if governed {
        out.push(EntrySource {
            name: POLICY_ENTRY.into(),
            kind: EntryKind::Other,
            path: dir.policy(name),
        });
    }
    for d in &spec.disks {
        out.push(EntrySource {
            name: disk_entry(&d.name),
            kind: EntryKind::Disk,
            path: dir.disk(name, &d.name),
        });
    }
    if with_snapshot {
        let snap = dir.snapshot(name);
        if !snap.join(vmm::snapshot::COMPLETE_FILE).is_file() {
            bail!(
                "profile {name:?} is suspended but {} holds no complete snapshot",
                snap.display()
            );
        }
        for file in snapshot_files(&snap)? {
            let kind = match file.as_str() {
                vmm::snapshot::STATE_FILE => EntryKind::SnapshotState,
                vmm::snapshot::MEMORY_FILE => EntryKind::SnapshotMemory,
                _ => EntryKind::Other,
            };
            out.push(EntrySource {
                name: format!("{SNAPSHOT_DIR}/{file}"),
                kind,
                path: snap.join(&file),
            });
        }
    }
    Ok(out)
}

/// The regular files of a snapshot directory (not hidden temporaries), sorted.
fn snapshot_files(snap: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(snap).with_context(|| format!("cannot read {}", snap.display()))? {
        let e = e.with_context(|| format!("cannot read {}", snap.display()))?;
        let Ok(name) = e.file_name().into_string() else {
            bail!("{}: a file name is not UTF-8", snap.display());
        };
        if name.starts_with('.') || !e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Checks that the file holds only what a profile has: its spec, its policy if governed, its
/// spec's disks and, if suspended, files directly in `snapshot/` (a file made for a recipient
/// key can come from anyone, so nothing else may land in the profile directory).
pub fn check_entries<'a>(
    names: impl IntoIterator<Item = &'a str>,
    config: &ProfileConfig,
) -> Result<()> {
    let disks: Vec<String> = config
        .spec
        .disks
        .iter()
        .map(|d| disk_entry(&d.name))
        .collect();
    for name in names {
        let in_snapshot = name
            .strip_prefix(SNAPSHOT_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|f| !f.is_empty() && !f.contains('/') && !f.starts_with('.'));
        let ok = name == SPEC_ENTRY
            || (name == POLICY_ENTRY && config.governed())
            || disks.iter().any(|d| d == name)
            || (in_snapshot && config.state == SavedState::Suspended);
        if !ok {
            bail!("the file holds {name:?}, which is not part of a profile");
        }
    }
    Ok(())
}

/// Checks an imported profile directory against its manifest config; returns the snapshot
/// directory if there is one.
pub fn check_imported(root: &Path, config: &ProfileConfig) -> Result<Option<PathBuf>> {
    let spec_path = root.join(SPEC_ENTRY);
    let text = std::fs::read_to_string(&spec_path).context("the file holds no profile.toml")?;
    let spec = ProfileSpec::from_toml(&text).context("the file's profile.toml is invalid")?;
    if spec != config.spec {
        bail!("the file's profile.toml differs from its manifest");
    }
    if config.governed() != root.join(POLICY_ENTRY).is_file() {
        bail!(
            "the file's policy entry and its format ({}) disagree",
            config.format
        );
    }
    for d in &spec.disks {
        let p = root.join(disk_entry(&d.name));
        let len = std::fs::metadata(&p)
            .with_context(|| format!("the file holds no disk {:?}", d.name))?
            .len();
        if len != d.size_mib << 20 {
            bail!(
                "disk {:?} has {len} bytes, its spec says {} MiB",
                d.name,
                d.size_mib
            );
        }
    }
    let snap = root.join(SNAPSHOT_DIR);
    match config.state {
        SavedState::Stopped => {
            if snap.exists() {
                bail!("the file holds a snapshot but says the profile is stopped");
            }
            Ok(None)
        }
        SavedState::Suspended => {
            let saved = vmm::snapshot::inspect(&snap).context("the file's snapshot is invalid")?;
            check_snapshot_matches(&saved, config)?;
            Ok(Some(snap))
        }
    }
}

/// Checks that the snapshot's VM is the one the spec describes. On resume the handset
/// replaces the disk, serial and vsock socket paths but keeps the rest of the saved
/// configuration, so a snapshot must not bring other devices, read-only flags or TAPs.
fn check_snapshot_matches(saved: &vmm::VmConfig, config: &ProfileConfig) -> Result<()> {
    let spec = &config.spec;
    let mismatch = |what: &str| anyhow::anyhow!("the snapshot's {what} differs from the profile's");
    if saved.memory_mib != spec.memory_mib || saved.vcpus != spec.vcpus {
        return Err(mismatch("memory size or vCPU count"));
    }
    let saved_ro: Vec<bool> = saved.disks.iter().map(|d| d.read_only).collect();
    let spec_ro: Vec<bool> = spec.disks.iter().map(|d| d.read_only).collect();
    if saved_ro != spec_ro {
        return Err(mismatch("disk list"));
    }
    let saved_taps: Vec<&str> = saved.net.iter().map(|n| n.tap.as_str()).collect();
    let spec_taps: Vec<&str> = spec.net.iter().map(String::as_str).collect();
    if saved_taps != spec_taps {
        return Err(mismatch("network interface"));
    }
    if saved.vsock.as_ref().map(|v| v.cid) != Some(u64::from(config.vsock_cid)) {
        return Err(mismatch("vsock CID"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(state: SavedState) -> ProfileConfig {
        ProfileConfig {
            format: CONFIG_FORMAT.into(),
            state,
            vsock_cid: 3,
            exported_by: "test".into(),
            spec: ProfileSpec::from_template("work", "w", handset::spec::TemplateBoot::Probe)
                .unwrap(),
            data_key: None,
        }
    }

    #[test]
    fn an_encrypted_profile_carries_its_data_key_and_only_then() {
        let mut c = config(SavedState::Stopped);
        c.spec.encrypt_at_rest = true;
        let key: [u8; 64] = std::array::from_fn(|i| u8::try_from(i).unwrap());
        let v = serde_json::to_value(&c).unwrap();
        let e = ProfileConfig::from_manifest(&v).unwrap_err();
        assert!(e.to_string().contains("does not carry"), "{e}");
        c.data_key = Some(TravellingKey(zeroize::Zeroizing::new(key)));
        assert_eq!(format!("{:?}", c.data_key), "Some(TravellingKey(..))");
        let v = serde_json::to_value(&c).unwrap();
        let back = ProfileConfig::from_manifest(&v).unwrap();
        assert_eq!(*back.data_key.unwrap().0, key);
        // A key without encryption, or a damaged key, is refused.
        let mut plain = v.clone();
        plain["spec"]["encrypt_at_rest"] = false.into();
        assert!(ProfileConfig::from_manifest(&plain).is_err());
        for bad in ["00", &"g".repeat(128), &"AB".repeat(64)] {
            let mut damaged = v.clone();
            damaged["data_key"] = bad.into();
            assert!(ProfileConfig::from_manifest(&damaged).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_round_trip_and_format_check() {
        let c = config(SavedState::Suspended);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["state"], "suspended");
        let back = ProfileConfig::from_manifest(&v).unwrap();
        assert_eq!(back.spec, c.spec);
        assert!(!back.governed());
        let mut governed = v.clone();
        governed["format"] = GOVERNED_FORMAT.into();
        assert!(ProfileConfig::from_manifest(&governed).unwrap().governed());
        let mut future = v.clone();
        future["format"] = "pocketvisor-profile/3".into();
        let e = ProfileConfig::from_manifest(&future).unwrap_err();
        assert!(e.to_string().contains("pocketvisor-profile/3"), "{e}");
        let mut bad = v.clone();
        bad["spec"]["memory_mib"] = 1.into();
        assert!(ProfileConfig::from_manifest(&bad).is_err());
        // An imported spec names guest assets by file name, never a host path: another
        // profile's disk or a host file as initrd is refused before anything is created.
        for (field, path) in [
            (
                "initrd",
                "/var/lib/pocketvisor/profiles/personal/disks/data.img",
            ),
            ("kernel", "/etc/shadow"),
            ("initrd", "../../personal/disks/data.img"),
        ] {
            let mut bad = v.clone();
            bad["spec"][field] = path.into();
            let e = format!("{:#}", ProfileConfig::from_manifest(&bad).unwrap_err());
            assert!(e.contains("asset directory"), "{field} {path}: {e}");
        }
    }

    #[test]
    fn snapshot_must_match_the_spec() {
        let c = config(SavedState::Suspended);
        let mut vm = vmm::VmConfig::new("/k".into());
        vm.memory_mib = c.spec.memory_mib;
        vm.vcpus = c.spec.vcpus;
        vm.disks = vec![vmm::DiskConfig {
            path: "/a/disks/data.img".into(),
            read_only: false,
            encrypted: false,
            key: None,
        }];
        vm.vsock = Some(vmm::VsockConfig {
            cid: 3,
            socket: "/a/run/vsock.sock".into(),
        });
        assert!(check_snapshot_matches(&vm, &c).is_ok());
        let mut bad = vm.clone();
        bad.memory_mib *= 2;
        assert!(check_snapshot_matches(&bad, &c).is_err());
        let mut bad = vm.clone();
        bad.disks[0].read_only = true;
        assert!(check_snapshot_matches(&bad, &c).is_err());
        let mut bad = vm.clone();
        bad.disks.push(bad.disks[0].clone());
        assert!(check_snapshot_matches(&bad, &c).is_err());
        let mut bad = vm.clone();
        bad.net.push(vmm::NetConfig {
            tap: "eth0".into(),
            mac: None,
            filter: None,
        });
        assert!(check_snapshot_matches(&bad, &c).is_err());
        let mut bad = vm;
        bad.vsock = None;
        assert!(check_snapshot_matches(&bad, &c).is_err());
    }

    #[test]
    fn only_profile_files_are_accepted() {
        let stopped = config(SavedState::Stopped);
        let suspended = config(SavedState::Suspended);
        let base = ["profile.toml", "disks/data.img"];
        assert!(check_entries(base, &stopped).is_ok());
        let snap = ["profile.toml", "snapshot/state.bin", "snapshot/memory.bin"];
        assert!(check_entries(snap, &suspended).is_ok());
        assert!(check_entries(snap, &stopped).is_err());
        // The policy entry only in a governed profile's file.
        let with_policy = ["profile.toml", POLICY_ENTRY];
        assert!(check_entries(with_policy, &stopped).is_err());
        let mut governed = stopped.clone();
        governed.format = GOVERNED_FORMAT.into();
        assert!(check_entries(with_policy, &governed).is_ok());
        for bad in [
            "run/api.sock",
            "disks/other.img",
            "snapshot/a/b",
            "snapshot/.hidden",
            "snapshot",
            "handset.db",
        ] {
            assert!(check_entries([bad], &suspended).is_err(), "{bad}");
        }
    }

    #[test]
    fn imported_tree_is_checked() {
        let t = std::env::temp_dir().join(format!("pv-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join(DISKS_DIR)).unwrap();
        let c = config(SavedState::Stopped);
        std::fs::write(t.join(SPEC_ENTRY), c.spec.to_toml().unwrap()).unwrap();
        // The disk is missing.
        assert!(check_imported(&t, &c).is_err());
        let disk = std::fs::File::create(t.join(disk_entry("data"))).unwrap();
        disk.set_len(64 << 20).unwrap();
        assert!(check_imported(&t, &c).unwrap().is_none());
        // A wrong size is refused.
        disk.set_len(1 << 20).unwrap();
        assert!(check_imported(&t, &c).is_err());
        disk.set_len(64 << 20).unwrap();
        // A governed profile without its policy, or a policy in an ungoverned one: refused.
        let mut governed = c.clone();
        governed.format = GOVERNED_FORMAT.into();
        assert!(check_imported(&t, &governed).is_err());
        std::fs::write(t.join(POLICY_ENTRY), b"signed").unwrap();
        assert!(check_imported(&t, &governed).unwrap().is_none());
        assert!(check_imported(&t, &c).is_err());
        std::fs::remove_file(t.join(POLICY_ENTRY)).unwrap();
        // Suspended without a snapshot is refused.
        assert!(check_imported(&t, &config(SavedState::Suspended)).is_err());
        // A spec that differs from the manifest is refused.
        let mut other = c.clone();
        other.spec.memory_mib = 256;
        assert!(check_imported(&t, &other).is_err());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
