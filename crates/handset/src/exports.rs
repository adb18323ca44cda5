//! The export intents: an export writes its file under a temporary name next to the output
//! (`<out>.tmp-<hex>`) and renames it when complete. Before the temporary file exists the
//! export records its name in `exports/<pid>` (fsynced) and removes the record when it
//! ends, whatever the outcome. A process killed in between leaves the record:
//! [`sweep`] (run at every daemon start and before every export) removes the temporary file
//! it names, and then the record, once that process is gone.
//!
//! Only a file whose name has the temporary form, in the directory the record names, is
//! removed (the state directory is the owner's only, but a record never removes anything
//! else).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state_dir::{self, StateDir};

/// The marker in a temporary export file's name (`<out>.tmp-<16 hex digits>`).
const TEMP_MARK: &str = ".tmp-";

/// What a record holds (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The export's temporary file (absolute).
    temp: PathBuf,
}

/// An export under way, recorded in `exports/<pid>`; dropping it removes the record.
#[derive(Debug)]
pub struct ExportIntent {
    record: PathBuf,
}

impl ExportIntent {
    /// Records (durably, before the file is created) that this process is about to write
    /// `temp`, an absolute `<out>.tmp-<hex>` path.
    pub fn begin(dir: &StateDir, temp: &Path) -> Result<Self> {
        if !is_temp_name(temp) || !temp.is_absolute() {
            return Err(Error::Internal(format!(
                "{} is not an absolute temporary export name",
                temp.display()
            )));
        }
        state_dir::create_private_dir(&dir.exports())?;
        let record = dir.exports().join(std::process::id().to_string());
        let text = serde_json::to_vec(&Record {
            temp: temp.to_path_buf(),
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        state_dir::write_atomic(&record, &text)?;
        Ok(ExportIntent { record })
    }
}

impl Drop for ExportIntent {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.record) {
            tracing::warn!("cannot remove {}: {e}", self.record.display());
        }
    }
}

/// Whether `path`'s file name has the temporary form `<name>.tmp-<16 hex digits>`.
fn is_temp_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    match name.rsplit_once(TEMP_MARK) {
        Some((stem, hex)) => {
            !stem.is_empty() && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Whether no process `pid` exists (other than us).
fn dead(pid: u32) -> bool {
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the temporary files of exports whose process is gone, and their records;
/// returns the files removed. Records of live processes are left alone.
pub fn sweep(dir: &StateDir) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(list) = std::fs::read_dir(dir.exports()) else {
        return Ok(removed);
    };
    for e in list.flatten() {
        let pid = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
        // Other names: a record being written (`.<pid>.tmp`) by a live or dead process.
        let Some(pid) = pid else {
            if let Some(p) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('.')?.strip_suffix(".tmp"))
                .and_then(|p| p.parse::<u32>().ok())
            {
                if dead(p) {
                    remove_if_present(&e.path())?;
                }
            }
            continue;
        };
        if !dead(pid) {
            continue;
        }
        let record: Option<Record> = std::fs::read(e.path())
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok());
        if let Some(temp) = record.map(|r| r.temp) {
            let regular = std::fs::symlink_metadata(&temp).is_ok_and(|m| m.file_type().is_file());
            if is_temp_name(&temp) && temp.is_absolute() && regular {
                remove_if_present(&temp)?;
                removed.push(temp);
            }
        }
        remove_if_present(&e.path())?;
    }
    Ok(removed)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", path.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_temporary_export_names_qualify() {
        assert!(is_temp_name(Path::new("/a/w.pvp.tmp-0123456789abcdef")));
        assert!(!is_temp_name(Path::new("/a/w.pvp")));
        assert!(!is_temp_name(Path::new("/a/w.pvp.tmp-0123")));
        assert!(!is_temp_name(Path::new("/a/.tmp-0123456789abcdef")));
        assert!(!is_temp_name(Path::new("/a/w.tmp-0123456789abcdeg")));
    }

    #[test]
    fn a_dead_exports_temporary_file_is_swept_and_a_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::new(&root.path().join("state")).unwrap();
        let out = root.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let ours = out.join("w.pvp.tmp-00000000000000aa");
        let theirs = out.join("w.pvp.tmp-00000000000000bb");
        let not_temp = out.join("w.pvp");
        for f in [&ours, &theirs, &not_temp] {
            std::fs::write(f, b"x").unwrap();
        }
        // This process's own (live) record is kept with its file.
        let intent = ExportIntent::begin(&dir, &ours).unwrap();
        assert_eq!(sweep(&dir).unwrap(), Vec::<PathBuf>::new());
        assert!(ours.exists());
        // A dead process's record: its file and the record go; a record naming a file
        // that is not a temporary export name removes nothing.
        let dead_pid = u32::try_from(i32::MAX).unwrap();
        let write = |pid: u32, temp: &Path| {
            let text = serde_json::to_vec(&Record {
                temp: temp.to_path_buf(),
            })
            .unwrap();
            std::fs::write(dir.exports().join(pid.to_string()), text).unwrap();
        };
        write(dead_pid, &theirs);
        write(dead_pid - 1, &not_temp);
        assert_eq!(sweep(&dir).unwrap(), vec![theirs.clone()]);
        assert!(!theirs.exists());
        assert!(not_temp.exists(), "a non-temporary name was removed");
        assert!(ours.exists());
        let left: Vec<_> = std::fs::read_dir(dir.exports())
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(left.len(), 1, "only the live record is left");
        drop(intent);
        assert_eq!(std::fs::read_dir(dir.exports()).unwrap().count(), 0);
    }
}
