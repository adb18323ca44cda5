//! The intent log: a lifecycle step that changes files and a VMM together (suspend, resume,
//! stop) first writes `profiles/<name>/intent` (fsynced), and removes it once the registry
//! holds the outcome. A daemon that dies in between finds the file at its next start and
//! finishes the step or rolls it back ([`Handset::finish_intent`]), so the profile ends in a
//! state its files agree with: never a cold boot while a complete snapshot waits on disk,
//! never a suspended profile without its snapshot.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmm_api::Request;

use super::lifecycle::Event;
use super::{Handset, SNAPSHOT_TIMEOUT};
use crate::api_types::ProfileState;
use crate::error::{Error, Result};
use crate::state_dir;
use crate::vmm_proc;

/// A step recorded before it acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intent {
    /// Snapshot the VM, end the VMM, record `suspended`.
    Suspend,
    /// Launch a VMM restoring the snapshot, drop the snapshot once it answers.
    Resume,
    /// End the VMM, record `stopped`.
    Stop,
    /// Migrate the VM to a cloud host, record where, end the VMM, record `offloaded`.
    Offload,
    /// Launch a VMM receiving the guest back from the cloud host; once it runs, drop the
    /// kept copy and the record of where it was.
    Return,
}

impl Intent {
    fn as_str(self) -> &'static str {
        match self {
            Intent::Suspend => "suspend",
            Intent::Resume => "resume",
            Intent::Stop => "stop",
            Intent::Offload => "offload",
            Intent::Return => "return",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "suspend" => Some(Intent::Suspend),
            "resume" => Some(Intent::Resume),
            "stop" => Some(Intent::Stop),
            "offload" => Some(Intent::Offload),
            "return" => Some(Intent::Return),
            _ => None,
        }
    }
}

/// Whether `dir` holds a snapshot whose writer finished (its `COMPLETE` marker).
fn complete(dir: &Path) -> bool {
    dir.join(vmm_api::snapshot_files::COMPLETE_FILE).is_file()
}

impl Handset {
    /// Records that `intent` is about to act on `name` (durably, before anything changes).
    /// A running replication ends first: every step that has an intent ends or replaces the
    /// VMM it checkpoints.
    pub(super) fn begin_intent(&self, name: &str, intent: Intent) -> Result<()> {
        self.halt_replication(name);
        state_dir::write_atomic(&self.dir().intent(name), intent.as_str().as_bytes())
    }

    /// Removes the record once the registry holds the outcome.
    pub(super) fn end_intent(&self, name: &str) {
        let path = self.dir().intent(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                let _ = state_dir::sync_dir(&self.dir().profile(name));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!("cannot remove {}: {e}", path.display()),
        }
    }

