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
