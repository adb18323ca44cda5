//! Keys: passphrases, argon2id parameters, X25519 identities and their text form.

use std::fmt;

use rand_core::OsRng;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::error::{Result, VaultError};

/// A passphrase, wiped from memory when dropped. Its `Debug` output is redacted.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase.
    pub fn new(text: impl Into<String>) -> Self {
        Passphrase(Zeroizing::new(text.into()))
    }

    /// The passphrase bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl From<String> for Passphrase {
    fn from(text: String) -> Self {
        Passphrase::new(text)
    }
}

impl From<&str> for Passphrase {
    fn from(text: &str) -> Self {
        Passphrase::new(text)
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Argon2id cost parameters of a passphrase slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub m_cost_kib: u32,
    /// Number of passes.
    pub t_cost: u32,
    /// Degree of parallelism (lanes).
    pub p_cost: u32,
}

impl KdfParams {
    /// Production default: 128 MiB, 3 passes, 1 lane (about 0.45 s on one x86-64 server core
    /// in a release build; slower on phones).
    pub const DEFAULT: KdfParams = KdfParams {
        m_cost_kib: 128 * 1024,
        t_cost: 3,
        p_cost: 1,
    };

    /// Minimal parameters for tests and fuzzing only: they give no protection against guessing.
    pub const INSECURE_FAST: KdfParams = KdfParams {
        m_cost_kib: 8,
        t_cost: 1,
        p_cost: 1,
    };

    /// Checks the parameters against argon2's own rules and the given limits.
    pub(crate) fn check(&self, limits: &ReadLimits) -> Result<argon2::Params, String> {
        if self.m_cost_kib > limits.max_kdf_m_cost_kib
            || self.t_cost > limits.max_kdf_t_cost
            || self.p_cost > limits.max_kdf_p_cost
        {
            return Err(format!(
                "argon2 parameters m={} KiB t={} p={} exceed the allowed maximum \
                 (m={} KiB t={} p={})",
                self.m_cost_kib,
                self.t_cost,
                self.p_cost,
                limits.max_kdf_m_cost_kib,
                limits.max_kdf_t_cost,
                limits.max_kdf_p_cost
            ));
        }
        argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| format!("invalid argon2 parameters: {e}"))
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams::DEFAULT
    }
}

/// Upper bounds a reader accepts, so a hostile file cannot make it burn unbounded memory or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest argon2 memory cost (KiB) a passphrase slot may ask for.
    pub max_kdf_m_cost_kib: u32,
    /// Largest argon2 pass count.
    pub max_kdf_t_cost: u32,
    /// Largest argon2 lane count.
    pub max_kdf_p_cost: u32,
}

impl Default for ReadLimits {
    /// 1 GiB, 16 passes, 16 lanes.
    fn default() -> Self {
        ReadLimits {
            max_kdf_m_cost_kib: 1024 * 1024,
            max_kdf_t_cost: 16,
            max_kdf_p_cost: 16,
        }
    }
}

/// A way to open a file, given when exporting. Each becomes one key slot.
#[derive(Debug, Clone)]
pub enum KeySpec {
    /// Anyone who knows the passphrase can open the file.
    Passphrase {
        /// The passphrase.
        passphrase: Passphrase,
        /// Argon2id cost parameters (use [`KdfParams::DEFAULT`] outside tests).
        params: KdfParams,
    },
    /// The holder of the X25519 secret matching this public key can open the file.
    Recipient(PublicKey),
}

impl KeySpec {
    /// A passphrase slot with the default argon2id parameters.
    pub fn passphrase(passphrase: impl Into<Passphrase>) -> Self {
        KeySpec::Passphrase {
            passphrase: passphrase.into(),
            params: KdfParams::DEFAULT,
        }
    }
}

/// What the importer holds to open a file.
pub enum Unlock {
    /// A passphrase.
    Passphrase(Passphrase),
    /// An X25519 identity (secret key), zeroized on drop.
    Identity(StaticSecret),
}

impl fmt::Debug for Unlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unlock::Passphrase(_) => f.write_str("Unlock::Passphrase(<redacted>)"),
            Unlock::Identity(_) => f.write_str("Unlock::Identity(<redacted>)"),
        }
    }
}

/// Creates a fresh random X25519 identity and its public key.
pub fn generate_identity() -> (StaticSecret, PublicKey) {
    let secret = StaticSecret::random_from_rng(OsRng);
    let public = PublicKey::from(&secret);
    (secret, public)
}

