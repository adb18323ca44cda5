//! The policy in force for one profile: one signed envelope file, replaced atomically.
//!
//! The file is the envelope exactly as the organisation signed it, so it is verified again
//! at every read: a file changed on disk is refused, never half-trusted. [`apply`] is all or
//! nothing: the new envelope is verified and checked (profile, expiry, version above the one
//! in force), written to a temporary file, fsynced and renamed over the old one (and the
//! directory fsynced), under an exclusive lock so two applies cannot interleave. A refused
//! policy, or a crash at any point, leaves the old policy in force.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::envelope::{self, Verified, MAX_ENVELOPE};
use crate::keys::OrgPublicKey;
use crate::{PolicyError, Result};

/// What [`apply`] did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The policy now in force.
    pub policy: Verified,
    /// The version it replaced, if any.
    pub replaced: Option<u64>,
    /// False when this exact envelope was already in force (nothing was written).
    pub changed: bool,
}

/// Reads and verifies the policy in force at `file` for `profile`; `None` when there is none.
/// A file that fails verification, or names another profile, is an error (fail closed).
pub fn read_in_force(file: &Path, profile: &str, key: &OrgPublicKey) -> Result<Option<Verified>> {
    let bytes = match read_bounded(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PolicyError::io(format!("cannot read {}", file.display()))(
                e,
            ))
        }
    };
    let verified = envelope::verify(&bytes, key).map_err(|e| {
        PolicyError::Signature(format!(
            "the policy in force at {} fails verification ({e})",
            file.display()
        ))
    })?;
    if verified.policy.profile != profile {
        return Err(PolicyError::Document(format!(
            "the policy in force at {} is for profile {:?}, not {profile:?}",
            file.display(),
            verified.policy.profile
        )));
    }
    Ok(Some(verified))
}

/// Verifies `envelope` under `key` and makes it the policy in force at `file` for `profile`,
/// if it is for that profile, unexpired at `now` (unix seconds) and newer than the policy in
/// force. Refused: nothing changes.
pub fn apply(
    file: &Path,
    profile: &str,
    key: &OrgPublicKey,
    envelope_bytes: &[u8],
    now: u64,
) -> Result<Applied> {
    let offered = envelope::verify(envelope_bytes, key)?;
    let p = &offered.policy;
    if p.profile != profile {
        return Err(PolicyError::Document(format!(
            "policy version {} is for profile {:?}, not {profile:?}",
            p.version, p.profile
        )));
    }
    if let Some(expires_at) = p.expires_at.filter(|_| p.is_expired(now)) {
        return Err(PolicyError::Expired {
            version: p.version,
            expires_at,
            now,
        });
    }
    let lock_file = file.with_file_name(".policy.lock");
    let _lock = lock(&lock_file)?;
    let current = read_in_force(file, profile, key)?;
    if let Some(cur) = &current {
        if cur.envelope == offered.envelope {
            return Ok(Applied {
                replaced: Some(cur.policy.version),
                policy: offered,
                changed: false,
            });
        }
        if offered.policy.version <= cur.policy.version {
            return Err(PolicyError::Rollback {
                offered: offered.policy.version,
                in_force: cur.policy.version,
            });
        }
    }
    write_atomic(file, &offered.envelope)?;
    Ok(Applied {
        replaced: current.map(|c| c.policy.version),
        policy: offered,
        changed: true,
    })
}

/// Reads at most [`MAX_ENVELOPE`] + 1 bytes (more is refused by verification).
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(u64::try_from(MAX_ENVELOPE + 1).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// An exclusive `flock` on `path`, released when the file is dropped.
fn lock(path: &Path) -> Result<File> {
    let what = || format!("cannot lock {}", path.display());
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(PolicyError::io(what()))?;
    // SAFETY: flock on a file descriptor we own for the duration of the call; no memory is
    // passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(PolicyError::io(what())(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Writes `data` to a temporary file next to `path`, fsyncs it, renames it over `path` and
/// fsyncs the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    hostfs::write_atomic(path, data)
        .map_err(PolicyError::io(format!("cannot write {}", path.display())))
}
