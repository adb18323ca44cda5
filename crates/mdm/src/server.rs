//! The MDM server: axum over rustls.
//!
//! One listener serves everyone. The TLS layer asks every client for a certificate from the
//! server's CA but lets one connect without (enrollment, admin); the device endpoints then
//! require a certificate whose SHA-256 belongs to an enrolled, unrevoked device, and only
//! ever touch that device's rows. The admin API requires `Authorization: Bearer <token>`.
//!
//! | route | who |
//! |---|---|
//! | `POST /v1/enroll` | anyone with a token: token + key + proof -> certificate |
//! | `GET /v1/device/commands?wait=S` | device: its pending commands, long-polled |
//! | `POST /v1/device/results` | device: a result signed by its key |
//! | `POST /v1/device/compliance` | device: a compliance report (JSON) |
//! | `POST /v1/device/lease` | device: a key lease, signed by the command key |
//! | `POST /v1/admin/tokens`, `GET /v1/admin/devices`, `POST /v1/admin/devices/{id}/commands`, `POST /v1/admin/devices/{id}/revoke`, `GET /v1/admin/audit` | admin |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::ca::{cert_sha256, write_atomic};
use crate::protocol::{
    command_message, lease_message, result_message, verify_hex, EnrollBody, Enrolled, Lease,
    LeaseRequest, ResultBody, SignedCommand, MAX_LEASE_SECS,
};
use crate::{Ca, CaError, Device, EnrollRequest, Store, StoreError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const COMMAND_KEY_FILE: &str = "command-key.pk8";
/// Command kinds the admin may queue.
pub const COMMAND_KINDS: &[&str] = &["policy", "lock", "unlock", "wipe"];
/// Longest body a device or admin may send.
pub(crate) const MAX_BODY: usize = 256 * 1024;

/// Server failures at startup.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("command key {0}: {1}")]
    CommandKey(String, String),
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The server's shared state.
pub struct Mdm {
    store: Arc<dyn Store>,
    ca: Ca,
    command_key: Ed25519KeyPair,
    admin_token_sha256: [u8; 32],
    long_poll: Duration,
    wake: Mutex<HashMap<String, Arc<Notify>>>,
    /// Long polls being held now.
    polls_open: AtomicUsize,
}

/// Counts a long poll while it is held.
struct PollHeld<'a>(&'a AtomicUsize);

impl<'a> PollHeld<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        PollHeld(count)
    }
}

impl Drop for PollHeld<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(deprecated)] // ring's provider, as in vmm::migration::tls (no aws-lc-rs C build)
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_command_key(state_dir: &Path) -> Result<Ed25519KeyPair, ServerError> {
    let path = state_dir.join(COMMAND_KEY_FILE);
    let bad = |e: String| ServerError::CommandKey(path.display().to_string(), e);
    let pkcs8 = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| bad(e.to_string()))?;
            write_atomic(&path, doc.as_ref(), 0o600)?;
            doc.as_ref().to_vec()
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| bad(e.to_string()))
}

impl Mdm {
    /// The server on `store`, with its CA and command key in `state_dir` (created once).
    pub fn new(
        state_dir: &Path,
        store: Arc<dyn Store>,
        admin_token: &str,
        long_poll: Duration,
    ) -> Result<Arc<Self>, ServerError> {
        let ca = Ca::open_or_create(state_dir)?;
        let command_key = load_command_key(state_dir)?;
        let mdm = Arc::new(Mdm {
            store,
            ca,
            command_key,
            admin_token_sha256: Sha256::digest(admin_token.as_bytes()).into(),
            long_poll,
            wake: Mutex::new(HashMap::new()),
            polls_open: AtomicUsize::new(0),
        });
        // Another server on the same store queued a command or revoked a device: wake the
        // device's poll if this server holds it (the weak reference lets the server go).
        let weak = Arc::downgrade(&mdm);
        mdm.store.watch_devices(Box::new(move |device_id| {
            let Some(mdm) = weak.upgrade() else { return };
            let held = mdm
                .wake
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(device_id)
                .cloned();
            if let Some(notify) = held {
                notify.notify_waiters();
            }
        }))?;
        Ok(mdm)
    }

