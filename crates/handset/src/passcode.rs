//! Profile passcodes (issue 12, lock and unlock): an argon2id hash of the passcode, and the
//! waiting time after failed attempts. Stored form:
//! `argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt hex>$<hash hex>`.

use argon2::{Algorithm, Argon2, Params, Version};

use crate::error::{Error, Result};

/// Memory cost (KiB), passes and lanes of new hashes (OWASP's argon2id minimum).
pub const DEFAULT_COST: Cost = Cost {
    m_kib: 19 * 1024,
    t: 2,
    p: 1,
};
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
/// Failed attempts allowed before each further one has to wait.
pub const FREE_ATTEMPTS: u32 = 3;
/// Longest wait between attempts, in seconds.
pub const MAX_WAIT_SECS: u64 = 300;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

/// Hashes `passcode` with a fresh random salt; returns the stored form.
pub fn hash(passcode: &[u8], cost: Cost) -> Result<String> {
    let salt = crate::secret_file::random::<SALT_LEN>()?;
    let out = derive(passcode, &salt[..], cost)?;
    Ok(format!(
        "argon2id$v=19$m={},t={},p={}${}${}",
        cost.m_kib,
        cost.t,
        cost.p,
        hex::encode(&salt[..]),
        hex::encode(out)
    ))
}

/// Whether `passcode` matches the stored form `stored` (compared in constant time); a stored
/// form that does not parse is an error, not a mismatch.
pub fn verify(passcode: &[u8], stored: &str) -> Result<bool> {
    let bad = || Error::Internal("the stored passcode hash is not readable".into());
    let mut parts = stored.split('$');
    if parts.next() != Some("argon2id") || parts.next() != Some("v=19") {
        return Err(bad());
    }
    let mut cost = [0u32; 3];
    let params = parts.next().ok_or_else(bad)?;
    let mut fields = params.split(',');
    for (slot, key) in cost.iter_mut().zip(["m=", "t=", "p="]) {
        *slot = fields
            .next()
            .and_then(|f| f.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
    }
    let salt = hex::decode(parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
    let want = hex::decode(parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
    if parts.next().is_some() || fields.next().is_some() || salt.len() != SALT_LEN {
        return Err(bad());
    }
    if want.len() != HASH_LEN {
        return Err(bad());
    }
    let cost = Cost {
        m_kib: cost[0],
        t: cost[1],
        p: cost[2],
    };
    let got = derive(passcode, &salt, cost)?;
    Ok(got.iter().zip(&want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
}

fn derive(passcode: &[u8], salt: &[u8], cost: Cost) -> Result<[u8; HASH_LEN]> {
    let params = Params::new(cost.m_kib, cost.t, cost.p, Some(HASH_LEN))
        .map_err(|e| Error::Internal(format!("passcode hash parameters: {e}")))?;
    let mut out = [0u8; HASH_LEN];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passcode, salt, &mut out)
        .map_err(|e| Error::Internal(format!("passcode hash: {e}")))?;
    Ok(out)
}

/// Seconds the next attempt must wait after `failures` consecutive failed ones: none for the
/// first [`FREE_ATTEMPTS`], then doubling from 1 s up to [`MAX_WAIT_SECS`].
pub fn wait_secs(failures: u32) -> u64 {
    match failures.checked_sub(FREE_ATTEMPTS) {
        None => 0,
        Some(n) => 1u64.checked_shl(n).unwrap_or(u64::MAX).min(MAX_WAIT_SECS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters for tests; the stored form carries them.
    const TEST_COST: Cost = Cost {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    #[test]
    fn hash_and_verify() {
        let stored = hash(b"1234", TEST_COST).unwrap();
        assert!(
            stored.starts_with("argon2id$v=19$m=64,t=1,p=1$"),
            "{stored}"
        );
        assert!(verify(b"1234", &stored).unwrap());
        assert!(!verify(b"1235", &stored).unwrap());
        assert!(!verify(b"", &stored).unwrap());
        // Salted: the same passcode hashes differently each time, and both verify.
        let again = hash(b"1234", TEST_COST).unwrap();
        assert_ne!(again, stored);
        assert!(verify(b"1234", &again).unwrap());
        // A damaged stored form is an error, not a match or a mismatch.
        for bad in [
            "",
            "argon2i$v=19$m=64,t=1,p=1$00$00",
            &stored[..stored.len() - 2],
            &stored.replace("m=64", "m=x"),
            &format!("{stored}$00"),
        ] {
            assert!(verify(b"1234", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_hash_depends_on_passcode_salt_and_cost() {
        let a = derive(b"pw", &[1; SALT_LEN], TEST_COST).unwrap();
        assert_ne!(a, derive(b"pw", &[2; SALT_LEN], TEST_COST).unwrap());
        assert_ne!(a, derive(b"px", &[1; SALT_LEN], TEST_COST).unwrap());
        let t2 = Cost { t: 2, ..TEST_COST };
        assert_ne!(a, derive(b"pw", &[1; SALT_LEN], t2).unwrap());
        assert_eq!(a, derive(b"pw", &[1; SALT_LEN], TEST_COST).unwrap());
    }

    #[test]
    fn waits_grow_after_the_free_attempts() {
        let waits: Vec<u64> = (0..=12).map(wait_secs).collect();
        assert_eq!(waits, [0, 0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(wait_secs(u32::MAX), MAX_WAIT_SECS);
    }
}
