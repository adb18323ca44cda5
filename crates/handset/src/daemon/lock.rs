//! `profile lock`, `profile unlock` and `profile passcode set` (the state is
//! [`crate::lock`]): a lock pauses the profile in memory and holds it there, across daemon
//! restarts, until its passcode unlocks it.

use std::sync::Arc;

use vmm_api::Request;
use zeroize::Zeroizing;

use super::lifecycle::Event;
use super::{Handset, CALL_TIMEOUT};
use crate::api_types::{ProfileInfo, ProfileState};
use crate::error::{Error, Result};
use crate::lock::{self, LOCK_PAUSED};
use crate::passcode;
use crate::vmm_proc;

impl Handset {
    /// Refuses `what` on profile `name` while it is locked (403); the refusal is audited as
    /// `locked`.
    pub(crate) fn refuse_if_locked(&self, name: &str, what: &str) -> Result<()> {
        lock::check_unlocked(self.dir(), name, what)
            .inspect_err(|e| self.audit(name, "locked", &format!("refused {what}: {e}")))
    }

    /// Sets (or replaces) the passcode of profile `name`, which must not be locked.
    pub async fn set_passcode(&self, name: &str, passcode: Zeroizing<String>) -> Result<()> {
        crate::spec::check_name("profile name", name)?;
        self.registry.row(name)?;
        lock::check_passcode(&passcode)?;
        // Hashed (argon2id, ~20 MiB) before the lifecycle lock is taken.
        let stored = tokio::task::spawn_blocking(move || {
            passcode::hash(passcode.as_bytes(), passcode::DEFAULT_COST)
        })
        .await
        .map_err(|e| Error::Internal(format!("passcode hash: {e}")))??;
        let _ops = self.ops.lock().await;
        let mut st = lock::read(self.dir(), name)?;
        if st.locked {
            return Err(Error::Denied(format!(
                "profile {name:?} is locked: unlock it before changing its passcode"
            )));
        }
        st.passcode = Some(stored);
        st.failures = 0;
        st.last_failure_ms = 0;
        lock::write(self.dir(), name, &st)?;
        self.registry.event(name, "passcode-set", "");
        Ok(())
    }

    /// Locks profile `name`: marked locked (persisted first), and paused in memory if it
    /// runs. It needs a passcode to be unlocked with.
    pub async fn lock(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.registry.row(name)?;
        let mut st = lock::read(self.dir(), name)?;
        if st.passcode.is_none() {
            return Err(Error::Conflict(format!(
                "profile {name:?} has no passcode to unlock it with: `pocketvisor profile \
                 passcode set {name}` first"
            )));
        }
        if !st.locked {
            st.locked = true;
            lock::write(self.dir(), name, &st)?;
        }
        self.pause_locked_profile(name).await?;
        self.registry.event(name, "locked", "");
        self.show(name)
    }

    /// Pauses locked profile `name` if its guest runs (ops lock held).
    async fn pause_locked_profile(&self, name: &str) -> Result<()> {
        let running = self.registry.state(name)? == ProfileState::Running;
        if !running || !self.supervisor.is_live(name) {
            return Ok(());
        }
        vmm_proc::call(&self.dir().api_socket(name), &Request::Pause, CALL_TIMEOUT).await?;
        let pid = self.supervisor.pid(name);
        self.registry.apply(name, Event::Pause, pid, LOCK_PAUSED)?;
        self.registry.event(name, "paused", "locked");
        Ok(())
    }

