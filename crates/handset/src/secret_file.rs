//! Small secret files of the state directory (`audit.key`, `device.key`): random bytes created
//! once, owner only (0600), written temp + fsync + rename, and read back whole.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Reads the `N`-byte secret at `path`, creating it (random, mode 0600) the first time. A file
/// of another length is refused rather than used or replaced.
pub fn load_or_create<const N: usize>(path: &Path) -> Result<Zeroizing<[u8; N]>> {
    let what = || format!("cannot read {}", path.display());
    match std::fs::File::open(path) {
        Ok(f) => {
            let mut bytes = Zeroizing::new(Vec::with_capacity(N + 1));
            f.take(N as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(Error::io(what()))?;
            let mut key = Zeroizing::new([0u8; N]);
            if bytes.len() != N {
                return Err(Error::Internal(format!(
                    "{} holds {} bytes, not {N}",
                    path.display(),
                    bytes.len()
                )));
            }
            key.copy_from_slice(&bytes);
            return Ok(key);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(what())(e)),
    }
    let key = random::<N>()?;
    let dir = path
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no parent", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Internal(format!("{} has no file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let what = || format!("cannot write {}", path.display());
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io(what()))?;
    std::io::Write::write_all(&mut f, &key[..]).map_err(Error::io(what()))?;
    f.sync_all().map_err(Error::io(what()))?;
    drop(f);
    // Two processes racing here: the first rename wins and both read what it left.
    std::fs::rename(&tmp, path).map_err(Error::io(what()))?;
    crate::state_dir::sync_dir(dir)?;
    load_or_create(path)
}

/// Reads the `N`-byte secret at `path`, which must exist (never created here).
pub fn load<const N: usize>(path: &Path) -> Result<Zeroizing<[u8; N]>> {
    if !path.exists() {
        return Err(Error::Internal(format!(
            "{} does not exist",
            path.display()
        )));
    }
    load_or_create(path)
}

/// `N` bytes from the kernel's random source.
pub fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>> {
    let mut key = Zeroizing::new([0u8; N]);
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut key[..]))
        .map_err(Error::io("cannot read /dev/urandom"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_owner_only_and_exact_length() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("device.key");
        let a = load_or_create::<32>(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(*load_or_create::<32>(&p).unwrap(), *a);
        assert_ne!(
            *load_or_create::<32>(&t.path().join("other.key")).unwrap(),
            *a
        );
        // Another length is refused and the file left alone.
        assert!(load_or_create::<64>(&p).is_err());
        std::fs::write(&p, [1u8; 33]).unwrap();
        assert!(load_or_create::<32>(&p).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), vec![1u8; 33]);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(names.len(), 2);
    }
}
