//! An offloaded profile's screen, on the device: while a profile with a `screen` runs at its
//! cloud host, the daemon keeps a `pocketvisor cloud view` process serving the profile's
//! `run/vnc.sock`, relayed over TLS (the device's cloud identity) to the twin's own VNC
//! server. `profile view`, the browser phone and anything else that reads a profile's screen
//! from that socket then shows the twin, keys and pointer included, as Citrix Receiver showed a
//! remote desktop on a phone. It starts once the offload is recorded (and at daemon start for a
//! profile offloaded before), and ends before a return, whose VMM serves that socket again.
//! The relay dies with the daemon (`PR_SET_PDEATHSIG`). The device screen's compositor reads
//! the same socket while the offloaded profile is in front (`profile switch` to it, or the
//! offload of the profile in front), and sends the device's input there (`device_screen`).

use std::collections::HashMap;
use std::sync::Mutex;

use super::Handset;
use crate::api_types::ProfileState;
use crate::error::{Error, Result};

/// The relays that run, by profile.
#[derive(Default)]
pub struct CloudScreens {
    relays: Mutex<HashMap<String, tokio::process::Child>>,
}

impl CloudScreens {
    fn relays(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::process::Child>> {
        self.relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether profile `name`'s twin's screen is relayed here.
    pub fn serves(&self, name: &str) -> bool {
        self.relays()
            .get_mut(name)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Handset {
    /// Starts relaying offloaded profile `name`'s twin's screen to its `run/vnc.sock`, if the
    /// profile has a screen. A failure is logged and recorded as an event: the offload stands.
    pub(super) async fn start_cloud_screen(&self, name: &str) {
        if let Err(e) = self.try_start_cloud_screen(name).await {
            tracing::warn!("{name}: its twin's screen is not relayed: {e}");
            self.registry
                .event(name, "cloud-screen-failed", &e.to_string());
        }
    }

    async fn try_start_cloud_screen(&self, name: &str) -> Result<()> {
        if !self.registry.spec(name)?.screen
            || self.registry.state(name)? != ProfileState::Offloaded
        {
            return Ok(());
        }
        let from = super::cloud::offloaded_to(self.dir(), name)
            .ok_or_else(|| Error::Internal(format!("profile {name:?}: no cloud host recorded")))?;
        let id = super::cloud::identity(self.dir())?;
        let run = self.dir().run(name);
        std::fs::create_dir_all(&run)
            .map_err(Error::io(format!("cannot create {}", run.display())))?;
        let mut listen = std::ffi::OsString::from("unix:");
        listen.push(run.join(vmm_api::jail::VNC_SOCKET_NAME));
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir().vmm_log(name))
            .map_err(Error::io("cannot open the profile's VMM log"))?;
        let err = log
            .try_clone()
            .map_err(Error::io("cannot duplicate the log file"))?;
        let mut c = id.relay_command(&self.opts.vmm_bin, "view", name, &from, listen);
        c.stdout(log).stderr(err);
        let child = c.spawn().map_err(Error::io(format!(
            "cannot start {}",
            self.opts.vmm_bin.display()
        )))?;
        if let Some(mut old) = self.cloud_screens.relays().insert(name.to_string(), child) {
            let _ = old.start_kill();
        }
        self.registry
            .event(name, "cloud-screen", &format!("relayed from {from}"));
        Ok(())
    }

    /// Stops relaying profile `name`'s twin's screen (before a return) and removes its socket.
    pub(super) async fn stop_cloud_screen(&self, name: &str) {
        let child = self.cloud_screens.relays().remove(name);
        if let Some(mut child) = child {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(self.dir().run(name).join(vmm_api::jail::VNC_SOCKET_NAME));
    }
}
