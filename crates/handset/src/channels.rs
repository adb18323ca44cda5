//! Typed channels between profiles: clipboard copy and file transfer, through the daemon.
//!
//! The daemon is the only party that talks to both guests: it asks the source profile's
//! in-guest agent for the data over the source's vsock socket (`run/vsock.sock`,
//! `CONNECT 1025`), checks it, and hands it to the target's agent. Guests never talk to
//! each other. The agent protocol (newline-delimited JSON, one answer line per request) is
//! described in `guest/probe/PROTOCOL.md` ("Agent mode") and implemented once, for the
//! daemon and both agents, by the `agent-proto` crate; `guest/agent` is the Linux agent.
//!
//! # Policy
//!
//! A transfer of kind K from profile A to profile B is allowed when both agree:
//! - A's spec lists B in `channels.clipboard_to` (K = clipboard) or `channels.files_to`
//!   (K = file): what may leave A, and where to;
//! - B's spec has no `channels.clipboard_from` / `channels.files_from`, or lists A there:
//!   what B accepts.
//!
//! The templates give `personal -> work` for both kinds and nothing from `work`. Specs are
//! read at each transfer, so editing `profile.toml` changes the next decision. A profile
//! with a signed IT policy in force ([`crate::org_policy`]) is governed by the policy's
//! `[channels]` lists instead of its spec's, read at each transfer too. Every
//! transfer, allowed, denied (403) or failed, is one `channel-clipboard` / `channel-file`
//! record in the audit log (profile = the source), with the size and SHA-256 of what moved.
//!
//! Two reserved peers stand for what is not a profile here: [`HOST`] (the device's user) and
//! [`CLOUD`] (a profile's own clone, files only). With them only the profile's own lists
//! decide ([`decide_reserved`]): out if its `*_to` lists the peer, in unless its `*_from` is
//! set without it.
//!
//! Both profiles must have a VMM; one paused in the background (`background = "pause"`)
//! is resumed for the transfer and paused again ([`Handset::with_unpaused`]).
//!
//! Guests are not trusted: both agents' `health` answers come first and bound what is read
//! (the smaller of the source's and the target's limits and the daemon's [`MAX_CLIPBOARD`] /
//! [`MAX_FILE`]) and how long each call may take (15 s plus 1 s per MiB, or per 4 KiB for
//! an agent that says it is the slow probe, which is then held to 1 MiB); answers are
//! parsed as JSON, base64 and MIME types are checked, and nothing from one guest reaches
//! the other unless it passed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::{b64, Answer, Op, Request};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::api::Peer;
use crate::api_types::{ErrorBody, ProfileState};
use crate::daemon::Handset;
use crate::error::Error;
use crate::spec::{check_name, ProfileSpec};

pub use agent_proto::{valid_file_name, valid_mime};

/// The agents' vsock port.
pub const AGENT_PORT: u32 = agent_proto::PORT;
/// Largest clipboard content the daemon carries (the Linux agent's limit).
pub const MAX_CLIPBOARD: usize = agent_proto::LINUX.max_clipboard;
/// Largest file the daemon carries (the Linux agent's limit).
pub const MAX_FILE: usize = agent_proto::LINUX.max_file;
/// Longest file name.
pub const FILE_NAME_MAX: usize = agent_proto::NAME_MAX;
/// Time to connect to an agent and get `OK <port>`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Base time for one agent request, plus one second per [`Rate`] bytes it carries.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes per second granted to the probe agent (it runs very slowly under kvm_pvm).
const PROBE_RATE: usize = 4096;
/// Bytes per second granted to other agents.
const AGENT_RATE: usize = 1 << 20;
/// The most a probe agent is believed to hold (its own file limit): with the slow
/// [`PROBE_RATE`] this bounds a call to a guest claiming to be the probe to about 6 min.
const PROBE_MAX: usize = agent_proto::PROBE.max_file;

/// What moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The clipboard (content and MIME type).
    Clipboard,
    /// One file from the source's inbox to the target's.
    File,
}

impl Kind {
    /// `clipboard` or `file`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Clipboard => "clipboard",
            Kind::File => "file",
        }
    }

    pub(crate) fn limit(self) -> usize {
        match self {
            Kind::Clipboard => MAX_CLIPBOARD,
            Kind::File => MAX_FILE,
        }
    }
}