    /// How many devices' long polls the server holds now (waiting for a command or their
    /// time), for load tests and benches.
    pub fn polls_open(&self) -> usize {
        self.polls_open.load(Ordering::Relaxed)
    }

    /// Hex public key devices check commands against.
    pub fn command_key(&self) -> String {
        hex::encode(self.command_key.public_key().as_ref())
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// A rustls config: a server certificate for `names` from the CA, client certificates
    /// from the CA asked for but optional (checked per route).
    pub fn tls_config(&self, names: &[String]) -> Result<Arc<rustls::ServerConfig>, ServerError> {
        let (cert_pem, key_pem) = self.ca.issue_server(names)?;
        let tls = |e: &dyn std::fmt::Display| ServerError::Tls(e.to_string());
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| tls(&e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| tls(&e))?;
        let mut roots = rustls::RootCertStore::empty();
        let ca =
            CertificateDer::from_pem_slice(self.ca.cert_pem().as_bytes()).map_err(|e| tls(&e))?;
        roots.add(ca).map_err(|e| tls(&e))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(&e))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], key)
            .map_err(|e| tls(&e))?;
        Ok(Arc::new(config))
    }

    fn wake(&self, device_id: &str) -> Arc<Notify> {
        let mut map = self.wake.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(device_id.to_owned()).or_default().clone()
    }

    fn sign(&self, device_id: &str, c: crate::Command) -> SignedCommand {
        let sig = self
            .command_key
            .sign(&command_message(device_id, c.id, &c.kind, &c.body));
        SignedCommand {
            id: c.id,
            device_id: device_id.to_owned(),
            kind: c.kind,
            body: c.body,
            signature: hex::encode(sig.as_ref()),
        }
    }
}

/// Who is on the other end of a connection: address and client certificate, if any.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Hex SHA-256 of the client's end-entity certificate (already verified against the CA).
    pub cert_sha256: Option<String>,
}

/// Accepts TCP, completes TLS handshakes off the accept path, hands finished streams to axum.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(256);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = tcp.accept() => a,
                    () = tx.closed() => return,
                };
                let Ok((stream, addr)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        let cert_sha256 = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| cert_sha256(c));
                        let _ = tx.send((tls, Peer { addr, cert_sha256 })).await;
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            cert_sha256: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// An API error: status and a one-line reason.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TokenRefused => ApiError(StatusCode::FORBIDDEN, e.to_string()),
            StoreError::UnknownDevice(_) | StoreError::UnknownCommand(_) => {
                ApiError(StatusCode::NOT_FOUND, e.to_string())
            }
            StoreError::Duplicate => ApiError(StatusCode::CONFLICT, e.to_string()),
            _ => ApiError(StatusCode::INTERNAL_SERVER_ERROR, "store failure".into()),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn device_of(mdm: &Mdm, peer: &Peer) -> ApiResult<Device> {
    let Some(fp) = &peer.cert_sha256 else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "a device certificate is required".into(),
        ));
    };
    match mdm.store.device_by_cert(fp)? {
        Some(d) if !d.revoked => Ok(d),
        Some(_) => Err(ApiError(StatusCode::FORBIDDEN, "device revoked".into())),
        None => Err(ApiError(
            StatusCode::FORBIDDEN,
            "unknown device certificate".into(),
        )),
    }
}

fn admin(mdm: &Mdm, headers: &HeaderMap) -> ApiResult<()> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Comparing hashes: the time taken says nothing about the token.
    match presented {
        Some(t) if <[u8; 32]>::from(Sha256::digest(t.as_bytes())) == mdm.admin_token_sha256 => {
            Ok(())
        }
        _ => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "admin bearer token required".into(),
        )),
    }
}

fn random_hex(bytes: usize) -> ApiResult<String> {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no randomness".into()))?;
    Ok(hex::encode(b))
}

