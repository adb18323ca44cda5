//! The jail's root directory `<jail-root>/<id>/root`: mount points prepared by the parent,
//! bind mounts and `pivot_root` done by the jailed child, removal by the parent.
//!
//! The bind mounts are made after the child's mount namespace is made private, so they never
//! appear on the host: there the jail is a tree of empty files and directories, which
//! [`JailRoot::remove`] deletes with `unlink`/`rmdir` only (never a recursive delete, which
//! could reach through a mount into a disk or a run directory).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::ptr;

use crate::{check, check_long, cpath, sys, Error, Result};

/// What a bind mount brings into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path (file, device node or directory).
    pub source: PathBuf,
    /// Absolute path inside the jail.
    pub target: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
    /// A directory (otherwise a file or device node).
    pub dir: bool,
    /// A device node: keeps device access (the other binds get `nodev`).
    pub device: bool,
}

/// One jail's directory, locked for as long as this value lives in the parent.
#[derive(Debug)]
pub struct JailRoot {
    dir: PathBuf,
    root: PathBuf,
    /// `flock`ed: a second vmm with the same id is refused.
    _lock: File,
    binds: Vec<Bind>,
    /// Files and directories this value created, in creation order.
    created: Vec<PathBuf>,
}

impl JailRoot {
    /// Creates `<jail_root>/<id>/root` (removing an empty stale tree a crashed run left) and
    /// locks `<jail_root>/<id>`; fails if another process holds that lock.
    pub fn create(jail_root: &Path, id: &str) -> Result<JailRoot> {
        crate::id::validate(id)?;
        if !jail_root.is_absolute() {
            return Err(Error::Invalid(format!(
                "the jail root {} must be an absolute path",
                jail_root.display()
            )));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(jail_root)
            .map_err(sys(format!("create {}", jail_root.display())))?;
        let dir = jail_root.join(id);
        let lock = loop {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(sys(format!("create {}", dir.display()))(e)),
            }
            let f = File::open(&dir).map_err(sys(format!("open {}", dir.display())))?;
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(Error::Invalid(format!(
                        "jail {id} is in use by another process ({} is locked)",
                        dir.display()
                    )));
                }
                return Err(sys(format!("lock {}", dir.display()))(e));
            }
            // The previous holder may have removed the directory between our open and lock.
            let same = fs::symlink_metadata(&dir)
                .ok()
                .zip(f.metadata().ok())
                .is_some_and(|(a, b)| a.dev() == b.dev() && a.ino() == b.ino());
            if same {
                break f;
            }
        };
        let root = dir.join("root");
        if root.exists() {
            tracing::warn!("removing the stale jail tree {}", root.display());
            remove_empty_tree(&root)?;
        }
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&root)
            .map_err(sys(format!("create {}", root.display())))?;
        Ok(JailRoot {
            dir,
            root,
            _lock: lock,
            binds: Vec::new(),
            created: Vec::new(),
        })
    }

    /// The jail's root directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<jail-root>/<id>`, which holds `root`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bind mounts planned so far.
    pub fn binds(&self) -> &[Bind] {
        &self.binds
    }

    /// Plans a bind mount of `bind.source` at `bind.target` and creates its mount point.
    pub fn add(&mut self, bind: Bind) -> Result<()> {
        let rel = relative(&bind.target)?;
        if self.binds.iter().any(|b| b.target == bind.target) {
            return Err(Error::Invalid(format!(
                "two things mounted at {} in the jail",
                bind.target.display()
            )));
        }
        let meta = fs::metadata(&bind.source).map_err(sys(format!(
            "cannot use {} in the jail",
            bind.source.display()
        )))?;
        if meta.is_dir() != bind.dir {
            return Err(Error::Invalid(format!(
                "{} is {}a directory",
                bind.source.display(),
                if meta.is_dir() { "" } else { "not " }
            )));
        }
        let point = self.root.join(rel);
        let mut missing = Vec::new();
        let mut p = point.parent();
        while let Some(d) = p {
            if d == self.root || d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            p = d.parent();
        }
        for d in missing.into_iter().rev() {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&d)
                .map_err(sys(format!("create {}", d.display())))?;
            self.created.push(d);
        }
        if bind.dir {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&point)
                .map_err(sys(format!("create {}", point.display())))?;
        } else {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&point)
                .map_err(sys(format!("create {}", point.display())))?;
        }
        self.created.push(point);
        self.binds.push(bind);
        Ok(())
    }

    /// In the jailed child, already in its own mount namespace: makes every mount private,
    /// bind-mounts the planned paths, `pivot_root`s into the jail (the old root is detached),
    /// makes the jail's own root read-only and changes directory to `/`.
    pub fn enter(&self) -> Result<()> {
        mount(None, Path::new("/"), libc::MS_REC | libc::MS_PRIVATE)
            .map_err(|e| context(e, "make mounts private"))?;
        mount(Some(&self.root), &self.root, libc::MS_BIND)?;
        for b in &self.binds {
            let point = self.root.join(relative(&b.target)?);
            mount(Some(&b.source), &point, libc::MS_BIND)?;
            let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC;
            if !b.device {
                flags |= libc::MS_NODEV;
            }
            if b.read_only {
                flags |= libc::MS_RDONLY;
            }
            mount(None, &point, flags)?;
        }
        let root = cpath(&self.root)?;
        // SAFETY: chdir with a valid NUL-terminated path.
        check(unsafe { libc::chdir(root.as_ptr()) }, "chdir into the jail")?;
        let dot = c".";
        // SAFETY: pivot_root with two valid NUL-terminated paths; stacking the old root on
        // the new one (".", ".") is the documented way to avoid a put_old directory.
        let r = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
        check_long(r, "pivot_root")?;
        // SAFETY: umount2 with a valid path; detaches the old root stacked on ".".
        let r = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
        check(r, "detach the old root")?;
        let slash = c"/";
        // SAFETY: chdir with a valid NUL-terminated path.
        check(unsafe { libc::chdir(slash.as_ptr()) }, "chdir /")?;
        mount(
            None,
            Path::new("/"),
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
        )
    }

    /// In the parent after the child has exited: deletes the mount points and directories
    /// this value created, then `<id>/root` and `<id>` themselves.
    pub fn remove(self) -> Result<()> {
        for p in self.created.iter().rev() {
            remove_entry(p)?;
        }
        remove_entry(&self.root)?;
        fs::remove_dir(&self.dir).map_err(sys(format!("remove {}", self.dir.display())))
    }
}

