//! A device's (and the admin CLI's) side of the wire: HTTPS/1.1 requests over rustls, one
//! connection per request, with the device certificate when it has one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::protocol::{result_message, EnrollBody};
use crate::EnrollRequest;

/// Largest response accepted.
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad response from the server")]
    BadResponse,
    #[error("timed out")]
    Timeout,
}

#[allow(deprecated)] // ring's provider, as in vmm::migration::tls
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A device's identity: its ed25519 key (PKCS#8) and, once enrolled, its certificate.
pub struct DeviceKey {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl DeviceKey {
    /// A fresh key.
    pub fn generate() -> Result<Self, ClientError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// A key from its PKCS#8 form.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, ClientError> {
        let pair =
            Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(DeviceKey {
            pkcs8: pkcs8.to_vec(),
            pair,
        })
    }

    /// The PKCS#8 form, to keep (0600) in the device's state dir.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The enrollment body for `token`.
    pub fn enroll_body(&self, token: &str) -> EnrollBody {
        let public_key = self.pair.public_key().as_ref().to_vec();
        let sig = self
            .pair
            .sign(&EnrollRequest::signed_message(token, &public_key));
        EnrollBody {
            token: token.to_owned(),
            public_key: hex::encode(public_key),
            signature: hex::encode(sig.as_ref()),
        }
    }

    /// Hex signature of a command result.
    pub fn sign_result(&self, device_id: &str, command_id: i64, result: &str) -> String {
        hex::encode(
            self.pair
                .sign(&result_message(device_id, command_id, result))
                .as_ref(),
        )
    }
}

/// An HTTPS client for one MDM server.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    addr: SocketAddr,
    name: ServerName<'static>,
    timeout: Duration,
}

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Client {
    /// A client trusting `ca_pem`, connecting to `addr` and expecting `name` in the server's
    /// certificate; with `identity` (certificate PEM, device key) it shows a client certificate.
    pub fn new(
        addr: SocketAddr,
        name: &str,
        ca_pem: &str,
        identity: Option<(&str, &DeviceKey)>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let tls = |e: &dyn std::fmt::Display| ClientError::Tls(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert_pem, key)) => {
                let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls(&e))?;
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8.clone()));
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| tls(&e))?
            }
            None => builder.with_no_client_auth(),
        };
        Self::with_config(addr, name, Arc::new(config), timeout)
    }

    /// A client on a rustls configuration built elsewhere.
    pub fn with_config(
        addr: SocketAddr,
        name: &str,
        config: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let name =
            ServerName::try_from(name.to_owned()).map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Client {
            connector: TlsConnector::from(config),
            addr,
            name,
            timeout,
        })
    }

    /// Sends one request (`body` as JSON if given) and reads the whole response.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Reply, ClientError> {
        tokio::time::timeout(self.timeout, self.request_inner(method, path, bearer, body))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Reply, ClientError> {
        let tcp = TcpStream::connect(self.addr).await?;
        let mut tls = self.connector.connect(self.name.clone(), tcp).await?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: mdm\r\nConnection: close\r\n");
        if let Some(t) = bearer {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body).await?;
        tls.flush().await?;
        let mut raw = Vec::new();
        let read = (&mut tls).take(MAX_RESPONSE).read_to_end(&mut raw).await;
        // A server closing without close_notify after a complete response is tolerated.
        if let Err(e) = read {
            if raw.is_empty() {
                return Err(e.into());
            }
        }
        parse_response(&raw)
    }
}

fn parse_response(raw: &[u8]) -> Result<Reply, ClientError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ClientError::BadResponse)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| ClientError::BadResponse)?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or(ClientError::BadResponse)?;
    let mut body = raw[end + 4..].to_vec();
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            let n: usize = v.trim().parse().map_err(|_| ClientError::BadResponse)?;
            if body.len() < n {
                return Err(ClientError::BadResponse);
            }
            body.truncate(n);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ClientError::BadResponse);
        }
    }
    Ok(Reply { status, body })
}
