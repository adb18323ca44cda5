//! The file header: fixed fields, key slots that wrap the file key, and the header MAC.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! offset size
//!      0    8  magic "PVPROF\0\x01"
//!      8    2  format version (1)
//!     10    1  cipher id (1 = XChaCha20-Poly1305)
//!     11    1  flags (reserved, must be 0)
//!     12    4  plaintext chunk size
//!     16   24  random file salt; its first 16 bytes prefix every chunk nonce
//!     40    1  number of key slots (1..=16)
//!     41       key slots, each: kind u8, body length u16, body
//!      n   32  HMAC-SHA256 over bytes 0..n, keyed by a key derived from the file key
//! ```
//!
//! Passphrase slot body (kind 1): argon2id m (KiB) u32, t u32, p u32, salt (16 bytes), nonce (24),
//! wrapped file key (48). Recipient slot body (kind 2): ephemeral X25519 public key (32),
//! nonce (24), wrapped file key (48). Wrapping is XChaCha20-Poly1305 with the fixed part of the
//! header (bytes 0..40) as associated data. Unknown slot kinds are skipped (and still covered by
//! the MAC).

use std::io::Read;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::error::{Result, VaultError};
use crate::keys::{KdfParams, KeySpec, Passphrase, ReadLimits, Unlock};
use crate::util::read_up_to;

/// Magic bytes at the start of every portable profile file.
pub const MAGIC: [u8; 8] = *b"PVPROF\0\x01";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Cipher id of XChaCha20-Poly1305, the only cipher of version 1.
pub(crate) const CIPHER_XCHACHA20_POLY1305: u8 = 1;
/// Smallest accepted plaintext chunk size.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// Largest accepted plaintext chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;

const FIXED_LEN: usize = 40;
const MAX_SLOTS: u8 = 16;
const MAX_SLOT_BODY: u16 = 1024;
const MAX_PASSPHRASE_ATTEMPTS: usize = 4;
const MAC_LEN: usize = 32;
const KEY_LEN: usize = 32;
const WRAPPED_LEN: usize = KEY_LEN + 16;

const SLOT_PASSPHRASE: u8 = 1;
const SLOT_RECIPIENT: u8 = 2;
const PASSPHRASE_BODY_LEN: usize = 12 + 16 + 24 + WRAPPED_LEN;
const RECIPIENT_BODY_LEN: usize = 32 + 24 + WRAPPED_LEN;

const INFO_CHUNK_KEY: &[u8] = b"pocketvisor pvp v1 chunk key";
const INFO_HEADER_MAC: &[u8] = b"pocketvisor pvp v1 header mac";
const INFO_RECIPIENT: &[u8] = b"pocketvisor pvp v1 x25519 slot";

type HmacSha256 = Hmac<Sha256>;

/// Everything needed to seal or open the chunks that follow a header.
pub(crate) struct StreamKeys {
    /// Cipher keyed with the per-file chunk key (zeroized on drop by the cipher).
    pub cipher: XChaCha20Poly1305,
    /// First 16 bytes of every chunk nonce.
    pub nonce_prefix: [u8; 16],
    /// SHA-256 of the whole header including its MAC; part of every chunk's associated data.
    pub header_hash: [u8; 32],
    /// Plaintext chunk size.
    pub chunk_size: u32,
}

/// A header that was read and authenticated.
pub(crate) struct OpenedHeader {
    pub keys: StreamKeys,
    /// Length of the header in bytes.
    pub len: u64,
}

