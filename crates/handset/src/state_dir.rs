//! Paths inside the state directory and crash-safe file writes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pocketvisor";
/// Environment variable overriding the default state directory.
pub const STATE_DIR_ENV: &str = "POCKETVISOR_STATE_DIR";

/// The state directory (layout documented in the crate root).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Wraps `root` (made absolute; not created).
    pub fn new(root: &Path) -> Result<Self> {
        let root = std::path::absolute(root).map_err(Error::io("bad state directory"))?;
        Ok(Self { root })
    }

    /// `--state-dir` if given, else `$POCKETVISOR_STATE_DIR`, else `/var/lib/pocketvisor`.
    pub fn resolve(flag: Option<&Path>) -> Result<Self> {
        match flag {
            Some(p) => Self::new(p),
            None => match std::env::var_os(STATE_DIR_ENV) {
                Some(v) if !v.is_empty() => Self::new(Path::new(&v)),
                _ => Self::new(Path::new(DEFAULT_STATE_DIR)),
            },
        }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `handset.db`.
    pub fn db(&self) -> PathBuf {
        self.root.join("handset.db")
    }
    /// `handset.sock`.
    pub fn socket(&self) -> PathBuf {
        self.root.join("handset.sock")
    }
    /// `handset.lock` (held by the running daemon).
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("handset.lock")
    }
    /// `jail/` (the jailer's per-profile root directories while jailed VMMs run).
    pub fn jail_root(&self) -> PathBuf {
        self.root.join("jail")
    }
    /// `profiles/`.
    pub fn profiles(&self) -> PathBuf {
        self.root.join("profiles")
    }
    /// `profiles/<name>/`.
    pub fn profile(&self, name: &str) -> PathBuf {
        self.profiles().join(name)
    }
    /// `profiles/<name>/profile.toml`.
    pub fn spec(&self, name: &str) -> PathBuf {
        self.profile(name).join("profile.toml")
    }
    /// `profiles/<name>/disks/`.
    pub fn disks(&self, name: &str) -> PathBuf {
        self.profile(name).join("disks")
    }
    /// `profiles/<name>/disks/<disk>.img`.
    pub fn disk(&self, name: &str, disk: &str) -> PathBuf {
        self.disks(name).join(format!("{disk}.img"))
    }
    /// `profiles/<name>/run/`.
    pub fn run(&self, name: &str) -> PathBuf {
        self.profile(name).join("run")
    }
    /// `profiles/<name>/run/api.sock`.
    pub fn api_socket(&self, name: &str) -> PathBuf {
        self.run(name).join("api.sock")
    }
    /// `profiles/<name>/run/vsock.sock`.
    pub fn vsock_socket(&self, name: &str) -> PathBuf {
        self.run(name).join("vsock.sock")
    }
    /// `profiles/<name>/run/serial.log`.
    pub fn serial_log(&self, name: &str) -> PathBuf {
        self.run(name).join("serial.log")
    }
    /// `profiles/<name>/run/vmm.log` (the VMM's stdout and stderr).
    pub fn vmm_log(&self, name: &str) -> PathBuf {
        self.run(name).join("vmm.log")
    }
    /// `profiles/<name>/run/vm.toml`.
    pub fn vm_config(&self, name: &str) -> PathBuf {
        self.run(name).join("vm.toml")
    }
    /// `profiles/<name>/snapshot/`.
    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.profile(name).join("snapshot")
    }
}

/// Replaces `path` with `data`: temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no parent", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Internal(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let what = || format!("cannot write {}", path.display());
    let mut f = File::create(&tmp).map_err(Error::io(what()))?;
    f.write_all(data).map_err(Error::io(what()))?;
    f.sync_all().map_err(Error::io(what()))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(Error::io(what()))?;
    sync_dir(dir)
}

/// fsyncs a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(format!("cannot sync {}", dir.display())))
}

/// Creates a sparse file of `size_mib` MiB (refuses to replace an existing one).
pub fn create_sparse(path: &Path, size_mib: u64) -> Result<()> {
    let what = || format!("cannot create disk {}", path.display());
    let f = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io(what()))?;
    f.set_len(size_mib << 20).map_err(Error::io(what()))?;
    f.sync_all().map_err(Error::io(what()))
}

/// Removes everything inside `dir` except the names in `keep` (the directory stays);
/// missing is fine.
pub fn clear_dir(dir: &Path, keep: &[&str]) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot read {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(Error::io(format!("cannot read {}", dir.display())))?;
        let p = entry.path();
        if keep.iter().any(|k| entry.file_name() == *k) {
            continue;
        }
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let r = if is_dir {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(Error::io(format!("cannot remove {}", p.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_sparse_disks() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.toml");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        let d = t.path().join("d.img");
        create_sparse(&d, 16).unwrap();
        let meta = std::fs::metadata(&d).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "not sparse");
        assert!(create_sparse(&d, 1).is_err());
        std::fs::create_dir(t.path().join("sub")).unwrap();
        clear_dir(t.path(), &["d.img"]).unwrap();
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        clear_dir(t.path(), &[]).unwrap();
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }

    #[test]
    fn layout() {
        let s = StateDir::new(Path::new("/s")).unwrap();
        assert_eq!(s.api_socket("w"), Path::new("/s/profiles/w/run/api.sock"));
        assert_eq!(
            s.disk("w", "data"),
            Path::new("/s/profiles/w/disks/data.img")
        );
        assert_eq!(s.snapshot("w"), Path::new("/s/profiles/w/snapshot"));
    }
}
