//! The `profiles/<name>/moved` marker: an export moved the profile to a file, so it must not
//! run here too (start and resume refuse it without `reclaim`).
//!
//! An export that moves a profile writes the marker **pending** before the file appears
//! under its final name (naming the file, and the inode of a file it replaces, if any), and
//! makes it final afterwards. A pending marker counts only once the file exists under that
//! name as a new inode: an export killed before its rename leaves the profile unmoved (no
//! file went anywhere); one killed after it leaves the profile moved (the file is complete).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state_dir::{self, StateDir};

/// The marker's content (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The absolute path of the exported file.
    file: String,
    /// When the export began or ended (ms since the epoch).
    #[serde(default)]
    time_ms: u64,
    /// Written before the file was complete.
    #[serde(default)]
    pending: bool,
    /// (device, inode) of the file the export replaces (`--force`), if it existed.
    #[serde(default)]
    replaces: Option<(u64, u64)>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

fn identity(file: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(file).ok().map(|m| (m.dev(), m.ino()))
}

fn write(dir: &StateDir, name: &str, marker: &Marker) -> Result<()> {
    let text = serde_json::to_vec(marker).map_err(|e| Error::Internal(e.to_string()))?;
    state_dir::write_atomic(&dir.moved_marker(name), &text)
}

/// Records, before an export writes `file` (absolute), that `name` is about to move there.
pub fn begin(dir: &StateDir, name: &str, file: &Path) -> Result<()> {
    let marker = Marker {
        file: file.display().to_string(),
        time_ms: now_ms(),
        pending: true,
        replaces: identity(file),
    };
    write(dir, name, &marker)
}

/// Records that `name` moved to `file` (written completely).
pub fn commit(dir: &StateDir, name: &str, file: &Path) -> Result<()> {
    let marker = Marker {
        file: file.display().to_string(),
        time_ms: now_ms(),
        pending: false,
        replaces: None,
    };
    write(dir, name, &marker)
}

/// Removes the marker (an export that failed, or a reclaim).
pub fn remove(dir: &StateDir, name: &str) -> Result<()> {
    let path = dir.moved_marker(name);
    match std::fs::remove_file(&path) {
        Ok(()) => state_dir::sync_dir(&dir.profile(name)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", path.display()))(e)),
    }
}

/// The file `name` moved to, if it is marked as moved (a pending marker counts once its
/// file exists as a new inode; see the module doc).
pub fn moved_to(dir: &StateDir, name: &str) -> Option<String> {
    let text = std::fs::read(dir.moved_marker(name)).ok()?;
    let Ok(marker) = serde_json::from_slice::<Marker>(&text) else {
        // Unreadable: the safe reading is "moved" (reclaim removes it).
        return Some("a portable file".into());
    };
    if marker.pending {
        let now = identity(Path::new(&marker.file));
        if now.is_none() || now == marker.replaces {
            return None;
        }
    }
    Some(marker.file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_marker_counts_only_once_its_file_is_new() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(&tmp.path().join("state")).unwrap();
        std::fs::create_dir_all(dir.profile("w")).unwrap();
        let out = tmp.path().join("w.pvp");
        assert_eq!(moved_to(&dir, "w"), None);

        // Killed before the file appeared: not moved.
        begin(&dir, "w", &out).unwrap();
        assert_eq!(moved_to(&dir, "w"), None);
        // The file renamed into place: moved.
        std::fs::write(&out, b"new").unwrap();
        assert_eq!(moved_to(&dir, "w").as_deref(), out.to_str());

        // With --force over an existing file: the old file does not count, a new one does.
        begin(&dir, "w", &out).unwrap();
        assert_eq!(moved_to(&dir, "w"), None);
        let tmp_out = tmp.path().join("w.pvp.tmp");
        std::fs::write(&tmp_out, b"newer").unwrap();
        std::fs::rename(&tmp_out, &out).unwrap();
        assert_eq!(moved_to(&dir, "w").as_deref(), out.to_str());

        commit(&dir, "w", &out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert_eq!(moved_to(&dir, "w").as_deref(), out.to_str(), "final");
        remove(&dir, "w").unwrap();
        assert_eq!(moved_to(&dir, "w"), None);

        // A marker from before this format (no `pending`) is final.
        std::fs::write(dir.moved_marker("w"), br#"{"file":"/x.pvp","time_ms":1}"#).unwrap();
        assert_eq!(moved_to(&dir, "w").as_deref(), Some("/x.pvp"));
    }
}
