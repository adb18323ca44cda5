//! The migration's transport: TLS 1.3 with both ends' certificates (rustls), or plain TCP.
//!
//! Each host holds a certificate chain and key and the certificate authority the other's
//! certificate must chain to. The source checks the destination's certificate against that
//! authority and the host name (or IP address) it connects to; the destination checks the
//! source's against its authority. Only TLS 1.3 is offered. The framed, authenticated
//! messages of [`wire`](super::wire) run inside, unchanged.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{version::TLS13, StreamOwned};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use vmm_api::MigrationTls;

use crate::Error;

/// One migration connection: TLS as the end that connected (client) or accepted (server),
/// or plain.
pub enum Transport {
    /// Plain TCP (framed and authenticated by the key, not encrypted).
    Plain(TcpStream),
    /// A unix socket to a relay on this host (`unix:PATH`; plain: the relay carries the
    /// bytes on, inside its own TLS: a cloud host's return).
    Local(UnixStream),
    /// TLS, this end the one that connected: a migration's source, or a device asking a
    /// cloud host for a return (it is then the migration's destination).
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// TLS, this end the one that accepted: a migration's destination, or a cloud host.
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
}

fn refused(why: impl std::fmt::Display) -> Error {
    Error::Migration(why.to_string())
}

/// rustls with *ring*: X25519/ECDHE key exchange and AES-GCM/ChaCha20 suites. rustls marks
/// *ring*'s provider deprecated for lacking post-quantum key exchange (only its aws-lc-rs
/// provider has it, a large C build); a known limit, said in the README.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| refused(format!("cannot read the {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(refused(format!(
            "the {what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        refused(format!(
            "cannot read the TLS private key {}: {e}",
            path.display()
        ))
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for c in certs(path, "TLS certificate authority")? {
        roots
            .add(c)
            .map_err(|e| refused(format!("the authority in {}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

/// The name the destination's certificate must carry: the host part of `to`.
fn server_name(to: &str) -> Result<ServerName<'static>, Error> {
    let host = to.rsplit_once(':').map_or(to, |(host, _port)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| refused(format!("{host:?} is not a host name or IP address for TLS")))
}

fn handshake_failed(peer: &str, e: std::io::Error) -> Error {
    refused(format!("the TLS handshake with {peer} failed: {e}"))
}

/// Connects TLS over `tcp` to the destination `to`, checking its certificate.
pub fn client(tcp: TcpStream, to: &str, files: &MigrationTls) -> Result<Transport, Error> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(refused)?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(
            certs(&files.cert, "TLS certificate")?,
            private_key(&files.key)?,
        )
        .map_err(|e| refused(format!("this host's TLS certificate and key: {e}")))?;
    let mut conn = ClientConnection::new(Arc::new(config), server_name(to)?).map_err(refused)?;
    let mut tcp = tcp;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| handshake_failed(to, e))?;
    }
    Ok(Transport::Client(Box::new(StreamOwned::new(conn, tcp))))
}

/// Accepts TLS over `tcp` from a source, checking its certificate.
pub fn server(tcp: TcpStream, files: &MigrationTls) -> Result<Transport, Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(|e| refused(format!("the TLS certificate authority: {e}")))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(refused)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&files.cert, "TLS certificate")?,
            private_key(&files.key)?,
        )
        .map_err(|e| refused(format!("this host's TLS certificate and key: {e}")))?;
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "the source".to_string(), |a| a.to_string());
    let mut conn = ServerConnection::new(Arc::new(config)).map_err(refused)?;
    let mut tcp = tcp;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| handshake_failed(&peer, e))?;
    }
    Ok(Transport::Server(Box::new(StreamOwned::new(conn, tcp))))
}

impl Transport {
    /// How long a read may wait (None: for as long as it takes).
    pub fn set_read_timeout(&self, wait: Option<std::time::Duration>) -> std::io::Result<()> {
        match self {
            Transport::Plain(s) => s.set_read_timeout(wait),
            Transport::Local(s) => s.set_read_timeout(wait),
            Transport::Client(s) => s.get_ref().set_read_timeout(wait),
            Transport::Server(s) => s.get_ref().set_read_timeout(wait),
        }
    }

    /// How long a read may wait now.
    pub fn read_timeout(&self) -> std::io::Result<Option<std::time::Duration>> {
        match self {
            Transport::Plain(s) => s.read_timeout(),
            Transport::Local(s) => s.read_timeout(),
            Transport::Client(s) => s.get_ref().read_timeout(),
            Transport::Server(s) => s.get_ref().read_timeout(),
        }
    }

    /// Ends the connection in direction `how` (a TLS end says so first, `close_notify`).
    pub fn shutdown(&mut self, how: Shutdown) {
        match self {
            Transport::Plain(s) => {
                let _ = s.shutdown(how);
            }
            Transport::Local(s) => {
                let _ = s.shutdown(how);
            }
            Transport::Client(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
                let _ = s.get_ref().shutdown(how);
            }
            Transport::Server(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
                let _ = s.get_ref().shutdown(how);
            }
        }
    }