async fn enroll(
    State(mdm): State<Arc<Mdm>>,
    Json(body): Json<EnrollBody>,
) -> ApiResult<Json<Enrolled>> {
    let bad = || {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad key or proof of possession".into(),
        )
    };
    let req = EnrollRequest {
        public_key: hex::decode(&body.public_key).map_err(|_| bad())?,
        signature: hex::decode(&body.signature).map_err(|_| bad())?,
    };
    // The proof first, so a malformed request does not use the token up.
    req.verify(&body.token).map_err(|_| bad())?;
    mdm.store.redeem_token(&body.token, now())?;
    let device_id = random_hex(16)?;
    let cert = mdm
        .ca
        .issue(&device_id, &req, &body.token)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    mdm.store.add_device(&Device {
        id: device_id.clone(),
        cert_sha256: cert.sha256,
        enrolled_at: now(),
        revoked: false,
        public_key: body.public_key,
    })?;
    mdm.store
        .audit(&format!("device:{device_id}"), "enroll", "", now())?;
    Ok(Json(Enrolled {
        device_id,
        cert_pem: cert.pem,
        ca_pem: mdm.ca.cert_pem().to_owned(),
        command_key: mdm.command_key(),
    }))
}

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
}

async fn commands(
    State(mdm): State<Arc<Mdm>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<Vec<SignedCommand>>> {
    let device = device_of(&mdm, &peer)?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(mdm.long_poll);
    let deadline = tokio::time::Instant::now() + wait;
    let wake = mdm.wake(&device.id);
    let _held = PollHeld::new(&mdm.polls_open);
    let mut again = false;
    loop {
        // Registered before the check, so a command queued in between still wakes us.
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if again {
            // A revocation wakes the poll too, and ends it as it would the next request.
            device_of(&mdm, &peer)?;
        }
        again = true;
        let pending = mdm.store.pending(&device.id)?;
        if !pending.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(
                pending
                    .into_iter()
                    .map(|c| mdm.sign(&device.id, c))
                    .collect(),
            ));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn results(
    State(mdm): State<Arc<Mdm>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(body): Json<ResultBody>,
) -> ApiResult<StatusCode> {
    let device = device_of(&mdm, &peer)?;
    let message = result_message(&device.id, body.command_id, &body.result);
    if !verify_hex(&device.public_key, &message, &body.signature) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "result not signed by the device key".into(),
        ));
    }
    mdm.store
        .complete(&device.id, body.command_id, &body.result, now())?;
    mdm.store.audit(
        &format!("device:{}", device.id),
        "result",
        &body.command_id.to_string(),
        now(),
    )?;
    Ok(StatusCode::NO_CONTENT)
}

async fn compliance(
    State(mdm): State<Arc<Mdm>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(report): Json<serde_json::Value>,
) -> ApiResult<StatusCode> {
    let device = device_of(&mdm, &peer)?;
    mdm.store
        .add_compliance(&device.id, &report.to_string(), now())?;
    Ok(StatusCode::NO_CONTENT)
}

/// A key lease for the device, valid `secs` (1 s to [`MAX_LEASE_SECS`]) from now, signed by
/// the command key. A revoked device gets none (403 before this).
async fn lease(
    State(mdm): State<Arc<Mdm>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<LeaseRequest>,
) -> ApiResult<Json<Lease>> {
    let device = device_of(&mdm, &peer)?;
    if !(1..=MAX_LEASE_SECS).contains(&req.secs) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("secs must be 1..={MAX_LEASE_SECS}"),
        ));
    }
    let issued_at = u64::try_from(now()).unwrap_or(0);
    let valid_until = issued_at + req.secs;
    let sig = mdm
        .command_key
        .sign(&lease_message(&device.id, issued_at, valid_until));
    Ok(Json(Lease {
        device_id: device.id,
        issued_at,
        valid_until,
        signature: hex::encode(sig.as_ref()),
    }))
}

#[derive(Deserialize)]
struct TokenBody {
    /// Seconds the token stays valid (1 s to 30 days).
    ttl_secs: i64,
}

/// The answer to `POST /v1/admin/tokens`.
#[derive(Serialize, Deserialize)]
pub struct NewToken {
    pub token: String,
    pub expires_at: i64,
}

