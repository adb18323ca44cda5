//! Durable replacing writes: temporary file, fsync, rename, directory fsync.

use std::fs::File;
use std::io::{Error, ErrorKind, Write};
use std::path::Path;

/// fsyncs a directory so a rename or a new entry in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `data`: written to `.NAME.tmp` next to it, fsynced, renamed over `path`,
/// then the directory fsynced. On any error the temporary file is removed and `path` is as it
/// was. A bare file name is taken in the current directory. The temporary file is always a new
/// one (`O_EXCL`): a stale one from a crash is removed first, and a symlink planted at its name
/// in a shared directory is never followed.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => return Err(Error::new(ErrorKind::InvalidInput, "no directory")),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.toml");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let p = t.path().join("out.key");
        std::os::unix::fs::symlink(&victim, t.path().join(".out.key.tmp")).unwrap();
        write_atomic(&p, b"secret").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_no_temporary() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.toml");
        write_atomic(&p, b"old").unwrap();
        // The rename fails: the target is now a non-empty directory.
        let d = t.path().join("dir");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("x"), b"x").unwrap();
        assert!(write_atomic(&d, b"new").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(!t.path().join(".dir.tmp").exists());
        assert!(write_atomic(Path::new("/"), b"x").is_err());
    }
}
