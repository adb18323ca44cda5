//! Encryption at rest, the keys: an encrypted profile's disk data key (64 bytes, AES-256-XTS,
//! see `devices::virtio::block::crypt`) is random per profile and stored only wrapped, with
//! ChaCha20-Poly1305 under the handset's device key (`<state-dir>/device.key`, 32 bytes, owner
//! only, created once). The profile's name is the associated data, so a wrapped key copied to
//! another profile does not open, and any change to the stored bytes is refused.
//!
//! Wrapped form: `PVDK` magic, version byte 1, 12-byte nonce, 64 + 16 bytes of ciphertext.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::secret_file;

/// Length of a disk data key (two AES-256 keys).
pub const DISK_KEY_LEN: usize = 64;
/// Length of the device key.
pub const DEVICE_KEY_LEN: usize = 32;
const MAGIC: &[u8; 5] = b"PVDK\x01";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Length of a wrapped disk key.
pub const WRAPPED_LEN: usize = MAGIC.len() + NONCE_LEN + DISK_KEY_LEN + TAG_LEN;

/// A disk data key in clear, zeroized on drop.
pub type DiskKeyBytes = Zeroizing<[u8; DISK_KEY_LEN]>;

/// The handset's device key, which wraps every profile's disk key.
pub struct DeviceKey(Zeroizing<[u8; DEVICE_KEY_LEN]>);

impl DeviceKey {
    /// Reads the device key at `path`, creating it (random, mode 0600) the first time.
    pub fn load_or_create(path: &Path) -> Result<DeviceKey> {
        Ok(DeviceKey(secret_file::load_or_create(path)?))
    }

    fn aead(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&self.0[..]))
    }

    /// Wraps `key` for the profile `profile`.
    pub fn wrap(&self, profile: &str, key: &[u8; DISK_KEY_LEN]) -> Result<Vec<u8>> {
        let nonce = secret_file::random::<NONCE_LEN>()?;
        let sealed = self
            .aead()
            .encrypt(
                Nonce::from_slice(&nonce[..]),
                Payload {
                    msg: key,
                    aad: &aad(profile),
                },
            )
            .map_err(|_| Error::Internal("cannot wrap a disk key".into()))?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce[..]);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens the profile `profile`'s wrapped disk key; anything but a key this device key
    /// wrapped for that profile is refused.
    pub fn unwrap(&self, profile: &str, wrapped: &[u8]) -> Result<DiskKeyBytes> {
        let refused = || {
            Error::Denied(format!(
                "the disk key of profile {profile} does not open with this handset's device key"
            ))
        };
        if wrapped.len() != WRAPPED_LEN || !wrapped.starts_with(MAGIC) {
            return Err(refused());
        }
        let (nonce, sealed) = wrapped[MAGIC.len()..].split_at(NONCE_LEN);
        let opened = Zeroizing::new(
            self.aead()
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad(profile),
                    },
                )
                .map_err(|_| refused())?,
        );
        let mut key = Zeroizing::new([0u8; DISK_KEY_LEN]);
        key.copy_from_slice(&opened);
        Ok(key)
    }
}

/// A new random disk data key (its two halves distinct, as XTS needs).
pub fn new_disk_key() -> Result<DiskKeyBytes> {
    loop {
        let key = secret_file::random::<DISK_KEY_LEN>()?;
        let (data, tweak) = key.split_at(DISK_KEY_LEN / 2);
        if data != tweak {
            return Ok(key);
        }
    }
}

fn aad(profile: &str) -> Vec<u8> {
    let mut aad = b"pocketvisor disk key\0".to_vec();
    aad.extend_from_slice(profile.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(dir: &Path, name: &str) -> DeviceKey {
        DeviceKey::load_or_create(&dir.join(name)).unwrap()
    }

    #[test]
    fn wrapped_key_opens_only_for_its_device_and_profile() {
        let t = tempfile::tempdir().unwrap();
        let dev = device(t.path(), "device.key");
        let key = new_disk_key().unwrap();
        assert_ne!(key[..32], key[32..]);
        assert_ne!(*new_disk_key().unwrap(), *key);
        let wrapped = dev.wrap("work", &key).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert!(!wrapped.windows(16).any(|w| key.windows(16).any(|k| k == w)));
        // The same device key, read again from its file, opens it.
        let again = device(t.path(), "device.key");
        assert_eq!(*again.unwrap("work", &wrapped).unwrap(), *key);
        // Another profile's name, another device key, or any changed byte do not.
        assert!(matches!(
            dev.unwrap("personal", &wrapped),
            Err(Error::Denied(_))
        ));
        let other = device(t.path(), "other.key");
        assert!(other.unwrap("work", &wrapped).is_err());
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 1;
            assert!(dev.unwrap("work", &bad).is_err(), "byte {i} changed");
        }
        assert!(dev.unwrap("work", &wrapped[..WRAPPED_LEN - 1]).is_err());
        // Two wrappings of one key differ (fresh nonce) and both open.
        let second = dev.wrap("work", &key).unwrap();
        assert_ne!(second, wrapped);
        assert_eq!(*dev.unwrap("work", &second).unwrap(), *key);
    }
}