/// `POST /v1/channels/clipboard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipboardRequest {
    /// Source profile.
    pub from: String,
    /// Target profile.
    pub to: String,
}

/// `POST /v1/channels/file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRequest {
    /// Source profile.
    pub from: String,
    /// Target profile.
    pub to: String,
    /// File name in the source's inbox (kept in the target's).
    pub name: String,
}

/// A completed transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// What moved.
    pub kind: Kind,
    /// Source profile.
    pub from: String,
    /// Target profile.
    pub to: String,
    /// File name (file transfers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// MIME type (clipboard transfers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime: Option<String>,
    /// Bytes moved.
    pub bytes: u64,
    /// SHA-256 of the bytes, lower-case hex (for the caller, who knows the contents).
    pub sha256: String,
    /// The audit log's keyed digest of the bytes ([`crate::audit_key`]); not sent over the API.
    #[serde(skip)]
    pub audit_digest: String,
    /// Time taken in milliseconds.
    pub ms: u64,
}

/// Why a transfer did not happen; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A malformed request (400).
    #[error("{0}")]
    BadRequest(String),
    /// The policy forbids it (403).
    #[error("{0}")]
    Denied(String),
    /// A profile is not running (409).
    #[error("{0}")]
    NotRunning(String),
    /// The data exceeds a limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// An agent is unreachable, refused, or answered nonsense (502).
    #[error("{0}")]
    Agent(String),
    /// The daemon failed (its own status, e.g. 404 for an unknown profile).
    #[error(transparent)]
    Handset(#[from] Error),
}

impl ChannelError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ChannelError::BadRequest(_) => 400,
            ChannelError::Denied(_) => 403,
            ChannelError::NotRunning(_) => 409,
            ChannelError::TooLarge(_) => 413,
            ChannelError::Agent(_) => 502,
            ChannelError::Handset(e) => e.status(),
        }
    }
}

impl IntoResponse for ChannelError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let error = self
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        (status, Json(ErrorBody { error })).into_response()
    }
}

/// The policy decision for `kind` from `from` to `to` (see the module docs): `Err(reason)`
/// when denied.
pub fn decide(kind: Kind, from: &ProfileSpec, to: &ProfileSpec) -> Result<(), String> {
    let (send, accept, send_key, accept_key) = match kind {
        Kind::Clipboard => (
            &from.channels.clipboard_to,
            &to.channels.clipboard_from,
            "clipboard_to",
            "clipboard_from",
        ),
        Kind::File => (
            &from.channels.files_to,
            &to.channels.files_from,
            "files_to",
            "files_from",
        ),
    };
    if !send.contains(&to.name) {
        return Err(format!(
            "{}'s channels.{send_key} does not include {}",
            from.name, to.name
        ));
    }
    if let Some(list) = accept {
        if !list.contains(&from.name) {
            return Err(format!(
                "{}'s channels.{accept_key} does not include {}",
                to.name, from.name
            ));
        }
    }
    Ok(())
}

/// The peer name that stands for the host itself (the device's user, through the CLI or API)
/// in channel rules; no profile may be called this.
pub const HOST: &str = "host";

/// Which way data moves between a profile and a reserved peer ([`HOST`], [`CLOUD`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the peer into the profile (clipboard set, file push, file from the clone).
    ToProfile,
    /// From the profile out to the peer (clipboard get, file pull, file to the clone).
    FromProfile,
}

/// The policy decision for `kind` between the host and the profile `spec` (with its
/// effective channels): [`decide_reserved`] for [`HOST`].
pub fn decide_host(kind: Kind, way: Way, spec: &ProfileSpec) -> Result<(), String> {
    decide_reserved(HOST, kind, way, spec)
}

/// The policy decision for `kind` between the reserved peer `peer` ([`HOST`], or [`CLOUD`]
/// for files) and the profile `spec` (with its effective channels): out of the profile only
/// if its `clipboard_to` / `files_to` lists `peer`; into it unless its `clipboard_from` /
/// `files_from` is present without `peer`. `Err(reason)` when denied.
pub fn decide_reserved(peer: &str, kind: Kind, way: Way, spec: &ProfileSpec) -> Result<(), String> {
    let c = &spec.channels;
    let (send, accept, send_key, accept_key) = match kind {
        Kind::Clipboard => (
            &c.clipboard_to,
            &c.clipboard_from,
            "clipboard_to",
            "clipboard_from",
        ),
        Kind::File => (&c.files_to, &c.files_from, "files_to", "files_from"),
    };
    let name = &spec.name;
    match way {
        Way::FromProfile if !send.iter().any(|p| p == peer) => Err(format!(
            "{name}'s channels.{send_key} does not include {peer}"
        )),
        Way::ToProfile
            if accept
                .as_ref()
                .is_some_and(|l| !l.iter().any(|p| p == peer)) =>
        {
            Err(format!(
                "{name}'s channels.{accept_key} does not include {peer}"
            ))
        }
        _ => Ok(()),
    }
}

