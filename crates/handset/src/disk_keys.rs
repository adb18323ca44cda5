//! Encryption at rest, the keys: an encrypted profile's disk data key (64 bytes, AES-256-XTS,
//! see `devices::virtio::block::crypt`) is random per profile and stored only wrapped, with
//! ChaCha20-Poly1305 under the handset's device key (`<state-dir>/device.key`, 32 bytes, owner
//! only, created once). The profile's name is the associated data, so a wrapped key copied to
//! another profile does not open, and any change to the stored bytes is refused.
//!
//! Wrapped form: `PVDK` magic, version byte 1, 12-byte nonce, 64 + 16 bytes of ciphertext.
//!
//! A profile with `encrypt_at_rest` gets its key at create ([`create_profile_key`]), stored
//! wrapped in `profiles/<name>/disk.key`; each of its disks is encrypted under its own key
//! derived from it ([`disk_key`]: HMAC-SHA512 of the disk's name), so two disks never share
//! ciphertext for equal sectors. The daemon hands the derived keys to the VMM over its stdin
//! ([`keys_for_vmm`]) at every start and resume.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::secret_file;
use crate::spec::ProfileSpec;
use crate::state_dir::{self, StateDir};

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

    /// Reads the device key at `path`, which must exist (an export or a start never makes a
    /// new one: it could open nothing).
    pub fn load(path: &Path) -> Result<DeviceKey> {
        Ok(DeviceKey(secret_file::load(path)?))
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

/// The key of disk `disk` of a profile whose data key is `profile_key`: HMAC-SHA512 over the
/// disk's name (its two halves distinct, as XTS needs; equal halves are refused).
pub fn disk_key(profile_key: &[u8; DISK_KEY_LEN], disk: &str) -> Result<DiskKeyBytes> {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha512> as Mac>::new_from_slice(profile_key)
        .map_err(|_| Error::Internal("HMAC key".into()))?;
    mac.update(b"pocketvisor disk key v1\0");
    mac.update(disk.as_bytes());
    let mut out = mac.finalize().into_bytes();
    let mut key = Zeroizing::new([0u8; DISK_KEY_LEN]);
    key.copy_from_slice(&out);
    zeroize::Zeroize::zeroize(out.as_mut_slice());
    if key[..DISK_KEY_LEN / 2] == key[DISK_KEY_LEN / 2..] {
        return Err(Error::Internal(format!("disk {disk}: a weak derived key")));
    }
    Ok(key)
}

/// Makes profile `name`'s data key: random, wrapped under the handset's device key (created
/// the first time) and written to `profiles/<name>/disk.key` (temp + fsync + rename).
pub fn create_profile_key(dir: &StateDir, name: &str) -> Result<DiskKeyBytes> {
    let key = new_disk_key()?;
    store_profile_key(dir, &dir.profile(name), name, &key)?;
    Ok(key)
}

/// Writes `key`, wrapped for profile `name` under the handset's device key (created the
/// first time), as `disk.key` in `profile_dir` (the profile's directory, or an import's
/// staging copy of it).
pub fn store_profile_key(
    dir: &StateDir,
    profile_dir: &Path,
    name: &str,
    key: &[u8; DISK_KEY_LEN],
) -> Result<()> {
    let device = DeviceKey::load_or_create(&dir.device_key())?;
    let wrapped = device.wrap(name, key)?;
    state_dir::write_atomic(&profile_dir.join(crate::state_dir::DATA_KEY_FILE), &wrapped)
}

/// Opens profile `name`'s data key with the handset's device key.
pub fn load_profile_key(dir: &StateDir, name: &str) -> Result<DiskKeyBytes> {
    let path = dir.data_key(name);
    let wrapped = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Denied(format!(
                "profile {name} is encrypted at rest but has no data key ({} is missing)",
                path.display()
            ))
        } else {
            Error::io(format!("cannot read {}", path.display()))(e)
        }
    })?;
    let device = DeviceKey::load(&dir.device_key()).map_err(|e| {
        Error::Denied(format!(
            "profile {name} is encrypted at rest and this handset's device key cannot be read: {e}"
        ))
    })?;
    device.unwrap(name, &wrapped)
}

/// What the VMM of profile `spec` reads on its stdin (`--disk-keys-stdin`): the key of each
/// disk in the spec's order; None for a profile not encrypted at rest.
pub fn keys_for_vmm(dir: &StateDir, spec: &ProfileSpec) -> Result<Option<Zeroizing<Vec<u8>>>> {
    if !spec.encrypt_at_rest {
        return Ok(None);
    }
    // With a key lease in the policy, only while the MDM's lease holds.
    crate::mdm_link::lease::check(dir, &spec.name, crate::policy_clock::now())?;
    let profile = load_profile_key(dir, &spec.name)?;
    let mut out = Zeroizing::new(Vec::with_capacity(DISK_KEY_LEN * spec.disks.len()));
    for d in &spec.disks {
        out.extend_from_slice(&disk_key(&profile, &d.name)?[..]);
    }
    Ok(Some(out))
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

    #[test]
    fn a_profile_key_is_stored_wrapped_and_gives_each_disk_its_own_key() {
        let t = tempfile::tempdir().unwrap();
        let dir = StateDir::new(t.path()).unwrap();
        std::fs::create_dir_all(dir.profile("work")).unwrap();
        // No device key yet: nothing opens.
        assert!(load_profile_key(&dir, "work").is_err());
        let key = create_profile_key(&dir, "work").unwrap();
        let stored = std::fs::read(dir.data_key("work")).unwrap();
        assert_eq!(stored.len(), WRAPPED_LEN);
        assert_eq!(*load_profile_key(&dir, "work").unwrap(), *key);
        // Derived per disk: distinct, stable, and not the profile key itself.
        let a = disk_key(&key, "data").unwrap();
        let b = disk_key(&key, "system").unwrap();
        assert_ne!(*a, *b);
        assert_ne!(*a, *key);
        assert_eq!(*disk_key(&key, "data").unwrap(), *a);
        // The VMM gets the disks' keys in the spec's order.
        let mut spec =
            ProfileSpec::from_template("work", "work", crate::spec::TemplateBoot::Probe).unwrap();
        assert!(keys_for_vmm(&dir, &spec).unwrap().is_none());
        spec.encrypt_at_rest = true;
        spec.disks.push(crate::spec::DiskSpec::empty("system", 1));
        let keys = keys_for_vmm(&dir, &spec).unwrap().unwrap();
        assert_eq!(&keys[..], &[&a[..], &b[..]].concat()[..]);
        // Another device key (a copied profile directory) opens nothing.
        std::fs::remove_file(dir.device_key()).unwrap();
        DeviceKey::load_or_create(&dir.device_key()).unwrap();
        let e = load_profile_key(&dir, "work").unwrap_err();
        assert!(matches!(e, Error::Denied(_)), "{e}");
    }
}
