//! Paths inside the state directory and crash-safe file writes.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pocketvisor";
/// Environment variable overriding the default state directory.
pub const STATE_DIR_ENV: &str = "POCKETVISOR_STATE_DIR";

/// File name of a profile's wrapped disk data key ([`StateDir::data_key`]).
pub const DATA_KEY_FILE: &str = "disk.key";

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
    /// `device.key` (wraps the profiles' disk keys for encryption at rest, owner only).
    pub fn device_key(&self) -> PathBuf {
        self.root.join("device.key")
    }
    /// `profiles/<name>/disk.key`: the profile's disk data key, wrapped under
    /// [`device_key`](Self::device_key) (only for a profile encrypted at rest).
    pub fn data_key(&self, name: &str) -> PathBuf {
        self.profile(name).join(DATA_KEY_FILE)
    }
    /// `profiles/<name>/lock.json`: whether the profile is locked, its passcode hash and its
    /// failed unlock attempts ([`crate::lock`]).
    pub fn lock_state(&self, name: &str) -> PathBuf {
        self.profile(name).join("lock.json")
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
    /// `cloud/`: this device's identity towards cloud hosts (`profile offload`): its
    /// certificate `cert.pem`, private key `key.pem`, the hosts' authority `ca.pem` and the
    /// migration key `migration.key`, put there by the administrator.
    pub fn cloud(&self) -> PathBuf {
        self.root.join("cloud")
    }
    /// `profiles/<name>/offloaded`: the cloud host an offloaded profile runs at (JSON).
    pub fn offload_marker(&self, name: &str) -> PathBuf {
        self.profile(name).join("offloaded")
    }
    /// `profiles/<name>/cloud-kept/`: while offloaded, the snapshot of the guest as it was
    /// at the switch (`migrate --keep`), the base its return starts from.
    pub fn cloud_kept(&self, name: &str) -> PathBuf {
        self.profile(name).join("cloud-kept")
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

/// What [`create_from_image`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedImage {
    /// The disk's size in MiB.
    pub size_mib: u64,
    /// The SHA-256 of the image's bytes as copied (lower-case hex).
    pub sha256: String,
}

/// Creates the disk `path` as a copy of the image `image` (refuses to replace an existing
/// disk): `size_mib` MiB, or with 0 the image's size rounded up to a MiB; a disk smaller than
/// its image is refused. Zero 4 KiB blocks are not written, so a sparse image stays sparse. The
/// image is opened without waiting (a FIFO or device is refused), hashed as it is copied,
/// and the disk is fsynced.
///
/// With `cipher` every sector of the image is encrypted on its way (zero blocks too: they are
/// data, and must read back as zeros; a last partial sector is padded with zeros); the disk
/// beyond the image stays a hole, which reads as noise until the guest writes it, as a fresh
/// dm-crypt device does. The hash is of the image's plaintext.
pub fn create_from_image(
    path: &Path,
    image: &Path,
    size_mib: u64,
    cipher: Option<&crate::disk_crypt::SectorCipher>,
) -> Result<CopiedImage> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    check_regular_file("disk image", image)?;
    let read_err = || format!("cannot read disk image {}", image.display());
    let mut src = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(image)
        .map_err(Error::io(read_err()))?;
    let meta = src.metadata().map_err(Error::io(read_err()))?;
    if !meta.is_file() {
        return Err(Error::BadRequest(format!(
            "disk image {} is not a regular file",
            image.display()
        )));
    }
    let image_mib = meta.len().div_ceil(1 << 20);
    let size_mib = match size_mib {
        0 => image_mib.max(1),
        n if n < image_mib => {
            return Err(Error::BadRequest(format!(
                "disk {} of {n} MiB is smaller than its image {} ({image_mib} MiB)",
                path.display(),
                image.display()
            )))
        }
        n => n,
    };
    let what = || format!("cannot create disk {}", path.display());
    let mut dst = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io(what()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    let started = std::time::Instant::now();
    let mut reported = 0u64;
    loop {
        let n = match cipher {
            None => src.read(&mut buf).map_err(Error::io(read_err()))?,
            // Whole buffers (whole sectors) but at the end.
            Some(_) => fill(&mut src, &mut buf).map_err(Error::io(read_err()))?,
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        match cipher {
            None => write_sparse(&mut dst, &buf[..n]).map_err(Error::io(what()))?,
            Some(c) => {
                use std::io::Write;
                let padded = n.next_multiple_of(crate::disk_crypt::SECTOR);
                buf[n..padded].fill(0);
                c.encrypt(&mut buf[..padded], copied / 512)?;
                dst.write_all(&buf[..padded]).map_err(Error::io(what()))?;
            }
        }
        copied += u64::try_from(n).map_err(|_| Error::Internal("read size".into()))?;
        if copied - reported >= 256 << 20 {
            reported = copied;
            tracing::info!(
                "copying {} into {}: {} of {} MiB, {} s",
                image.display(),
                path.display(),
                copied >> 20,
                meta.len() >> 20,
                started.elapsed().as_secs()
            );
        }
    }
    if copied != meta.len() {
        return Err(Error::BadRequest(format!(
            "disk image {} changed while it was copied",
            image.display()
        )));
    }
    dst.set_len(size_mib << 20).map_err(Error::io(what()))?;
    dst.sync_all().map_err(Error::io(what()))?;
    Ok(CopiedImage {
        size_mib,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Reads from `src` until `buf` is full or the file ends; returns the bytes read.
fn fill(src: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes `data` at `dst`'s position, seeking over its all-zero 4 KiB blocks (the file stays
/// sparse there), writing each run of other blocks at once.
fn write_sparse(dst: &mut File, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    const BLOCK: usize = 4096;
    let mut at = 0;
    while at < data.len() {
        let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
        let blocks = data[at..].chunks(BLOCK);
        let first_zero = zero(&data[at..data.len().min(at + BLOCK)]);
        let run: usize = blocks
            .take_while(|b| zero(b) == first_zero)
            .map(<[u8]>::len)
            .sum();
        if first_zero {
            dst.seek(SeekFrom::Current(
                i64::try_from(run).map_err(std::io::Error::other)?,
            ))?;
        } else {
            dst.write_all(&data[at..at + run])?;
        }
        at += run;
    }
    Ok(())
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
    fn a_disk_made_from_an_image_is_a_sparse_copy_with_its_hash() {
        use sha2::{Digest, Sha256};
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        // 3 MiB + 5 bytes: a boot sector, 2 MiB of zeros, a tail.
        let mut bytes = vec![0u8; (3 << 20) + 5];
        bytes[..512].fill(0x55);
        bytes[3 << 20..].copy_from_slice(b"tail!");
        let image = t.path().join("debian.raw");
        std::fs::write(&image, &bytes).unwrap();
        let want = hex::encode(Sha256::digest(&bytes));

        let d = t.path().join("system.img");
        let made = create_from_image(&d, &image, 0, None).unwrap();
        assert_eq!(
            made,
            CopiedImage {
                size_mib: 4,
                sha256: want.clone()
            }
        );
        let disk = std::fs::read(&d).unwrap();
        assert_eq!(disk.len(), 4 << 20);
        assert!(disk[..bytes.len()] == bytes[..]);
        assert!(disk[bytes.len()..].iter().all(|&b| b == 0));
        assert!(
            std::fs::metadata(&d).unwrap().blocks() * 512 <= 2 << 20,
            "not sparse"
        );
        // Larger on request; never smaller than the image, never over an existing disk.
        let big = t.path().join("big.img");
        assert_eq!(
            create_from_image(&big, &image, 64, None).unwrap().size_mib,
            64
        );
        assert_eq!(std::fs::metadata(&big).unwrap().len(), 64 << 20);
        let e = create_from_image(&t.path().join("s.img"), &image, 3, None).unwrap_err();
        assert!(e.to_string().contains("smaller than its image"), "{e}");
        assert!(!t.path().join("s.img").exists());
        assert!(create_from_image(&d, &image, 0, None).is_err());
        assert_eq!(std::fs::read(&d).unwrap(), disk);
        // A directory or a missing file is no image.
        let e = create_from_image(&t.path().join("x.img"), t.path(), 0, None).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e =
            create_from_image(&t.path().join("y.img"), &t.path().join("no"), 0, None).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn an_encrypted_copy_holds_only_ciphertext_of_every_sector() {
        use crate::disk_crypt::SectorCipher;
        let t = tempfile::tempdir().unwrap();
        // 1 MiB + 700 bytes: a marker, zeros, a partial last sector.
        let mut bytes = vec![0u8; (1 << 20) + 700];
        let marker = b"secret-marker-in-the-image";
        bytes[4096..4096 + marker.len()].copy_from_slice(marker);
        bytes[(1 << 20)..].fill(0x41);
        let image = t.path().join("img.raw");
        std::fs::write(&image, &bytes).unwrap();
        let key: [u8; 64] = std::array::from_fn(|i| u8::try_from(i * 3 + 1).unwrap());
        let d = t.path().join("enc.img");
        let plain = create_from_image(&t.path().join("plain.img"), &image, 4, None).unwrap();
        let made =
            create_from_image(&d, &image, 4, Some(&SectorCipher::new(&key).unwrap())).unwrap();
        assert_eq!(made, plain, "same size and plaintext hash");
        let disk = std::fs::read(&d).unwrap();
        assert_eq!(disk.len(), 4 << 20);
        assert!(!disk.windows(marker.len()).any(|w| w == marker));
        // Zero sectors of the image are encrypted too (they must read back as zeros).
        assert!(disk[512..1024].iter().any(|&b| b != 0));
        // The VMM's cipher reads the image back, the padded last sector as zeros after it.
        use devices::virtio::block::crypt as vmm;
        let c = vmm::SectorCipher::new(&vmm::DiskKey::from_slice(&key).unwrap());
        let mut back = disk[..(1 << 20) + 1024].to_vec();
        c.decrypt(&mut back, 0).unwrap();
        assert_eq!(&back[..bytes.len()], &bytes[..]);
        assert!(back[bytes.len()..].iter().all(|&b| b == 0));
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
