//! The host's own channels to one profile: set and read its clipboard, push a file into its
//! agent's inbox and pull one out (`profile clipboard set|get`, `profile file push|pull`).
//!
//! They go through the profile's in-guest agent exactly as profile-to-profile transfers do
//! ([`crate::channels`]): the agent's `health` bounds what is read, answers are checked, a
//! paused background profile is resumed for the call. The host is the peer [`HOST`] in
//! the profile's channel rules (its spec's, or its IT policy's while one is in force), read
//! at each call ([`decide_host`]): data leaves a profile only if its `clipboard_to` /
//! `files_to` lists `host`; data enters unless its `clipboard_from` / `files_from` is set
//! without `host`. Every call, allowed, denied (403) or failed, is one `channel-clipboard` /
//! `channel-file` audit record (profile = the guest) with the size and keyed digest of
//! what moved. File names are the agents' inbox names ([`valid_file_name`]): checked here
//! and again by the agent, never a path.

use std::sync::Arc;
use std::time::Instant;

use agent_proto::{b64, Op, Request};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::Peer;
use crate::api_types::ProfileState;
use crate::channels::{
    agent_call, agent_info, body, decide_host, sha256_hex, valid_file_name, valid_mime,
    ChannelError, Kind, Transfer, Way, FILE_NAME_MAX, HOST,
};
use crate::daemon::Handset;
use crate::spec::check_name;

/// `PUT /v1/profiles/{name}/clipboard`: what to put on the profile's clipboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipboardSet {
    /// MIME type (default `text/plain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime: Option<String>,
    /// The content, standard padded base64.
    pub data_b64: String,
}

/// `PUT /v1/profiles/{name}/files/{file}`: the file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePush {
    /// The content, standard padded base64.
    pub data_b64: String,
}

/// What a read from a profile returns: the transfer (from the profile to `host`) and the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// What moved.
    #[serde(flatten)]
    pub transfer: Transfer,
    /// The content, standard padded base64.
    pub data_b64: String,
}

/// The largest request body a push may have: the largest file in base64 and some JSON.
pub const PUSH_BODY_MAX: usize = b64::encoded_len(crate::channels::MAX_FILE) + 4096;

fn check_file_name(n: &str) -> Result<(), ChannelError> {
    if valid_file_name(n) {
        return Ok(());
    }
    Err(ChannelError::BadRequest(format!(
        "file name {n:?} must be 1-{FILE_NAME_MAX} of A-Z, a-z, 0-9, '.', '_' and '-', \
         not starting with '.' nor containing '..'"
    )))
}

/// One host call: what moves, which way, with which profile (and inbox file).
#[derive(Debug, Clone, Copy)]
struct HostCall<'a> {
    kind: Kind,
    way: Way,
    profile: &'a str,
    name: Option<&'a str>,
}

impl HostCall<'_> {
    /// The source and the target.
    fn ends(&self) -> (&str, &str) {
        match self.way {
            Way::ToProfile => (HOST, self.profile),
            Way::FromProfile => (self.profile, HOST),
        }
    }

    /// Checks the name, the policy and the state, then runs `call` with the profile
    /// unpaused; `allowed` records the policy decision once made.
    async fn guarded<T>(
        &self,
        h: &Handset,
        allowed: &mut Option<bool>,
        call: impl std::future::Future<Output = Result<T, ChannelError>>,
    ) -> Result<T, ChannelError> {
        let profile = self.profile;
        check_name("profile", profile)?;
        if let Some(n) = self.name {
            check_file_name(n)?;
        }
        let info = h.show(profile)?;
        // A locked profile reaches no channel, whatever its rules.
        h.refuse_if_locked(profile, "a channel transfer")?;
        let mut spec = info.spec.clone();
        spec.channels = crate::org_policy::effective_channels(h.dir(), &spec)?;
        let decision = decide_host(self.kind, self.way, &spec);
        *allowed = Some(decision.is_ok());
        decision.map_err(|why| {
            let (from, to) = self.ends();
            ChannelError::Denied(format!(
                "{} from {from} to {to} denied by policy: {why}",
                self.kind.as_str()
            ))
        })?;
        match info.state {
            ProfileState::Running | ProfileState::Paused => {}
            s => {
                return Err(ChannelError::NotRunning(format!(
                    "profile {profile} is {}, not running",
                    s.as_str()
                )))
            }
        }
        h.with_unpaused(&[profile], call).await?
    }

    /// Records the call in the audit log and passes its result on.
    fn audited<T>(
        &self,
        h: &Handset,
        peer: Peer,
        allowed: Option<bool>,
        r: Result<T, ChannelError>,
        moved: impl Fn(&T) -> &Transfer,
    ) -> Result<T, ChannelError> {
        let (from, to) = self.ends();
        let file = self
            .name
            .map(|n| format!(" name={}", n.escape_debug()))
            .unwrap_or_default();
        let decision = match allowed {
            Some(true) => "allowed",
            Some(false) => "denied",
            None => "none",
        };
        let outcome = match &r {
            Ok(v) => {
                let t = moved(v);
                let mime = t
                    .mime
                    .as_ref()
                    .map(|m| format!(" mime={m}"))
                    .unwrap_or_default();
                format!(
                    "result=ok bytes={} hmac-sha256={}{mime}",
                    t.bytes, t.audit_digest
                )
            }
            Err(e) => format!("result=error ({e})"),
        };
        let detail = format!("from={from} to={to}{file} decision={decision} {outcome} by {peer}");
        let subject = if check_name("", self.profile).is_ok() {
            self.profile
        } else {
            "-"
        };
        h.audit(subject, &format!("channel-{}", self.kind.as_str()), &detail);
        r
    }
}

