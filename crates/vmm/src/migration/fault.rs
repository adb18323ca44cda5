//! Named kill points for the migration crash tests (the same convention as the handset's:
//! `POCKETVISOR_KILL_AT` names one or more points, comma separated).
//!
//! Source: `migrate-disk` (the disks sent whole, no page yet), `migrate-round` (after the
//! first round), `migrate-stop-copy` (paused, last pages
//! sent, state not yet), `migrate-committed` (after `Commit`). Destination: `receive-disk`
//! (after writing the first `Disk` frame into the temporary file), `receive-round` (after
//! acknowledging a round), `receive-state` (the state arrived, nothing built yet),
//! `receive-committed` (after the source's `Commit`, before answering `Running`). A cloud
//! host's proxy of a return: `relay-rounds` (once 64 KiB of the twin's migration went to the
//! device: the first round under way). A replica: `checkpoint-live` (the VMM, an incremental
//! checkpoint's live copy written, nothing paused yet), `replica-store` (the cloud host's connection
//! process, once a piece of a checkpoint after a chain's first is in its temporary file). When the
//! variable names the point the process sends itself SIGKILL there, as `kill -9` would.
//! Unset (always, outside the tests), a point costs one environment lookup.

/// The variable naming the kill point(s).
pub const KILL_AT_VAR: &str = "POCKETVISOR_KILL_AT";

/// Dies (SIGKILL to ourselves) if `POCKETVISOR_KILL_AT` names `point`.
pub fn kill_point(point: &str) {
    let Some(wanted) = std::env::var_os(KILL_AT_VAR) else {
        return;
    };
    if wanted
        .to_str()
        .is_some_and(|w| w.split(',').any(|p| p.trim() == point))
    {
        tracing::warn!("{KILL_AT_VAR}: killing this process at {point}");
        // SAFETY: kill(2) on our own pid; SIGKILL ends the process here.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        // Still here: the first process of a pid namespace (a jailed VMM) does not take a
        // signal it has no handler for from itself. It ends at once all the same, with the
        // status its jailer gives a SIGKILL (128 + 9), running no destructor.
        // SAFETY: _exit(2) ends the process; nothing runs after it.
        unsafe { libc::_exit(128 + libc::SIGKILL) };
    }
}
