//! `mdm serve --request-log FILE`: every request the server receives, appended to FILE as
//! one JSON line (time, method, path, the client certificate's SHA-256 if any, the body as
//! text), before it is handled. For audits of what devices disclose (the handset's privacy
//! test reads it) and for debugging; the file holds enrollment tokens and policies, so it is
//! created 0600 and belongs with the server's state.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::server::Peer;

/// The open log.
#[derive(Clone)]
pub struct RequestLog(Arc<Mutex<std::fs::File>>);

impl RequestLog {
    /// Opens (appends to) `path`, created 0600.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(RequestLog(Arc::new(Mutex::new(f))))
    }

    /// Appends `line` in one write, so a reader never sees half a line from a formatter's
    /// many small writes.
    fn append(&self, line: &serde_json::Value) {
        let text = format!("{line}\n");
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = f.write_all(text.as_bytes());
    }
}

async fn record(
    State(log): State<RequestLog>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, crate::server::MAX_BODY).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    log.append(&serde_json::json!({
        "time": crate::server::now(),
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "device_cert": peer.cert_sha256,
        "body": String::from_utf8_lossy(&bytes),
    }));
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// `router` with every request recorded in `log` first.
pub fn layer(router: Router, log: RequestLog) -> Router {
    router.layer(axum::middleware::from_fn_with_state(log, record))
}
