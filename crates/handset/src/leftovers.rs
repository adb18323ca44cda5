//! What an interrupted delete or import leaves in `profiles/`, and how the next daemon (or
//! the next import) finishes or rolls it back.
//!
//! - A **delete** first renames `profiles/<name>` to `profiles/.deleting-<name>` (one atomic
//!   step: from then on the profile's files are no longer the profile's), then removes the
//!   registry row, then the directory. [`finish_deletes`] completes a delete cut anywhere in
//!   between: the row goes (unless a new profile of that name exists) and so does the
//!   directory.
//! - An **import** decrypts into `profiles/.import-<pid>-<n>` (vault's own temporary
//!   directory next to it is `..import-<pid>-<n>.import-<hex>`), renames it to
//!   `profiles/<name>` holding `.import-pending` (its pid), then registers the row and removes
//!   the marker. [`sweep_imports`] rolls back one whose process is gone: staging directories
//!   go; a renamed directory without its row goes; with its row only the marker goes.

use std::path::Path;

use crate::db::Db;
use crate::error::{Error, Result};
use crate::state_dir::StateDir;

/// Prefix of a profile directory being deleted.
pub const DELETING_PREFIX: &str = ".deleting-";
/// Prefix of an import's staging directory in `profiles/`.
pub const IMPORT_STAGING_PREFIX: &str = ".import-";
/// File in a profile directory between its rename into place and its registration; holds
/// the importing process's pid.
pub const IMPORT_PENDING_MARKER: &str = ".import-pending";

/// Whether no process `pid` exists (other than us).
fn dead(pid: u32) -> bool {
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

fn remove_tree(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", path.display()))(e)),
    }
}

/// Finishes deletes cut short (see the module doc); returns the names whose registry row it
/// removed. Call with no other writer of `profiles/` running (the daemon at start).
pub fn finish_deletes(dir: &StateDir, db: &Db) -> Result<Vec<String>> {
    let mut unregistered = Vec::new();
    let Ok(list) = std::fs::read_dir(dir.profiles()) else {
        return Ok(unregistered);
    };
    for e in list.flatten() {
        let file_name = e.file_name();
        let Some(name) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(DELETING_PREFIX))
        else {
            continue;
        };
        // While the row exists no profile of that name can be made (create and import
        // refuse a registered name), so a `profiles/<name>` next to it is a later profile's.
        if crate::spec::check_name("", name).is_ok()
            && !dir.profile(name).exists()
            && db.profile(name)?.is_some()
        {
            db.delete_profile(name)?;
            unregistered.push(name.to_string());
        }
        remove_tree(&e.path())?;
    }
    Ok(unregistered)
}

/// Rolls back imports whose process is gone (see the module doc). `db` is this process's
/// open registry, if it has one: a second connection in the same process must not be
/// opened (closing its file would drop the first one's locks; SQLite's POSIX-lock caveat).
pub fn sweep_imports(dir: &StateDir, db: Option<&Db>) -> Result<()> {
    let Ok(list) = std::fs::read_dir(dir.profiles()) else {
        return Ok(());
    };
    let mut opened = None;
    for e in list.flatten() {
        let file_name = e.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        // A staging directory (ours, or vault's temporary one next to it).
        let staging = name
            .strip_prefix(IMPORT_STAGING_PREFIX)
            .or_else(|| name.strip_prefix(&format!(".{IMPORT_STAGING_PREFIX}")));
        if let Some(rest) = staging {
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(dead) {
                remove_tree(&e.path())?;
            }
            continue;
        }
        // A profile directory renamed into place but perhaps not registered.
        let pid = std::fs::read_to_string(e.path().join(IMPORT_PENDING_MARKER))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        if !pid.is_some_and(dead) {
            continue;
        }
        if db.is_none() && opened.is_none() && dir.db().is_file() {
            opened = Some(Db::open(&dir.db())?);
        }
        let registered = match db.or(opened.as_ref()) {
            Some(db) => db.profile(name)?.is_some(),
            None => false,
        };
        if registered {
            // Registered just before the kill: only the marker is left over.
            let marker = e.path().join(IMPORT_PENDING_MARKER);
            std::fs::remove_file(&marker)
                .map_err(Error::io(format!("cannot remove {}", marker.display())))?;
        } else {
            remove_tree(&e.path())?;
        }
    }
    Ok(())
}

/// Whether `profiles/<name>` is an import still under way (its pending marker names a live
/// process): a create of that name must not take it for debris.
pub fn import_in_progress(dir: &StateDir, name: &str) -> bool {
    std::fs::read_to_string(dir.profile(name).join(IMPORT_PENDING_MARKER))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .is_some_and(|p| !dead(p))
}