/// Builds a new header with a fresh random file key and one slot per key spec.
pub(crate) fn create(specs: &[KeySpec], chunk_size: u32) -> Result<(Vec<u8>, StreamKeys)> {
    if specs.is_empty() {
        return Err(VaultError::invalid_input("at least one key is required"));
    }
    if specs.len() > usize::from(MAX_SLOTS) {
        return Err(VaultError::invalid_input(format!(
            "at most {MAX_SLOTS} keys are allowed"
        )));
    }
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(VaultError::invalid_input(format!(
            "chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
        )));
    }
    let mut file_key = Zeroizing::new([0u8; KEY_LEN]);
    OsRng.fill_bytes(file_key.as_mut());
    let mut salt = [0u8; 24];
    OsRng.fill_bytes(&mut salt);

    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.push(CIPHER_XCHACHA20_POLY1305);
    out.push(0);
    out.extend_from_slice(&chunk_size.to_le_bytes());
    out.extend_from_slice(&salt);
    debug_assert_eq!(out.len(), FIXED_LEN);
    let fixed: [u8; FIXED_LEN] = out[..FIXED_LEN]
        .try_into()
        .map_err(|_| VaultError::invalid_input("internal: header prefix length"))?;
    let slot_count = u8::try_from(specs.len())
        .map_err(|_| VaultError::invalid_input("internal: too many key slots"))?;
    out.push(slot_count);

    for spec in specs {
        let (kind, body) = match spec {
            KeySpec::Passphrase { passphrase, params } => (
                SLOT_PASSPHRASE,
                passphrase_slot(passphrase, params, &file_key, &fixed)?,
            ),
            KeySpec::Recipient(public) => {
                (SLOT_RECIPIENT, recipient_slot(public, &file_key, &fixed)?)
            }
        };
        out.push(kind);
        // Slot bodies are small fixed sizes.
        let body_len = u16::try_from(body.len())
            .map_err(|_| VaultError::invalid_input("internal: key slot too large"))?;
        out.extend_from_slice(&body_len.to_le_bytes());
        out.extend_from_slice(&body);
    }

    let (chunk_key, mac_key) = derive_keys(&file_key, &salt);
    let mut mac = new_mac(&mac_key);
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());

    let keys = stream_keys(&chunk_key, &salt, &out, chunk_size);
    Ok((out, keys))
}

/// Reads a header from `input`, unwraps the file key with `unlock` and checks the header MAC.
pub(crate) fn open(
    input: &mut impl Read,
    unlock: &Unlock,
    limits: &ReadLimits,
) -> Result<OpenedHeader> {
    let mut raw = Vec::with_capacity(512);

    let mut magic = [0u8; 8];
    let got = read_up_to(input, &mut magic)?;
    if magic[..got] != MAGIC[..got] {
        return Err(VaultError::NotAPortableProfile);
    }
    if got < magic.len() {
        return Err(VaultError::Truncated);
    }
    raw.extend_from_slice(&magic);

    let version = u16::from_le_bytes(read_array(input, &mut raw)?);
    if version != FORMAT_VERSION {
        return Err(VaultError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let [cipher, flags] = read_array(input, &mut raw)?;
    if cipher != CIPHER_XCHACHA20_POLY1305 {
        return Err(VaultError::UnsupportedCipher { id: cipher });
    }
    if flags != 0 {
        return Err(VaultError::corrupt_header(format!(
            "unknown header flags {flags:#04x}"
        )));
    }
    let chunk_size = u32::from_le_bytes(read_array(input, &mut raw)?);
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(VaultError::corrupt_header(format!(
            "chunk size {chunk_size} is out of range"
        )));
    }
    let salt: [u8; 24] = read_array(input, &mut raw)?;
    let fixed: [u8; FIXED_LEN] = raw
        .as_slice()
        .try_into()
        .map_err(|_| VaultError::corrupt_header("internal: header prefix length"))?;

    let [slot_count] = read_array(input, &mut raw)?;
    if slot_count == 0 || slot_count > MAX_SLOTS {
        return Err(VaultError::corrupt_header(format!(
            "{slot_count} key slots (1 to {MAX_SLOTS} allowed)"
        )));
    }
    let mut slots = Vec::with_capacity(usize::from(slot_count));
    for _ in 0..slot_count {
        let [kind] = read_array(input, &mut raw)?;
        let len = u16::from_le_bytes(read_array(input, &mut raw)?);
        if len > MAX_SLOT_BODY {
            return Err(VaultError::corrupt_header(format!(
                "key slot of {len} bytes is too large"
            )));
        }
        let mut body = vec![0u8; usize::from(len)];
        read_exact_or_truncated(input, &mut body)?;
        raw.extend_from_slice(&body);
        slots.push((kind, body));
    }
    let mut mac_tag = [0u8; MAC_LEN];
    read_exact_or_truncated(input, &mut mac_tag)?;

    let file_key = unwrap_file_key(&slots, unlock, limits, &fixed)?;
    let (chunk_key, mac_key) = derive_keys(&file_key, &salt);
    let mut mac = new_mac(&mac_key);
    mac.update(&raw);
    mac.verify_slice(&mac_tag)
        .map_err(|_| VaultError::corrupt_header("header authentication failed"))?;

    raw.extend_from_slice(&mac_tag);
    let keys = stream_keys(&chunk_key, &salt, &raw, chunk_size);
    Ok(OpenedHeader {
        keys,
        len: raw.len() as u64,
    })
}

fn unwrap_file_key(
    slots: &[(u8, Vec<u8>)],
    unlock: &Unlock,
    limits: &ReadLimits,
    fixed: &[u8; FIXED_LEN],
) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    match unlock {
        Unlock::Passphrase(passphrase) => {
            // Each attempt costs a full argon2 run: try a bounded number of slots.
            let passphrase_slots = slots
                .iter()
                .filter(|(k, _)| *k == SLOT_PASSPHRASE)
                .take(MAX_PASSPHRASE_ATTEMPTS);
            for (_, body) in passphrase_slots {
                if let Some(key) = open_passphrase_slot(body, passphrase, limits, fixed)? {
                    return Ok(key);
                }
            }
        }
        Unlock::Identity(secret) => {
            for (_, body) in slots.iter().filter(|(k, _)| *k == SLOT_RECIPIENT) {
                if let Some(key) = open_recipient_slot(body, secret, fixed)? {
                    return Ok(key);
                }
            }
        }
    }
    Err(VaultError::WrongKey)
}

