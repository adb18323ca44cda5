//! Files between a profile and its clone (issue 13, docs/cloud.md "works for its original"):
//! a file in the agent inbox of the clone `profile clone NAME` started at a cloud host is
//! brought into NAME's own agent inbox (`profile file from-clone`), or one of NAME's is put
//! into the clone's (`profile file to-clone`: work handed to the twin); both are
//! `POST /v1/profiles/{name}/clone/files`, the body's `direction` says which way.
//!
//! The clone's host is the one the last successful clone recorded in the database. For the
//! call only, the daemon runs `pocketvisor cloud vsock NAME` (TLS 1.3 with this device's
//! identity, `<state>/cloud/`) onto a socket in the profile's directory, which reaches the
//! clone's vsock device as a VMM's own socket does (beside `run/`, not in it: `run/` is the
//! jailed VMM's own directory, and the relay runs as the daemon's user, which must not bind
//! and chmod a path the VMM can swap for a link); the clone's agent is then asked
//! exactly as a local profile's ([`crate::channels::move_data`]): both agents' `health`
//! first (it bounds what is read and how long a call may take), then `file_get` from the
//! source, answers checked, and `file_put` into the target. The relay process ends and its
//! socket is removed when the call ends, whatever its outcome.
//!
//! Policy: the clone is the peer [`CLOUD`] in NAME's channel rules (its spec's, or its IT
//! policy's while one is in force), read at each call, as the host is the peer `host`
//! ([`decide_reserved`]): a file enters NAME from its clone unless its `channels.files_from`
//! is set without `cloud`, and leaves NAME for its clone only if its `channels.files_to`
//! lists `cloud`. A locked profile refuses. Every call, allowed, denied (403) or failed, is
//! one `channel-file` audit record (profile = NAME, `from=cloud to=NAME` or `from=NAME
//! to=cloud`, the clone's host) with the size and keyed digest of what moved. Both names are
//! the agents' inbox names ([`valid_file_name`]), never paths.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::{Op, Request};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::Handset;
use crate::api::Peer;
use crate::api_types::ProfileState;
use crate::channels::{
    agent_call_within, agent_info_within, body, decide_reserved, move_data, valid_file_name,
    ChannelError, End, Kind, Transfer, Way, CLOUD, FILE_NAME_MAX,
};
use crate::error::Error;
use crate::spec::check_name;

/// How long the relay may take to reach the cloud host and the clone the first time.
const RELAY_START: Duration = Duration::from_secs(60);
/// How long one connection through the relay may take to reach the clone's agent (a TLS
/// connection to the host, which starts a process for it, comes first).
const RELAY_CONNECT: Duration = Duration::from_secs(30);

/// Which way a file moves between a profile and its clone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneDirection {
    /// From the clone's inbox into the profile's (`profile file from-clone`).
    #[default]
    FromClone,
    /// From the profile's inbox into the clone's (`profile file to-clone`).
    ToClone,
}

impl CloneDirection {
    /// The same move in the channel rules' terms (the clone is the peer [`CLOUD`]).
    fn way(self) -> Way {
        match self {
            CloneDirection::FromClone => Way::ToProfile,
            CloneDirection::ToClone => Way::FromProfile,
        }
    }

    /// `(from, to)` of a move with profile `name`'s clone.
    fn ends(self, name: &str) -> (&str, &str) {
        match self {
            CloneDirection::FromClone => (CLOUD, name),
            CloneDirection::ToClone => (name, CLOUD),
        }
    }

    /// What a locked profile is refused.
    fn what(self) -> &'static str {
        match self {
            CloneDirection::FromClone => "a file from its clone",
            CloneDirection::ToClone => "a file to its clone",
        }
    }

    fn is_from_clone(&self) -> bool {
        *self == CloneDirection::FromClone
    }
}

