//! The relay between a jailed VMM and a cloud host. The jailed VMM's seccomp filter allows
//! only unix sockets and its root holds none of the device's identity, so it migrates,
//! plain, to a unix socket in its run directory (`unix:PATH`, the seam the host's return
//! uses too), and the daemon carries those bytes on to the host inside its own TLS 1.3
//! connection with the device's certificate. The bytes are not read here: the migration's
//! frames are authenticated by the key end to end, and the device's private key never enters
//! the VMM.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpStream, UnixListener};
use tokio::task::JoinHandle;
use vmm_api::MigrationTls;

use crate::error::{Error, Result};

/// How long the relay waits for the VMM to connect, and for the host's TLS handshake.
const WAIT: Duration = Duration::from_secs(30);

/// rustls with *ring*, as the VMM's migration TLS.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The device's TLS 1.3 client configuration: its certificate and key, the hosts' authority.
fn client_config(tls: &MigrationTls) -> Result<Arc<rustls::ClientConfig>> {
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        Error::Conflict(format!("{}: {e}", what.display()))
    };
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(&tls.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| bad(&tls.key, &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&tls.ca).map_err(|e| bad(&tls.ca, &e))? {
        let ca = ca.map_err(|e| bad(&tls.ca, &e))?;
        roots.add(ca).map_err(|e| bad(&tls.ca, &e))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| bad(&tls.cert, &e))?;
    Ok(Arc::new(config))
}

/// The name the host's certificate must have: HOST of `HOST:PORT` (an IPv6 address without
/// its brackets).
fn server_name(to: &str) -> Result<ServerName<'static>> {
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| Error::BadRequest(format!("cloud host {to:?}: {e}")))
}

/// Listens on `socket` (a stale one replaced) for the jailed VMM running as `uid`, which
/// alone may connect (the socket is its, mode 0600).
pub(super) fn listen(socket: &Path, uid: u32) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(format!("cannot remove {}", socket.display()))(e))
        }
        _ => {}
    }
    let l = UnixListener::bind(socket)
        .map_err(Error::io(format!("cannot listen on {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::os::unix::fs::chown(socket, Some(uid), Some(uid)))
        .map_err(Error::io(format!(
            "cannot hand {} to the VMM",
            socket.display()
        )))?;
    Ok(l)
}

/// Relays the one connection the VMM makes on `listener` to the cloud host `to` inside TLS
/// with the device's identity `tls`, until either end closes. The answer is the bytes
/// relayed (to the host, to the VMM), or why it failed.
pub(super) fn start(
    listener: UnixListener,
    to: String,
    tls: MigrationTls,
) -> JoinHandle<std::result::Result<(u64, u64), String>> {
    tokio::spawn(async move {
        let config = client_config(&tls).map_err(|e| e.to_string())?;
        let name = server_name(&to).map_err(|e| e.to_string())?;
        let (mut vmm, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .map_err(|_| "the VMM did not connect".to_string())?
            .map_err(|e| format!("the VMM's connection: {e}"))?;
        drop(listener);
        let tcp = tokio::time::timeout(WAIT, TcpStream::connect(&to))
            .await
            .map_err(|_| format!("cannot connect to {to}: timed out"))?
            .map_err(|e| format!("cannot connect to {to}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut host = tokio::time::timeout(
            WAIT,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| format!("the TLS handshake with {to} timed out"))?
        .map_err(|e| format!("the TLS handshake with {to} failed: {e}"))?;
        tokio::io::copy_bidirectional(&mut vmm, &mut host)
            .await
            .map_err(|e| format!("relaying to {to}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_named_by_its_address_part() {
        assert!(matches!(
            server_name("cloud.example:7000").unwrap(),
            ServerName::DnsName(d) if d.as_ref() == "cloud.example"
        ));
        assert!(matches!(
            server_name("127.0.0.1:7000").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:7000").unwrap(),
            ServerName::IpAddress(_)
        ));
    }
}