fn passphrase_slot(
    passphrase: &Passphrase,
    params: &KdfParams,
    file_key: &[u8; KEY_LEN],
    fixed: &[u8; FIXED_LEN],
) -> Result<Vec<u8>> {
    // Export accepts any parameters argon2 accepts; the read limits only apply to readers.
    let unlimited = ReadLimits {
        max_kdf_m_cost_kib: u32::MAX,
        max_kdf_t_cost: u32::MAX,
        max_kdf_p_cost: u32::MAX,
    };
    let argon_params = params
        .check(&unlimited)
        .map_err(VaultError::invalid_input)?;
    if passphrase.as_bytes().is_empty() {
        return Err(VaultError::invalid_input("the passphrase is empty"));
    }
    let mut salt = [0u8; 16];
    OsRng.fill_bytes(&mut salt);
    let kek = argon2_key(passphrase, &salt, argon_params)
        .map_err(|e| VaultError::invalid_input(format!("argon2 failed: {e}")))?;
    let mut nonce = [0u8; 24];
    OsRng.fill_bytes(&mut nonce);
    let wrapped = wrap(&kek, &nonce, file_key, fixed)?;

    let mut body = Vec::with_capacity(PASSPHRASE_BODY_LEN);
    body.extend_from_slice(&params.m_cost_kib.to_le_bytes());
    body.extend_from_slice(&params.t_cost.to_le_bytes());
    body.extend_from_slice(&params.p_cost.to_le_bytes());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&wrapped);
    Ok(body)
}

fn open_passphrase_slot(
    body: &[u8],
    passphrase: &Passphrase,
    limits: &ReadLimits,
    fixed: &[u8; FIXED_LEN],
) -> Result<Option<Zeroizing<[u8; KEY_LEN]>>> {
    if body.len() != PASSPHRASE_BODY_LEN {
        return Err(VaultError::corrupt_header(
            "passphrase key slot has the wrong size",
        ));
    }
    let (m, rest) = body.split_at(4);
    let (t, rest) = rest.split_at(4);
    let (p, rest) = rest.split_at(4);
    let (salt, rest) = rest.split_at(16);
    let (nonce, wrapped) = rest.split_at(24);
    let params = KdfParams {
        m_cost_kib: le_u32(m),
        t_cost: le_u32(t),
        p_cost: le_u32(p),
    };
    let argon_params = params.check(limits).map_err(VaultError::corrupt_header)?;
    let kek = argon2_key(passphrase, salt, argon_params)
        .map_err(|e| VaultError::corrupt_header(format!("argon2 failed: {e}")))?;
    Ok(unwrap(&kek, nonce, wrapped, fixed))
}

