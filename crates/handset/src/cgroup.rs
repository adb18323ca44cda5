//! One cgroup per running profile: CPU weight (foreground/background) and a memory limit.
//!
//! cgroup v2 is preferred (`<mount>/<parent>/<profile>` with `cpu.weight` and `memory.max`,
//! the cpu and memory controllers enabled in the parents' `cgroup.subtree_control`). On a
//! hybrid host whose cpu and memory controllers are bound to cgroup v1, the v1 equivalents
//! are used (`cpu.shares` = weight * 1024 / 100, `memory.limit_in_bytes`). If neither can be
//! written the daemon records why and runs without.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The prefix of the default parent group's name under the cgroup mount.
pub const DEFAULT_PARENT: &str = "pocketvisor";

/// The default parent group of the daemon of `state_dir`: `pocketvisor-` and 8 hex digits of
/// the SHA-256 of its absolute path, so two daemons (two state directories) never share a
/// profile's group.
pub fn default_parent(state_dir: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let abs = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = Sha256::digest(abs.as_os_str().as_encoded_bytes());
    format!("{DEFAULT_PARENT}-{}", hex::encode(&digest[..4]))
}

/// Which cgroup interface is in use.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// cgroup v2: `dir` is the parent group.
    V2 {
        /// The parent group (`<mount>/<parent>`).
        dir: PathBuf,
    },
    /// cgroup v1 cpu and memory hierarchies.
    V1 {
        /// `<cpu mount>/<parent>`.
        cpu: PathBuf,
        /// `<memory mount>/<parent>`.
        memory: PathBuf,
    },
    /// No cgroups; the reason.
    Disabled {
        /// Why cgroups are not used.
        reason: String,
    },
}

/// What the API reports about cgroups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupInfo {
    /// `v2`, `v1` or `none`.
    pub mode: String,
    /// The parent group directory (v2) or the cpu hierarchy's (v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Why cgroups are not used (mode `none`), or which fallback was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(Error::io(format!("cannot write {}", path.display())))
}

fn mkdir(path: &Path) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("cannot create {}", path.display()))(e)),
    }
}

/// Removes a group directory, retrying briefly while an exiting process still sits in it.
fn rmdir(path: &Path) -> Result<()> {
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => return Err(Error::io(format!("cannot remove {}", path.display()))(e)),
        }
    }
    Err(Error::Internal(format!(
        "{} is still busy after 1 s",
        path.display()
    )))
}

/// The cgroup v1 `cpu.shares` for a v2 `cpu.weight` (100 <-> 1024).
pub fn weight_to_shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

impl Cgroups {
    /// Finds a usable cgroup interface under `/sys/fs/cgroup` and creates the parent group.
    pub fn detect(parent: &str) -> Self {
        Self::detect_at(Path::new("/sys/fs/cgroup"), parent)
    }

    /// [`Cgroups::detect`] with another cgroup file system root (for tests).
    pub fn detect_at(root: &Path, parent: &str) -> Self {
        let mut notes = Vec::new();
        for mount in [root.to_path_buf(), root.join("unified")] {
            match Self::try_v2(&mount, parent) {
                Ok(c) => return c,
                Err(e) => notes.push(format!("v2 at {}: {e}", mount.display())),
            }
        }
        match Self::try_v1(root, parent) {
            Ok(c) => {
                tracing::info!("cgroup v2 unusable ({}); using cgroup v1", notes.join("; "));
                c
            }
            Err(e) => {
                notes.push(format!("v1: {e}"));
                let reason = notes.join("; ");
                tracing::warn!("running without cgroups: {reason}");
                Cgroups::Disabled { reason }
            }
        }
    }

    fn try_v2(mount: &Path, parent: &str) -> Result<Self> {
        let controllers = std::fs::read_to_string(mount.join("cgroup.controllers"))
            .map_err(Error::io("not a cgroup v2 mount"))?;
        for c in ["cpu", "memory"] {
            if !controllers.split_whitespace().any(|x| x == c) {
                return Err(Error::Internal(format!("no {c} controller")));
            }
        }
        write(&mount.join("cgroup.subtree_control"), "+cpu +memory")?;
        let dir = mount.join(parent);
        mkdir(&dir)?;
        write(&dir.join("cgroup.subtree_control"), "+cpu +memory")?;
        Ok(Cgroups::V2 { dir })
    }

    fn try_v1(root: &Path, parent: &str) -> Result<Self> {
        let cpu = root.join("cpu");
        let memory = root.join("memory");
        if !cpu.join("cpu.shares").is_file() || !memory.join("memory.limit_in_bytes").is_file() {
            return Err(Error::Internal("no cpu and memory v1 hierarchies".into()));
        }
        let (cpu, memory) = (cpu.join(parent), memory.join(parent));
        mkdir(&cpu)?;
        mkdir(&memory)?;
        Ok(Cgroups::V1 { cpu, memory })
    }

    /// For the API.
    pub fn info(&self) -> CgroupInfo {
        match self {
            Cgroups::V2 { dir } => CgroupInfo {
                mode: "v2".into(),
                path: Some(dir.display().to_string()),
                note: None,
            },
            Cgroups::V1 { cpu, .. } => CgroupInfo {
                mode: "v1".into(),
                path: Some(cpu.display().to_string()),
                note: Some(
                    "cgroup v2 has no cpu/memory controllers here; cpu.shares = weight*1024/100"
                        .into(),
                ),
            },
            Cgroups::Disabled { reason } => CgroupInfo {
                mode: "none".into(),
                path: None,
                note: Some(reason.clone()),
            },
        }
    }

