//! Lock and unlock (issue 12): a profile's lock state, `profiles/<name>/lock.json`, written
//! temp + fsync + rename: whether it is locked, its passcode (argon2id, [`crate::passcode`])
//! and the failed unlock attempts, whose count and time survive a daemon restart so that the
//! wait after failures ([`crate::passcode::wait_secs`]) cannot be reset by restarting it.
//!
//! A locked profile is paused (a running one by the lock, at once; one the daemon finds
//! running at its start, by the daemon) and cannot be started, resumed, unpaused, switched
//! to, captured, viewed, attached to, or reach a channel until it is unlocked with its
//! passcode (`Handset::unlock`, `daemon/lock.rs`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state_dir::{self, StateDir};

/// The state detail of a profile the lock paused.
pub const LOCK_PAUSED: &str = "locked";
/// The fewest characters of a passcode.
pub const PASSCODE_MIN: usize = 4;
/// The most bytes of a passcode.
pub const PASSCODE_MAX: usize = 1024;

/// `profiles/<name>/lock.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockState {
    /// Whether the profile is locked.
    #[serde(default)]
    pub locked: bool,
    /// The passcode's argon2id stored form ([`crate::passcode::hash`]), if one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passcode: Option<String>,
    /// Failed unlock attempts since the last success.
    #[serde(default)]
    pub failures: u32,
    /// When the last one failed (unix milliseconds).
    #[serde(default)]
    pub last_failure_ms: u64,
}

impl LockState {
    /// Milliseconds the next unlock attempt must still wait at `now_ms` (unix milliseconds;
    /// 0: it may be made).
    pub fn wait_left_ms(&self, now_ms: u64) -> u64 {
        let wait_ms = crate::passcode::wait_secs(self.failures).saturating_mul(1000);
        self.last_failure_ms
            .saturating_add(wait_ms)
            .saturating_sub(now_ms)
    }
}

/// The time now in unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The lock state of profile `name` (the default, unlocked and without passcode, when it has
/// none). A file that does not parse is an error: the profile counts as locked by callers
/// that ask [`is_locked`].
pub fn read(dir: &StateDir, name: &str) -> Result<LockState> {
    let path = dir.lock_state(name);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::Internal(format!("{} is not a lock state: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LockState::default()),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()))(e)),
    }
}

/// Replaces profile `name`'s lock state (temp + fsync + rename).
pub fn write(dir: &StateDir, name: &str, state: &LockState) -> Result<()> {
    let text = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::Internal(format!("lock state: {e}")))?;
    state_dir::write_atomic(&dir.lock_state(name), &text)
}

/// Whether profile `name` is locked; a lock state that cannot be read counts as locked (fail
/// closed).
pub fn is_locked(dir: &StateDir, name: &str) -> bool {
    read(dir, name).map(|s| s.locked).unwrap_or(true)
}

/// Refuses `what` on profile `name` while it is locked (403, saying how to unlock it).
pub fn check_unlocked(dir: &StateDir, name: &str, what: &str) -> Result<()> {
    if is_locked(dir, name) {
        return Err(Error::Denied(format!(
            "profile {name:?} is locked: {what} is refused until it is unlocked (`pocketvisor \
             profile unlock {name}`)"
        )));
    }
    Ok(())
}

/// Checks a new passcode's length.
pub fn check_passcode(passcode: &str) -> Result<()> {
    let n = passcode.chars().count();
    if n < PASSCODE_MIN || passcode.len() > PASSCODE_MAX {
        return Err(Error::BadRequest(format!(
            "a passcode is {PASSCODE_MIN} to {PASSCODE_MAX} bytes long, not {n} characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_a_damaged_one_counts_as_locked() {
        let t = tempfile::tempdir().unwrap();
        let dir = StateDir::new(t.path()).unwrap();
        std::fs::create_dir_all(dir.profile("w")).unwrap();
        assert_eq!(read(&dir, "w").unwrap(), LockState::default());
        assert!(!is_locked(&dir, "w"));
        assert!(check_unlocked(&dir, "w", "start").is_ok());
        let s = LockState {
            locked: true,
            passcode: Some("argon2id$...".into()),
            failures: 4,
            last_failure_ms: 1000,
        };
        write(&dir, "w", &s).unwrap();
        assert_eq!(read(&dir, "w").unwrap(), s);
        let e = check_unlocked(&dir, "w", "start").unwrap_err();
        assert!(matches!(e, Error::Denied(_)) && e.to_string().contains("unlock w"));
        std::fs::write(dir.lock_state("w"), b"{\"locked\": fals").unwrap();
        assert!(read(&dir, "w").is_err());
        assert!(is_locked(&dir, "w"));
    }

    #[test]
    fn the_wait_runs_from_the_last_failure() {
        let mut s = LockState::default();
        assert_eq!(s.wait_left_ms(0), 0);
        s.failures = 3;
        s.last_failure_ms = 100_000;
        assert_eq!(s.wait_left_ms(100_000), 1000);
        assert_eq!(s.wait_left_ms(100_999), 1);
        assert_eq!(s.wait_left_ms(101_000), 0);
        s.failures = 6;
        assert_eq!(s.wait_left_ms(100_000), 8000);
        assert_eq!(s.wait_left_ms(105_000), 3000);
        assert_eq!(s.wait_left_ms(500_000), 0);
        assert!(check_passcode("123").is_err());
        assert!(check_passcode("1234").is_ok());
        assert!(check_passcode(&"x".repeat(PASSCODE_MAX + 1)).is_err());
    }
}