/// The peer name that stands for a profile's own clone at a cloud host (`profile clone`) in
/// its `files_from` and `files_to` lists; no profile may be called this. Files move between
/// a profile and its clone under [`decide_reserved`], as between the profile and the host.
pub const CLOUD: &str = "cloud";

/// Checks the channel peers `spec` names that `before` (the spec it replaces, if any) did not
/// name in the same list: each must be [`HOST`] or a profile `exists` knows, and none may be
/// the profile itself. Peers kept from `before` pass (a peer deleted since is not an error of
/// this change). `Err` is the 400 message.
pub fn check_peers(
    spec: &ProfileSpec,
    before: Option<&ProfileSpec>,
    exists: impl Fn(&str) -> bool,
) -> Result<(), String> {
    let lists = |s: &ProfileSpec| {
        let c = s.channels.clone();
        [
            ("clipboard_to", c.clipboard_to),
            ("files_to", c.files_to),
            ("clipboard_from", c.clipboard_from.unwrap_or_default()),
            ("files_from", c.files_from.unwrap_or_default()),
        ]
    };
    let old = before.map(lists);
    for (i, (key, peers)) in lists(spec).into_iter().enumerate() {
        for peer in &peers {
            if *peer == spec.name {
                return Err(format!(
                    "channels.{key} names {peer} itself: channels connect a profile with \
                     other profiles or the host (\"{HOST}\")"
                ));
            }
            let kept = old
                .as_ref()
                .and_then(|o| o.get(i))
                .is_some_and(|(_, list)| list.contains(peer));
            if peer == CLOUD && !key.starts_with("files_") {
                return Err(format!(
                    "channels.{key} names {CLOUD}, which stands for the profile's clone and is a \
                     peer in channels.files_from and files_to only (files move to and from it)"
                ));
            }
            if peer != HOST && peer != CLOUD && !kept && !exists(peer) {
                return Err(format!(
                    "channels.{key} names {peer}, which is no profile here (create it first; \
                     \"{HOST}\" stands for the host, \"{CLOUD}\" for the profile's clone)"
                ));
            }
        }
    }
    Ok(())
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// What an agent said about itself (`health`), with the daemon's bounds applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentInfo {
    /// Bytes per second its calls are given.
    rate: usize,
    max_clipboard: usize,
    max_file: usize,
}

impl AgentInfo {
    /// Before `health` answered: small calls only.
    const UNKNOWN: AgentInfo = AgentInfo {
        rate: PROBE_RATE,
        max_clipboard: 0,
        max_file: 0,
    };

    pub(crate) fn max(&self, kind: Kind) -> usize {
        match kind {
            Kind::Clipboard => self.max_clipboard,
            Kind::File => self.max_file,
        }
    }
}

/// Asks `profile`'s agent for its kind and limits.
pub(crate) async fn agent_info(profile: &str, vsock: &Path) -> Result<AgentInfo, ChannelError> {
    agent_info_within(profile, vsock, CONNECT_TIMEOUT).await
}

/// [`agent_info`] with `connect` as the time to reach the agent (a relayed socket takes
/// longer).
pub(crate) async fn agent_info_within(
    profile: &str,
    vsock: &Path,
    connect: Duration,
) -> Result<AgentInfo, ChannelError> {
    let req = Request::new(Op::Health);
    let a = agent_call_within(profile, vsock, &req, 4096, AgentInfo::UNKNOWN, connect).await?;
    let probe = a.agent.as_deref() == Some("probe");
    let cap = |claimed: Option<u64>, daemon: usize| {
        let daemon = if probe { daemon.min(PROBE_MAX) } else { daemon };
        claimed.map_or(daemon, |m| {
            usize::try_from(m).unwrap_or(usize::MAX).min(daemon)
        })
    };
    Ok(AgentInfo {
        rate: if probe { PROBE_RATE } else { AGENT_RATE },
        max_clipboard: cap(a.max_clipboard, MAX_CLIPBOARD),
        max_file: cap(a.max_file, MAX_FILE),
    })
}