    /// The file holding `profile`'s CPU weight (`cpu.weight` or `cpu.shares`), if any.
    pub fn weight_file(&self, profile: &str) -> Option<PathBuf> {
        match self {
            Cgroups::V2 { dir } => Some(dir.join(profile).join("cpu.weight")),
            Cgroups::V1 { cpu, .. } => Some(cpu.join(profile).join("cpu.shares")),
            Cgroups::Disabled { .. } => None,
        }
    }

    /// The profile's group directories.
    pub fn group_dirs(&self, profile: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { dir } => vec![dir.join(profile)],
            Cgroups::V1 { cpu, memory } => vec![cpu.join(profile), memory.join(profile)],
            Cgroups::Disabled { .. } => vec![],
        }
    }

    /// Creates `profile`'s group with its memory limit and CPU weight, and moves `pid` in.
    pub fn enter(&self, profile: &str, pid: i32, memory_max_mib: u64, weight: u32) -> Result<()> {
        let bytes = (memory_max_mib << 20).to_string();
        match self {
            Cgroups::V2 { dir } => {
                let g = dir.join(profile);
                mkdir(&g)?;
                write(&g.join("memory.max"), &bytes)?;
                write(&g.join("cpu.weight"), &weight.to_string())?;
                write(&g.join("cgroup.procs"), &pid.to_string())
            }
            Cgroups::V1 { cpu, memory } => {
                let (c, m) = (cpu.join(profile), memory.join(profile));
                mkdir(&c)?;
                mkdir(&m)?;
                write(&m.join("memory.limit_in_bytes"), &bytes)?;
                write(&c.join("cpu.shares"), &weight_to_shares(weight).to_string())?;
                write(&c.join("cgroup.procs"), &pid.to_string())?;
                write(&m.join("cgroup.procs"), &pid.to_string())
            }
            Cgroups::Disabled { .. } => Ok(()),
        }
    }

    /// Moves one more process into `profile`'s existing group.
    pub fn add_pid(&self, profile: &str, pid: i32) -> Result<()> {
        let dirs = self.group_dirs(profile);
        for d in dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Sets `profile`'s CPU weight.
    pub fn set_weight(&self, profile: &str, weight: u32) -> Result<()> {
        match self {
            Cgroups::V2 { dir } => {
                write(&dir.join(profile).join("cpu.weight"), &weight.to_string())
            }
            Cgroups::V1 { cpu, .. } => write(
                &cpu.join(profile).join("cpu.shares"),
                &weight_to_shares(weight).to_string(),
            ),
            Cgroups::Disabled { .. } => Ok(()),
        }
    }

    /// Removes `profile`'s group (its processes must have exited).
    pub fn remove(&self, profile: &str) -> Result<()> {
        for d in self.group_dirs(profile) {
            rmdir(&d)?;
        }
        Ok(())
    }

    /// Removes the parent group if it is empty (a non-default parent at daemon exit).
    pub fn remove_parent(&self) {
        let dirs = match self {
            Cgroups::V2 { dir } => vec![dir.clone()],
            Cgroups::V1 { cpu, memory } => vec![cpu.clone(), memory.clone()],
            Cgroups::Disabled { .. } => vec![],
        };
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_state_directory_has_its_own_default_parent() {
        let a = default_parent(std::path::Path::new("/var/lib/pocketvisor"));
        let b = default_parent(std::path::Path::new("/tmp/hs"));
        assert_ne!(a, b);
        assert_eq!(
            a,
            default_parent(std::path::Path::new("/var/lib/pocketvisor"))
        );
        assert!(
            a.starts_with("pocketvisor-") && a.len() == "pocketvisor-".len() + 8,
            "{a}"
        );
        assert!(!a.contains('/'));
    }

    #[test]
    fn shares_follow_weights() {
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(weight_to_shares(1000), 10240);
        assert_eq!(weight_to_shares(1), 10);
    }

    #[test]
    fn fake_v2_tree_gets_limits() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.controllers"), "cpu io memory pids").unwrap();
        let cg = Cgroups::detect_at(t.path(), "pv");
        let Cgroups::V2 { dir } = &cg else {
            panic!("not v2: {cg:?}")
        };
        assert_eq!(
            std::fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory"
        );
        cg.enter("work", 1234, 256, 1000).unwrap();
        let g = dir.join("work");
        assert_eq!(
            std::fs::read_to_string(g.join("memory.max")).unwrap(),
            "268435456"
        );
        assert_eq!(
            std::fs::read_to_string(g.join("cgroup.procs")).unwrap(),
            "1234"
        );
        cg.set_weight("work", 100).unwrap();
        assert_eq!(
            std::fs::read_to_string(cg.weight_file("work").unwrap()).unwrap(),
            "100"
        );
    }

    #[test]
    fn nothing_usable_is_disabled_with_a_reason() {
        let t = tempfile::tempdir().unwrap();
        let cg = Cgroups::detect_at(t.path(), "pv");
        let Cgroups::Disabled { reason } = cg else {
            panic!("expected disabled")
        };
        assert!(reason.contains("v1"), "{reason}");
    }
}