/// `POST /v1/profiles/{name}/clone/files`: which file moves, under which name, which way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneFile {
    /// The file's name in the inbox it leaves (the clone's, or with `to-clone` the
    /// profile's).
    pub name: String,
    /// Its name in the inbox it enters (default: the same); a file of that name is replaced.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub as_name: Option<String>,
    /// Which way it moves (default: from the clone).
    #[serde(default, skip_serializing_if = "CloneDirection::is_from_clone")]
    pub direction: CloneDirection,
}

fn check_file_name(what: &str, n: &str) -> Result<(), ChannelError> {
    if valid_file_name(n) {
        return Ok(());
    }
    Err(ChannelError::BadRequest(format!(
        "{what} {n:?} must be 1-{FILE_NAME_MAX} of A-Z, a-z, 0-9, '.', '_' and '-', not \
         starting with '.' nor containing '..'"
    )))
}

/// A `pocketvisor cloud vsock` process serving the clone's vsock device on a socket in the
/// profile's directory, for one call. [`CloneRelay::finish`] (or the drop) ends it and
/// removes the socket.
struct CloneRelay {
    child: tokio::process::Child,
    socket: PathBuf,
}

impl CloneRelay {
    /// Ends the process and removes its socket.
    async fn finish(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for CloneRelay {
    fn drop(&mut self) {
        // After `finish` this finds nothing to do; a call dropped half-way (its client gone)
        // ends here.
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Numbers the relays' sockets, so that two calls never share one.
static RELAYS: AtomicU64 = AtomicU64::new(0);

/// The relay sockets' name prefix in a profile's directory (`clone-vsock.<n>.sock`).
pub const RELAY_SOCKET_PREFIX: &str = "clone-vsock.";

impl Handset {
    /// Starts the relay of profile `name`'s clone at `host`; it serves once it reached the
    /// clone (the host's refusal, e.g. no such clone of this device, is the error).
    async fn clone_relay(&self, name: &str, host: &str) -> Result<CloneRelay, ChannelError> {
        let id = super::cloud::identity(self.dir())?;
        let n = RELAYS.fetch_add(1, Ordering::Relaxed);
        let socket = self
            .dir()
            .profile(name)
            .join(format!("{RELAY_SOCKET_PREFIX}{n}.sock"));
        let mut c = id.relay_command(&self.opts.vmm_bin, "vsock", name, host, &socket);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().map_err(|e| {
            Error::Internal(format!("cannot start {}: {e}", self.opts.vmm_bin.display()))
        })?;
        let stderr = child.stderr.take();
        let relay = CloneRelay { child, socket };
        let Some(stderr) = stderr else {
            return Err(Error::Internal("the relay's stderr is not piped".into()).into());
        };
        // It says where it serves once the host let it reach the clone; else it ends saying
        // why not.
        let mut lines = BufReader::new(stderr).lines();
        let mut said = Vec::new();
        let ready = tokio::time::timeout(RELAY_START, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(" on unix:") {
                    return true;
                }
                if said.len() < 8 {
                    said.push(line.chars().take(400).collect::<String>());
                }
            }
            false
        })
        .await;
        match ready {
            Ok(true) => {
                let profile = name.to_string();
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::info!("{profile}: its clone's relay: {line}");
                    }
                });
                Ok(relay)
            }
            Ok(false) => {
                let why = said
                    .iter()
                    .map(|l| l.trim_start_matches("pocketvisor: ").trim())
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                relay.finish().await;
                Err(ChannelError::Agent(format!(
                    "{name}'s clone at {host} is not reachable: {why}"
                )))
            }
            Err(_) => {
                relay.finish().await;
                Err(ChannelError::Agent(format!(
                    "{name}'s clone at {host}: no relay within {RELAY_START:?}"
                )))
            }
        }
    }

    /// Moves the file `src` of one inbox to the other as `dst`, `way` between profile
    /// `name`'s agent and its clone's at `host` (reached through a relay).
    async fn move_with_clone(
        &self,
        name: &str,
        host: &str,
        way: CloneDirection,
        src: &str,
        dst: &str,
    ) -> Result<Transfer, ChannelError> {
        let t0 = Instant::now();
        let relay = self.clone_relay(name, host).await?;
        let who = format!("{name}'s clone");
        let clone = End {
            who: &who,
            peer: CLOUD,
            socket: relay.socket.clone(),
            connect: RELAY_CONNECT,
        };
        let own = End::profile(self, name);
        let (from, to) = match way {
            CloneDirection::FromClone => (&clone, &own),
            CloneDirection::ToClone => (&own, &clone),
        };
        let moved = move_data(self, Kind::File, from, to, Some((src, dst)), t0).await;
        relay.finish().await;
        moved
    }

    /// Tells the agent of profile `name`'s clone at `host` that its guest is now a twin of
    /// `name` (the agent's `twin`: the Linux agent writes it where the guest's programs read
    /// it). An event either way (`twin-notified`, `twin-notice-failed`: a guest without an
    /// agent has nobody to tell), never a failure of the clone.
    pub(super) async fn notify_twin(&self, name: &str, host: &str) {
        let told = async {
            let relay = self.clone_relay(name, host).await?;
            let clone = format!("{name}'s clone");
            let told = async {
                let info = agent_info_within(&clone, &relay.socket, RELAY_CONNECT).await?;
                let req = Request {
                    name: Some(name),
                    ..Request::new(Op::Twin)
                };
                let a = agent_call_within(&clone, &relay.socket, &req, 4096, info, RELAY_CONNECT)
                    .await?;
                if a.twin_of.as_deref() != Some(name) {
                    return Err(ChannelError::Agent(format!(
                        "{clone}'s agent did not acknowledge the notice"
                    )));
                }
                Ok(())
            }
            .await;
            relay.finish().await;
            told
        }
        .await;
        match told {
            Ok(()) => self.registry.event(
                name,
                "twin-notified",
                &format!("its clone's agent at {host} was told it is a twin of {name}"),
            ),
            Err(e) => self
                .registry
                .event(name, "twin-notice-failed", &e.to_string()),
        }
    }

    /// Checks the names, the lock, the policy, the state and the clone's host, then moves
    /// the file with the profile unpaused. `allowed` records the policy decision once made,
    /// `host` the clone's host once known.
    async fn guarded_with_clone(
        &self,
        name: &str,
        req: &CloneFile,
        allowed: &mut Option<bool>,
        host: &mut Option<String>,
    ) -> Result<Transfer, ChannelError> {
        let (way, src) = (req.direction, req.name.as_str());
        let dst = req.as_name.as_deref().unwrap_or(src);
        check_name("profile", name)?;
        check_file_name("file name", src)?;
        check_file_name("as", dst)?;
        let info = self.show(name)?;
        // A locked profile reaches no channel, whatever its rules.
        self.refuse_if_locked(name, way.what())?;
        let mut spec = info.spec.clone();
        spec.channels = crate::org_policy::effective_channels(self.dir(), &spec)?;
        let decision = decide_reserved(CLOUD, Kind::File, way.way(), &spec);
        *allowed = Some(decision.is_ok());
        decision.map_err(|why| {
            let (from, to) = way.ends(name);
            let said = |p: &str| match p {
                CLOUD => format!("{CLOUD} (the clone of {name})"),
                p => p.to_string(),
            };
            ChannelError::Denied(format!(
                "file from {} to {} denied by policy: {why}",
                said(from),
                said(to)
            ))
        })?;
        match info.state {
            ProfileState::Running | ProfileState::Paused => {}
            s => {
                return Err(ChannelError::NotRunning(format!(
                    "profile {name} is {}, not running",
                    s.as_str()
                )))
            }
        }
        let Some(at) = info.cloned_to else {
            return Err(Error::Conflict(format!(
                "profile {name} has no clone at a cloud host (`pocketvisor profile clone {name} \
                 --to HOST:PORT` makes one)"
            ))
            .into());
        };
        super::cloud::check_cloud_host(&at)?;
        *host = Some(at.clone());
        self.with_unpaused(&[name], self.move_with_clone(name, &at, way, src, dst))
            .await?
    }

    /// Moves a file between profile `name`'s agent inbox and its clone's, as `req` says,
    /// under `name`'s channel rules for the peer [`CLOUD`]; audited whatever the outcome.
    pub async fn file_with_clone(
        &self,
        peer: Peer,
        name: &str,
        req: &CloneFile,
    ) -> Result<Transfer, ChannelError> {
        let (mut allowed, mut host) = (None, None);
        let r = self
            .guarded_with_clone(name, req, &mut allowed, &mut host)
            .await;
        let decision = match allowed {
            Some(true) => "allowed",
            Some(false) => "denied",
            None => "none",
        };
        let renamed = match &req.as_name {
            Some(n) if *n != req.name => format!(" as={}", n.escape_debug()),
            _ => String::new(),
        };
        let at = host.map(|h| format!(" clone-at={h}")).unwrap_or_default();
        let outcome = match &r {
            Ok(t) => format!("result=ok bytes={} hmac-sha256={}", t.bytes, t.audit_digest),
            Err(e) => format!("result=error ({e})"),
        };
        let (from, to) = req.direction.ends(name);
        let detail = format!(
            "from={} to={} name={}{renamed}{at} decision={decision} {outcome} by {peer}",
            from.escape_debug(),
            to.escape_debug(),
            req.name.escape_debug()
        );
        let subject = if check_name("", name).is_ok() {
            name
        } else {
            "-"
        };
        self.audit(subject, "channel-file", &detail);
        r
    }
}

