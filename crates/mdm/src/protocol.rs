//! What server and device exchange (JSON bodies) and the signed byte forms of commands
//! (signed by the server's command key) and results (signed by the device key).

use serde::{Deserialize, Serialize};

const COMMAND_CONTEXT: &[u8] = b"pocketvisor-mdm-command-v1\0";
const RESULT_CONTEXT: &[u8] = b"pocketvisor-mdm-result-v1\0";
const LEASE_CONTEXT: &[u8] = b"pocketvisor-mdm-lease-v2\0";
/// The longest key lease the server signs.
pub const MAX_LEASE_SECS: u64 = 30 * 86_400;

/// `POST /v1/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollBody {
    pub token: String,
    /// Hex raw ed25519 public key.
    pub public_key: String,
    /// Hex signature over [`crate::EnrollRequest::signed_message`].
    pub signature: String,
}

/// The answer to an enrollment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    pub device_id: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Hex ed25519 public key that signs every command.
    pub command_key: String,
}

/// A command as the device receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    pub id: i64,
    pub device_id: String,
    pub kind: String,
    pub body: String,
    /// Hex signature by the command key over [`command_message`].
    pub signature: String,
}

/// `POST /v1/device/results`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultBody {
    pub command_id: i64,
    pub result: String,
    /// Hex signature by the device key over [`result_message`].
    pub signature: String,
}

/// `POST /v1/device/lease`: how long a lease the device asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub secs: u64,
}

/// A key lease: the server's word that `device_id` may unwrap its managed profiles' data keys
/// until `valid_until` (unix seconds), signed by the command key. Its `issued_at` is the
/// server's signed time of the contact, from which a policy's offline limit runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub device_id: String,
    pub issued_at: u64,
    pub valid_until: u64,
    /// Hex signature by the command key over [`lease_message`].
    pub signature: String,
}

/// The bytes the server signs for a lease.
pub fn lease_message(device_id: &str, issued_at: u64, valid_until: u64) -> Vec<u8> {
    framed(
        LEASE_CONTEXT,
        &[
            device_id.as_bytes(),
            &issued_at.to_be_bytes(),
            &valid_until.to_be_bytes(),
        ],
    )
}

impl Lease {
    /// True if `command_key` (hex) signed this lease for `device_id`.
    pub fn verify(&self, command_key: &str, device_id: &str) -> bool {
        self.device_id == device_id
            && verify_hex(
                command_key,
                &lease_message(&self.device_id, self.issued_at, self.valid_until),
                &self.signature,
            )
    }
}

fn framed(context: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = context.to_vec();
    for p in parts {
        m.extend_from_slice(&(p.len() as u64).to_be_bytes());
        m.extend_from_slice(p);
    }
    m
}

/// The bytes the server signs for a command: bound to its device, id, kind and body.
pub fn command_message(device_id: &str, id: i64, kind: &str, body: &str) -> Vec<u8> {
    framed(
        COMMAND_CONTEXT,
        &[
            device_id.as_bytes(),
            &id.to_be_bytes(),
            kind.as_bytes(),
            body.as_bytes(),
        ],
    )
}

/// The bytes a device signs for a result.
pub fn result_message(device_id: &str, command_id: i64, result: &str) -> Vec<u8> {
    framed(
        RESULT_CONTEXT,
        &[
            device_id.as_bytes(),
            &command_id.to_be_bytes(),
            result.as_bytes(),
        ],
    )
}

/// Checks an ed25519 signature given as hex against a hex public key.
pub fn verify_hex(public_key_hex: &str, message: &[u8], signature_hex: &str) -> bool {
    let (Ok(key), Ok(sig)) = (hex::decode(public_key_hex), hex::decode(signature_hex)) else {
        return false;
    };
    key.len() == 32
        && ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(message, &sig)
            .is_ok()
}

impl SignedCommand {
    /// True if `command_key` (hex) signed this command for `device_id`.
    pub fn verify(&self, command_key: &str, device_id: &str) -> bool {
        self.device_id == device_id
            && verify_hex(
                command_key,
                &command_message(&self.device_id, self.id, &self.kind, &self.body),
                &self.signature,
            )
    }
}
