//! The audit log's keyed digests: transfer contents are recorded as HMAC-SHA256 under a
//! per-handset secret key (`<state-dir>/audit.key`, owner only), so a reader of the audit
//! log cannot confirm a guess of short contents (a PIN, a one-time code) by hashing it,
//! while the owner of the key can still match a record against a known file.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::Result;

/// Key length in bytes.
const KEY_LEN: usize = 32;
/// SHA-256's block size (HMAC pads the key to it).
const BLOCK: usize = 64;

/// The secret key of the audit digests.
pub struct AuditKey([u8; KEY_LEN]);

impl AuditKey {
    /// Reads the key at `path`, creating it (random, mode 0600) the first time.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let key = crate::secret_file::load_or_create::<KEY_LEN>(path)?;
        Ok(Self(*key))
    }

    /// HMAC-SHA256 of `data` under this key, lower-case hex.
    pub fn digest(&self, data: &[u8]) -> String {
        let mut ipad = [0x36u8; BLOCK];
        let mut opad = [0x5cu8; BLOCK];
        for (i, k) in self.0.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        let inner = Sha256::new()
            .chain_update(ipad)
            .chain_update(data)
            .finalize();
        hex::encode(
            Sha256::new()
                .chain_update(opad)
                .chain_update(inner)
                .finalize(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hmac_sha256_and_a_private_key_file() {
        // HMAC-SHA256 with a key of 32 bytes 0x0b (checked against Python's hmac module).
        let k = AuditKey([0x0b; KEY_LEN]);
        assert_eq!(
            k.digest(b"Hi There"),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("audit.key");
        let a = AuditKey::load_or_create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = AuditKey::load_or_create(&p).unwrap();
        assert_eq!(a.digest(b"1234"), b.digest(b"1234"));
        assert_ne!(a.digest(b"1234"), a.digest(b"1235"));
        let other = AuditKey::load_or_create(&t.path().join("other.key")).unwrap();
        assert_ne!(a.digest(b"1234"), other.digest(b"1234"));
        assert_ne!(a.digest(b"1234"), hex::encode(Sha256::digest(b"1234")));
    }
}
