//! Who may use the browser phone: the holder of the daemon's phone token.
//!
//! The daemon makes a new random token at each start; `profile view` prints the page's
//! address with it (`/phone?token=...`). Opening that address sets an HttpOnly,
//! SameSite=Strict cookie and redirects to `/phone`, so the token leaves the address bar;
//! the page's requests (REST, event stream, websocket) carry the cookie. Scripts may send
//! `Authorization: Bearer TOKEN` instead. A request whose `Origin` is not the page's own
//! origin is refused (another site's page cannot drive the phone, even on loopback).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api_types::ErrorBody;
use crate::error::{Error, Result};

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// The phone's credential and how its cookie is set.
#[derive(Debug)]
pub struct PhoneAuth {
    token: String,
    cookie: String,
    tls: bool,
}

impl PhoneAuth {
    /// A new random token; the cookie's name carries `port` (cookies are per host, not per
    /// port, so two daemons on one host keep theirs apart).
    pub fn new(port: u16, tls: bool) -> Result<PhoneAuth> {
        let mut bytes = [0u8; TOKEN_BYTES];
        let mut filled = 0;
        while filled < bytes.len() {
            let rest = &mut bytes[filled..];
            // SAFETY: getrandom(2) writes at most `rest.len()` bytes into `rest`, which we own.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            match usize::try_from(n) {
                Ok(n) => filled += n,
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::io("cannot make the phone's token")(e));
                    }
                }
            }
        }
        Ok(PhoneAuth {
            token: hex::encode(bytes),
            cookie: format!("pv_phone_{port}"),
            tls,
        })
    }

    /// The token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether `candidate` is the token (compared in constant time).
    pub fn is_token(&self, candidate: &str) -> bool {
        let (a, b) = (self.token.as_bytes(), candidate.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The `Set-Cookie` value that carries the token.
    pub fn set_cookie(&self) -> String {
        let secure = if self.tls { "; Secure" } else { "" };
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict{secure}",
            self.cookie, self.token
        )
    }

    /// Whether the request carries the token (cookie or bearer).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer "))
            .any(|t| self.is_token(t.trim()));
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == self.cookie && self.is_token(v));
        bearer || cookie
    }

    /// Whether the request's `Origin`, if any, is the phone's own origin.
    pub fn same_origin(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let scheme = if self.tls { "https" } else { "http" };
        match (origin.to_str(), host) {
            (Ok(origin), Some(host)) => origin == format!("{scheme}://{host}"),
            _ => false,
        }
    }
}

fn refuse(status: StatusCode, error: &str) -> Response {
    let body = ErrorBody {
        error: error.to_string(),
    };
    (status, Json(body)).into_response()
}

/// Middleware for the phone's API routes: 401 without the token, 403 from another origin.
pub async fn require(State(auth): State<Arc<PhoneAuth>>, req: Request, next: Next) -> Response {
    if !auth.same_origin(req.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "the request comes from another origin than the browser phone's page",
        );
    }
    if !auth.allows(req.headers()) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "the browser phone needs its token: open the address `pocketvisor profile view \
             NAME` prints, or send Authorization: Bearer TOKEN",
        );
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_the_token_is_allowed() {
        let auth = PhoneAuth::new(8080, false).unwrap();
        let other = PhoneAuth::new(8080, false).unwrap();
        assert_ne!(auth.token(), other.token(), "random per start");
        assert_eq!(auth.token().len(), 2 * TOKEN_BYTES);
        let good = format!("a=b; pv_phone_8080={}", auth.token());
        assert!(auth.allows(&headers(&[(header::COOKIE, &good)])));
        let bearer = format!("Bearer {}", auth.token());
        assert!(auth.allows(&headers(&[(header::AUTHORIZATION, &bearer)])));
        assert!(!auth.allows(&HeaderMap::new()));
        let wrong_port = format!("pv_phone_8081={}", auth.token());
        assert!(!auth.allows(&headers(&[(header::COOKIE, &wrong_port)])));
        let theirs = format!("pv_phone_8080={}", other.token());
        assert!(!auth.allows(&headers(&[(header::COOKIE, &theirs)])));
        let short = format!("Bearer {}", &auth.token()[1..]);
        assert!(!auth.allows(&headers(&[(header::AUTHORIZATION, &short)])));
    }

    #[test]
    fn other_origins_are_refused() {
        let auth = PhoneAuth::new(8080, false).unwrap();
        let host = (header::HOST, "127.0.0.1:8080");
        assert!(auth.same_origin(&headers(std::slice::from_ref(&host))));
        let ours = (header::ORIGIN, "http://127.0.0.1:8080");
        assert!(auth.same_origin(&headers(&[host.clone(), ours])));
        let evil = (header::ORIGIN, "http://evil.example");
        assert!(!auth.same_origin(&headers(&[host.clone(), evil])));
        let tls = PhoneAuth::new(8080, true).unwrap();
        let plain = (header::ORIGIN, "http://127.0.0.1:8080");
        assert!(!tls.same_origin(&headers(&[host, plain])));
        assert!(tls.set_cookie().ends_with("; Secure"));
    }
}
