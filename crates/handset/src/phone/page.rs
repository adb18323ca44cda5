//! The phone's page and its assets, built into the binary (no Node.js or files at run time).
//!
//! `phone.js` is our own small RFB 3.8 client on a canvas (Raw and DesktopSize, security
//! None), not noVNC: the daemon's RFB server is ours and sends only those, so about 300
//! reviewed lines do what the page needs without shipping and tracking a third-party tree
//! of about 10,000 lines built from npm.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::auth::PhoneAuth;

const HTML: &str = include_str!("assets/phone.html");
const JS: &str = include_str!("assets/phone.js");
const CSS: &str = include_str!("assets/phone.css");

/// `?token=` of `/phone`.
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    /// The daemon's phone token (from `profile view`).
    pub token: Option<String>,
}

/// Headers of every page and asset: no caching, no framing, no referrer, only our own
/// scripts and connections.
fn guarded(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

fn unauthorized(why: &str) -> Response {
    let text = format!(
        "pocketvisor browser phone: {why}\n\nOpen the address that `pocketvisor profile view \
         NAME` prints (it carries the daemon's token, which changes at each daemon start).\n"
    );
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

/// `/`: the page is at `/phone` (the query, with a token, goes along).
pub async fn root(uri: Uri) -> Redirect {
    match uri.query() {
        Some(q) => Redirect::to(&format!("/phone?{q}")),
        None => Redirect::to("/phone"),
    }
}

/// `/phone`: with `?token=` the token is checked and set as a cookie (then `/phone` again,
/// without it in the address); with the cookie, the page.
pub async fn phone(
    State(auth): State<Arc<PhoneAuth>>,
    q: Result<Query<PageQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    if let Some(token) = q.token {
        if !auth.is_token(&token) {
            return unauthorized("this is not the daemon's token.");
        }
        return (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, "/phone".to_string()),
                (header::SET_COOKIE, auth.set_cookie()),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ],
        )
            .into_response();
    }
    if !auth.allows(&headers) {
        return unauthorized("this browser has not been given the daemon's token.");
    }
    guarded("text/html; charset=utf-8", HTML)
}

/// `/phone/phone.js` and `/phone/phone.css` (the same for everyone: no token needed).
pub async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "phone.js" => guarded("text/javascript; charset=utf-8", JS),
        "phone.css" => guarded("text/css; charset=utf-8", CSS),
        _ => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}