fn recipient_slot(
    recipient: &PublicKey,
    file_key: &[u8; KEY_LEN],
    fixed: &[u8; FIXED_LEN],
) -> Result<Vec<u8>> {
    let ephemeral = EphemeralSecret::random_from_rng(OsRng);
    let ephemeral_public = PublicKey::from(&ephemeral);
    let shared = ephemeral.diffie_hellman(recipient);
    if !shared.was_contributory() {
        return Err(VaultError::invalid_input(
            "the recipient public key is not a valid X25519 key",
        ));
    }
    let kek = recipient_kek(shared.as_bytes(), &ephemeral_public, recipient);
    let mut nonce = [0u8; 24];
    OsRng.fill_bytes(&mut nonce);
    let wrapped = wrap(&kek, &nonce, file_key, fixed)?;

    let mut body = Vec::with_capacity(RECIPIENT_BODY_LEN);
    body.extend_from_slice(ephemeral_public.as_bytes());
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&wrapped);
    Ok(body)
}

fn open_recipient_slot(
    body: &[u8],
    secret: &StaticSecret,
    fixed: &[u8; FIXED_LEN],
) -> Result<Option<Zeroizing<[u8; KEY_LEN]>>> {
    if body.len() != RECIPIENT_BODY_LEN {
        return Err(VaultError::corrupt_header(
            "recipient key slot has the wrong size",
        ));
    }
    let (epk, rest) = body.split_at(32);
    let (nonce, wrapped) = rest.split_at(24);
    let epk: [u8; 32] = epk
        .try_into()
        .map_err(|_| VaultError::corrupt_header("internal: ephemeral key length"))?;
    let ephemeral_public = PublicKey::from(epk);
    let shared = secret.diffie_hellman(&ephemeral_public);
    if !shared.was_contributory() {
        return Ok(None);
    }
    let own_public = PublicKey::from(secret);
    let kek = recipient_kek(shared.as_bytes(), &ephemeral_public, &own_public);
    Ok(unwrap(&kek, nonce, wrapped, fixed))
}

fn recipient_kek(
    shared: &[u8; 32],
    ephemeral: &PublicKey,
    recipient: &PublicKey,
) -> Zeroizing<[u8; KEY_LEN]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral.as_bytes());
    salt[32..].copy_from_slice(recipient.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut kek = Zeroizing::new([0u8; KEY_LEN]);
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hk.expand(INFO_RECIPIENT, kek.as_mut());
    kek
}

fn argon2_key(
    passphrase: &Passphrase,
    salt: &[u8],
    params: argon2::Params,
) -> Result<Zeroizing<[u8; KEY_LEN]>, argon2::Error> {
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = Zeroizing::new([0u8; KEY_LEN]);
    argon.hash_password_into(passphrase.as_bytes(), salt, kek.as_mut())?;
    Ok(kek)
}

fn wrap(
    kek: &[u8; KEY_LEN],
    nonce: &[u8; 24],
    file_key: &[u8; KEY_LEN],
    fixed: &[u8; FIXED_LEN],
) -> Result<Vec<u8>> {
    let cipher = XChaCha20Poly1305::new(kek.into());
    cipher
        .encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: file_key,
                aad: fixed,
            },
        )
        .map_err(|_| VaultError::invalid_input("internal: key wrapping failed"))
}

fn unwrap(
    kek: &[u8; KEY_LEN],
    nonce: &[u8],
    wrapped: &[u8],
    fixed: &[u8; FIXED_LEN],
) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    if nonce.len() != 24 {
        return None;
    }
    let cipher = XChaCha20Poly1305::new(kek.into());
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: wrapped,
                    aad: fixed,
                },
            )
            .ok()?,
    );
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if plain.len() != KEY_LEN {
        return None;
    }
    key.copy_from_slice(&plain);
    Some(key)
}

fn derive_keys(
    file_key: &[u8; KEY_LEN],
    salt: &[u8; 24],
) -> (Zeroizing<[u8; KEY_LEN]>, Zeroizing<[u8; KEY_LEN]>) {
    let hk = Hkdf::<Sha256>::new(Some(salt), file_key);
    let mut chunk_key = Zeroizing::new([0u8; KEY_LEN]);
    let mut mac_key = Zeroizing::new([0u8; KEY_LEN]);
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hk.expand(INFO_CHUNK_KEY, chunk_key.as_mut());
    let _ = hk.expand(INFO_HEADER_MAC, mac_key.as_mut());
    (chunk_key, mac_key)
}

