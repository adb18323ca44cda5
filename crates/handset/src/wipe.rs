//! `profile wipe` (issue 12): crypto-erase, then delete, all or nothing across a crash.
//!
//! 1. `profiles/<name>/.wiping` is written (fsynced): from here on the wipe will finish.
//! 2. The wrapped data key `disk.key` (a profile encrypted at rest) is overwritten in place
//!    with random bytes, fsynced, and removed (the directory fsynced): the disks' ciphertext,
//!    and every copy of it taken before, no longer opens with anything on this handset.
//! 3. The profile is deleted as `delete` does (renamed to `.deleting-<name>`, its registry
//!    row removed, its files removed; [`crate::leftovers`]).
//!
//! A daemon killed anywhere in between finishes the wipe at its next start ([`finish`]).

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::state_dir::{self, StateDir, DATA_KEY_FILE};

/// The marker of a wipe under way, in the profile's directory.
pub const WIPING_MARKER: &str = ".wiping";

/// Marks profile `name` as being wiped (the first step; fsynced).
pub fn begin(dir: &StateDir, name: &str) -> Result<()> {
    state_dir::write_atomic(&dir.profile(name).join(WIPING_MARKER), b"wipe\n")
}

/// Whether a wipe of profile `name` was begun.
pub fn begun(dir: &StateDir, name: &str) -> bool {
    dir.profile(name).join(WIPING_MARKER).exists()
}

/// Destroys the wrapped data key in `profile_dir`, if there is one: overwritten with random
/// bytes and fsynced, then removed and the directory fsynced. Returns whether there was one.
pub fn erase_key(profile_dir: &Path) -> Result<bool> {
    let path = profile_dir.join(DATA_KEY_FILE);
    let len = match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            return Err(Error::Internal(format!(
                "{} is not a regular file",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()))(e)),
    };
    let what = || format!("cannot overwrite {}", path.display());
    let mut f = std::fs::File::options()
        .write(true)
        .open(&path)
        .map_err(Error::io(what()))?;
    let len = usize::try_from(len).map_err(|_| Error::Internal(what()))?;
    let mut noise = vec![0u8; len];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(Error::io("cannot read /dev/urandom"))?,
        &mut noise,
    )
    .map_err(Error::io("cannot read /dev/urandom"))?;
    f.write_all(&noise).map_err(Error::io(what()))?;
    f.sync_all().map_err(Error::io(what()))?;
    drop(f);
    crate::fault::kill_point("wipe-overwritten");
    std::fs::remove_file(&path).map_err(Error::io(format!("cannot remove {}", path.display())))?;
    state_dir::sync_dir(profile_dir)?;
    Ok(true)
}

/// The profiles whose wipe a killed daemon left unfinished (their marker is there).
pub fn unfinished(dir: &StateDir) -> Vec<String> {
    let Ok(list) = std::fs::read_dir(dir.profiles()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = list
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| crate::spec::check_name("", n).is_ok() && begun(dir, n))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_overwritten_then_removed() {
        let t = tempfile::tempdir().unwrap();
        let dir = StateDir::new(t.path()).unwrap();
        std::fs::create_dir_all(dir.profile("w")).unwrap();
        assert!(!erase_key(&dir.profile("w")).unwrap());
        let key = crate::disk_keys::create_profile_key(&dir, "w").unwrap();
        assert!(crate::disk_keys::load_profile_key(&dir, "w").is_ok());
        assert!(!begun(&dir, "w"));
        begin(&dir, "w").unwrap();
        assert_eq!(unfinished(&dir), ["w"]);
        assert!(erase_key(&dir.profile("w")).unwrap());
        assert!(!dir.data_key("w").exists());
        let e = crate::disk_keys::load_profile_key(&dir, "w").unwrap_err();
        assert!(e.to_string().contains("no data key"), "{e}");
        drop(key);
    }
}