/// `POST /v1/profiles/{name}/clone/files`.
pub async fn with_clone(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(profile): Path<String>,
    req: Result<Json<CloneFile>, JsonRejection>,
) -> Result<Json<Transfer>, ChannelError> {
    let req = match body(req) {
        Ok(r) => r,
        Err(e) => {
            let subject = if check_name("", &profile).is_ok() {
                profile.as_str()
            } else {
                "-"
            };
            h.audit(
                subject,
                "channel-file",
                &format!("peer={CLOUD} decision=none result=error ({e}) by {peer}"),
            );
            return Err(e);
        }
    };
    let t = h.file_with_clone(peer, &profile, &req).await?;
    Ok(Json(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_file_perhaps_a_new_name_and_the_way() {
        let r: CloneFile = serde_json::from_str(r#"{"name":"a.txt","as":"b.txt"}"#).unwrap();
        assert_eq!(
            (r.name.as_str(), r.as_name.as_deref(), r.direction),
            ("a.txt", Some("b.txt"), CloneDirection::FromClone)
        );
        let r: CloneFile =
            serde_json::from_str(r#"{"name":"a.txt","direction":"to-clone"}"#).unwrap();
        assert_eq!((&r.as_name, r.direction), (&None, CloneDirection::ToClone));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"name":"a.txt","direction":"to-clone"}"#
        );
        for bad in [
            r#"{"name":"a","to":"x"}"#,
            r#"{"name":"a","direction":"sideways"}"#,
            r#"{"name":"a","direction":null}"#,
        ] {
            assert!(serde_json::from_str::<CloneFile>(bad).is_err(), "{bad}");
        }
        assert_eq!(CloneDirection::ToClone.way(), Way::FromProfile);
        assert_eq!(CloneDirection::FromClone.ends("work"), (CLOUD, "work"));
        assert!(check_file_name("as", "../etc/passwd").is_err());
        assert_eq!(check_file_name("as", "").unwrap_err().status(), 400);
        assert!(check_file_name("as", "report-2.pdf").is_ok());
    }
}
