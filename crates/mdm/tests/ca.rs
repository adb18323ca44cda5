//! The CA: created once with a 0600 key, issues device certificates that a rustls client
//! verifier built on `ca.pem` accepts, refuses requests without proof of possession.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use mdm::{Ca, CaError, EnrollRequest};
use rcgen::{KeyPair, PKCS_ED25519};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;

/// A device key and its signed enrollment request for `token`, using ring directly.
fn request(token: &str) -> EnrollRequest {
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public_key = kp.public_key().as_ref().to_vec();
    let signature = kp
        .sign(&EnrollRequest::signed_message(token, &public_key))
        .as_ref()
        .to_vec();
    EnrollRequest {
        public_key,
        signature,
    }
}

// The ring provider is what the workspace's TLS uses (vmm::migration::tls does the same).
#[allow(deprecated)]
fn verifier(ca_pem: &str) -> Arc<dyn ClientCertVerifier> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let der = pem_to_der(ca_pem);
    roots.add(CertificateDer::from(der)).unwrap();
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap()
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[test]
fn the_ca_key_is_created_once_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(dir.path()).unwrap();
    let key = dir.path().join("ca-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_before = std::fs::read(&key).unwrap();
    let again = Ca::open_or_create(dir.path()).unwrap();
    assert_eq!(std::fs::read(&key).unwrap(), key_before);
    assert_eq!(ca.cert_pem(), again.cert_pem());
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Ca::open_or_create(dir.path()).unwrap();
    let key = dir.path().join("ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        Ca::open_or_create(dir.path()),
        Err(CaError::KeyMode(_, 0o644))
    ));
}

#[test]
fn an_issued_certificate_verifies_against_the_stored_ca_even_after_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = Ca::open_or_create(dir.path())
        .unwrap()
        .cert_pem()
        .to_owned();
    // Issue with a reloaded CA: the certificate must still chain to the stored ca.pem.
    let ca = Ca::open_or_create(dir.path()).unwrap();
    let cert = ca.issue("dev-1", &request("tok"), "tok").unwrap();
    assert_eq!(cert.sha256, mdm::ca::cert_sha256(&cert.der));
    let v = verifier(&ca_pem);
    v.verify_client_cert(
        &CertificateDer::from(cert.der.clone()),
        &[],
        UnixTime::now(),
    )
    .expect("device certificate accepted");
}

#[test]
fn another_cas_certificate_is_refused() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca_a = Ca::open_or_create(a.path()).unwrap();
    let ca_b = Ca::open_or_create(b.path()).unwrap();
    let foreign = ca_b.issue("dev-1", &request("t"), "t").unwrap();
    let v = verifier(ca_a.cert_pem());
    assert!(v
        .verify_client_cert(&CertificateDer::from(foreign.der), &[], UnixTime::now())
        .is_err());
    // A self-signed certificate with the CA's name is refused too.
    let kp = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, mdm::ca::CA_NAME);
    let fake = p.self_signed(&kp).unwrap();
    assert!(v
        .verify_client_cert(fake.der(), &[], UnixTime::now())
        .is_err());
}

#[test]
fn requests_without_proof_of_possession_or_with_bad_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(dir.path()).unwrap();
    let req = request("tok-1");
    // Signed for another token.
    assert!(matches!(
        ca.issue("d", &req, "tok-2"),
        Err(CaError::BadRequest)
    ));
    // Someone else's key with this signature.
    let mut other = request("tok-1");
    other.signature = req.signature.clone();
    assert!(matches!(
        ca.issue("d", &other, "tok-1"),
        Err(CaError::BadRequest)
    ));
    // Wrong key length.
    let short = EnrollRequest {
        public_key: vec![1; 31],
        signature: vec![0; 64],
    };
    assert!(matches!(
        ca.issue("d", &short, "tok-1"),
        Err(CaError::BadRequest)
    ));
    for bad in ["", "a/b", "x y", &"a".repeat(65)] {
        assert!(
            matches!(ca.issue(bad, &req, "tok-1"), Err(CaError::BadDeviceId)),
            "{bad:?}"
        );
    }
    ca.issue("good-id-1", &req, "tok-1").unwrap();
}

#[test]
fn a_lost_key_gives_a_new_ca_certificate_not_a_stale_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = Ca::open_or_create(dir.path())
        .unwrap()
        .cert_pem()
        .to_owned();
    std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
    let ca = Ca::open_or_create(dir.path()).unwrap();
    assert_ne!(ca.cert_pem(), old);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        ca.cert_pem()
    );
    let cert = ca.issue("dev-1", &request("t"), "t").unwrap();
    verifier(ca.cert_pem())
        .verify_client_cert(&CertificateDer::from(cert.der), &[], UnixTime::now())
        .expect("chains to the new ca.pem");
}
