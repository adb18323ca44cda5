//! The REST API on `handset.sock`: the route table, the handlers and the server.
//!
//! [`ROUTES`] is the single list of routes: the router is built from it and the OpenAPI
//! test compares it with `docs/api/handset.openapi.yaml`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put, MethodRouter};
use axum::{Json, Router};

use crate::api_types::{
    CreateProfile, DeleteQuery, ErrorBody, EventsQuery, LimitQuery, OffloadRequest, Passcode,
    ReclaimQuery, ReplicateRequest, ReplicationStatus, StopQuery,
};
use crate::daemon::Handset;
use crate::db::Log;
use crate::error::Error;
use crate::org_policy::{self, ApplyPolicy, PolicyApplied};

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Daemon facts.
    Info,
    /// List profiles.
    List,
    /// Create a profile.
    Create,
    /// Show one profile.
    Show,
    /// Delete a profile.
    Delete,
    /// Change what may change in a profile's spec.
    Set,
    /// Start a profile.
    Start,
    /// Stop a profile.
    Stop,
    /// Suspend to disk.
    Suspend,
    /// Resume from disk.
    Resume,
    /// Stop the vCPUs, memory kept.
    Pause,
    /// Run a paused profile's vCPUs again.
    Unpause,
    /// Bring to the foreground.
    Switch,
    /// A profile's lifecycle events.
    Events,
    /// What a running profile's screen shows.
    Screenshot,
    /// The guest's serial console, interactive (switches protocols).
    Console,
    /// Where a running profile's screen can be viewed (VNC on loopback).
    View,
    /// A running profile's screen as RFB over a websocket (the browser phone's).
    Screen,
    /// Where the device screen (foreground profile under the host's status bar) is viewed.
    DeviceView,
    /// All lifecycle events.
    AllEvents,
    /// Lifecycle events as they happen (server-sent events).
    EventStream,
    /// The audit log.
    Audit,
    /// Apply a signed IT policy.
    ApplyPolicy,
    /// The IT policy in force for a profile.
    ProfilePolicy,
    /// Copy a clipboard between profiles.
    ChannelClipboard,
    /// Send a file between profiles.
    ChannelFile,
    /// Put data on a profile's clipboard.
    ClipboardSet,
    /// Read a profile's clipboard.
    ClipboardGet,
    /// Put a file in a profile's agent inbox.
    FilePush,
    /// Read a file from a profile's agent inbox.
    FilePull,
    /// Lock a profile (paused until its passcode unlocks it).
    Lock,
    /// Unlock a profile with its passcode.
    Unlock,
    /// Set a profile's passcode.
    Passcode,
    /// Crypto-erase and delete a profile.
    Wipe,
    /// Migrate a running profile live to a cloud host.
    Offload,
    /// Bring an offloaded profile back from its cloud host.
    Return,
    /// Start a live copy of a running profile at a cloud host.
    Clone,
    /// Move a file between a profile's agent inbox and its clone's.
    CloneFile,
    /// Replicate a profile to a cloud host while it runs (the daemon's timer).
    Replicate,
    /// A profile's replication and how it goes.
    Replication,
    /// End a profile's replication.
    Unreplicate,
}

/// One route.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path (axum syntax, `{name}` parameters, as in OpenAPI).
    pub path: &'static str,
    /// Handler.
    pub op: Op,
}

const fn r(method: &'static str, path: &'static str, op: Op) -> Route {
    Route { method, path, op }
}

