//! Foreground scheduling: one live profile is in the foreground with its foreground CPU
//! weight; the others get their background weight, and those with `background = "pause"`
//! are paused until switched to.
//!
//! An offloaded profile with a screen can be in the foreground too: the device screen then
//! shows its twin (relayed to its `run/vnc.sock`, `cloud_screen`) and sends it the device's
//! input. Nothing of it runs here, so it has no CPU weight or pause to apply; the live
//! profiles all get their background placement meanwhile.

use std::time::Instant;

use vmm_api::Request;

use super::lifecycle::Event;
use super::{Handset, CALL_TIMEOUT};
use crate::api_types::{ProfileInfo, ProfileState};
use crate::error::{Error, Result};
use crate::spec::{BackgroundMode, ProfileSpec};
use crate::vmm_proc;

/// What a live profile gets for a given foreground.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Placement {
    /// Its `cpu.weight`.
    pub weight: u32,
    /// The pause or resume it needs, as the lifecycle event it records.
    pub change: Option<Event>,
}

/// The placement of a profile in `state` with `spec`, in the foreground or not; one the user
/// paused (`user_paused`) stays paused until unpaused.
pub(super) fn placement(
    is_fg: bool,
    state: Option<ProfileState>,
    user_paused: bool,
    spec: &ProfileSpec,
) -> Placement {
    let weight = if is_fg {
        spec.cpu.foreground
    } else {
        spec.cpu.background
    };
    let change = match (is_fg, state) {
        (true, Some(ProfileState::Paused)) if !user_paused => Some(Event::ForegroundResumed),
        (false, Some(ProfileState::Running)) if spec.background == BackgroundMode::Pause => {
            Some(Event::BackgroundPaused)
        }
        _ => None,
    };
    Placement { weight, change }
}

/// The foreground once `started` runs: the current one if another profile holds it.
pub(super) fn after_start<'a>(current: Option<&'a str>, started: &'a str) -> &'a str {
    current.filter(|f| *f != started).unwrap_or(started)
}

/// The foreground once `exited` has no VMM: unchanged if another profile holds it, else the
/// first of `live` by name.
pub(super) fn after_exit(current: Option<&str>, exited: &str, live: &[String]) -> Option<String> {
    match current {
        Some(f) if f != exited => Some(f.to_string()),
        _ => live.iter().filter(|n| *n != exited).min().cloned(),
    }
}

/// The request that carries out a placement change.
fn request_for(change: Event) -> Request {
    if change == Event::ForegroundResumed {
        Request::Resume
    } else {
        Request::Pause
    }
}

impl Handset {
    /// Makes `name` the foreground profile: a live one, or an offloaded one with a screen
    /// (the device screen then shows its twin).
    pub async fn switch(self: &std::sync::Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.registry.check(name, Event::Switch)?;
        self.refuse_if_locked(name, "a switch to it")?;
        if self.registry.state(name)? == ProfileState::Offloaded {
            if !self.registry.spec(name)?.screen {
                return Err(Error::Conflict(format!(
                    "profile {name:?} is offloaded and has no screen (screen = true in its \
                     spec): there is nothing of it to show here; bring it back with \
                     `pocketvisor profile return {name}` first"
                )));
            }
        } else if !self.supervisor.is_live(name) {
            // Its VMM has just ended; the supervisor is about to record how.
            return Err(Error::Conflict(format!(
                "profile {name:?} is {}: start it first",
                self.registry.row(name)?.state
            )));
        }
        let t0 = Instant::now();
        self.apply_foreground(Some(name)).await?;
        let twin = match super::cloud::offloaded_to(self.dir(), name) {
            Some(host) => format!("; its twin's screen, from {host}"),
            None => String::new(),
        };
        self.registry.event(
            name,
            "foreground",
            &format!("{} us{twin}", t0.elapsed().as_micros()),
        );
        self.show(name)
    }

    /// Gives a newly running profile its place: foreground if there is none, else background.
    pub(super) async fn place(&self, name: &str) -> Result<()> {
        let fg = self.current_foreground()?;
        self.apply_foreground(Some(after_start(fg.as_deref(), name)))
            .await
    }

    /// After `name` stopped: if it was the foreground one, the first running profile takes over.
    pub(super) async fn place_after_exit(&self, name: &str) -> Result<()> {
        let fg = self.current_foreground()?;
        let next = after_exit(fg.as_deref(), name, &self.supervisor.names());
        if next.is_some() && next == fg {
            return Ok(());
        }
        self.apply_foreground(next.as_deref()).await
    }

    /// The foreground profile if it is running, or offloaded with a screen (its twin's).
    pub(super) fn current_foreground(&self) -> Result<Option<String>> {
        let rows = self.registry.db().profiles()?;
        Ok(rows
            .into_iter()
            .find(|r| {
                r.foreground
                    && (self.supervisor.is_live(&r.name)
                        || (ProfileState::parse(&r.state) == ProfileState::Offloaded
                            && self.registry.spec(&r.name).is_ok_and(|s| s.screen)))
            })
            .map(|r| r.name))
    }

