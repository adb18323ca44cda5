//! The signed envelope: one header line with the signature, then the policy's exact bytes.
//!
//! ```text
//! pocketvisor-policy-v1 ed25519 <128 hex digits: the signature>\n
//! <the policy TOML, byte for byte as signed>
//! ```
//!
//! The signature is ed25519 (strict verification) over `pocketvisor-policy-v1\0` followed by
//! the body, so a signature made for anything else never verifies here. [`verify`] checks
//! the size, the header and the signature first; only a body that verified is decoded as
//! UTF-8, parsed as TOML and checked ([`Policy::validate`]).

use ed25519_dalek::{Signature, Signer};

use crate::document::Policy;
use crate::keys::{OrgPublicKey, OrgSecretKey};
use crate::{PolicyError, Result};

/// The header's first word, and the signature's domain separator.
pub const MAGIC: &str = "pocketvisor-policy-v1";
/// The largest envelope read or accepted.
pub const MAX_ENVELOPE: usize = 1 << 20;

/// A policy whose signature verified and whose document is valid.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The parsed, checked document.
    pub policy: Policy,
    /// The whole envelope, byte for byte (what is stored when it is applied).
    pub envelope: Vec<u8>,
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(MAGIC.len() + 1 + body.len());
    msg.extend_from_slice(MAGIC.as_bytes());
    msg.push(0);
    msg.extend_from_slice(body);
    msg
}

/// Checks `body` is a valid policy and signs it: the envelope's bytes.
pub fn sign(body: &[u8], key: &OrgSecretKey) -> Result<Vec<u8>> {
    if body.len() + 256 > MAX_ENVELOPE {
        return Err(PolicyError::Document(format!(
            "{} bytes is more than a policy may hold ({MAX_ENVELOPE} with its header)",
            body.len()
        )));
    }
    Policy::parse(body)?;
    let sig = key.0.sign(&signed_message(body));
    let mut out = format!("{MAGIC} ed25519 {}\n", hex::encode(sig.to_bytes())).into_bytes();
    out.extend_from_slice(body);
    Ok(out)
}

/// Verifies `envelope` under `key`, then parses and checks its document.
///
/// Nothing in the body is interpreted before the signature verified. Expiry and rollback
/// are checked by [`crate::store::apply`], which knows the time and what is in force.
pub fn verify(envelope: &[u8], key: &OrgPublicKey) -> Result<Verified> {
    let body = verify_signature(envelope, key)?;
    let policy = Policy::parse(body)?;
    Ok(Verified {
        policy,
        envelope: envelope.to_vec(),
    })
}

/// The body of `envelope` if its signature verifies under `key`.
fn verify_signature<'a>(envelope: &'a [u8], key: &OrgPublicKey) -> Result<&'a [u8]> {
    let bad = |m: &str| PolicyError::Signature(m.to_string());
    if envelope.len() > MAX_ENVELOPE {
        return Err(bad("the file is larger than any signed policy (1 MiB)"));
    }
    let newline = envelope.iter().position(|&b| b == b'\n').ok_or_else(|| {
        bad("not a signed policy (no header line; sign it with `pocketvisor policy sign`)")
    })?;
    let (header, rest) = envelope.split_at(newline);
    let body = &rest[1..];
    let header = std::str::from_utf8(header).map_err(|_| bad("the header is not text"))?;
    let mut words = header.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(bad(
            "not a signed policy (the first line is not `pocketvisor-policy-v1 ed25519 ...`; \
             sign it with `pocketvisor policy sign`)",
        ));
    }
    if words.next() != Some("ed25519") {
        return Err(bad("unknown signature algorithm (only ed25519)"));
    }
    let sig_hex = words
        .next()
        .ok_or_else(|| bad("the header has no signature"))?;
    if words.next().is_some() {
        return Err(bad("the header has extra words"));
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(sig_hex, &mut sig)
        .map_err(|_| bad("the signature is not 128 hex digits"))?;
    key.0
        .verify_strict(&signed_message(body), &Signature::from_bytes(&sig))
        .map_err(|_| {
            PolicyError::Signature(format!(
                "the signature does not verify under the trusted organisation key {} (the \
                 policy was changed after signing, or another key signed it)",
                key.fingerprint()
            ))
        })?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "version = 1\nissued_at = 1000\nprofile = \"work\"\n";

    #[test]
    fn a_signed_policy_verifies_and_parses() {
        let key = OrgSecretKey::generate();
        let env = sign(DOC.as_bytes(), &key).unwrap();
        let v = verify(&env, &key.public()).unwrap();
        assert_eq!(v.policy.version, 1);
        assert_eq!(v.policy.profile, "work");
        assert_eq!(v.envelope, env);
    }

    #[test]
    fn every_flipped_bit_of_the_body_or_signature_is_refused() {
        let key = OrgSecretKey::generate();
        let env = sign(DOC.as_bytes(), &key).unwrap();
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert!(
                verify(&bad, &key.public()).is_err(),
                "byte {i} flipped verified"
            );
        }
    }

    #[test]
    fn unsigned_wrongly_signed_and_oversized_envelopes_are_refused() {
        let key = OrgSecretKey::generate();
        let other = OrgSecretKey::generate();
        let err = verify(DOC.as_bytes(), &key.public()).unwrap_err();
        assert!(matches!(err, PolicyError::Signature(_)), "{err}");
        let env = sign(DOC.as_bytes(), &other).unwrap();
        let err = verify(&env, &key.public()).unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        let mut big = env.clone();
        big.resize(MAX_ENVELOPE + 1, b' ');
        assert!(verify(&big, &other.public()).is_err());
        // Appending to a signed body breaks it too.
        let mut longer = env;
        longer.extend_from_slice(b"\n[boot]\n");
        assert!(verify(&longer, &other.public()).is_err());
    }

    #[test]
    fn an_invalid_document_is_not_signed() {
        let key = OrgSecretKey::generate();
        assert!(sign(b"version = 0\nissued_at = 1\nprofile = \"work\"\n", &key).is_err());
        assert!(sign(b"not toml [", &key).is_err());
    }
}
