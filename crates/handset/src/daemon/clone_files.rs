//! Files from a profile's clone (issue 13, docs/cloud.md "works for its original"): a file in
//! the agent inbox of the clone `profile clone NAME` started at a cloud host is brought into
//! NAME's own agent inbox (`profile file from-clone`, `POST /v1/profiles/{name}/clone/files`).
//!
//! The clone's host is the one the last successful clone recorded in the database. For the
//! call only, the daemon runs `pocketvisor cloud vsock NAME` (TLS 1.3 with this device's
//! identity, `<state>/cloud/`) onto a socket in the profile's directory, which reaches the
//! clone's vsock device as a VMM's own socket does (beside `run/`, not in it: `run/` is the
//! jailed VMM's own directory, and the relay runs as the daemon's user, which must not bind
//! and chmod a path the VMM can swap for a link); the clone's agent is then asked
//! exactly as a local profile's ([`crate::channels`]): `health` first (it bounds what is read
//! and how long a call may take), then `file_get`, answers checked, and the file is put into
//! NAME's inbox with `file_put`. The relay process ends and its socket is removed when the call
//! ends, whatever its outcome.
//!
//! Policy: the clone is the peer [`CLOUD`] in NAME's channel rules (its spec's, or its IT
//! policy's while one is in force), read at each call: a file enters NAME from its clone
//! unless its `channels.files_from` is set without `cloud` ([`decide_from_clone`]). A locked
//! profile refuses. Every call, allowed, denied (403) or failed, is one `channel-file` audit
//! record (profile = NAME, `from=cloud`, the clone's host) with the size and keyed digest of
//! what moved. Both names are the agents' inbox names ([`valid_file_name`]), never paths.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::{b64, Op, Request};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::Handset;
use crate::api::Peer;
use crate::api_types::ProfileState;
use crate::channels::{
    agent_call, agent_call_within, agent_info, agent_info_within, body, decide_from_clone,
    put_request, sha256_hex, valid_file_name, ChannelError, Kind, Transfer, CLOUD, FILE_NAME_MAX,
};
use crate::error::Error;
use crate::spec::check_name;

/// How long the relay may take to reach the cloud host and the clone the first time.
const RELAY_START: Duration = Duration::from_secs(60);
/// How long one connection through the relay may take to reach the clone's agent (a TLS
/// connection to the host, which starts a process for it, comes first).
const RELAY_CONNECT: Duration = Duration::from_secs(30);