    /// The end-entity certificate (DER) the connecting end showed, at the accepting end of a
    /// TLS connection; None over plain TCP and at the connecting end. The cloud host names a
    /// device by it.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            Transport::Server(s) => s.conn.peer_certificates()?.first().map(|c| c.as_ref()),
            Transport::Plain(_) | Transport::Local(_) | Transport::Client(_) => None,
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Local(s) => s.read(buf),
            Transport::Client(s) => s.read(buf),
            Transport::Server(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Local(s) => s.write(buf),
            Transport::Client(s) => s.write(buf),
            Transport::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Local(s) => s.flush(),
            Transport::Client(s) => s.flush(),
            Transport::Server(s) => s.flush(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A certificate authority and one certificate it signs for `name`, as PEM files in `dir`
    /// named `prefix-*`.
    pub(crate) fn issue(dir: &Path, prefix: &str, names: &[&str]) -> MigrationTls {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let files = MigrationTls {
            cert: dir.join(format!("{prefix}-cert.pem")),
            key: dir.join(format!("{prefix}-key.pem")),
            ca: dir.join(format!("{prefix}-ca.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, ca.pem()).unwrap();
        files
    }

    pub(crate) fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pv-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The destination's side of [`connect`]: the certificate the source showed.
    type Shown = Result<Option<Vec<u8>>, Error>;

    /// Connects `src` to a destination using `dst`; both ends' results (a byte echoed back
    /// when both succeed).
    fn connect(src: MigrationTls, dst: MigrationTls) -> (Result<(), Error>, Shown) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap().to_string();
        let d = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let mut t = server(tcp, &dst)?;
            let mut b = [0u8; 1];
            t.read_exact(&mut b).map_err(refused)?;
            t.write_all(&b).and_then(|()| t.flush()).map_err(refused)?;
            Ok(t.peer_certificate().map(<[u8]>::to_vec))
        });
        let s = (|| {
            let mut t = client(TcpStream::connect(&to).unwrap(), &to, &src)?;
            t.write_all(&[42])
                .and_then(|()| t.flush())
                .map_err(refused)?;
            let mut b = [0u8; 1];
            t.read_exact(&mut b).map_err(refused)?;
            assert_eq!(b, [42]);
            Ok(())
        })();
        (s, d.join().unwrap())
    }

    /// Two hosts' files: each with its own certificate, each trusting `ca_of`'s authority.
    pub(crate) fn cross(a: &MigrationTls, ca_of: &MigrationTls) -> MigrationTls {
        MigrationTls {
            ca: ca_of.ca.clone(),
            ..a.clone()
        }
    }

    #[test]
    fn both_certificates_checked_and_the_bytes_go_through() {
        let dir = scratch("ok");
        let src = issue(&dir, "src", &["source.example"]);
        let dst = issue(&dir, "dst", &["127.0.0.1"]);
        let (s, d) = connect(cross(&src, &dst), cross(&dst, &src));
        s.unwrap();
        // The destination knows which certificate the source showed.
        let shown = certs(&src.cert, "the source's").unwrap();
        assert_eq!(d.unwrap().as_deref(), Some(shown[0].as_ref()));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_source_with_a_certificate_from_another_authority_is_refused() {
        let dir = scratch("src");
        let src = issue(&dir, "src", &["source.example"]);
        let dst = issue(&dir, "dst", &["127.0.0.1"]);
        let stranger = issue(&dir, "other", &["source.example"]);
        // The destination trusts `src`'s authority; the source shows a stranger's certificate.
        let (s, d) = connect(cross(&stranger, &dst), cross(&dst, &src));
        let d = d.unwrap_err().to_string();
        assert!(d.contains("TLS handshake"), "{d}");
        assert!(s.is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_destination_with_a_certificate_from_another_authority_or_name_is_refused() {
        let dir = scratch("dst");
        let src = issue(&dir, "src", &["source.example"]);
        let dst = issue(&dir, "dst", &["127.0.0.1"]);
        let stranger = issue(&dir, "other", &["127.0.0.1"]);
        let (s, _) = connect(cross(&src, &dst), cross(&stranger, &src));
        let s = s.unwrap_err().to_string();
        assert!(s.contains("TLS handshake"), "{s}");
        // The right authority, but a certificate for another name.
        let elsewhere = issue(&dir, "named", &["elsewhere.example"]);
        let (s, _) = connect(cross(&src, &elsewhere), cross(&elsewhere, &src));
        let s = s.unwrap_err().to_string();
        assert!(s.contains("TLS handshake"), "{s}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn host_names_come_from_the_address() {
        assert!(matches!(
            server_name("10.0.0.2:7000").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:7000").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("cloud.example:7000").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name:1").is_err());
    }
}