/// Every route the daemon serves.
pub const ROUTES: &[Route] = &[
    r("GET", "/v1/handset", Op::Info),
    r("GET", "/v1/profiles", Op::List),
    r("POST", "/v1/profiles", Op::Create),
    r("GET", "/v1/profiles/{name}", Op::Show),
    r("DELETE", "/v1/profiles/{name}", Op::Delete),
    r("PATCH", "/v1/profiles/{name}", Op::Set),
    r("POST", "/v1/profiles/{name}/start", Op::Start),
    r("POST", "/v1/profiles/{name}/stop", Op::Stop),
    r("POST", "/v1/profiles/{name}/suspend", Op::Suspend),
    r("POST", "/v1/profiles/{name}/resume", Op::Resume),
    r("POST", "/v1/profiles/{name}/pause", Op::Pause),
    r("POST", "/v1/profiles/{name}/unpause", Op::Unpause),
    r("POST", "/v1/profiles/{name}/switch", Op::Switch),
    r("GET", "/v1/profiles/{name}/events", Op::Events),
    r("GET", "/v1/profiles/{name}/screenshot", Op::Screenshot),
    r("GET", "/v1/profiles/{name}/console", Op::Console),
    r("GET", "/v1/profiles/{name}/view", Op::View),
    r("GET", "/v1/profiles/{name}/screen", Op::Screen),
    r("GET", "/v1/device/view", Op::DeviceView),
    r("GET", "/v1/events", Op::AllEvents),
    r("GET", "/v1/events/stream", Op::EventStream),
    r("GET", "/v1/audit", Op::Audit),
    r("POST", "/v1/policies", Op::ApplyPolicy),
    r("GET", "/v1/profiles/{name}/policy", Op::ProfilePolicy),
    r("POST", "/v1/channels/clipboard", Op::ChannelClipboard),
    r("POST", "/v1/channels/file", Op::ChannelFile),
    r("PUT", "/v1/profiles/{name}/clipboard", Op::ClipboardSet),
    r("GET", "/v1/profiles/{name}/clipboard", Op::ClipboardGet),
    r("PUT", "/v1/profiles/{name}/files/{file}", Op::FilePush),
    r("GET", "/v1/profiles/{name}/files/{file}", Op::FilePull),
    r("POST", "/v1/profiles/{name}/lock", Op::Lock),
    r("POST", "/v1/profiles/{name}/unlock", Op::Unlock),
    r("PUT", "/v1/profiles/{name}/passcode", Op::Passcode),
    r("POST", "/v1/profiles/{name}/wipe", Op::Wipe),
    r("POST", "/v1/profiles/{name}/offload", Op::Offload),
    r("POST", "/v1/profiles/{name}/return", Op::Return),
    r("POST", "/v1/profiles/{name}/clone", Op::Clone),
    r("POST", "/v1/profiles/{name}/clone/files", Op::CloneFile),
    r("POST", "/v1/profiles/{name}/replicate", Op::Replicate),
    r("GET", "/v1/profiles/{name}/replicate", Op::Replication),
    r("DELETE", "/v1/profiles/{name}/replicate", Op::Unreplicate),
];

type Hs = Arc<Handset>;

/// The API client's credentials (SO_PEERCRED), recorded in the audit log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    /// Client user id.
    pub uid: Option<u32>,
    /// Client process id.
    pub pid: Option<i32>,
    /// The client's address, for one on the browser phone's TCP listener ([`crate::phone`]).
    pub addr: Option<std::net::SocketAddr>,
}

impl Peer {
    /// Whether the client is on another machine (a TCP client not on loopback).
    pub fn is_remote(&self) -> bool {
        self.addr.is_some_and(|a| !a.ip().is_loopback())
    }
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        let cred = stream.io().peer_cred().ok();
        Peer {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
            addr: None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(addr) = self.addr {
            return write!(f, "browser phone client {addr}");
        }
        let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        write!(
            f,
            "uid {} pid {}",
            show(self.uid.map(|v| v.to_string())),
            show(self.pid.map(|v| v.to_string()))
        )
    }
}

