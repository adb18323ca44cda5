//! Where the VMM writes a replica's plaintext checkpoints, and how `cloud replicate` reads
//! them back. A jailed VMM sees only its run directory, which its uid owns and may fill with
//! links: it writes into a directory there (`run/replica/`, named to it by its jail path),
//! and every checkpoint is read back through directory descriptors opened without following
//! links, as regular files within [`MAX_CHECKPOINT`], never by a path the VMM could swap; they
//! go to the sealing as `/proc/self/fd/N`, the very files checked. Nothing there is chmod- or
//! chown-ed by path.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cloud::replica::MAX_CHECKPOINT;
use vmm::replica::FILES;

/// The prefix of a checkpoint directory's name.
pub const PREFIX: &str = "ckpt-";

/// The directory the VMM writes checkpoints into: open here, and as the VMM names it.
pub struct VmmDir {
    fd: OwnedFd,
    seen: PathBuf,
}

/// One checkpoint's files, opened and checked.
pub struct Opened {
    files: Vec<File>,
}

impl Opened {
    /// Where the sealing reads file `i` of [`FILES`]: the descriptor opened here.
    pub fn path(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.files[i].as_raw_fd()))
    }
}

fn cstr(name: &std::ffi::OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).context("a name with a NUL byte")
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC)`.
fn open_at(dir: RawFd, name: &std::ffi::OsStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: openat reads a NUL-terminated name that outlives the call; the returned fd is
    // new and owned by nobody else.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into `st`, which is valid and writable.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

impl VmmDir {
    /// Opens (creating, mode 0700) the directory `host`, which the VMM sees as `seen`, and
    /// removes the checkpoints an earlier run left there. With `give`, a directory created or
    /// found here is handed (fchown on its descriptor) to the owner of its parent, the jailed
    /// VMM's run directory; its own path components are never followed as links.
    pub fn open(host: &Path, seen: &Path, give: bool) -> Result<VmmDir> {
        let (Some(parent), Some(name)) = (host.parent(), host.file_name()) else {
            bail!("{}: not a directory's path", host.display());
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir = std::fs::File::open(parent)
            .with_context(|| format!("cannot open {}", parent.display()))?;
        let c = cstr(name)?;
        // SAFETY: mkdirat reads a NUL-terminated name that outlives the call.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e).with_context(|| format!("cannot create {}", host.display()));
            }
        }
        let fd = open_at(dir.as_raw_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY)
            .with_context(|| format!("{} is not a directory (or a link)", host.display()))?;
        if give {
            let owner = fstat(dir.as_raw_fd())?;
            let st = fstat(fd.as_raw_fd())?;
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid) {
                // SAFETY: fchown on a descriptor this function owns.
                if unsafe { libc::fchown(fd.as_raw_fd(), owner.st_uid, owner.st_gid) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("cannot hand {} to the VMM", host.display()));
                }
            }
        }
        let d = VmmDir {
            fd,
            seen: seen.to_path_buf(),
        };
        for e in d.names()? {
            if e.to_string_lossy().starts_with(PREFIX) {
                d.remove(&e);
            }
        }
        Ok(d)
    }

    /// What the VMM is told to create for checkpoint `name`.
    pub fn vmm_path(&self, name: &str) -> PathBuf {
        self.seen.join(name)
    }

    /// The names in the directory open at `fd`, read through that descriptor.
    fn names_in(fd: RawFd) -> Result<Vec<std::ffi::OsString>> {
        let path = format!("/proc/self/fd/{fd}");
        Ok(std::fs::read_dir(&path)
            .with_context(|| format!("cannot list {path}"))?
            .flatten()
            .map(|e| e.file_name())
            .collect())
    }

    fn names(&self) -> Result<Vec<std::ffi::OsString>> {
        Self::names_in(self.fd.as_raw_fd())
    }

    /// Opens the checkpoint `name` the VMM wrote: its [`FILES`], each a regular file (no
    /// link followed), all together at most [`MAX_CHECKPOINT`] bytes.
    pub fn open_checkpoint(&self, name: &str) -> Result<Opened> {
        let dir = open_at(
            self.fd.as_raw_fd(),
            name.as_ref(),
            libc::O_RDONLY | libc::O_DIRECTORY,
        )
        .with_context(|| format!("the VMM's checkpoint {name} is not a directory"))?;
        let mut files = Vec::with_capacity(FILES.len());
        let mut total = 0u64;
        for f in FILES {
            let fd = open_at(
                dir.as_raw_fd(),
                f.as_ref(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
            )
            .with_context(|| format!("the VMM's checkpoint {name} has no regular file {f}"))?;
            let st = fstat(fd.as_raw_fd())?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                bail!("the VMM's checkpoint {name}: {f} is not a regular file");
            }
            // A file the VMM wrote has no other name: a hard link to another file is refused.
            if st.st_nlink != 1 {
                bail!("the VMM's checkpoint {name}: {f} has {} links", st.st_nlink);
            }
            total = total.saturating_add(u64::try_from(st.st_size).unwrap_or(u64::MAX));
            files.push(File::from(fd));
        }
        if total > MAX_CHECKPOINT {
            bail!("the VMM's checkpoint {name} is {total} bytes, above the limit {MAX_CHECKPOINT}");
        }
        Ok(Opened { files })
    }

    /// Removes the checkpoint `name` (its files, then it), through descriptors; what is not
    /// a file the VMM wrote is left.
    pub fn remove(&self, name: &std::ffi::OsStr) {
        let Ok(dir) = open_at(
            self.fd.as_raw_fd(),
            name,
            libc::O_RDONLY | libc::O_DIRECTORY,
        ) else {
            // Not a directory: a file or link in its place is unlinked, never followed.
            let _ = unlink_at(self.fd.as_raw_fd(), name, 0);
            return;
        };
        for e in Self::names_in(dir.as_raw_fd()).unwrap_or_default() {
            let _ = unlink_at(dir.as_raw_fd(), &e, 0);
        }
        drop(dir);
        let _ = unlink_at(self.fd.as_raw_fd(), name, libc::AT_REMOVEDIR);
    }
}

fn unlink_at(dir: RawFd, name: &std::ffi::OsStr, flags: libc::c_int) -> Result<()> {
    let c = cstr(name)?;
    // SAFETY: unlinkat reads a NUL-terminated name that outlives the call.
    if unsafe { libc::unlinkat(dir, c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pv-vmmdir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write_checkpoint(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for f in FILES {
            std::fs::write(dir.join(f), f.as_bytes()).unwrap();
        }
    }

    #[test]
    fn a_checkpoint_is_read_through_descriptors_and_removed() {
        let d = scratch("ok");
        let host = d.join("replica");
        let v = VmmDir::open(&host, Path::new("/run/7/replica"), false).unwrap();
        assert_eq!(v.vmm_path("ckpt-1"), Path::new("/run/7/replica/ckpt-1"));
        write_checkpoint(&host.join("ckpt-1"));
        let o = v.open_checkpoint("ckpt-1").unwrap();
        for (i, f) in FILES.iter().enumerate() {
            assert_eq!(std::fs::read(o.path(i)).unwrap(), f.as_bytes());
        }
        drop(o);
        v.remove("ckpt-1".as_ref());
        assert_eq!(std::fs::read_dir(&host).unwrap().count(), 0);
        // What an earlier run left is swept when opened again.
        write_checkpoint(&host.join("ckpt-9"));
        let _v = VmmDir::open(&host, Path::new("/x"), false).unwrap();
        assert_eq!(std::fs::read_dir(&host).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn links_a_vmm_places_are_not_followed() {
        let d = scratch("links");
        let secret = d.join("secret");
        std::fs::write(&secret, b"host secret").unwrap();
        let outside = d.join("outside");
        write_checkpoint(&outside.join("ckpt-1"));
        // The whole directory a link: refused.
        let run = d.join("run");
        std::fs::create_dir_all(&run).unwrap();
        symlink(&outside, run.join("replica")).unwrap();
        assert!(VmmDir::open(&run.join("replica"), Path::new("/r"), false).is_err());
        std::fs::remove_file(run.join("replica")).unwrap();
        let host = run.join("replica");
        let v = VmmDir::open(&host, Path::new("/r"), false).unwrap();
        // A checkpoint directory that is a link, and a file that is a link: refused.
        symlink(outside.join("ckpt-1"), host.join("ckpt-1")).unwrap();
        assert!(v.open_checkpoint("ckpt-1").is_err());
        write_checkpoint(&host.join("ckpt-2"));
        std::fs::remove_file(host.join("ckpt-2").join(FILES[2])).unwrap();
        symlink(&secret, host.join("ckpt-2").join(FILES[2])).unwrap();
        let e = v.open_checkpoint("ckpt-2").err().unwrap();
        assert!(format!("{e:#}").contains("no regular file"), "{e:#}");
        // A hard link to a file of the host (one it could name) is refused too.
        write_checkpoint(&host.join("ckpt-4"));
        std::fs::remove_file(host.join("ckpt-4").join(FILES[0])).unwrap();
        std::fs::hard_link(&secret, host.join("ckpt-4").join(FILES[0])).unwrap();
        let e = v.open_checkpoint("ckpt-4").err().unwrap();
        assert!(format!("{e:#}").contains("2 links"), "{e:#}");
        // A FIFO is not read (nor waited on).
        write_checkpoint(&host.join("ckpt-3"));
        let fifo = host.join("ckpt-3").join(FILES[1]);
        std::fs::remove_file(&fifo).unwrap();
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = v.open_checkpoint("ckpt-3").err().unwrap();
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
        // Removing them removes the links, never what they point to.
        for n in ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"] {
            v.remove(n.as_ref());
        }
        assert_eq!(std::fs::read_dir(&host).unwrap().count(), 0);
        assert_eq!(std::fs::read(&secret).unwrap(), b"host secret");
        assert_eq!(
            std::fs::read_dir(outside.join("ckpt-1")).unwrap().count(),
            4
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
