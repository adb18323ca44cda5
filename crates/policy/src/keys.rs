//! The organisation's ed25519 keys, as one-line text (`pvpol-secret-<hex>`,
//! `pvpol-public-<hex>`); key files may carry `#` comment lines.

use ed25519_dalek::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::{PolicyError, Result};

const SECRET_PREFIX: &str = "pvpol-secret-";
const PUBLIC_PREFIX: &str = "pvpol-public-";

/// The organisation's signing key (kept by IT, never on a handset).
pub struct OrgSecretKey(pub(crate) SigningKey);

/// The organisation's public key: what a handset trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgPublicKey(pub(crate) VerifyingKey);

impl OrgSecretKey {
    /// A new random key from the OS's generator.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand_core::OsRng))
    }

    /// Its public key.
    pub fn public(&self) -> OrgPublicKey {
        OrgPublicKey(self.0.verifying_key())
    }

    /// `pvpol-secret-<64 hex>` (zeroized when dropped).
    pub fn encode(&self) -> Zeroizing<String> {
        let bytes = Zeroizing::new(self.0.to_bytes());
        Zeroizing::new(format!("{SECRET_PREFIX}{}", hex::encode(*bytes)))
    }

    /// Parses a key file's text: its one non-comment line is `pvpol-secret-<64 hex>`.
    pub fn decode(text: &str) -> Result<Self> {
        let line = key_line(text)?;
        let hex_part = line.strip_prefix(SECRET_PREFIX).ok_or_else(|| {
            PolicyError::Key(format!(
                "not a policy signing key (expected {SECRET_PREFIX}...)"
            ))
        })?;
        let bytes = Zeroizing::new(decode_32(hex_part)?);
        Ok(Self(SigningKey::from_bytes(&bytes)))
    }
}

impl OrgPublicKey {
    /// `pvpol-public-<64 hex>`.
    pub fn encode(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", hex::encode(self.0.as_bytes()))
    }

    /// Parses `pvpol-public-<64 hex>` (a file's one non-comment line, or the string itself).
    pub fn decode(text: &str) -> Result<Self> {
        let line = key_line(text)?;
        let hex_part = line.strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            PolicyError::Key(format!(
                "not a policy public key (expected {PUBLIC_PREFIX}...)"
            ))
        })?;
        let bytes = decode_32(hex_part)?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| PolicyError::Key("not a valid ed25519 public key".into()))
    }

    /// A short fingerprint for messages: the first 16 hex digits of the key.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.0.as_bytes()[..8])
    }
}

/// The one line of a key file that is neither blank nor a `#` comment.
fn key_line(text: &str) -> Result<&str> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = lines
        .next()
        .ok_or_else(|| PolicyError::Key("no key in the file".into()))?;
    if lines.next().is_some() {
        return Err(PolicyError::Key("more than one key line".into()));
    }
    Ok(line)
}

fn decode_32(hex_part: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| PolicyError::Key("the key is not 64 hex digits".into()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_text() {
        let secret = OrgSecretKey::generate();
        let text = format!("# org key\n{}\n", &*secret.encode());
        let back = OrgSecretKey::decode(&text).unwrap();
        assert_eq!(back.public(), secret.public());
        let public = OrgPublicKey::decode(&secret.public().encode()).unwrap();
        assert_eq!(public, secret.public());
    }

    #[test]
    fn malformed_keys_are_refused() {
        let secret = OrgSecretKey::generate();
        // A secret where a public key is expected, and the other way round.
        assert!(OrgPublicKey::decode(&secret.encode()).is_err());
        assert!(OrgSecretKey::decode(&secret.public().encode()).is_err());
        assert!(OrgPublicKey::decode("pvpol-public-abcd").is_err());
        assert!(OrgPublicKey::decode("").is_err());
        let two = format!("{}\n{}", secret.public().encode(), secret.public().encode());
        assert!(OrgPublicKey::decode(&two).is_err());
    }
}
