//! Paths inside the state directory and crash-safe file writes.

use std::fs::File;
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
    /// `assets/` (guest assets: the kernels and initrds specs may name, put there by the
    /// device's administrator).
    pub fn assets(&self) -> PathBuf {
        self.root.join("assets")
    }
    /// `assets/<file>` (`file` checked by [`crate::spec::check_asset`]).
    pub fn asset(&self, file: &str) -> PathBuf {
        self.assets().join(file)
    }
    /// `audit.key` (the key of the audit log's content digests, owner only).
    pub fn audit_key(&self) -> PathBuf {
        self.root.join("audit.key")
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
    /// `profiles/<name>/vm.toml` (outside `run/`, which a jailed VMM sees and may write: the
    /// VMM never sees its own configuration).
    pub fn vm_config(&self, name: &str) -> PathBuf {
        self.profile(name).join("vm.toml")
    }
    /// `exports/`: the records of exports under way ([`crate::exports`]).
    pub fn exports(&self) -> PathBuf {
        self.root.join("exports")
    }
    /// `profiles/<name>/intent` (the lifecycle step in progress, see the daemon's intent log).
    pub fn intent(&self, name: &str) -> PathBuf {
        self.profile(name).join("intent")
    }
    /// `profiles/<name>/snapshot/`.
    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.profile(name).join("snapshot")
    }
    /// `org.pub`: the organisation's policy key this handset trusts ([`crate::org_policy`]).
    pub fn org_key(&self) -> PathBuf {
        self.root.join("org.pub")
    }
    /// `profiles/<name>/policy.pvpol`: the signed policy in force for the profile, if any.
    pub fn policy(&self, name: &str) -> PathBuf {
        self.profile(name).join("policy.pvpol")
    }
    /// `profiles/<name>/moved`: written by an export that moved the profile away (the file
    /// it went to); while it exists the profile does not start or resume without `reclaim`.
    pub fn moved_marker(&self, name: &str) -> PathBuf {
        self.profile(name).join("moved")
    }
    /// `profiles/.deleting-<name>/`: a profile's directory between the first step of its
    /// delete (this rename) and the last (its removal); see [`crate::leftovers`].
    pub fn deleting(&self, name: &str) -> PathBuf {
        self.profiles()
            .join(format!("{}{name}", crate::leftovers::DELETING_PREFIX))
    }
}

/// Replaces `path` with `data`: temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    hostfs::write_atomic(path, data).map_err(Error::io(format!("cannot write {}", path.display())))
}

/// Creates `dir` (and its parents) if missing and makes it owner-only (mode 0700): the state
/// directory holds disks, snapshots, keys and the audit log of every profile.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("cannot create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(format!("cannot chmod {}", dir.display())))
}

/// fsyncs a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    hostfs::sync_dir(dir).map_err(Error::io(format!("cannot sync {}", dir.display())))
}

/// Checks that `path` is a regular file (after symlinks) without waiting on it (see
/// [`hostfs::open_regular`]); a missing file, a FIFO, device, socket or directory is refused
/// with an error naming `what`.
pub fn check_regular_file(what: &str, path: &Path) -> Result<()> {
    match hostfs::open_regular(path, false) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::BadRequest(format!(
            "{what} {} does not exist",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            Err(Error::BadRequest(format!("{what} {}: {e}", path.display())))
        }
        Err(e) => Err(Error::io(format!("cannot open {what} {}", path.display()))(
            e,
        )),
    }
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
    fn special_files_are_refused_without_waiting() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let file = t.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let link = t.path().join("l");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let t0 = std::time::Instant::now();
        for (p, kind) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a device"),
            (link.as_path(), "a device"),
            (t.path(), "a directory"),
        ] {
            let e = check_regular_file("initrd", p).unwrap_err().to_string();
            assert!(e.contains(kind) && e.contains("initrd"), "{e}");
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        check_regular_file("kernel", &file).unwrap();
        let e = check_regular_file("kernel", &t.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
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