async fn new_token(
    State(mdm): State<Arc<Mdm>>,
    headers: HeaderMap,
    Json(b): Json<TokenBody>,
) -> ApiResult<Json<NewToken>> {
    admin(&mdm, &headers)?;
    if !(1..=30 * 86400).contains(&b.ttl_secs) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "ttl_secs must be 1..=2592000".into(),
        ));
    }
    let token = random_hex(32)?;
    let expires_at = now() + b.ttl_secs;
    mdm.store.add_token(&token, expires_at)?;
    mdm.store.audit(
        "admin",
        "enroll-token",
        &format!("expires {expires_at}"),
        now(),
    )?;
    Ok(Json(NewToken { token, expires_at }))
}

/// A device as the admin API lists it.
#[derive(Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub cert_sha256: String,
    pub enrolled_at: i64,
    pub revoked: bool,
    pub compliance: Option<serde_json::Value>,
}

async fn devices(
    State(mdm): State<Arc<Mdm>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<DeviceInfo>>> {
    admin(&mdm, &headers)?;
    let mut out = Vec::new();
    for d in mdm.store.devices()? {
        let compliance = mdm
            .store
            .latest_compliance(&d.id)?
            .and_then(|r| serde_json::from_str(&r).ok());
        out.push(DeviceInfo {
            id: d.id,
            cert_sha256: d.cert_sha256,
            enrolled_at: d.enrolled_at,
            revoked: d.revoked,
            compliance,
        });
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
struct CommandBody {
    kind: String,
    #[serde(default)]
    body: String,
}

async fn queue_command(
    State(mdm): State<Arc<Mdm>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Json(c): Json<CommandBody>,
) -> ApiResult<Json<serde_json::Value>> {
    admin(&mdm, &headers)?;
    if !COMMAND_KINDS.contains(&c.kind.as_str()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("kind must be one of {COMMAND_KINDS:?}"),
        ));
    }
    let command_id = mdm.store.enqueue(&id, &c.kind, &c.body, now())?;
    mdm.store.audit(
        "admin",
        &c.kind,
        &format!("device {id} command {command_id}"),
        now(),
    )?;
    mdm.wake(&id).notify_waiters();
    Ok(Json(serde_json::json!({ "id": command_id })))
}

async fn revoke(
    State(mdm): State<Arc<Mdm>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    admin(&mdm, &headers)?;
    mdm.store.revoke(&id)?;
    mdm.store.audit("admin", "revoke", &id, now())?;
    mdm.wake(&id).notify_waiters();
    Ok(StatusCode::NO_CONTENT)
}

/// An audit record as the admin API lists it.
#[derive(Serialize, Deserialize)]
pub struct AuditInfo {
    pub time: i64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

async fn audit(State(mdm): State<Arc<Mdm>>, headers: HeaderMap) -> ApiResult<Json<Vec<AuditInfo>>> {
    admin(&mdm, &headers)?;
    let log = mdm.store.audit_log()?;
    Ok(Json(
        log.into_iter()
            .map(|a| AuditInfo {
                time: a.time,
                actor: a.actor,
                action: a.action,
                detail: a.detail,
            })
            .collect(),
    ))
}

/// The server's routes.
pub fn router(mdm: Arc<Mdm>) -> Router {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/device/commands", get(commands))
        .route("/v1/device/results", post(results))
        .route("/v1/device/compliance", post(compliance))
        .route("/v1/device/lease", post(lease))
        .route("/v1/admin/tokens", post(new_token))
        .route("/v1/admin/devices", get(devices))
        .route("/v1/admin/devices/{id}/commands", post(queue_command))
        .route("/v1/admin/devices/{id}/revoke", post(revoke))
        .route("/v1/admin/audit", get(audit))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(mdm)
}

/// Serves `mdm` on `listener` until `shutdown` completes.
pub async fn serve(
    mdm: Arc<Mdm>,
    listener: TlsListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_logged(mdm, listener, shutdown, None).await
}

/// [`serve`], recording every request in `log` if given ([`crate::request_log`]).
pub async fn serve_logged(
    mdm: Arc<Mdm>,
    listener: TlsListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    log: Option<crate::request_log::RequestLog>,
) -> std::io::Result<()> {
    let app = match log {
        Some(log) => crate::request_log::layer(router(mdm), log),
        None => router(mdm),
    };
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown)
        .await
}