const SECRET_PREFIX: &str = "pvp-secret-";
const PUBLIC_PREFIX: &str = "pvp-public-";

/// Text form of an identity: `pvp-secret-<64 hex digits>`. The string is zeroized on drop.
pub fn encode_secret(secret: &StaticSecret) -> Zeroizing<String> {
    let bytes = Zeroizing::new(secret.to_bytes());
    let mut text = Zeroizing::new(String::with_capacity(SECRET_PREFIX.len() + 64));
    text.push_str(SECRET_PREFIX);
    push_hex(&mut text, bytes.as_ref());
    text
}

/// Text form of a public key: `pvp-public-<64 hex digits>`.
pub fn encode_public(public: &PublicKey) -> String {
    let mut text = String::with_capacity(PUBLIC_PREFIX.len() + 64);
    text.push_str(PUBLIC_PREFIX);
    push_hex(&mut text, public.as_bytes());
    text
}

/// Parses the text form made by [`encode_secret`] (surrounding whitespace is ignored).
pub fn decode_secret(text: &str) -> Result<StaticSecret> {
    let hex = text
        .trim()
        .strip_prefix(SECRET_PREFIX)
        .ok_or(VaultError::BadKeyText {
            reason: "a secret key starts with `pvp-secret-`",
        })?;
    let bytes = parse_hex32(hex)?;
    Ok(StaticSecret::from(*bytes))
}

/// Parses the text form made by [`encode_public`] (surrounding whitespace is ignored).
pub fn decode_public(text: &str) -> Result<PublicKey> {
    let hex = text
        .trim()
        .strip_prefix(PUBLIC_PREFIX)
        .ok_or(VaultError::BadKeyText {
            reason: "a public key starts with `pvp-public-`",
        })?;
    let bytes = parse_hex32(hex)?;
    Ok(PublicKey::from(*bytes))
}

/// Appends the lower-case hex of a 32-byte key to `out` (through a buffer zeroized on drop).
fn push_hex(out: &mut String, bytes: &[u8]) {
    let mut digits = Zeroizing::new([0u8; 64]);
    if hex::encode_to_slice(bytes, digits.as_mut()).is_ok() {
        // Hex digits are ASCII.
        out.push_str(std::str::from_utf8(digits.as_ref()).unwrap_or_default());
    }
}

fn parse_hex32(hex: &str) -> Result<Zeroizing<[u8; 32]>> {
    if hex.len() != 64 {
        return Err(VaultError::BadKeyText {
            reason: "a key has exactly 64 hex digits after its prefix",
        });
    }
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex, out.as_mut()).map_err(|_| VaultError::BadKeyText {
        reason: "a key contains a character that is not a hex digit",
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_round_trip() {
        let (secret, public) = generate_identity();
        let secret_text = encode_secret(&secret);
        let public_text = encode_public(&public);
        assert!(secret_text.starts_with("pvp-secret-"));
        assert_eq!(public_text.len(), "pvp-public-".len() + 64);
        let secret2 = decode_secret(&secret_text).unwrap();
        assert_eq!(secret2.to_bytes(), secret.to_bytes());
        let public2 = decode_public(&format!("  {public_text}\n")).unwrap();
        assert_eq!(public2, public);
        assert_eq!(PublicKey::from(&secret2), public);
    }

    #[test]
    fn key_text_rejects_garbage() {
        let (secret, public) = generate_identity();
        let public_text = encode_public(&public);
        // A public key is not a secret key and vice versa.
        assert!(decode_secret(&public_text).is_err());
        assert!(decode_public(&encode_secret(&secret)).is_err());
        // Wrong length and bad digits.
        assert!(decode_public(&public_text[..public_text.len() - 1]).is_err());
        let bad = format!("{}g", &public_text[..public_text.len() - 1]);
        assert!(decode_public(&bad).is_err());
        assert!(decode_public("pvp-public-zz").is_err());
    }

    #[test]
    fn kdf_limits_are_enforced() {
        let limits = ReadLimits::default();
        assert!(KdfParams::DEFAULT.check(&limits).is_ok());
        assert!(KdfParams::INSECURE_FAST.check(&limits).is_ok());
        let huge = KdfParams {
            m_cost_kib: u32::MAX,
            t_cost: 1,
            p_cost: 1,
        };
        assert!(huge.check(&limits).is_err());
        // argon2 itself refuses m < 8 * p.
        let invalid = KdfParams {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 4,
        };
        assert!(invalid.check(&limits).is_err());
    }

    #[test]
    fn passphrase_debug_is_redacted() {
        let p = Passphrase::new("hunter2");
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
