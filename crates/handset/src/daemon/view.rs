//! Remote views of a profile's screen: the jailed VMM serves VNC on a unix socket in the
//! profile's run directory (`run/vnc.sock`, owner only); the daemon exposes it on a loopback
//! TCP port of its own per profile, opened on the first `view` and kept while the daemon
//! runs. Each TCP client gets its own connection to the VMM's socket (a stopped profile's
//! clients are closed at once). Loopback only: RFB security None has no credential.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::Handset;
use crate::api_types::ProfileState;
use crate::error::{Error, Result};

/// The loopback listeners opened so far, by profile name.
#[derive(Default)]
pub struct Views {
    by_profile: tokio::sync::Mutex<HashMap<String, SocketAddr>>,
    /// The browser phone's page address with its token, once it listens.
    phone: std::sync::OnceLock<String>,
}

/// Where a profile's screen can be viewed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ViewInfo {
    /// The profile.
    pub name: String,
    /// The VNC (RFB 3.8, security None) address on loopback, `127.0.0.1:PORT`.
    pub vnc: String,
    /// The browser phone's page with the daemon's token, if the phone listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

impl Handset {
    /// The loopback VNC address of running profile `name`'s screen (opened on first use).
    pub async fn view(&self, name: &str) -> Result<ViewInfo> {
        let socket = self.vnc_socket(name)?;
        self.refuse_if_locked(name, "viewing its screen")?;
        let mut views = self.views.by_profile.lock().await;
        if let Some(addr) = views.get(name) {
            return Ok(ViewInfo {
                name: name.into(),
                vnc: addr.to_string(),
                phone: self.phone_url(),
            });
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| Error::Internal(format!("cannot listen for {name}'s view: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("{name}'s view address: {e}")))?;
        tokio::spawn(forward(
            listener,
            socket,
            self.dir().clone(),
            name.to_string(),
        ));
        views.insert(name.into(), addr);
        Ok(ViewInfo {
            name: name.into(),
            vnc: addr.to_string(),
            phone: self.phone_url(),
        })
    }

    /// Records the browser phone's page address (once, when it listens).
    pub(crate) fn set_phone_url(&self, url: &str) {
        let _ = self.views.phone.set(url.to_string());
    }

    /// The browser phone's page address with the token, if it listens.
    pub fn phone_url(&self) -> Option<String> {
        self.views.phone.get().cloned()
    }

    /// The VMM's VNC socket of `name`, once checked that it is a running or paused profile
    /// with a screen (404 for no such profile, 409 for no screen or not running).
    pub fn vnc_socket(&self, name: &str) -> Result<PathBuf> {
        crate::spec::check_name("profile name", name)?;
        if !self.registry.spec(name)?.screen {
            return Err(Error::Conflict(format!(
                "profile {name} has no screen (screen = true in its spec)"
            )));
        }
        let state = self.registry.state(name)?;
        // An offloaded profile's socket relays its twin's screen (`cloud_screen`).
        let relayed = state == ProfileState::Offloaded && self.cloud_screens.serves(name);
        if !relayed && !matches!(state, ProfileState::Running | ProfileState::Paused) {
            return Err(Error::Conflict(format!(
                "profile {name} is {}: only a running profile has a screen to view",
                state.as_str()
            )));
        }
        Ok(self.dir().run(name).join(vmm_api::jail::VNC_SOCKET_NAME))
    }

    /// The size of profile `name`'s display (its spec's), for a screen the host draws.
    pub fn display_size(&self, name: &str) -> Result<(u16, u16)> {
        let display = self.registry.spec(name)?.display;
        let side = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        Ok((side(display.width), side(display.height)))
    }
}

/// How often a viewer's session checks that its profile was not locked meanwhile.
pub(crate) const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(300);

/// Runs `session` until it ends or profile `name` is locked (then it is dropped, which
/// closes its connections); whether it ended by itself.
pub(crate) async fn until_locked<F: std::future::Future>(
    session: F,
    dir: &crate::state_dir::StateDir,
    name: &str,
) -> bool {
    tokio::pin!(session);
    loop {
        tokio::select! {
            _ = &mut session => return true,
            _ = tokio::time::sleep(LOCK_POLL) => {
                if crate::lock::is_locked(dir, name) {
                    tracing::info!("{name} was locked: a screen session ends");
                    return false;
                }
            }
        }
    }
}

/// Accepts viewers on `listener` and joins each to the VMM's VNC socket; while profile
/// `name` is locked a viewer is turned away (closed at once).
async fn forward(
    listener: tokio::net::TcpListener,
    socket: PathBuf,
    dir: crate::state_dir::StateDir,
    name: String,
) {
    loop {
        let (mut tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("view {}: accept failed: {e}", socket.display());
                continue;
            }
        };
        if crate::lock::is_locked(&dir, &name) {
            tracing::info!("view of {name}: turned a viewer away, the profile is locked");
            continue;
        }
        let socket = socket.clone();
        let (dir, name) = (dir.clone(), name.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(mut vmm) => {
                    let copy = tokio::io::copy_bidirectional(&mut tcp, &mut vmm);
                    until_locked(copy, &dir, &name).await;
                }
                Err(e) => tracing::info!("view: {} is not serving: {e}", socket.display()),
            }
        });
    }
}