    /// Sets every running profile's CPU weight and paused state for foreground `fg`.
    pub(super) async fn apply_foreground(&self, fg: Option<&str>) -> Result<()> {
        let mut first_err = None;
        for n in &self.supervisor.names() {
            let spec = match self.registry.spec(n) {
                Ok(s) => s,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            let state = self
                .registry
                .db()
                .profile(n)?
                .map(|r| ProfileState::parse(&r.state));
            // A locked profile stays paused like one the user paused.
            let held = self.user_paused(n)? || crate::lock::is_locked(self.registry.dir(), n);
            let p = placement(fg == Some(n.as_str()), state, held, &spec);
            if let Err(e) = self.cgroups.set_weight(n, p.weight) {
                tracing::warn!("{n}: {e}");
                first_err.get_or_insert(e);
            }
            let Some(change) = p.change else {
                continue;
            };
            let api = self.registry.dir().api_socket(n);
            let pid = self.supervisor.pid(n);
            // The state's detail, the event's name and the event's detail.
            let (state_detail, event, event_detail) = if change == Event::ForegroundResumed {
                ("", "unpaused", "foreground")
            } else {
                ("background", "paused", "background")
            };
            match vmm_proc::call(&api, &request_for(change), CALL_TIMEOUT).await {
                Ok(_) => {
                    self.registry.apply(n, change, pid, state_detail)?;
                    self.registry.event(n, event, event_detail);
                }
                // A guest that ended right after its start (nothing listens any more) is not
                // this call's failure: its exit handler records the end.
                Err(e) if vmm_gone(&api).await => {
                    tracing::info!("{n}: its VMM ended before it could be {event}: {e}");
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.registry.db().set_foreground(fg)?;
        self.device_screen.nudge();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs `f` with the profiles `names` able to answer: any of them paused in the background
    /// is resumed for `f` and paused again afterwards (its state stays `paused`), with the
    /// lifecycle lock held meanwhile so no switch interleaves. Used by `channels` to reach a
    /// background profile's agent. Without paused profiles `f` runs without the lock.
    pub async fn with_unpaused<T>(
        &self,
        names: &[&str],
        f: impl std::future::Future<Output = T>,
    ) -> Result<T> {
        let paused = |n: &str| -> Result<bool> {
            Ok(self
                .registry
                .db()
                .profile(n)?
                .is_some_and(|r| ProfileState::parse(&r.state) == ProfileState::Paused))
        };
        let mut any = false;
        for n in names {
            self.refuse_if_locked(n, "a channel transfer")?;
            if self.user_paused(n)? {
                return Err(Error::Conflict(format!(
                    "profile {n:?} is paused: `profile unpause {n}` first"
                )));
            }
            any |= paused(n)?;
        }
        if !any {
            return Ok(f.await);
        }
        let _ops = self.ops.lock().await;
        let mut resumed = Vec::new();
        for n in names {
            if paused(n)? {
                let api = self.registry.dir().api_socket(n);
                if let Err(e) = vmm_proc::call(&api, &Request::Resume, CALL_TIMEOUT).await {
                    for r in resumed {
                        let api = self.registry.dir().api_socket(r);
                        let _ = vmm_proc::call(&api, &Request::Pause, CALL_TIMEOUT).await;
                    }
                    return Err(e);
                }
                resumed.push(*n);
            }
        }
        let out = f.await;
        for n in resumed {
            let api = self.registry.dir().api_socket(n);
            if let Err(e) = vmm_proc::call(&api, &Request::Pause, CALL_TIMEOUT).await {
                tracing::warn!("{n}: cannot pause again after a channel transfer: {e}");
            }
        }
        Ok(out)
    }
}

/// Whether nothing listens on a VMM's API socket any more (refused or gone: it ended).
async fn vmm_gone(api: &std::path::Path) -> bool {
    use std::io::ErrorKind;
    matches!(
        tokio::net::UnixStream::connect(api).await,
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(background: BackgroundMode) -> ProfileSpec {
        let mut s = ProfileSpec::from_toml(
            "name = \"w\"\nkernel = \"probe\"\nmemory_mib = 128\nvcpus = 1\n",
        )
        .unwrap();
        s.cpu.foreground = 1000;
        s.cpu.background = 50;
        s.background = background;
        s
    }

    #[test]
    fn the_foreground_gets_its_weight_and_runs() {
        let run = spec(BackgroundMode::Run);
        let sus = spec(BackgroundMode::Pause);
        let p = placement(true, Some(ProfileState::Running), false, &sus);
        assert_eq!(
            p,
            Placement {
                weight: 1000,
                change: None
            }
        );
        let p = placement(true, Some(ProfileState::Paused), false, &sus);
        assert_eq!(p.change, Some(Event::ForegroundResumed));
        assert_eq!(request_for(p.change.unwrap()), Request::Resume);
        // In the background: the lower weight; paused only with background = "pause".
        let p = placement(false, Some(ProfileState::Running), false, &run);
        assert_eq!(
            p,
            Placement {
                weight: 50,
                change: None
            }
        );
        let p = placement(false, Some(ProfileState::Running), false, &sus);
        assert_eq!(p.change, Some(Event::BackgroundPaused));
        assert_eq!(request_for(p.change.unwrap()), Request::Pause);
        assert_eq!(
            placement(false, Some(ProfileState::Paused), false, &sus).change,
            None
        );
        // A profile the user paused stays paused in the foreground, whatever its mode.
        for s in [&run, &sus] {
            assert_eq!(
                placement(true, Some(ProfileState::Paused), true, s).change,
                None
            );
        }
    }

    #[test]
    fn a_started_profile_takes_the_foreground_only_if_free() {
        assert_eq!(after_start(None, "b"), "b");
        assert_eq!(after_start(Some("a"), "b"), "a");
        assert_eq!(after_start(Some("b"), "b"), "b");
    }

    #[test]
    fn the_first_live_profile_takes_over_an_abandoned_foreground() {
        let live = vec!["zed".to_string(), "alpha".to_string(), "mid".to_string()];
        assert_eq!(after_exit(Some("mid"), "zed", &live), Some("mid".into()));
        assert_eq!(after_exit(Some("zed"), "zed", &live), Some("alpha".into()));
        assert_eq!(after_exit(None, "", &live), Some("alpha".into()));
        assert_eq!(after_exit(Some("a"), "a", &[]), None);
    }
}