    /// Unlocks profile `name` with `passcode`. After [`passcode::FREE_ATTEMPTS`] failures each
    /// attempt waits ([`passcode::wait_secs`], counted from the last failure; an attempt made
    /// sooner is refused without being tried). A guest the lock paused runs again.
    pub async fn unlock(
        self: &Arc<Self>,
        name: &str,
        passcode: Zeroizing<String>,
    ) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        // Held throughout: concurrent attempts are tried one after another, each counted.
        let _ops = self.ops.lock().await;
        self.registry.row(name)?;
        let mut st = lock::read(self.dir(), name)?;
        if !st.locked {
            return Err(Error::Conflict(format!("profile {name:?} is not locked")));
        }
        let wait_ms = st.wait_left_ms(lock::now_ms());
        if wait_ms > 0 {
            return Err(Error::Denied(format!(
                "profile {name:?}: {} failed unlock attempts; try again in {} s",
                st.failures,
                wait_ms.div_ceil(1000)
            )));
        }
        let stored = st.passcode.clone().ok_or_else(|| {
            Error::Denied(format!(
                "profile {name:?} was locked by the MDM and has no passcode: only the MDM \
                 unlocks it"
            ))
        })?;
        let matches =
            tokio::task::spawn_blocking(move || passcode::verify(passcode.as_bytes(), &stored))
                .await
                .map_err(|e| Error::Internal(format!("passcode check: {e}")))??;
        if !matches {
            st.failures = st.failures.saturating_add(1);
            // Counted from the end of this attempt.
            st.last_failure_ms = lock::now_ms();
            lock::write(self.dir(), name, &st)?;
            let next = passcode::wait_secs(st.failures);
            return Err(Error::Denied(format!(
                "profile {name:?}: wrong passcode ({} failed attempts{})",
                st.failures,
                if next > 0 {
                    format!("; the next one waits {next} s")
                } else {
                    String::new()
                }
            )));
        }
        st.locked = false;
        st.failures = 0;
        st.last_failure_ms = 0;
        lock::write(self.dir(), name, &st)?;
        self.registry.event(name, "unlocked", "");
        self.run_unlocked(name).await?;
        self.show(name)
    }

    /// Locks profile `name` for the organisation's MDM: as [`Self::lock`], but without a
    /// passcode (the MDM unlocks it, or the passcode if one is set). Returns whether it was
    /// unlocked before.
    pub(crate) async fn lock_by_mdm(self: &Arc<Self>, name: &str) -> Result<bool> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.registry.row(name)?;
        let mut st = lock::read(self.dir(), name)?;
        let was_unlocked = !st.locked;
        if was_unlocked {
            st.locked = true;
            lock::write(self.dir(), name, &st)?;
        }
        self.pause_locked_profile(name).await?;
        self.registry.event(name, "locked", "by the MDM");
        Ok(was_unlocked)
    }

    /// Unlocks profile `name` for the organisation's MDM (no passcode asked; the failure count
    /// is reset). Returns whether it was locked.
    pub(crate) async fn unlock_by_mdm(self: &Arc<Self>, name: &str) -> Result<bool> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.registry.row(name)?;
        let mut st = lock::read(self.dir(), name)?;
        let was_locked = st.locked;
        if was_locked {
            st.locked = false;
            st.failures = 0;
            st.last_failure_ms = 0;
            lock::write(self.dir(), name, &st)?;
            self.registry.event(name, "unlocked", "by the MDM");
        }
        self.run_unlocked(name).await?;
        Ok(was_locked)
    }

    /// Lets a guest the lock paused run again (ops lock held, the lock state already
    /// unlocked).
    async fn run_unlocked(self: &Arc<Self>, name: &str) -> Result<()> {
        let row = self.registry.row(name)?;
        if ProfileState::parse(&row.state) == ProfileState::Paused
            && row.detail == LOCK_PAUSED
            && self.supervisor.is_live(name)
        {
            vmm_proc::call(&self.dir().api_socket(name), &Request::Resume, CALL_TIMEOUT).await?;
            self.registry.apply(name, Event::Unpause, row.pid, "")?;
            self.registry.event(name, "unpaused", "unlocked");
            // Its place again: paused once more if it waits in the background.
            self.place(name).await?;
        }
        Ok(())
    }

    /// Pauses every locked profile the daemon finds running (a lock persisted by a daemon
    /// that died before it paused the guest, or a guest adopted at start); audited as `lock`.
    pub(crate) async fn enforce_locks(&self) {
        for name in self.supervisor.names() {
            if !lock::is_locked(self.dir(), &name)
                || self.registry.state(&name).ok() != Some(ProfileState::Running)
            {
                continue;
            }
            let r = self.pause_locked_profile(&name).await;
            let detail = match &r {
                Ok(()) => "paused: the profile is locked".to_string(),
                Err(e) => format!("could not pause the locked profile: {e}"),
            };
            self.audit(&name, "lock", &detail);
        }
    }
}
