//! `profile wipe` (the steps and their crash safety are [`crate::wipe`]'s).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::lifecycle::Event;
use super::Handset;
use crate::error::Result;

/// What a wipe did (`POST /v1/profiles/{name}/wipe`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wiped {
    /// The profile, now gone.
    pub profile: String,
    /// Its data key was destroyed (a profile encrypted at rest): its disks, and any copy of
    /// them, no longer open. False for a plain profile: a copy taken before stays readable.
    pub crypto_erased: bool,
}

impl Handset {
    /// Wipes profile `name`: its VMM ended if it runs, its data key destroyed, its files
    /// deleted. Finished by the next daemon start if cut short.
    pub async fn wipe(self: &Arc<Self>, name: &str) -> Result<Wiped> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.registry.row(name)?;
        if self.supervisor.is_live(name) {
            let how = self.stop_vm(name).await?;
            self.registry.apply(name, Event::Stopped, None, "wipe")?;
            self.registry
                .event(name, "stopped", &format!("wipe: {how}"));
        }
        // An offloaded profile's screen relay goes with it.
        self.stop_cloud_screen(name).await;
        crate::wipe::begin(self.dir(), name)?;
        crate::fault::kill_point("wipe-marked");
        let wiped = self.finish_wipe(name)?;
        let _ = self.place_after_exit(name).await;
        Ok(wiped)
    }

    /// The steps after the marker (ops lock held, no VMM): crypto-erase, then delete.
    fn finish_wipe(&self, name: &str) -> Result<Wiped> {
        let crypto_erased = crate::wipe::erase_key(&self.dir().profile(name))?;
        crate::fault::kill_point("wipe-erased");
        let _ = self.cgroups.remove(name);
        self.remove_jail_dir(name);
        self.forget_replication(name);
        self.registry.remove(name)?;
        self.supervisor.forget_restarts(name);
        let how = if crypto_erased {
            "crypto-erased (its data key overwritten and removed), then its files deleted"
        } else {
            "not encrypted at rest: its files deleted (a copy taken before stays readable)"
        };
        self.registry.event(name, "wiped", how);
        self.audit(name, "wipe", how);
        Ok(Wiped {
            profile: name.to_string(),
            crypto_erased,
        })
    }

    /// At daemon start (ops lock held): finishes the wipes a killed daemon left half done.
    pub(super) fn finish_wipes(&self) {
        for name in crate::wipe::unfinished(self.dir()) {
            match self.finish_wipe(&name) {
                Ok(w) => self.audit(
                    &name,
                    "wipe",
                    &format!(
                        "finished after a daemon restart (crypto-erased: {})",
                        w.crypto_erased
                    ),
                ),
                Err(e) => tracing::error!("{name}: cannot finish its wipe: {e}"),
            }
        }
    }
}
