//! A cgroup v2 group for one jailed VMM: created if missing, controllers enabled in the
//! parent where possible, limits written, the child's pid moved in, removed at the end.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{cpath, sys, Error, Result};

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The controllers a VMM group wants.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// One cgroup v2 directory.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    /// Whether we made the directory (and so remove it at the end).
    created: bool,
}

impl Cgroup {
    /// Opens or creates the group at `path` (which must lie in a cgroup v2 hierarchy), enables
    /// `+cpu +memory +pids` in the parent's `cgroup.subtree_control` where the hierarchy
    /// offers them, and writes each `(file, value)` of `settings` (e.g. `memory.max`).
    pub fn setup(path: &Path, settings: &[(&str, String)]) -> Result<Cgroup> {
        let parent = path
            .parent()
            .filter(|_| path.is_absolute())
            .ok_or_else(|| {
                Error::Invalid(format!("cgroup {} is not an absolute path", path.display()))
            })?;
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(Error::Invalid(format!(
                "cgroup {} must not contain ..",
                path.display()
            )));
        }
        let mut created = false;
        if !path.exists() {
            // Parents that are missing are made too (they are cgroups of the same hierarchy).
            if !parent.exists() {
                if !is_cgroup2(nearest_existing(parent))? {
                    return Err(not_v2(path));
                }
                fs::create_dir_all(parent)
                    .map_err(sys(format!("create cgroup {}", parent.display())))?;
            }
            if !is_cgroup2(parent)? {
                return Err(not_v2(path));
            }
            enable_controllers(parent);
            fs::create_dir(path).map_err(sys(format!("create cgroup {}", path.display())))?;
            created = true;
        } else if !is_cgroup2(path)? {
            return Err(not_v2(path));
        } else {
            enable_controllers(parent);
        }
        let cg = Cgroup {
            path: path.to_path_buf(),
            created,
        };
        for (file, value) in settings {
            if let Err(e) = cg.write(file, value) {
                let _ = cg.remove();
                return Err(e);
            }
        }
        Ok(cg)
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The group's directory opened, for `clone3(CLONE_INTO_CGROUP)`.
    pub fn open_dir(&self) -> Result<std::fs::File> {
        std::fs::File::open(&self.path).map_err(sys(format!("open cgroup {}", self.path.display())))
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn join(&self, pid: libc::pid_t) -> Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// Writes `value` to the group's `file` (a plain name like `memory.max`).
    pub fn write(&self, file: &str, value: &str) -> Result<()> {
        if file.is_empty() || file.contains('/') || file.starts_with('.') {
            return Err(Error::Invalid(format!("bad cgroup file name {file:?}")));
        }
        let p = self.path.join(file);
        if !p.exists() {
            let controller = file.split('.').next().unwrap_or(file);
            let enabled = controllers(&self.path);
            return Err(Error::Invalid(format!(
                "cgroup {} has no {file}: the {controller} controller is not enabled there \
                 (enabled: {})",
                self.path.display(),
                if enabled.is_empty() {
                    "none".to_string()
                } else {
                    enabled.join(" ")
                }
            )));
        }
        fs::write(&p, value).map_err(sys(format!("write {value:?} to {}", p.display())))
    }

    /// Removes the group if this value created it, waiting up to a second for the exited
    /// processes to leave it.
    pub fn remove(&self) -> Result<()> {
        if !self.created {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(sys(format!("remove cgroup {}", self.path.display()))(e)),
            }
        }
    }
}

fn not_v2(path: &Path) -> Error {
    Error::Invalid(format!(
        "cgroup {} is not in a cgroup v2 hierarchy (mount type cgroup2)",
        path.display()
    ))
}

fn nearest_existing(mut p: &Path) -> &Path {
    while !p.exists() {
        match p.parent() {
            Some(up) => p = up,
            None => break,
        }
    }
    p
}

/// Whether `p` lies on a cgroup2 file system.
fn is_cgroup2(p: &Path) -> Result<bool> {
    let c = cpath(p)?;
    // SAFETY: statfs fills a zeroed struct it owns for the duration of the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a live statfs buffer.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    crate::check(r, format!("statfs {}", p.display()))?;
    Ok(st.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

/// Best effort: enables each wanted controller the parent offers in its subtree.
fn enable_controllers(parent: &Path) {
    let offered = fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
    for c in CONTROLLERS {
        if !offered.split_whitespace().any(|o| o == c) {
            tracing::info!("cgroup {}: no {c} controller here", parent.display());
            continue;
        }
        if let Err(e) = fs::write(parent.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::warn!("cgroup {}: cannot enable {c}: {e}", parent.display());
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted on this host (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from /proc/self/mountinfo.
pub fn v2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// The controllers the group at `path` offers (its `cgroup.controllers`).
pub fn controllers(path: &Path) -> Vec<String> {
    fs::read_to_string(path.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
