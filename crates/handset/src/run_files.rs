//! Files a jailed VMM made in its run directory, taken into the profile's own directory.
//!
//! The run directory belongs to the jailed VMM's uid, so a compromised VMM can put anything
//! there, links included, and swap it at any moment. What the daemon takes from it is checked
//! for what it must be (a regular file; a directory holding only regular files), moved by
//! rename (which follows no link) and checked again where it lands, by inode.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// At most this many entries in a directory taken from a run directory (a snapshot has a
/// handful).
const MAX_ENTRIES: usize = 64;

fn refused(path: &Path, why: &str) -> Error {
    Error::Conflict(format!(
        "{} was refused from the VMM's run directory: {why}",
        path.display()
    ))
}

/// The device and inode of `path` itself (a link is not followed) and whether it is a
/// regular file.
fn identify(path: &Path) -> Result<(u64, u64, bool)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io(format!("cannot open {}", path.display())))?;
    let m = f
        .metadata()
        .map_err(Error::io(format!("cannot read {}", path.display())))?;
    Ok((m.dev(), m.ino(), m.file_type().is_file()))
}

/// Moves the regular file `from` over `to` (in the same file system) and syncs `to`'s
/// directory. A link, a FIFO or anything but a regular file is refused and `to` is left as
/// it was; a file swapped between the check and the rename is removed from `to` and refused.
pub fn take_file(from: &Path, to: &Path) -> Result<()> {
    let (dev, ino, regular) = identify(from)?;
    if !regular {
        return Err(refused(from, "not a regular file"));
    }
    std::fs::rename(from, to).map_err(Error::io(format!(
        "cannot move {} to {}",
        from.display(),
        to.display()
    )))?;
    match identify(to) {
        Ok((d, i, true)) if (d, i) == (dev, ino) => {}
        _ => {
            let _ = std::fs::remove_file(to);
            return Err(refused(from, "it changed while it was taken"));
        }
    }
    sync_parent(to)
}

/// Checks that `dir` is a directory (not a link) of at most [`MAX_ENTRIES`] regular files.
pub fn check_plain_dir(dir: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(dir)
        .map_err(Error::io(format!("cannot read {}", dir.display())))?;
    if !m.file_type().is_dir() {
        return Err(refused(dir, "not a directory"));
    }
    let entries =
        std::fs::read_dir(dir).map_err(Error::io(format!("cannot read {}", dir.display())))?;
    for (n, e) in entries.enumerate() {
        let e = e.map_err(Error::io(format!("cannot read {}", dir.display())))?;
        if n >= MAX_ENTRIES {
            return Err(refused(dir, "too many files"));
        }
        let t = e
            .file_type()
            .map_err(Error::io(format!("cannot read {}", e.path().display())))?;
        if !t.is_file() {
            return Err(refused(&e.path(), "not a regular file"));
        }
    }
    Ok(())
}

/// Moves the directory `from`, of regular files only ([`check_plain_dir`]), to `to` (which
/// must not exist) and syncs `to`'s parent. While the VMM that wrote it runs, it may still
/// change what is in it: check `to` again with [`check_plain_dir`] once it has ended.
pub fn take_dir(from: &Path, to: &Path) -> Result<()> {
    check_plain_dir(from)?;
    let (dev, ino, _) = identify(from)?;
    std::fs::rename(from, to).map_err(Error::io(format!(
        "cannot move {} to {}",
        from.display(),
        to.display()
    )))?;
    let landed = identify(to).is_ok_and(|(d, i, _)| (d, i) == (dev, ino));
    if !landed || check_plain_dir(to).is_err() {
        let _ = std::fs::remove_dir_all(to);
        return Err(refused(from, "it changed while it was taken"));
    }
    sync_parent(to)
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => crate::state_dir::sync_dir(p),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_taken_and_a_link_or_fifo_is_not() {
        let d = tempfile::tempdir().unwrap();
        let (run, to) = (d.path().join("run"), d.path().join("disk.img"));
        std::fs::create_dir(&run).unwrap();
        std::fs::write(&to, b"kept").unwrap();
        // A link to a file of the host, in the file's place: refused, `to` untouched.
        let host = d.path().join("host-secret");
        std::fs::write(&host, b"secret").unwrap();
        let from = run.join("return-0.img");
        std::os::unix::fs::symlink(&host, &from).unwrap();
        assert!(take_file(&from, &to).is_err());
        assert_eq!(std::fs::read(&to).unwrap(), b"kept");
        std::fs::remove_file(&from).unwrap();
        // A FIFO: refused without blocking.
        let c = std::ffi::CString::new(from.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(take_file(&from, &to).is_err());
        assert_eq!(std::fs::read(&to).unwrap(), b"kept");
        std::fs::remove_file(&from).unwrap();
        // A regular file replaces `to`.
        std::fs::write(&from, b"returned").unwrap();
        take_file(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"returned");
        assert!(!from.exists());
    }

    #[test]
    fn a_directory_of_plain_files_is_taken_and_one_with_a_link_is_not() {
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("run-kept");
        std::fs::create_dir(&from).unwrap();
        std::fs::write(from.join("state.bin"), b"s").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", from.join("memory.bin")).unwrap();
        let to = d.path().join("cloud-kept");
        assert!(take_dir(&from, &to).is_err());
        assert!(!to.exists());
        std::fs::remove_file(from.join("memory.bin")).unwrap();
        std::fs::create_dir(from.join("sub")).unwrap();
        assert!(take_dir(&from, &to).is_err());
        std::fs::remove_dir(from.join("sub")).unwrap();
        take_dir(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join("state.bin")).unwrap(), b"s");
        // A link in the directory's own place is refused.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&to, &link).unwrap();
        assert!(check_plain_dir(&link).is_err());
    }
}
