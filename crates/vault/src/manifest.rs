//! The manifest: what a portable profile file holds.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{Result, VaultError};

/// Largest encoded manifest accepted by a reader.
pub const MAX_MANIFEST_LEN: u32 = 16 * 1024 * 1024;
const MAX_ENTRIES: usize = 4096;
const MAX_EXTENTS: usize = 1 << 20;
const MAX_NAME_LEN: usize = 1024;
const MAX_NAME_DEPTH: usize = 8;

/// Describes a profile and the entries stored in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Profile name.
    pub name: String,
    /// The profile's configuration, opaque to this crate.
    pub config: serde_json::Value,
    /// The profile's policy, opaque to this crate.
    #[serde(default)]
    pub policy: Option<serde_json::Value>,
    /// The stored entries, in stream order. Filled in by `export`.
    #[serde(default)]
    pub entries: Vec<EntryInfo>,
    /// Which kinds of keys can open the file (never the keys). Filled in by `export`.
    #[serde(default)]
    pub keys: Vec<KeyInfo>,
}

impl Manifest {
    /// A manifest with no entries and no keys yet.
    pub fn new(
        name: impl Into<String>,
        config: serde_json::Value,
        policy: Option<serde_json::Value>,
    ) -> Self {
        Manifest {
            name: name.into(),
            config,
            policy,
            entries: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// Total number of entry bytes stored in the file (holes excluded).
    pub fn stored_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(EntryInfo::stored_bytes)
            .fold(0, u64::saturating_add)
    }

    /// Checks names, extents and sizes; readers call this on every decoded manifest.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_profile_name(&self.name).map_err(VaultError::bad_manifest)?;
        if self.entries.len() > MAX_ENTRIES {
            return Err(VaultError::bad_manifest(format!(
                "{} entries (at most {MAX_ENTRIES})",
                self.entries.len()
            )));
        }
        let mut names = HashSet::new();
        for entry in &self.entries {
            validate_entry_name(&entry.name).map_err(VaultError::bad_manifest)?;
            if !names.insert(entry.name.as_str()) {
                return Err(VaultError::bad_manifest(format!(
                    "entry {:?} appears twice",
                    entry.name
                )));
            }
            entry.validate_extents()?;
        }
        // An entry may not also be a directory holding another entry.
        for entry in &self.entries {
            let mut prefix = entry.name.as_str();
            while let Some((parent, _)) = prefix.rsplit_once('/') {
                if names.contains(parent) {
                    return Err(VaultError::bad_manifest(format!(
                        "entry {parent:?} is both a file and a directory"
                    )));
                }
                prefix = parent;
            }
        }
        let mut total: u64 = 0;
        for entry in &self.entries {
            total = total
                .checked_add(entry.stored_bytes())
                .ok_or_else(|| VaultError::bad_manifest("total size overflows"))?;
        }
        Ok(())
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    /// A disk image.
    Disk,
    /// A snapshot's device and vCPU state.
    SnapshotState,
    /// A snapshot's guest memory.
    SnapshotMemory,
    /// Anything else.
    Other,
}

/// A byte range holding data; everything outside the extents of an entry is a hole (zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Start of the range.
    pub offset: u64,
    /// Length of the range (never 0).
    pub length: u64,
}

/// One stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// Relative path inside the profile (`/`-separated, no `.` or `..` components).
    pub name: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Logical file length.
    pub length: u64,
    /// Data extents, sorted and disjoint; their bytes follow in the stream in this order.
    pub extents: Vec<Extent>,
}

impl EntryInfo {
    /// Bytes stored for this entry (the sum of its extents).
    pub fn stored_bytes(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| e.length)
            .fold(0, u64::saturating_add)
    }

    fn validate_extents(&self) -> Result<()> {
        let bad = |what: &str| {
            VaultError::bad_manifest(format!("entry {:?}: {what}", self.name.as_str()))
        };
        if self.extents.len() > MAX_EXTENTS {
            return Err(bad("too many extents"));
        }
        let mut next_free = 0u64;
        for extent in &self.extents {
            if extent.length == 0 {
                return Err(bad("empty extent"));
            }
            if extent.offset < next_free {
                return Err(bad("extents overlap or are out of order"));
            }
            let end = extent
                .offset
                .checked_add(extent.length)
                .ok_or_else(|| bad("extent overflows"))?;
            if end > self.length {
                return Err(bad("extent beyond the end of the file"));
            }
            next_free = end;
        }
        Ok(())
    }
}

