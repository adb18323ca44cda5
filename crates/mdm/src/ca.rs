//! The MDM server's certificate authority.
//!
//! The CA key (ed25519, PKCS#8 PEM) lives in the server's state dir as `ca-key.pem`, mode
//! 0600, created once (temp + fsync + rename); `ca.pem` is the CA certificate devices and
//! the server's TLS client verifier trust. Loading re-issues the CA certificate in memory
//! from the same key and name, which is all signing needs.
//!
//! Enrollment carries the device's raw ed25519 public key and its signature over
//! [`EnrollRequest::signed_message`] (the token bound in), proving the device holds the key.
//! rcgen cannot parse a PKCS#10 CSR without its `x509-parser` feature, so this is the
//! CSR's role without the DER.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SignatureAlgorithm,
    PKCS_ED25519,
};
use sha2::{Digest, Sha256};

/// The CA certificate's common name.
pub const CA_NAME: &str = "pocketvisor MDM CA";
const KEY_FILE: &str = "ca-key.pem";
const CERT_FILE: &str = "ca.pem";
/// Domain separation for the enrollment proof of possession.
const ENROLL_CONTEXT: &[u8] = b"pocketvisor-mdm-enroll-v1\0";

/// What the CA can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: must be mode 0600 (it is {1:o})")]
    KeyMode(PathBuf, u32),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The device's key is not 32 bytes or its signature does not verify.
    #[error("enrollment request: bad key or proof of possession")]
    BadRequest,
    /// A device id must be 1-64 of `[A-Za-z0-9-]`.
    #[error("invalid device id")]
    BadDeviceId,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A device's enrollment request: its public key and proof that it holds the private key.
#[derive(Debug, Clone)]
pub struct EnrollRequest {
    /// Raw ed25519 public key (32 bytes).
    pub public_key: Vec<u8>,
    /// ed25519 signature over [`EnrollRequest::signed_message`].
    pub signature: Vec<u8>,
}

impl EnrollRequest {
    /// The bytes a device signs to enroll with `token`.
    pub fn signed_message(token: &str, public_key: &[u8]) -> Vec<u8> {
        let mut m = ENROLL_CONTEXT.to_vec();
        m.extend_from_slice(public_key);
        m.extend_from_slice(token.as_bytes());
        m
    }

    /// Checks the proof of possession for `token`.
    pub fn verify(&self, token: &str) -> Result<(), CaError> {
        if self.public_key.len() != 32 {
            return Err(CaError::BadRequest);
        }
        let key =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.public_key);
        key.verify(
            &Self::signed_message(token, &self.public_key),
            &self.signature,
        )
        .map_err(|_| CaError::BadRequest)
    }
}

/// A device certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub der: Vec<u8>,
    /// Hex SHA-256 of `der`: how the server recognises the device.
    pub sha256: String,
}

struct DeviceKey<'a>(&'a [u8]);

impl PublicKeyData for DeviceKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &SignatureAlgorithm {
        &PKCS_ED25519
    }
}

/// The server's CA.
pub struct Ca {
    key: KeyPair,
    cert: Certificate,
    cert_pem: String,
}

/// Hex SHA-256 of a certificate's DER, the form the store keeps.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// Writes `bytes` to `path` via a temporary file created with `mode` (so a key is never
/// readable by others, not even briefly), fsync, rename, directory fsync. `hostfs::write_atomic`
/// does the same but creates the temporary file with the default mode.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        hostfs::sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

impl Ca {
    /// Loads the CA from `state_dir`, creating key and certificate the first time.
    /// A key file readable by anyone but its owner is refused.
    pub fn open_or_create(state_dir: &Path) -> Result<Self, CaError> {
        fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let key_path = state_dir.join(KEY_FILE);
        let cert_path = state_dir.join(CERT_FILE);
        let mut new_key = false;
        let key = match fs::metadata(&key_path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode != 0o600 {
                    return Err(CaError::KeyMode(key_path, mode));
                }
                let pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
                KeyPair::from_pem(&pem)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate_for(&PKCS_ED25519)?;
                write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
                new_key = true;
                key
            }
            Err(e) => {
                return Err(CaError::Io {
                    path: key_path,
                    source: e,
                })
            }
        };
        let cert = ca_params().self_signed(&key)?;
        // A new key always gets a new ca.pem; otherwise the stored one is kept as issued.
        let stored = if new_key {
            Err(std::io::ErrorKind::NotFound.into())
        } else {
            fs::read_to_string(&cert_path)
        };
        let cert_pem = match stored {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = cert.pem();
                write_atomic(&cert_path, pem.as_bytes(), 0o644)?;
                pem
            }
            Err(e) => {
                return Err(CaError::Io {
                    path: cert_path,
                    source: e,
                })
            }
        };
        Ok(Self {
            key,
            cert,
            cert_pem,
        })
    }

    /// The CA certificate (PEM) as stored in the state dir.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a client certificate (common name `device_id`) for a verified request.
    pub fn issue(
        &self,
        device_id: &str,
        req: &EnrollRequest,
        token: &str,
    ) -> Result<IssuedCert, CaError> {
        let id_ok = (1..=64).contains(&device_id.len())
            && device_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !id_ok {
            return Err(CaError::BadDeviceId);
        }
        req.verify(token)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&DeviceKey(&req.public_key), &self.cert, &self.key)?;
        let der = cert.der().to_vec();
        Ok(IssuedCert {
            pem: cert.pem(),
            sha256: cert_sha256(&der),
            der,
        })
    }

    /// Issues the server's own TLS certificate for `names` (DNS names or IP addresses) and
    /// returns it with its new private key, both PEM.
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut p = CertificateParams::new(names.to_vec())?;
        p.distinguished_name
            .push(DnType::CommonName, "pocketvisor MDM server");
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}
