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
/// alone may connect (the socket is its, mode 0600). `socket`'s directory belongs to that
/// VMM, which could swap a path there for a link between a bind and a chmod by path: the
/// socket is bound, restricted and handed over in `private` (the daemon's own directory, on
/// the same file system), then renamed into place, which follows no link.
pub(super) fn listen(socket: &Path, private: &Path, uid: u32) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let staged = private.join(format!(".relay-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let l = UnixListener::bind(&staged)
        .map_err(Error::io(format!("cannot listen on {}", staged.display())))?;
    let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::os::unix::fs::chown(&staged, Some(uid), Some(uid)))
        .and_then(|()| std::fs::rename(&staged, socket));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(Error::io(format!(
            "cannot hand {} to the VMM",
            socket.display()
        ))(e));
    }
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

    #[tokio::test]
    async fn the_socket_is_placed_by_rename_and_a_link_in_its_place_is_not_followed() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let (run, private) = (dir.path().join("run"), dir.path().join("p"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(&private).unwrap();
        // What a hostile VMM could leave at the socket's path: a link to a file of the host.
        let target = dir.path().join("host-file");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let socket = run.join("cloud.sock");
        std::os::unix::fs::symlink(&target, &socket).unwrap();
        let uid = nix_uid();
        let _l = listen(&socket, &private, uid).unwrap();
        let meta = std::fs::symlink_metadata(&socket).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.uid(), uid);
        let host = std::fs::metadata(&target).unwrap();
        assert_eq!(
            host.mode() & 0o777,
            0o644,
            "the link's target was not touched"
        );
        assert_eq!(std::fs::read_dir(&private).unwrap().count(), 0);
    }

    fn nix_uid() -> u32 {
        // SAFETY: getuid has no preconditions and cannot fail.
        unsafe { libc::getuid() }
    }
}