/// A kind of key that opens the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum KeyInfo {
    /// A passphrase.
    Passphrase,
    /// The secret key of this X25519 public key (`pvp-public-...`).
    Recipient {
        /// The recipient's public key in text form.
        public_key: String,
    },
}

/// Checks that a profile name can safely become one path component: 1 to 255 bytes, no `/`,
/// no control characters, not `.` or `..`.
pub(crate) fn validate_profile_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 || name == "." || name == ".." {
        return Err(format!(
            "profile name {name:?} must have 1 to 255 bytes and not be `.` or `..`"
        ));
    }
    if name.contains(|c: char| c == '/' || c.is_control()) {
        return Err(format!(
            "profile name {name:?} contains a `/` or a control character"
        ));
    }
    Ok(())
}

/// Checks that `name` is a safe relative path: `/`-separated normal components.
pub(crate) fn validate_entry_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "entry name {name:?} must have 1 to {MAX_NAME_LEN} bytes"
        ));
    }
    let mut depth = 0;
    for component in name.split('/') {
        depth += 1;
        if component.is_empty() || component == "." || component == ".." {
            return Err(format!(
                "entry name {name:?} must be a relative path without empty, `.` or `..` parts"
            ));
        }
        if component.contains(['\0', '\\']) {
            return Err(format!("entry name {name:?} contains a NUL or backslash"));
        }
    }
    if depth > MAX_NAME_DEPTH {
        return Err(format!("entry name {name:?} is nested too deeply"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, length: u64, extents: &[(u64, u64)]) -> EntryInfo {
        EntryInfo {
            name: name.into(),
            kind: EntryKind::Disk,
            length,
            extents: extents
                .iter()
                .map(|&(offset, length)| Extent { offset, length })
                .collect(),
        }
    }

    fn with(entries: Vec<EntryInfo>) -> Manifest {
        let mut m = Manifest::new("p", serde_json::json!({}), None);
        m.entries = entries;
        m
    }

    #[test]
    fn names() {
        for ok in ["disk.raw", "snapshot/state", "a-b_c.1"] {
            assert!(validate_entry_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            ".",
            "a\\b",
            "a\0b",
            "1/2/3/4/5/6/7/8/9",
        ] {
            assert!(validate_entry_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn profile_names() {
        assert!(validate_profile_name("work phone").is_ok());
        for bad in ["", ".", "..", "a/b", "a\nb", "a\0b", &"x".repeat(256)] {
            assert!(validate_profile_name(bad).is_err(), "{bad:?}");
        }
        let mut m = with(vec![]);
        m.name = "../evil".into();
        assert!(m.validate().is_err());
    }

    #[test]
    fn extents_must_be_sorted_disjoint_and_inside() {
        assert!(with(vec![entry("d", 100, &[(0, 10), (10, 90)])])
            .validate()
            .is_ok());
        for extents in [
            &[(0, 10), (5, 10)][..],
            &[(50, 10), (0, 10)],
            &[(0, 0)],
            &[(95, 10)],
            &[(u64::MAX, 2)],
        ] {
            assert!(
                with(vec![entry("d", 100, extents)]).validate().is_err(),
                "{extents:?}"
            );
        }
    }

    #[test]
    fn duplicate_and_file_directory_clash() {
        assert!(with(vec![entry("a", 0, &[]), entry("a", 0, &[])])
            .validate()
            .is_err());
        assert!(with(vec![entry("a", 0, &[]), entry("a/b", 0, &[])])
            .validate()
            .is_err());
        assert!(with(vec![entry("a/c", 0, &[]), entry("a/b", 0, &[])])
            .validate()
            .is_ok());
    }

    #[test]
    fn json_shape() {
        let mut m = with(vec![entry("disk.raw", 4096, &[(0, 512)])]);
        m.keys = vec![
            KeyInfo::Passphrase,
            KeyInfo::Recipient {
                public_key: "pvp-public-00".into(),
            },
        ];
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["entries"][0]["kind"], "disk");
        assert_eq!(json["keys"][0]["type"], "passphrase");
        assert_eq!(json["keys"][1]["type"], "recipient");
        let back: Manifest = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.stored_bytes(), 512);
    }
}