fn new_mac(key: &[u8; KEY_LEN]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

fn stream_keys(
    chunk_key: &[u8; KEY_LEN],
    salt: &[u8; 24],
    header: &[u8],
    chunk_size: u32,
) -> StreamKeys {
    let mut nonce_prefix = [0u8; 16];
    nonce_prefix.copy_from_slice(&salt[..16]);
    StreamKeys {
        cipher: XChaCha20Poly1305::new(chunk_key.into()),
        nonce_prefix,
        header_hash: Sha256::digest(header).into(),
        chunk_size,
    }
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(b)
}

fn read_exact_or_truncated(input: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    if read_up_to(input, buf)? < buf.len() {
        return Err(VaultError::Truncated);
    }
    Ok(())
}

fn read_array<const N: usize>(input: &mut impl Read, raw: &mut Vec<u8>) -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    read_exact_or_truncated(input, &mut buf)?;
    raw.extend_from_slice(&buf);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::generate_identity;

    /// Tight limits so a flipped cost parameter cannot make a test slow.
    const TEST_LIMITS: ReadLimits = ReadLimits {
        max_kdf_m_cost_kib: 64,
        max_kdf_t_cost: 2,
        max_kdf_p_cost: 1,
    };

    fn pass(p: &str) -> KeySpec {
        KeySpec::Passphrase {
            passphrase: Passphrase::new(p),
            params: KdfParams::INSECURE_FAST,
        }
    }

    #[test]
    fn header_opens_with_each_key_and_agrees_on_stream_keys() {
        let (secret, public) = generate_identity();
        let (bytes, keys) = create(&[pass("pw"), KeySpec::Recipient(public)], 4096).unwrap();
        for unlock in [
            Unlock::Passphrase(Passphrase::new("pw")),
            Unlock::Identity(secret.clone()),
        ] {
            let opened = open(&mut &bytes[..], &unlock, &ReadLimits::default()).unwrap();
            assert_eq!(opened.len, bytes.len() as u64);
            assert_eq!(opened.keys.header_hash, keys.header_hash);
            assert_eq!(opened.keys.nonce_prefix, keys.nonce_prefix);
            assert_eq!(opened.keys.chunk_size, 4096);
        }
        let (other, _) = generate_identity();
        for unlock in [
            Unlock::Passphrase(Passphrase::new("nope")),
            Unlock::Identity(other),
        ] {
            let err = open(&mut &bytes[..], &unlock, &ReadLimits::default())
                .err()
                .unwrap();
            assert!(matches!(err, VaultError::WrongKey), "{err}");
        }
    }

    #[test]
    fn header_rejects_every_flipped_byte() {
        let (bytes, _) = create(&[pass("pw")], 4096).unwrap();
        let unlock = Unlock::Passphrase(Passphrase::new("pw"));
        for pos in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x01;
            assert!(
                open(&mut &bad[..], &unlock, &TEST_LIMITS).is_err(),
                "flip at {pos} accepted"
            );
        }
    }

    #[test]
    fn header_limits_kdf_cost() {
        let (bytes, _) = create(&[pass("pw")], 4096).unwrap();
        let limits = ReadLimits {
            max_kdf_m_cost_kib: 4,
            ..ReadLimits::default()
        };
        let err = open(
            &mut &bytes[..],
            &Unlock::Passphrase(Passphrase::new("pw")),
            &limits,
        )
        .err()
        .unwrap();
        assert!(matches!(err, VaultError::CorruptHeader { .. }), "{err}");
    }

    #[test]
    fn empty_passphrase_is_refused() {
        let err = create(&[pass("")], 4096).err().unwrap();
        assert!(matches!(err, VaultError::InvalidInput { .. }), "{err}");
    }

    #[test]
    fn recipient_rejects_low_order_point() {
        let zero = PublicKey::from([0u8; 32]);
        assert!(create(&[KeySpec::Recipient(zero)], 4096).is_err());
    }
}
