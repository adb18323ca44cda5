//! The journal of MDM commands this handset acts on: `<state-dir>/mdm/journal/<id>.json`,
//! written (temp + fsync + rename) **before** the command's first step, and again with its
//! result once it is done. A daemon killed in between finds the entry `started` at its next
//! start and acts on the command again (each action is idempotent: a policy already in force,
//! a profile already locked, a wipe whose profiles are already gone); a `done` entry is the
//! result still to deliver (a wipe's receipt), removed once the server has it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state_dir;

/// One command's journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The server's command id.
    pub id: i64,
    /// `policy`, `lock`, `unlock` or `wipe`.
    pub kind: String,
    /// The command's body, as signed.
    pub body: String,
    /// The managed profiles it acts on, fixed when it started (a wipe finishing after a
    /// restart erases what it set out to erase, no more).
    pub targets: Vec<String>,
    /// For a wipe: which of `targets` were encrypted at rest (their data key is destroyed).
    #[serde(default)]
    pub encrypted: Vec<bool>,
    /// When it started (unix seconds).
    pub started_at: u64,
    /// The result (JSON text) once done; none while under way.
    #[serde(default)]
    pub result: Option<String>,
}

/// The journal directory under the handset's MDM directory.
pub fn dir(mdm_dir: &Path) -> PathBuf {
    mdm_dir.join("journal")
}

fn path(mdm_dir: &Path, id: i64) -> PathBuf {
    dir(mdm_dir).join(format!("{id}.json"))
}

/// Writes `entry` durably (temp + fsync + rename).
pub fn write(mdm_dir: &Path, entry: &Entry) -> Result<()> {
    let d = dir(mdm_dir);
    state_dir::create_private_dir(&d)?;
    let text =
        serde_json::to_vec_pretty(entry).map_err(|e| Error::Internal(format!("journal: {e}")))?;
    state_dir::write_atomic(&path(mdm_dir, entry.id), &text)
}

/// The entry of command `id`, if any (a damaged one is an error, never silently dropped).
pub fn read(mdm_dir: &Path, id: i64) -> Result<Option<Entry>> {
    let p = path(mdm_dir, id);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Internal(format!("{} is damaged: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot read {}", p.display()))(e)),
    }
}

/// Removes command `id`'s entry (its result was delivered).
pub fn remove(mdm_dir: &Path, id: i64) -> Result<()> {
    match std::fs::remove_file(path(mdm_dir, id)) {
        Ok(()) => state_dir::sync_dir(&dir(mdm_dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot remove a journal entry")(e)),
    }
}

/// Every entry, oldest command first (files that are not `<id>.json` are ignored).
pub fn all(mdm_dir: &Path) -> Result<Vec<Entry>> {
    let Ok(list) = std::fs::read_dir(dir(mdm_dir)) else {
        return Ok(Vec::new());
    };
    let mut ids: Vec<i64> = list
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".json").and_then(|i| i.parse().ok()))
        .collect();
    ids.sort_unstable();
    let mut out = Vec::new();
    for id in ids {
        if let Some(e) = read(mdm_dir, id)? {
            out.push(e);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_in_command_order_and_go_once_removed() {
        let t = tempfile::tempdir().unwrap();
        assert!(all(t.path()).unwrap().is_empty());
        let mut e = Entry {
            id: 12,
            kind: "wipe".into(),
            body: String::new(),
            targets: vec!["work".into()],
            encrypted: vec![true],
            started_at: 5,
            result: None,
        };
        write(t.path(), &e).unwrap();
        let mut first = e.clone();
        first.id = 3;
        write(t.path(), &first).unwrap();
        e.result = Some("{}".into());
        write(t.path(), &e).unwrap();
        assert_eq!(all(t.path()).unwrap(), [first.clone(), e.clone()]);
        remove(t.path(), 12).unwrap();
        remove(t.path(), 12).unwrap();
        assert_eq!(read(t.path(), 12).unwrap(), None);
        std::fs::write(path(t.path(), 3), b"{\"id\": 3").unwrap();
        assert!(all(t.path()).is_err());
    }
}