/// `profile`'s agent's `health` answer, within `timeout` (for `list`/`show`).
pub(crate) async fn health(
    profile: &str,
    vsock: &Path,
    timeout: Duration,
) -> Result<Answer, ChannelError> {
    let req = Request::new(Op::Health);
    tokio::time::timeout(
        timeout,
        agent_call(profile, vsock, &req, 4096, AgentInfo::UNKNOWN),
    )
    .await
    .map_err(|_| ChannelError::Agent(format!("{profile}'s agent: no answer within {timeout:?}")))?
}

/// Sends one request to the agent behind `vsock` (a Firecracker-style host socket) and
/// returns its answer. `max_line` bounds the answer line (a longer one is
/// [`ChannelError::TooLarge`]); the call may take [`CALL_TIMEOUT`] plus a second per
/// `info.rate` bytes of request and of `max_line`.
pub(crate) async fn agent_call(
    profile: &str,
    vsock: &Path,
    request: &Request<'_>,
    max_line: usize,
    info: AgentInfo,
) -> Result<Answer, ChannelError> {
    agent_call_within(profile, vsock, request, max_line, info, CONNECT_TIMEOUT).await
}

/// [`agent_call`] with `connect` as the time to connect and get `OK <port>` (a socket
/// relayed to a cloud host makes a TLS connection first).
pub(crate) async fn agent_call_within(
    profile: &str,
    vsock: &Path,
    request: &Request<'_>,
    max_line: usize,
    info: AgentInfo,
    connect_timeout: Duration,
) -> Result<Answer, ChannelError> {
    let op = request.op;
    let fail = |what: String| ChannelError::Agent(format!("{profile}'s agent ({op}): {what}"));
    let line = request.to_line().map_err(|e| fail(e.to_string()))?;
    let connect = async {
        let mut s = UnixStream::connect(vsock).await?;
        s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
            .await?;
        let mut r = BufReader::new(s);
        let mut ok = Vec::new();
        (&mut r).take(64).read_until(b'\n', &mut ok).await?;
        Ok::<_, std::io::Error>((r, ok))
    };
    let (mut r, ok) = tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| fail(format!("no vsock connection within {connect_timeout:?}")))?
        .map_err(|e| fail(format!("cannot connect through {}: {e}", vsock.display())))?;
    if !ok.starts_with(b"OK ") {
        return Err(fail(format!(
            "nothing listens on vsock port {AGENT_PORT} (is the agent running in the guest?)"
        )));
    }
    let budget =
        CALL_TIMEOUT + Duration::from_secs(((line.len() + max_line) / info.rate.max(1)) as u64);
    let exchange = async {
        r.get_mut().write_all(&line).await?;
        let mut answer = Vec::new();
        (&mut r)
            .take(max_line as u64 + 1)
            .read_until(b'\n', &mut answer)
            .await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(budget, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {budget:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    if answer.len() > max_line {
        return Err(ChannelError::TooLarge(format!(
            "{profile}'s agent ({op}): answer longer than {max_line} bytes"
        )));
    }
    if answer.last() != Some(&b'\n') {
        return Err(fail("connection closed without an answer".into()));
    }
    let a: Answer =
        serde_json::from_slice(&answer).map_err(|e| fail(format!("bad answer: {e}")))?;
    if !a.ok {
        let why = a.error.unwrap_or_else(|| "refused".into());
        return Err(fail(format!("refused: {why}")));
    }
    Ok(a)
}

/// What one transfer carries.
struct Payload {
    data: Vec<u8>,
    mime: Option<String>,
}

/// Checks the policy (`allowed` records the decision once made), then moves the data.
async fn transfer(
    h: &Handset,
    kind: Kind,
    from: &str,
    to: &str,
    name: Option<&str>,
    allowed: &mut Option<bool>,
) -> Result<Transfer, ChannelError> {
    let t0 = Instant::now();
    let from_info = h.show(from)?;
    let to_info = h.show(to)?;
    // A locked profile reaches no channel, whatever the rules.
    for p in [from, to] {
        h.refuse_if_locked(p, "a channel transfer")?;
    }
    // A profile with an IT policy in force is governed by its channel lists, not its spec's.
    let mut from_spec = from_info.spec.clone();
    let mut to_spec = to_info.spec.clone();
    from_spec.channels = crate::org_policy::effective_channels(h.dir(), &from_spec)?;
    to_spec.channels = crate::org_policy::effective_channels(h.dir(), &to_spec)?;
    let decision = decide(kind, &from_spec, &to_spec);
    *allowed = Some(decision.is_ok());
    decision.map_err(|why| {
        ChannelError::Denied(format!(
            "{} from {from} to {to} denied by policy: {why}",
            kind.as_str()
        ))
    })?;
    for p in [&from_info, &to_info] {
        match p.state {
            // A paused (background) VM is resumed for the transfer by `with_unpaused`.
            ProfileState::Running | ProfileState::Paused => {}
            s => {
                return Err(ChannelError::NotRunning(format!(
                    "profile {} is {}, not running",
                    p.name,
                    s.as_str()
                )))
            }
        }
    }
    let (src, dst) = (End::profile(h, from), End::profile(h, to));
    let file = name.map(|n| (n, n));
    h.with_unpaused(&[from, to], move_data(h, kind, &src, &dst, file, t0))
        .await?
}

/// One end of a transfer: the agent behind a vsock socket.
pub(crate) struct End<'a> {
    /// Whose agent it is, in messages (`work`, `work's clone`).
    pub(crate) who: &'a str,
    /// The peer it is in the transfer's `from` / `to` (a profile, [`CLOUD`]).
    pub(crate) peer: &'a str,
    /// The socket its agent is reached on (`CONNECT` to [`AGENT_PORT`]).
    pub(crate) socket: std::path::PathBuf,
    /// How long reaching the agent may take.
    pub(crate) connect: Duration,
}

impl<'a> End<'a> {
    /// Profile `name`'s own agent, on its VMM's vsock socket.
    pub(crate) fn profile(h: &Handset, name: &'a str) -> Self {
        End {
            who: name,
            peer: name,
            socket: h.dir().vsock_socket(name),
            connect: CONNECT_TIMEOUT,
        }
    }
}

/// Asks both agents' limits, reads from the source's agent and writes to the target's. A
/// file is `file`'s first name in the source's inbox and its second in the target's.
pub(crate) async fn move_data(
    h: &Handset,
    kind: Kind,
    from: &End<'_>,
    to: &End<'_>,
    file: Option<(&str, &str)>,
    t0: Instant,
) -> Result<Transfer, ChannelError> {
    let (src, dst) = (&from.socket, &to.socket);
    // Both agents' limits first: nothing is read from the source that cannot be delivered,
    // and a call takes no longer than its agent's kind and limits justify.
    let src_info = agent_info_within(from.who, src, from.connect).await?;
    let dst_info = agent_info_within(to.who, dst, to.connect).await?;
    let target_max = dst_info.max(kind).min(kind.limit());
    let max_line = b64::encoded_len(target_max.min(src_info.max(kind))) + agent_proto::ENVELOPE_MAX;
    let get = match (kind, file) {
        (Kind::Clipboard, _) => Request::new(Op::ClipboardGet),
        (Kind::File, Some((n, _))) => Request {
            name: Some(n),
            ..Request::new(Op::FileGet)
        },
        (Kind::File, None) => return Err(ChannelError::BadRequest("name is missing".into())),
    };
    let got = agent_call_within(from.who, src, &get, max_line, src_info, from.connect)
        .await
        .map_err(|e| match e {
            ChannelError::TooLarge(_) => ChannelError::TooLarge(format!(
                "the {} in {} is larger than {}'s agent accepts ({target_max} bytes)",
                kind.as_str(),
                from.who,
                to.who
            )),
            e => e,
        })?;
    let data = got
        .data_b64
        .as_deref()
        .and_then(|s| b64::decode(s).ok())
        .ok_or_else(|| {
            ChannelError::Agent(format!("{}'s agent sent no valid data_b64", from.who))
        })?;
    let payload = Payload {
        mime: match kind {
            Kind::Clipboard => {
                let m = got.mime.unwrap_or_else(|| agent_proto::DEFAULT_MIME.into());
                if !valid_mime(&m) {
                    return Err(ChannelError::Agent(format!(
                        "{}'s agent sent a bad mime type",
                        from.who
                    )));
                }
                Some(m)
            }
            Kind::File => None,
        },
        data,
    };
    if payload.data.len() > target_max {
        return Err(ChannelError::TooLarge(format!(
            "the {} is {} bytes; {}'s agent accepts at most {target_max}",
            kind.as_str(),
            payload.data.len(),
            to.who
        )));
    }
    let data_b64 = b64::encode(&payload.data);
    let name = file.map(|(_, n)| n);
    let put = put_request(kind, name, payload.mime.as_deref(), &data_b64);
    agent_call_within(to.who, dst, &put, 4096, dst_info, to.connect).await?;
    Ok(Transfer {
        kind,
        from: from.peer.to_string(),
        to: to.peer.to_string(),
        name: name.map(str::to_string),
        mime: payload.mime,
        bytes: payload.data.len() as u64,
        sha256: sha256_hex(&payload.data),
        audit_digest: h.audit_digest(&payload.data),
        ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// The agent request that writes `data_b64` into a guest: its clipboard (with `mime`), or its
/// inbox file `name`.
pub(crate) fn put_request<'a>(
    kind: Kind,
    name: Option<&'a str>,
    mime: Option<&'a str>,
    data_b64: &'a str,
) -> Request<'a> {
    match kind {
        Kind::Clipboard => Request {
            mime,
            data_b64: Some(data_b64),
            ..Request::new(Op::ClipboardSet)
        },
        Kind::File => Request {
            name,
            data_b64: Some(data_b64),
            ..Request::new(Op::FilePut)
        },
    }
}

/// Validates, transfers and audits one request.
async fn audited_transfer(
    h: &Handset,
    peer: Peer,
    kind: Kind,
    from: &str,
    to: &str,
    name: Option<&str>,
) -> Result<Transfer, ChannelError> {
    check_name("from", from)?;
    check_name("to", to)?;
    if from == to {
        return Err(ChannelError::BadRequest(format!(
            "from and to are both {from}"
        )));
    }
    if let Some(n) = name {
        if !valid_file_name(n) {
            return Err(ChannelError::BadRequest(format!(
                "file name {n:?} must be 1-{FILE_NAME_MAX} of A-Z, a-z, 0-9, '.', '_' and '-', \
                 not starting with '.' nor containing '..'"
            )));
        }
    }
    let mut allowed = None;
    let r = transfer(h, kind, from, to, name, &mut allowed).await;
    let file = name.map(|n| format!(" name={n}")).unwrap_or_default();
    let decision = match allowed {
        Some(true) => "allowed",
        Some(false) => "denied",
        None => "none",
    };
    let outcome = match &r {
        Ok(t) => format!(
            "result=ok bytes={} hmac-sha256={}{}",
            t.bytes,
            t.audit_digest,
            t.mime
                .as_ref()
                .map(|m| format!(" mime={m}"))
                .unwrap_or_default()
        ),
        Err(e) => format!("result=error ({e})"),
    };
    let detail = format!("from={from} to={to}{file} decision={decision} {outcome} by {peer}");
    h.audit(from, &format!("channel-{}", kind.as_str()), &detail);
    r
}

pub(crate) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ChannelError> {
    b.map(|Json(v)| v)
        .map_err(|e| ChannelError::BadRequest(e.body_text()))
}

/// `POST /v1/channels/clipboard`.
pub async fn clipboard(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Result<Json<ClipboardRequest>, JsonRejection>,
) -> Result<Json<Transfer>, ChannelError> {
    let req = body(req)?;
    let t = audited_transfer(&h, peer, Kind::Clipboard, &req.from, &req.to, None).await?;
    Ok(Json(t))
}

/// `POST /v1/channels/file`.
pub async fn file(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Result<Json<FileRequest>, JsonRejection>,
) -> Result<Json<Transfer>, ChannelError> {
    let req = body(req)?;
    let t = audited_transfer(&h, peer, Kind::File, &req.from, &req.to, Some(&req.name)).await?;
    Ok(Json(t))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn spec(template: &str, name: &str) -> ProfileSpec {
        ProfileSpec::from_template(template, name, crate::spec::TemplateBoot::Probe).unwrap()
    }

    #[test]
    fn default_policy_personal_to_work_only() {
        let p = spec("personal", "personal");
        let w = spec("work", "work");
        for kind in [Kind::Clipboard, Kind::File] {
            assert_eq!(decide(kind, &p, &w), Ok(()));
            let why = decide(kind, &w, &p).unwrap_err();
            assert!(why.contains("work's channels."), "{why}");
        }
        // A third profile is neither sent to nor accepted by default.
        let other = spec("work", "lab");
        assert!(decide(Kind::Clipboard, &p, &other).is_err());
    }

    #[test]
    fn both_sides_must_agree_and_kinds_are_separate() {
        let p = spec("personal", "personal");
        let mut w = spec("work", "work");
        // The receiver narrows what it accepts.
        w.channels.clipboard_from = Some(vec!["home".into()]);
        let why = decide(Kind::Clipboard, &p, &w).unwrap_err();
        assert!(why.contains("clipboard_from"), "{why}");
        assert_eq!(decide(Kind::File, &p, &w), Ok(()));
        w.channels.clipboard_from = Some(vec!["personal".into()]);
        assert_eq!(decide(Kind::Clipboard, &p, &w), Ok(()));
        // Opening work -> personal for files only.
        w.channels.files_to = vec!["personal".into()];
        assert_eq!(decide(Kind::File, &w, &p), Ok(()));
        assert!(decide(Kind::Clipboard, &w, &p).is_err());
        // The new fields survive the spec file.
        let back = ProfileSpec::from_toml(&w.to_toml().unwrap()).unwrap();
        assert_eq!(back, w);
        w.channels.files_from = Some(vec!["Bad Name".into()]);
        assert!(w.validate().is_err());
    }

    #[test]
    fn peers_must_be_profiles_or_the_host_and_not_itself() {
        let known = |n: &str| ["work", "personal"].contains(&n);
        let mut p = spec("personal", "personal");
        assert_eq!(check_peers(&p, None, known), Ok(()));
        p.channels.files_from = Some(vec!["ghost".into()]);
        let why = check_peers(&p, None, known).unwrap_err();
        assert!(
            why.contains("files_from names ghost, which is no profile"),
            "{why}"
        );
        // A peer the old spec already had is kept (it may have been deleted since).
        let before = p.clone();
        p.memory_mib = 256;
        assert_eq!(check_peers(&p, Some(&before), known), Ok(()));
        // ... but only in the same list.
        p.channels.clipboard_to.push("ghost".into());
        assert!(check_peers(&p, Some(&before), known).is_err());
        let mut w = spec("work", "work");
        w.channels.clipboard_to = vec!["work".into()];
        let why = check_peers(&w, None, known).unwrap_err();
        assert!(why.contains("names work itself"), "{why}");
        w.channels.clipboard_to = vec!["host".into(), "personal".into()];
        assert_eq!(check_peers(&w, None, |_| false), Err(
            "channels.clipboard_to names personal, which is no profile here (create it first; \"host\" stands for the host, \"cloud\" for the profile's clone)".into()
        ));
    }

    #[test]
    fn a_clone_is_the_peer_cloud_in_the_file_lists_only() {
        let clone = |way, s: &ProfileSpec| decide_reserved(CLOUD, Kind::File, way, s);
        let mut w = spec("work", "work");
        // No accept list: files come back from the clone; none go to it unless listed.
        assert_eq!(clone(Way::ToProfile, &w), Ok(()));
        let why = clone(Way::FromProfile, &w).unwrap_err();
        assert_eq!(why, "work's channels.files_to does not include cloud");
        w.channels.files_from = Some(vec!["personal".into()]);
        let why = clone(Way::ToProfile, &w).unwrap_err();
        assert_eq!(why, "work's channels.files_from does not include cloud");
        w.channels.files_from = Some(vec!["personal".into(), CLOUD.into()]);
        assert_eq!(clone(Way::ToProfile, &w), Ok(()));
        // Sending to the clone is not sending to the host, nor the other way round.
        w.channels.files_to = vec![HOST.into()];
        assert!(clone(Way::FromProfile, &w).is_err());
        w.channels.files_to = vec![CLOUD.into()];
        assert_eq!(clone(Way::FromProfile, &w), Ok(()));
        assert!(decide_host(Kind::File, Way::FromProfile, &w).is_err());
        // Named where it means something; elsewhere it is refused in words.
        let known = |n: &str| n == "personal";
        assert_eq!(check_peers(&w, None, known), Ok(()));
        w.channels.clipboard_to = vec![CLOUD.into()];
        let why = check_peers(&w, None, known).unwrap_err();
        assert!(
            why.contains("in channels.files_from and files_to only"),
            "{why}"
        );
        w.channels.clipboard_to = vec![];
        w.channels.clipboard_from = Some(vec![CLOUD.into()]);
        assert!(check_peers(&w, None, known).is_err());
    }

    #[test]
    fn digests_are_lower_case_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // File names are checked before anything is asked of an agent (agent-proto's rule).
        assert!(valid_file_name("Report_2024-01.pdf"));
        assert!(!valid_file_name("../etc/passwd"));
    }

    /// A fake agent socket: answers the handshake with `hello` and the request with `answer`.
    async fn fake_agent(hello: &'static [u8], answer: Vec<u8>) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("vsock.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = BufReader::new(s);
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).await.unwrap();
            assert_eq!(line, b"CONNECT 1025\n");
            if hello.is_empty() {
                return; // like the VMM when nothing listens in the guest: closed
            }
            r.get_mut().write_all(hello).await.unwrap();
            line.clear();
            let _ = r.read_until(b'\n', &mut line).await;
            let _ = r.get_mut().write_all(&answer).await;
        });
        (t, path)
    }

    async fn call_fake(hello: &'static [u8], answer: &[u8]) -> Result<Answer, ChannelError> {
        let (_t, path) = fake_agent(hello, answer.to_vec()).await;
        let info = AgentInfo {
            rate: AGENT_RATE,
            max_clipboard: 64,
            max_file: 64,
        };
        agent_call("p", &path, &Request::new(Op::ClipboardGet), 64, info).await
    }

    #[tokio::test]
    async fn agent_answers_are_checked() {
        let a = call_fake(b"OK 1024\n", b"{\"ok\":true,\"data_b64\":\"aGk=\"}\n")
            .await
            .unwrap();
        assert_eq!(a.data_b64.as_deref(), Some("aGk="));
        let e = call_fake(b"OK 1024\n", &[b'x'; 100]).await.unwrap_err();
        assert_eq!(e.status(), 413, "{e}");
        assert!(e.to_string().contains("longer than 64 bytes"), "{e}");
        let cases: [(&'static [u8], &[u8], &str); 4] = [
            (
                b"OK 1024\n",
                b"{\"ok\":false,\"error\":\"nope\"}\n",
                "refused: nope",
            ),
            (b"OK 1024\n", b"{\"ok\":true}", "closed without an answer"),
            (b"OK 1024\n", b"garbage\n", "bad answer"),
            (b"", b"", "nothing listens on vsock port 1025"),
        ];
        for (hello, answer, want) in cases {
            let e = call_fake(hello, answer).await.unwrap_err();
            assert_eq!(e.status(), 502);
            assert!(e.to_string().contains(want), "{e} (wanted {want})");
        }
        // No socket at all: the VMM is not there.
        let e = agent_call(
            "p",
            Path::new("/nonexistent/vsock.sock"),
            &Request::new(Op::Health),
            64,
            AgentInfo::UNKNOWN,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("cannot connect"), "{e}");
    }

    #[tokio::test]
    async fn agent_claims_are_bounded() {
        let (_t, path) = fake_agent(
            b"OK 1024\n",
            b"{\"ok\":true,\"agent\":\"probe\",\"max_file\":1099511627776}\n".to_vec(),
        )
        .await;
        let p = agent_info("p", &path).await.unwrap();
        // A guest claiming to be the (slow) probe is held to the probe's size.
        assert_eq!(
            (p.rate, p.max_file, p.max_clipboard),
            (PROBE_RATE, PROBE_MAX, PROBE_MAX)
        );
        let (_t, path) = fake_agent(
            b"OK 1024\n",
            b"{\"ok\":true,\"agent\":\"linux\",\"max_file\":1099511627776,\"max_clipboard\":5}\n"
                .to_vec(),
        )
        .await;
        let l = agent_info("l", &path).await.unwrap();
        assert_eq!(
            (l.rate, l.max_file, l.max_clipboard),
            (AGENT_RATE, MAX_FILE, 5)
        );
        assert_eq!(l.max(Kind::Clipboard), 5);
    }

    #[test]
    fn errors_map_to_statuses() {
        assert_eq!(ChannelError::Denied("x".into()).status(), 403);
        assert_eq!(ChannelError::NotRunning("x".into()).status(), 409);
        assert_eq!(ChannelError::TooLarge("x".into()).status(), 413);
        assert_eq!(ChannelError::Agent("x".into()).status(), 502);
        assert_eq!(
            ChannelError::from(Error::NotFound("p".into())).status(),
            404
        );
    }
}