/// An error as an HTTP response: its status and `{"error": "..."}`.
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let text = self.0.to_string();
        let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
        (status, Json(ErrorBody { error: one_line })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Records `action` on `profile` in the audit log with its outcome, and passes the outcome on.
pub(crate) fn audited<T>(
    h: &Handset,
    peer: Peer,
    profile: &str,
    action: &str,
    r: crate::Result<T>,
) -> Result<T, ApiError> {
    let detail = match &r {
        Ok(_) => format!("{peer}: ok"),
        Err(e) => format!("{peer}: error: {e}"),
    };
    // A name that is no profile name (`-x`, `../a`, control characters) is recorded under
    // `-`, escaped and cut short, never as a profile.
    if crate::spec::check_name("", profile).is_err() {
        let shown: String = format!("{profile:?}").chars().take(66).collect();
        h.audit("-", action, &format!("name {shown}; {detail}"));
    } else {
        h.audit(profile, action, &detail);
    }
    r.map_err(ApiError)
}

async fn info(State(h): State<Hs>) -> ApiResult<crate::DaemonInfo> {
    Ok(Json(h.daemon_info()?))
}

async fn list(State(h): State<Hs>) -> ApiResult<Vec<crate::ProfileInfo>> {
    Ok(Json(h.list_with_agents().await?))
}

async fn create(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Result<Json<CreateProfile>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::ProfileInfo>), ApiError> {
    let Json(req) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let name = req
        .name
        .clone()
        .or_else(|| req.spec.as_ref().map(|s| s.name.clone()))
        .unwrap_or_default();
    let r = h.create(req).await;
    let info = audited(&h, peer, &name, "create", r)?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn show(State(h): State<Hs>, Path(name): Path<String>) -> ApiResult<crate::ProfileInfo> {
    Ok(Json(h.show_with_agent(&name).await?))
}

async fn screenshot(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    let r = h.screenshot(&name).await;
    // A capture the IT policy refuses is recorded; allowed ones are not (they change nothing).
    if let Err(e @ Error::Denied(_)) = &r {
        h.audit(&name, "screenshot", &format!("{peer}: refused: {e}"));
    }
    Ok(Json(r?))
}

async fn view(
    State(h): State<Hs>,
    Path(name): Path<String>,
) -> ApiResult<crate::daemon::view::ViewInfo> {
    Ok(Json(h.view(&name).await?))
}

async fn device_view(
    State(h): State<Hs>,
) -> ApiResult<crate::daemon::device_screen::DeviceViewInfo> {
    Ok(Json(h.device_view()?))
}

async fn remove(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let q = query(q)?;
    let r = h.delete(&name, q.force.unwrap_or(false)).await;
    audited(&h, peer, &name, "delete", r)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    body: Result<Json<serde_json::Map<String, serde_json::Value>>, JsonRejection>,
) -> ApiResult<crate::ProfileInfo> {
    let Json(changes) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let r = h.set(&name, changes).await;
    Ok(Json(audited(&h, peer, &name, "set", r)?))
}

macro_rules! lifecycle {
    ($fn:ident, $action:literal) => {
        async fn $fn(
            State(h): State<Hs>,
            ConnectInfo(peer): ConnectInfo<Peer>,
            Path(name): Path<String>,
        ) -> ApiResult<crate::ProfileInfo> {
            let r = h.$fn(&name).await;
            Ok(Json(audited(&h, peer, &name, $action, r)?))
        }
    };
}

macro_rules! reclaimable {
    ($fn:ident, $action:literal) => {
        async fn $fn(
            State(h): State<Hs>,
            ConnectInfo(peer): ConnectInfo<Peer>,
            Path(name): Path<String>,
            q: Result<Query<ReclaimQuery>, QueryRejection>,
        ) -> ApiResult<crate::ProfileInfo> {
            let reclaim = query(q)?.reclaim.unwrap_or(false);
            let r = h.$fn(&name, reclaim).await;
            Ok(Json(audited(&h, peer, &name, $action, r)?))
        }
    };
}

reclaimable!(start, "start");
reclaimable!(resume, "resume");

async fn stop(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    q: Result<Query<StopQuery>, QueryRejection>,
) -> ApiResult<crate::ProfileInfo> {
    let q = query(q)?;
    let r = h.stop(&name, q.discard.unwrap_or(false)).await;
    Ok(Json(audited(&h, peer, &name, "stop", r)?))
}

lifecycle!(suspend, "suspend");
lifecycle!(lock, "lock");

async fn unlock(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    body: Result<Json<Passcode>, JsonRejection>,
) -> ApiResult<crate::ProfileInfo> {
    let Json(req) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let r = h.unlock(&name, req.passcode).await;
    Ok(Json(audited(&h, peer, &name, "unlock", r)?))
}

async fn wipe(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> ApiResult<crate::daemon::wipe::Wiped> {
    let r = h.wipe(&name).await;
    Ok(Json(audited(&h, peer, &name, "wipe-request", r)?))
}

async fn set_passcode(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    body: Result<Json<Passcode>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(req) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let r = h.set_passcode(&name, req.passcode).await;
    audited(&h, peer, &name, "passcode-set", r)?;
    Ok(StatusCode::NO_CONTENT)
}
async fn offload(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    body: Result<Json<OffloadRequest>, JsonRejection>,
) -> ApiResult<crate::ProfileInfo> {
    let Json(req) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let r = h.offload(&name, &req.to).await;
    Ok(Json(audited(&h, peer, &name, "offload", r)?))
}

async fn clone_to(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    body: Result<Json<OffloadRequest>, JsonRejection>,
) -> ApiResult<crate::ProfileInfo> {
    let Json(req) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let r = h.clone_to(&name, &req.to).await;
    Ok(Json(audited(&h, peer, &name, "clone", r)?))
}

async fn give_back(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> ApiResult<crate::ProfileInfo> {
    let r = h.give_back(&name).await;
    Ok(Json(audited(&h, peer, &name, "return", r)?))
}

async fn replicate(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    body: Result<Json<ReplicateRequest>, JsonRejection>,
) -> ApiResult<ReplicationStatus> {
    let Json(req) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let r = h.set_replication(&name, req).await;
    Ok(Json(audited(&h, peer, &name, "replicate", r)?))
}

async fn replication(
    State(h): State<Hs>,
    Path(name): Path<String>,
) -> ApiResult<ReplicationStatus> {
    Ok(Json(h.replication(&name)?))
}

async fn unreplicate(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let r = h.stop_replication(&name).await;
    audited(&h, peer, &name, "replicate-stop", r)?;
    Ok(StatusCode::NO_CONTENT)
}

lifecycle!(switch, "switch");
lifecycle!(pause, "pause");
lifecycle!(unpause, "unpause");

/// A query string, or the 400 (with the JSON error body) saying what is wrong with it.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError(Error::BadRequest(e.body_text())))
}

/// The largest `?limit=`.
pub const LIMIT_MAX: u32 = 10_000;

/// `?limit=` (default 100); above [`LIMIT_MAX`] is refused, not clamped.
fn limit(q: Result<Query<LimitQuery>, QueryRejection>) -> Result<u32, ApiError> {
    checked_limit(query(q)?.limit)
}

fn checked_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(100),
        Some(n) if n > LIMIT_MAX => Err(ApiError(Error::BadRequest(format!(
            "limit {n} is above the maximum {LIMIT_MAX}"
        )))),
        Some(n) => Ok(n),
    }
}

async fn events(
    State(h): State<Hs>,
    Path(name): Path<String>,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult<Vec<crate::Event>> {
    Ok(Json(h.profile_events(&name, limit(q)?)?))
}

async fn all_events(
    State(h): State<Hs>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Vec<crate::Event>> {
    let q = query(q)?;
    let limit = checked_limit(q.limit)?;
    Ok(Json(h.history(Log::Events, q.profile.as_deref(), limit)?))
}

async fn audit(
    State(h): State<Hs>,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult<Vec<crate::Event>> {
    Ok(Json(h.history(Log::Audit, None, limit(q)?)?))
}

async fn apply_policy(
    State(h): State<Hs>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Result<Json<ApplyPolicy>, JsonRejection>,
) -> ApiResult<PolicyApplied> {
    let Json(req) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let now = crate::policy_clock::now();
    let who = peer.to_string();
    let applied =
        org_policy::apply_audited(h.dir(), req.envelope.as_bytes(), now, &who, |p, a, d| {
            h.audit(p, a, d)
        })?;
    if applied.changed {
        // A running guest gets the new network rules now (the failure is audited; the
        // policy is in force and its rules apply at the next start or resume anyway).
        let _ = h.push_net_filter(&applied.profile).await;
    }
    Ok(Json(applied))
}

async fn profile_policy(
    State(h): State<Hs>,
    Path(name): Path<String>,
) -> ApiResult<org_policy::PolicyStatus> {
    Ok(Json(h.policy_status(&name)?))
}

fn method_router(route: &Route) -> MethodRouter<Hs> {
    match route.op {
        Op::Info => get(info),
        Op::List => get(list),
        Op::Create => post(create),
        Op::Show => get(show),
        Op::Delete => delete(remove),
        Op::Set => patch(set),
        Op::Start => post(start),
        Op::Stop => post(stop),
        Op::Suspend => post(suspend),
        Op::Resume => post(resume),
        Op::Pause => post(pause),
        Op::Unpause => post(unpause),
        Op::Switch => post(switch),
        Op::Events => get(events),
        Op::Screenshot => get(screenshot),
        Op::Console => get(crate::console::attach),
        Op::View => get(view),
        Op::DeviceView => get(device_view),
        Op::Screen => get(crate::phone::ws::screen),
        Op::AllEvents => get(all_events),
        Op::EventStream => get(crate::event_stream::stream),
        Op::Audit => get(audit),
        Op::ApplyPolicy => post(apply_policy),
        Op::ProfilePolicy => get(profile_policy),
        Op::ChannelClipboard => post(crate::channels::clipboard),
        Op::ChannelFile => post(crate::channels::file),
        Op::ClipboardSet => put(crate::host_channels::clipboard_set),
        Op::ClipboardGet => get(crate::host_channels::clipboard_get),
        Op::FilePush => put(crate::host_channels::file_push)
            .layer(DefaultBodyLimit::max(crate::host_channels::PUSH_BODY_MAX)),
        Op::FilePull => get(crate::host_channels::file_pull),
        Op::Lock => post(lock),
        Op::Unlock => post(unlock),
        Op::Passcode => put(set_passcode),
        Op::Wipe => post(wipe),
        Op::Offload => post(offload),
        Op::Return => post(give_back),
        Op::Clone => post(clone_to),
        Op::CloneFile => post(crate::daemon::clone_files::with_clone),
        Op::Replicate => post(replicate),
        Op::Replication => get(replication),
        Op::Unreplicate => delete(unreplicate),
    }
}

async fn not_found() -> (StatusCode, Json<ErrorBody>) {
    let error = "no such route (see docs/api/handset.openapi.yaml)".to_string();
    (StatusCode::NOT_FOUND, Json(ErrorBody { error }))
}

async fn method_not_allowed(method: axum::http::Method) -> (StatusCode, Json<ErrorBody>) {
    let error = format!(
        "method {method} is not allowed here (the Allow header lists those that are; see \
         docs/api/handset.openapi.yaml)"
    );
    (StatusCode::METHOD_NOT_ALLOWED, Json(ErrorBody { error }))
}

/// The router for [`ROUTES`].
pub fn router(h: Hs) -> Router {
    router_with(h, |_| true)
}

/// The router for the [`ROUTES`] whose operation `keep` accepts (the browser phone serves a
/// few).
pub fn router_with(h: Hs, keep: impl Fn(Op) -> bool) -> Router {
    let mut by_path: BTreeMap<&str, MethodRouter<Hs>> = BTreeMap::new();
    for route in ROUTES.iter().filter(|r| keep(r.op)) {
        let mr = method_router(route);
        let merged = match by_path.remove(route.path) {
            Some(existing) => existing.merge(mr),
            None => mr,
        };
        by_path.insert(route.path, merged);
    }
    let mut app = Router::new();
    for (path, mr) in by_path {
        app = app.route(path, mr);
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(h)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    h: Hs,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(h).into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