/// `target` without its leading `/`; refuses relative paths and `..`.
fn relative(target: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    let mut comps = target.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(Error::Invalid(format!(
            "jail path {} is not absolute",
            target.display()
        )));
    }
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            _ => {
                return Err(Error::Invalid(format!(
                    "jail path {} must not contain . or ..",
                    target.display()
                )))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(Error::Invalid(
            "nothing can be mounted on the jail's /".into(),
        ));
    }
    Ok(out)
}

/// Removes an empty regular file (a file mount point) or an empty directory.
fn remove_entry(p: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(sys(format!("stat {}", p.display()))(e)),
    };
    if meta.is_dir() {
        fs::remove_dir(p).map_err(sys(format!("remove {}", p.display())))
    } else if meta.is_file() && meta.len() == 0 {
        fs::remove_file(p).map_err(sys(format!("remove {}", p.display())))
    } else {
        Err(Error::Invalid(format!(
            "{} is not an empty mount point; left in place",
            p.display()
        )))
    }
}

/// Removes a stale jail tree made only of empty files and directories.
fn remove_empty_tree(p: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(p).map_err(sys(format!("stat {}", p.display())))?;
    if meta.is_dir() {
        for entry in fs::read_dir(p).map_err(sys(format!("read {}", p.display())))? {
            let entry = entry.map_err(sys(format!("read {}", p.display())))?;
            remove_empty_tree(&entry.path())?;
        }
    }
    remove_entry(p)
}

fn context(e: Error, what: &str) -> Error {
    match e {
        Error::Sys { source, .. } => Error::Sys {
            what: what.to_string(),
            source,
        },
        other => other,
    }
}

/// mount(2) without a file system type or data: binds and flag changes.
fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> Result<()> {
    let src = source.map(cpath).transpose()?;
    let tgt = cpath(target)?;
    // SAFETY: every pointer is a valid NUL-terminated string or null, which mount(2) accepts
    // for the source of a propagation or remount change and for the type and data.
    let r = unsafe {
        libc::mount(
            src.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            tgt.as_ptr(),
            ptr::null(),
            flags,
            ptr::null(),
        )
    };
    check(
        r,
        match source {
            Some(s) => format!("bind-mount {} at {}", s.display(), target.display()),
            None => format!("change mount flags of {}", target.display()),
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("jail-unit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn relative_paths_are_refused() {
        assert_eq!(relative(Path::new("/a/b")).unwrap(), PathBuf::from("a/b"));
        assert!(relative(Path::new("a/b")).is_err());
        assert!(relative(Path::new("/a/../b")).is_err());
        assert!(relative(Path::new("/")).is_err());
    }

    #[test]
    fn mount_points_are_created_and_removed() {
        let base = tmp("mp");
        let src = tmp("mp-src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("disk"), b"data").unwrap();
        let mut j = JailRoot::create(&base, "t1").unwrap();
        assert!(
            JailRoot::create(&base, "t1").is_err(),
            "second holder refused"
        );
        j.add(Bind {
            source: src.join("disk"),
            target: "/disks/0".into(),
            read_only: false,
            dir: false,
            device: false,
        })
        .unwrap();
        j.add(Bind {
            source: src.clone(),
            target: "/run/0".into(),
            read_only: false,
            dir: true,
            device: false,
        })
        .unwrap();
        let dup = Bind {
            source: src.join("disk"),
            target: "/disks/0".into(),
            read_only: true,
            dir: false,
            device: false,
        };
        assert!(j.add(dup).is_err());
        let wrong_kind = Bind {
            source: src.clone(),
            target: "/x".into(),
            read_only: true,
            dir: false,
            device: false,
        };
        assert!(j.add(wrong_kind).is_err());
        assert!(j.root().join("disks/0").is_file());
        assert!(j.root().join("run/0").is_dir());
        j.remove().unwrap();
        assert!(!base.join("t1").exists());
        assert_eq!(fs::read(src.join("disk")).unwrap(), b"data");
        fs::remove_dir_all(&src).unwrap();
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn stale_trees_are_cleared_but_never_data() {
        let base = tmp("stale");
        fs::create_dir_all(base.join("t2/root/disks")).unwrap();
        fs::write(base.join("t2/root/disks/0"), b"").unwrap();
        let j = JailRoot::create(&base, "t2").unwrap();
        assert!(!j.root().join("disks").exists());
        j.remove().unwrap();
        fs::create_dir_all(base.join("t3/root")).unwrap();
        fs::write(base.join("t3/root/precious"), b"not empty").unwrap();
        assert!(JailRoot::create(&base, "t3").is_err());
        assert_eq!(
            fs::read(base.join("t3/root/precious")).unwrap(),
            b"not empty"
        );
        fs::remove_dir_all(&base).unwrap();
    }
}
