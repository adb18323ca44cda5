//! Named kill points for crash tests.
//!
//! Each step of a lifecycle operation that changes files or the registry calls
//! [`kill_point`] with a name (`"delete-renamed"`, `"export-marked"`, ...). When the
//! environment variable `POCKETVISOR_KILL_AT` names that point, the process sends itself
//! SIGKILL there: exactly what a power cut or `kill -9` at that moment does (no destructor,
//! no flush). The crash tests run the daemon and the CLI with each point in turn and check
//! that the next run finishes or rolls back the step. Unset (always, outside the tests), a
//! kill point costs one environment lookup.

/// The variable naming the kill point(s): one name, or several separated by commas.
pub const KILL_AT_VAR: &str = "POCKETVISOR_KILL_AT";

/// Dies (SIGKILL to ourselves) if `POCKETVISOR_KILL_AT` names `point`.
pub fn kill_point(point: &str) {
    let Some(wanted) = std::env::var_os(KILL_AT_VAR) else {
        return;
    };
    let hit = wanted
        .to_str()
        .is_some_and(|w| w.split(',').any(|p| p.trim() == point));
    if hit {
        tracing::warn!("{KILL_AT_VAR}: killing this process at {point}");
        // SAFETY: kill(2) on our own pid; SIGKILL ends the process here.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// The variable naming a hold point and its flag file: `POINT:PATH`.
pub const HOLD_AT_VAR: &str = "POCKETVISOR_HOLD_AT";

/// Holds the step at `point` while a test acts on the world (fills the disk, ...): if
/// `POCKETVISOR_HOLD_AT` is `point:PATH`, creates `PATH` and waits until the test removes it
/// (at most 60 s). Unset (always, outside the tests), a hold point costs one environment
/// lookup.
pub async fn hold_point(point: &str) {
    let Some(wanted) = std::env::var_os(HOLD_AT_VAR) else {
        return;
    };
    let Some((p, flag)) = wanted.to_str().and_then(|w| w.split_once(':')) else {
        return;
    };
    if p != point {
        return;
    }
    tracing::warn!("{HOLD_AT_VAR}: holding at {point} until {flag} is removed");
    if std::fs::write(flag, point).is_err() {
        return;
    }
    for _ in 0..6000 {
        if !std::path::Path::new(flag).exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
