//! `profile pause` / `profile unpause`: a running profile's vCPUs stopped and started again,
//! its memory kept in its VMM (unlike suspend, which saves the guest to disk and ends the
//! VMM).
//!
//! A profile the user paused is `paused` with the detail [`USER_PAUSED`]; one the foreground
//! scheduling paused (`background = "pause"`) has the detail `background`. Only the user's
//! unpause runs the first again: switching to it does not, and a channel transfer refuses it
//! (409) rather than let its guest run; the second is resumed by a switch, not by unpause.

use std::sync::Arc;

use vmm_api::Request;

use super::lifecycle::Event;
use super::{Handset, CALL_TIMEOUT};
use crate::api_types::{ProfileInfo, ProfileState};
use crate::error::{Error, Result};
use crate::vmm_proc;

/// The state detail of a profile the user paused.
pub const USER_PAUSED: &str = "user";

impl Handset {
    /// Whether `name` is paused by the user (not by the foreground scheduling).
    pub(crate) fn user_paused(&self, name: &str) -> Result<bool> {
        Ok(self.registry.db().profile(name)?.is_some_and(|r| {
            ProfileState::parse(&r.state) == ProfileState::Paused && r.detail == USER_PAUSED
        }))
    }

    /// Pauses a running profile's vCPUs; its memory stays in its VMM.
    pub async fn pause(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        self.toggle(name, Event::Pause).await
    }

    /// Lets a profile the user paused run again.
    pub async fn unpause(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        self.toggle(name, Event::Unpause).await
    }

    async fn toggle(self: &Arc<Self>, name: &str, event: Event) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.registry.check(name, event)?;
        if event == Event::Unpause {
            self.refuse_if_locked(name, "unpause")?;
        }
        if event == Event::Unpause && !self.user_paused(name)? {
            return Err(Error::Conflict(format!(
                "profile {name:?} is paused in the background: switch to it"
            )));
        }
        if !self.supervisor.is_live(name) {
            // Its VMM has just ended; the supervisor is about to record how.
            return Err(Error::Conflict(format!(
                "profile {name:?} has no VMM any more: see `profile show {name}`"
            )));
        }
        let (request, detail, word) = match event {
            Event::Pause => (Request::Pause, USER_PAUSED, "paused"),
            _ => (Request::Resume, "", "unpaused"),
        };
        let t0 = std::time::Instant::now();
        vmm_proc::call(&self.dir().api_socket(name), &request, CALL_TIMEOUT).await?;
        let pid = self.supervisor.pid(name);
        self.registry.apply(name, event, pid, detail)?;
        self.registry.event(
            name,
            word,
            &format!("user; {} us", t0.elapsed().as_micros()),
        );
        self.show(name)
    }
}
