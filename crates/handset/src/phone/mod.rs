//! The browser phone: a phone-shaped page served by the daemon over HTTP (loopback) or HTTPS
//! (wider), with the foreground profile's live screen (RFB over a websocket, [`ws`]), a
//! profile switcher and each profile's state as a badge ([`page`]).
//!
//! It listens on TCP (`pocketvisor handset --http ADDR`; default a loopback port the system
//! picks) and serves the page, its assets and the few API routes the page calls
//! ([`PHONE_OPS`]), each behind the daemon's phone token ([`auth`]). An address that is not
//! loopback is refused unless the daemon has a certificate and key for HTTPS ([`tls`]).

pub mod auth;
pub mod page;
pub mod tls;
pub mod ws;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::middleware;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::api::{Op, Peer};
use crate::daemon::Handset;
use crate::error::{Error, Result};
use auth::PhoneAuth;
use tls::TlsListener;

/// The API operations the phone's page calls; the phone's listener serves only these.
pub const PHONE_OPS: &[Op] = &[
    Op::Info,
    Op::List,
    Op::Show,
    Op::Switch,
    Op::Events,
    Op::EventStream,
    Op::Screen,
];

/// Where and how the browser phone listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneConfig {
    /// The TCP address (port 0: the system picks one).
    pub addr: SocketAddr,
    /// HTTPS: the certificate chain and key (PEM); required unless `addr` is loopback.
    pub tls: Option<TlsFiles>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

impl PhoneConfig {
    /// Plain HTTP on `127.0.0.1`, on a port the system picks.
    pub fn loopback() -> PhoneConfig {
        PhoneConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
        }
    }

    /// Refuses an address wider than loopback without HTTPS.
    pub fn check(&self) -> Result<()> {
        if !self.addr.ip().is_loopback() && self.tls.is_none() {
            return Err(Error::BadRequest(format!(
                "the browser phone on {} (not loopback) needs HTTPS: give a certificate and \
                 key (--http-cert FILE --http-key FILE), or listen on loopback",
                self.addr
            )));
        }
        Ok(())
    }
}

enum Listening {
    Plain(TcpListener),
    Tls(TlsListener),
}

/// The phone's listener, bound, with its credential and address.
pub struct BoundPhone {
    listening: Listening,
    auth: Arc<PhoneAuth>,
    url: String,
}

impl BoundPhone {
    /// The page's address with the token (what `profile view` prints).
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Checks `cfg`, loads its certificate, binds its address and makes a new token.
pub async fn bind(cfg: &PhoneConfig) -> Result<BoundPhone> {
    cfg.check()?;
    let tls = cfg
        .tls
        .as_ref()
        .map(|t| tls::server_config(&t.cert, &t.key))
        .transpose()?;
    let tcp = TcpListener::bind(cfg.addr)
        .await
        .map_err(Error::io(format!(
            "cannot listen on {} for the browser phone",
            cfg.addr
        )))?;
    let local = tcp
        .local_addr()
        .map_err(Error::io("the browser phone's address"))?;
    let auth = Arc::new(PhoneAuth::new(local.port(), tls.is_some())?);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!(
        "{scheme}://{}:{}/phone?token={}",
        url_host(local.ip()),
        local.port(),
        auth.token()
    );
    let listening = match tls {
        Some(config) => Listening::Tls(
            TlsListener::new(tcp, config).map_err(Error::io("the browser phone's address"))?,
        ),
        None => Listening::Plain(tcp),
    };
    Ok(BoundPhone {
        listening,
        auth,
        url,
    })
}

/// The host part of the page's address: the bound IP, or this machine's name when bound to
/// every address.
fn url_host(ip: IpAddr) -> String {
    if ip.is_unspecified() {
        if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let name = name.trim();
            if !name.is_empty() {
                return name.to_string();
            }
        }
    }
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The phone's router: the page and its assets, and [`PHONE_OPS`] behind the token.
pub fn router(h: Arc<Handset>, auth: Arc<PhoneAuth>) -> Router {
    let api = crate::api::router_with(h, |op| PHONE_OPS.contains(&op))
        .layer(middleware::from_fn_with_state(auth.clone(), auth::require));
    Router::new()
        .route("/", get(page::root))
        .route("/phone", get(page::phone))
        .route("/phone/{asset}", get(page::asset))
        .with_state(auth)
        .merge(api)
}

impl Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Peer {
            addr: Some(*stream.remote_addr()),
            ..Peer::default()
        }
    }
}

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer {
            addr: Some(*stream.remote_addr()),
            ..Peer::default()
        }
    }
}

/// Serves the phone on `bound` until `shutdown` completes.
pub async fn serve(
    h: Arc<Handset>,
    bound: BoundPhone,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(h, bound.auth);
    match bound.listening {
        Listening::Plain(l) => {
            axum::serve(l, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(shutdown)
                .await
        }
        Listening::Tls(l) => {
            axum::serve(l, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wider_than_loopback_needs_https() {
        assert!(PhoneConfig::loopback().check().is_ok());
        let wide = PhoneConfig {
            addr: "0.0.0.0:8443".parse().unwrap(),
            tls: None,
        };
        let e = wide.check().unwrap_err().to_string();
        assert!(e.contains("needs HTTPS"), "{e}");
        let v6 = PhoneConfig {
            addr: "[::1]:0".parse().unwrap(),
            tls: None,
        };
        assert!(v6.check().is_ok(), "::1 is loopback");
        let with_tls = PhoneConfig {
            tls: Some(TlsFiles {
                cert: "c.pem".into(),
                key: "k.pem".into(),
            }),
            ..wide
        };
        assert!(with_tls.check().is_ok());
    }
}