/// Decodes pushed data, bounded by the daemon's limit for `kind`.
fn decode_push(kind: Kind, data_b64: &str) -> Result<Vec<u8>, ChannelError> {
    let len = b64::decoded_len(data_b64)
        .map_err(|_| ChannelError::BadRequest("data_b64 is not canonical padded base64".into()))?;
    if len > kind.limit() {
        return Err(ChannelError::TooLarge(format!(
            "the {} is {len} bytes; the handset carries at most {}",
            kind.as_str(),
            kind.limit()
        )));
    }
    b64::decode(data_b64)
        .map_err(|_| ChannelError::BadRequest("data_b64 is not canonical padded base64".into()))
}

/// Writes `data` into `profile` through its agent (clipboard, or the inbox file `name`).
async fn push(
    h: &Handset,
    hc: HostCall<'_>,
    mime: Option<&str>,
    data: &[u8],
) -> Result<Transfer, ChannelError> {
    let HostCall {
        kind,
        profile,
        name,
        ..
    } = hc;
    let t0 = Instant::now();
    let sock = h.dir().vsock_socket(profile);
    let info = agent_info(profile, &sock).await?;
    let max = info.max(kind);
    if data.len() > max {
        return Err(ChannelError::TooLarge(format!(
            "the {} is {} bytes; {profile}'s agent accepts at most {max}",
            kind.as_str(),
            data.len()
        )));
    }
    let data_b64 = b64::encode(data);
    let req = crate::channels::put_request(kind, name, mime, &data_b64);
    agent_call(profile, &sock, &req, 4096, info).await?;
    Ok(Transfer {
        kind,
        from: HOST.to_string(),
        to: profile.to_string(),
        name: name.map(str::to_string),
        mime: mime.map(str::to_string),
        bytes: data.len() as u64,
        sha256: sha256_hex(data),
        audit_digest: h.audit_digest(data),
        ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Reads `profile`'s clipboard, or its inbox file `name`, through its agent.
async fn pull(h: &Handset, hc: HostCall<'_>) -> Result<Pulled, ChannelError> {
    let HostCall {
        kind,
        profile,
        name,
        ..
    } = hc;
    let t0 = Instant::now();
    let sock = h.dir().vsock_socket(profile);
    let info = agent_info(profile, &sock).await?;
    let max = info.max(kind).min(kind.limit());
    let max_line = b64::encoded_len(max) + agent_proto::ENVELOPE_MAX;
    let req = match kind {
        Kind::Clipboard => Request::new(Op::ClipboardGet),
        Kind::File => Request {
            name,
            ..Request::new(Op::FileGet)
        },
    };
    let got = agent_call(profile, &sock, &req, max_line, info).await?;
    let data = got
        .data_b64
        .as_deref()
        .and_then(|s| b64::decode(s).ok())
        .ok_or_else(|| ChannelError::Agent(format!("{profile}'s agent sent no valid data_b64")))?;
    if data.len() > max {
        return Err(ChannelError::Agent(format!(
            "{profile}'s agent sent {} bytes, more than its limit {max}",
            data.len()
        )));
    }
    let mime = match kind {
        Kind::Clipboard => {
            let m = got.mime.unwrap_or_else(|| agent_proto::DEFAULT_MIME.into());
            if !valid_mime(&m) {
                return Err(ChannelError::Agent(format!(
                    "{profile}'s agent sent a bad mime type"
                )));
            }
            Some(m)
        }
        Kind::File => None,
    };
    Ok(Pulled {
        transfer: Transfer {
            kind,
            from: profile.to_string(),
            to: HOST.to_string(),
            name: name.map(str::to_string),
            mime,
            bytes: data.len() as u64,
            sha256: sha256_hex(&data),
            audit_digest: h.audit_digest(&data),
            ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        },
        data_b64: b64::encode(&data),
    })
}

/// `PUT /v1/profiles/{name}/clipboard`.
pub async fn clipboard_set(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(profile): Path<String>,
    req: Result<Json<ClipboardSet>, JsonRejection>,
) -> Result<Json<Transfer>, ChannelError> {
    let hc = HostCall {
        kind: Kind::Clipboard,
        way: Way::ToProfile,
        profile: &profile,
        name: None,
    };
    let mut allowed = None;
    let r = async {
        let req = body(req)?;
        let mime = req
            .mime
            .unwrap_or_else(|| agent_proto::DEFAULT_MIME.to_string());
        if !valid_mime(&mime) {
            return Err(ChannelError::BadRequest(format!(
                "mime {mime:?} must be 1-{} of A-Z, a-z, 0-9 and /+.;=-",
                agent_proto::MIME_MAX
            )));
        }
        let data = decode_push(hc.kind, &req.data_b64)?;
        let call = push(&h, hc, Some(&mime), &data);
        hc.guarded(&h, &mut allowed, call).await
    }
    .await;
    Ok(Json(hc.audited(&h, peer, allowed, r, |t| t)?))
}

/// `GET /v1/profiles/{name}/clipboard`.
pub async fn clipboard_get(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(profile): Path<String>,
) -> Result<Json<Pulled>, ChannelError> {
    let hc = HostCall {
        kind: Kind::Clipboard,
        way: Way::FromProfile,
        profile: &profile,
        name: None,
    };
    let mut allowed = None;
    let r = hc.guarded(&h, &mut allowed, pull(&h, hc)).await;
    Ok(Json(hc.audited(&h, peer, allowed, r, |p| &p.transfer)?))
}

/// `PUT /v1/profiles/{name}/files/{file}`.
pub async fn file_push(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path((profile, file)): Path<(String, String)>,
    req: Result<Json<FilePush>, JsonRejection>,
) -> Result<Json<Transfer>, ChannelError> {
    let hc = HostCall {
        kind: Kind::File,
        way: Way::ToProfile,
        profile: &profile,
        name: Some(&file),
    };
    let mut allowed = None;
    let r = async {
        check_file_name(&file)?;
        let req = body(req)?;
        let data = decode_push(hc.kind, &req.data_b64)?;
        hc.guarded(&h, &mut allowed, push(&h, hc, None, &data))
            .await
    }
    .await;
    Ok(Json(hc.audited(&h, peer, allowed, r, |t| t)?))
}

/// `GET /v1/profiles/{name}/files/{file}`.
pub async fn file_pull(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path((profile, file)): Path<(String, String)>,
) -> Result<Json<Pulled>, ChannelError> {
    let hc = HostCall {
        kind: Kind::File,
        way: Way::FromProfile,
        profile: &profile,
        name: Some(&file),
    };
    let mut allowed = None;
    let r = hc.guarded(&h, &mut allowed, pull(&h, hc)).await;
    Ok(Json(hc.audited(&h, peer, allowed, r, |p| &p.transfer)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ProfileSpec;

    fn spec(template: &str, name: &str) -> ProfileSpec {
        ProfileSpec::from_template(template, name, crate::spec::TemplateBoot::Probe).unwrap()
    }

    #[test]
    fn host_rules_per_direction() {
        let (to, from) = (Way::ToProfile, Way::FromProfile);
        let p = spec("personal", "personal");
        let mut w = spec("work", "work");
        for kind in [Kind::Clipboard, Kind::File] {
            // The templates: the host may give both data; only personal's leaves to the host.
            assert_eq!(decide_host(kind, to, &p), Ok(()));
            assert_eq!(decide_host(kind, from, &p), Ok(()));
            assert_eq!(decide_host(kind, to, &w), Ok(()));
            let why = decide_host(kind, from, &w).unwrap_err();
            assert!(
                why.contains("work's channels.") && why.contains("host"),
                "{why}"
            );
        }
        // An accept list without host refuses the host; kinds are separate.
        w.channels.clipboard_from = Some(vec!["personal".into()]);
        assert!(decide_host(Kind::Clipboard, to, &w).is_err());
        assert_eq!(decide_host(Kind::File, to, &w), Ok(()));
        w.channels.files_from = Some(vec!["host".into()]);
        assert_eq!(decide_host(Kind::File, to, &w), Ok(()));
        w.channels.files_to = vec!["host".into()];
        assert_eq!(decide_host(Kind::File, from, &w), Ok(()));
        assert!(decide_host(Kind::Clipboard, from, &w).is_err());
    }

    #[test]
    fn pushed_data_is_checked_and_bounded() {
        assert_eq!(decode_push(Kind::Clipboard, "aGk=").unwrap(), b"hi");
        assert_eq!(decode_push(Kind::File, "aGk").unwrap_err().status(), 400);
        let big = b64::encode(&vec![0u8; crate::channels::MAX_CLIPBOARD + 1]);
        assert_eq!(
            decode_push(Kind::Clipboard, &big).unwrap_err().status(),
            413
        );
        assert!(check_file_name("report.pdf").is_ok());
        for bad in ["../x", "a/b", ".hidden", ""] {
            assert_eq!(check_file_name(bad).unwrap_err().status(), 400, "{bad}");
        }
    }
}