    /// Before a lifecycle step (ops lock held): a step this daemon could not record after
    /// its VMM ended (the registry write failed, e.g. on a full disk) left its intent and a
    /// registry that still says the VMM runs. It is finished or rolled back now, as at a
    /// daemon start, so the normal commands recover every state the registry can hold. An
    /// intent whose VMM still lives is left to the step itself (a repeated stop ends it).
    /// Returns the state it settled the profile in, if it did.
    pub(super) async fn settle_pending(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Option<ProfileState>> {
        if !self.dir().intent(name).exists() {
            return Ok(None);
        }
        let pid = self.registry.row(name)?.pid.unwrap_or(0);
        let api = self.dir().api_socket(name);
        if pid > 0 && vmm_proc::is_our_vmm(pid, &self.opts.vmm_bin, &api) {
            return Ok(None);
        }
        if !self.finish_intent(name).await? {
            return Ok(None);
        }
        Ok(Some(ProfileState::parse(&self.registry.row(name)?.state)))
    }

    /// At daemon start, before adoption: finishes or rolls back the step an earlier daemon
    /// left half done on `name` (ops lock held). Returns whether the profile was settled here
    /// (the caller then leaves it alone).
    pub(super) async fn finish_intent(self: &Arc<Self>, name: &str) -> Result<bool> {
        let path = self.dir().intent(name);
        let intent = match std::fs::read_to_string(&path) {
            Ok(t) => Intent::parse(&t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()))(e)),
        };
        let row = self.registry.row(name)?;
        let state = ProfileState::parse(&row.state);
        let api = self.dir().api_socket(name);
        let pid = row.pid.unwrap_or(0);
        let alive = vmm_proc::is_our_vmm(pid, &self.opts.vmm_bin, &api);
        let snap = self.dir().snapshot(name);
        let staged = self.dir().run(name).join("snapshot");
        let live = matches!(state, ProfileState::Running | ProfileState::Paused);
        let settled = match intent {
            Some(Intent::Suspend) if live => {
                if alive {
                    // The VMM may still be writing: its answer to a request comes after the
                    // snapshot (requests are served one at a time).
                    let _ = vmm_proc::call(&api, &Request::Stats, SNAPSHOT_TIMEOUT).await;
                }
                if !complete(&snap) && complete(&staged) {
                    let _ = std::fs::remove_dir_all(&snap);
                    std::fs::rename(&staged, &snap)
                        .map_err(Error::io(format!("cannot move {}", staged.display())))?;
                }
                if complete(&snap) {
                    // Finish: the guest is in the snapshot; its VMM (paused) ends.
                    if alive {
                        end_process(pid).await;
                    }
                    self.cleanup_run(name);
                    self.registry.apply(
                        name,
                        Event::Suspended,
                        None,
                        "suspend finished after restart",
                    )?;
                    self.registry
                        .event(name, "suspended", "finished after a daemon restart");
                    true
                } else {
                    // Roll back: the guest runs on (a failed snapshot resumes it) or is lost.
                    for d in [&snap, &staged] {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    self.registry
                        .event(name, "suspend-rolled-back", "no complete snapshot");
                    false
                }
            }
            Some(Intent::Resume) if live && !alive && complete(&snap) => {
                // Roll back: the restored VMM is gone before it was known to run; the
                // snapshot is the guest.
                self.cleanup_run(name);
                self.registry
                    .apply(name, Event::Suspended, None, "resume rolled back")?;
                self.registry.event(
                    name,
                    "resume-rolled-back",
                    "the restored VMM did not survive",
                );
                true
            }
            Some(Intent::Resume) if live && alive => {
                // Finish: the restored VM runs (adopted by the caller); the snapshot goes.
                let _ = std::fs::remove_dir_all(&snap);
                false
            }
            Some(Intent::Stop) if live => {
                // Finish: the user asked for the VMM to end.
                if alive {
                    end_process(pid).await;
                }
                self.cleanup_run(name);
                self.registry
                    .apply(name, Event::Stopped, None, "stop finished after restart")?;
                self.registry
                    .event(name, "stopped", "finished after a daemon restart");
                true
            }
            // Finish: the guest runs at the cloud host (where was recorded once it did) and
            // its VMM here ended. Without that record the offload failed or never finished
            // (the VMM's end is then handled as any other).
            Some(Intent::Offload) if live && !alive => self.finish_offload(name, state)?,
            // A return an earlier daemon left: its VMM is waited for and adopted once the
            // guest runs here, or the profile stays offloaded.
            Some(Intent::Return) if state == ProfileState::Offloaded => {
                self.finish_return(name).await?
            }
            // A return whose guest ran here before that daemon was done with it: settled
            // here, its VMM adopted below as any running one.
            Some(Intent::Return) if live => {
                self.finish_returned(name)?;
                false
            }
            // Settled before the record went (or nothing to do): only the record remains.
            _ => false,
        };
        self.end_intent(name);
        Ok(settled)
    }
}

/// Ends a VMM this daemon does not watch (left by an earlier daemon) and waits until it is
/// gone (at most 5 s).
async fn end_process(pid: i32) {
    vmm_proc::kill_group(pid, libc::SIGKILL);
    // SAFETY: kill(2) on the VMM's pid, which the registry recorded.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for _ in 0..500 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