/// `POST /v1/profiles/{name}/clone/files`: which file of the clone's inbox to bring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromClone {
    /// The file's name in the clone's agent inbox.
    pub name: String,
    /// Its name in the profile's inbox (default: the same); a file of that name is replaced.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub as_name: Option<String>,
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

    /// Reads `remote` from the clone's agent through a relay and writes it into `name`'s
    /// inbox as `local`.
    async fn bring_from_clone(
        &self,
        name: &str,
        host: &str,
        remote: &str,
        local: &str,
    ) -> Result<Transfer, ChannelError> {
        let t0 = Instant::now();
        let relay = self.clone_relay(name, host).await?;
        let clone = format!("{name}'s clone");
        let src = relay.socket.clone();
        let dst = self.dir().vsock_socket(name);
        let moved = async {
            // Both agents' limits first: nothing is read that cannot be delivered.
            let src_info = agent_info_within(&clone, &src, RELAY_CONNECT).await?;
            let dst_info = agent_info(name, &dst).await?;
            let target_max = dst_info.max(Kind::File).min(Kind::File.limit());
            let max_line = b64::encoded_len(target_max.min(src_info.max(Kind::File)))
                + agent_proto::ENVELOPE_MAX;
            let get = Request {
                name: Some(remote),
                ..Request::new(Op::FileGet)
            };
            let got = agent_call_within(&clone, &src, &get, max_line, src_info, RELAY_CONNECT)
                .await
                .map_err(|e| match e {
                    ChannelError::TooLarge(_) => ChannelError::TooLarge(format!(
                        "the file in {name}'s clone is larger than {name}'s agent accepts \
                         ({target_max} bytes)"
                    )),
                    e => e,
                })?;
            let data = got
                .data_b64
                .as_deref()
                .and_then(|s| b64::decode(s).ok())
                .ok_or_else(|| {
                    ChannelError::Agent(format!("{clone}'s agent sent no valid data_b64"))
                })?;
            if data.len() > target_max {
                return Err(ChannelError::TooLarge(format!(
                    "the file is {} bytes; {name}'s agent accepts at most {target_max}",
                    data.len()
                )));
            }
            let data_b64 = b64::encode(&data);
            let put = put_request(Kind::File, Some(local), None, &data_b64);
            agent_call(name, &dst, &put, 4096, dst_info).await?;
            Ok(Transfer {
                kind: Kind::File,
                from: CLOUD.to_string(),
                to: name.to_string(),
                name: Some(local.to_string()),
                mime: None,
                bytes: data.len() as u64,
                sha256: sha256_hex(&data),
                audit_digest: self.audit_digest(&data),
                ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        }
        .await;
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

    /// Checks the names, the lock, the policy, the state and the clone's host, then brings
    /// the file with the profile unpaused. `allowed` records the policy decision once made,
    /// `host` the clone's host once known.
    async fn guarded_from_clone(
        &self,
        name: &str,
        remote: &str,
        local: &str,
        allowed: &mut Option<bool>,
        host: &mut Option<String>,
    ) -> Result<Transfer, ChannelError> {
        check_name("profile", name)?;
        check_file_name("file name", remote)?;
        check_file_name("as", local)?;
        let info = self.show(name)?;
        // A locked profile reaches no channel, whatever its rules.
        self.refuse_if_locked(name, "a file from its clone")?;
        let mut spec = info.spec.clone();
        spec.channels = crate::org_policy::effective_channels(self.dir(), &spec)?;
        let decision = decide_from_clone(&spec);
        *allowed = Some(decision.is_ok());
        decision.map_err(|why| {
            ChannelError::Denied(format!(
                "file from {CLOUD} (the clone of {name}) to {name} denied by policy: {why}"
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
        self.with_unpaused(&[name], self.bring_from_clone(name, &at, remote, local))
            .await?
    }

    /// Brings the file `remote` from the agent inbox of profile `name`'s clone into `name`'s
    /// own inbox (as `local`, default `remote`), under `name`'s channel rules for the peer
    /// [`CLOUD`]; audited whatever the outcome.
    pub async fn file_from_clone(
        &self,
        peer: Peer,
        name: &str,
        remote: &str,
        local: Option<&str>,
    ) -> Result<Transfer, ChannelError> {
        let local = local.unwrap_or(remote);
        let (mut allowed, mut host) = (None, None);
        let r = self
            .guarded_from_clone(name, remote, local, &mut allowed, &mut host)
            .await;
        let decision = match allowed {
            Some(true) => "allowed",
            Some(false) => "denied",
            None => "none",
        };
        let renamed = if local == remote {
            String::new()
        } else {
            format!(" as={}", local.escape_debug())
        };
        let at = host.map(|h| format!(" clone-at={h}")).unwrap_or_default();
        let outcome = match &r {
            Ok(t) => format!("result=ok bytes={} hmac-sha256={}", t.bytes, t.audit_digest),
            Err(e) => format!("result=error ({e})"),
        };
        let detail = format!(
            "from={CLOUD} to={} name={}{renamed}{at} decision={decision} {outcome} by {peer}",
            name.escape_debug(),
            remote.escape_debug()
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
pub async fn from_clone(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(profile): Path<String>,
    req: Result<Json<FromClone>, JsonRejection>,
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
                &format!("from={CLOUD} decision=none result=error ({e}) by {peer}"),
            );
            return Err(e);
        }
    };
    let t = h
        .file_from_clone(peer, &profile, &req.name, req.as_name.as_deref())
        .await?;
    Ok(Json(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_file_and_perhaps_a_new_name() {
        let r: FromClone = serde_json::from_str(r#"{"name":"a.txt","as":"b.txt"}"#).unwrap();
        assert_eq!(
            (r.name.as_str(), r.as_name.as_deref()),
            ("a.txt", Some("b.txt"))
        );
        let r: FromClone = serde_json::from_str(r#"{"name":"a.txt"}"#).unwrap();
        assert_eq!(r.as_name, None);
        assert!(serde_json::from_str::<FromClone>(r#"{"name":"a","to":"x"}"#).is_err());
        assert!(check_file_name("as", "../etc/passwd").is_err());
        assert_eq!(check_file_name("as", "").unwrap_err().status(), 400);
        assert!(check_file_name("as", "report-2.pdf").is_ok());
    }
}
