//! A governed profile's policy travelling inside its portable file, and the handset's record
//! of the newest policy version it has accepted for each profile name.
//!
//! Export ships `profiles/P/policy.pvpol` (the signed envelope, byte for byte) inside the
//! authenticated `.pvp` file. Import calls [`check_imported`] before the profile appears: the
//! envelope must verify under **this** handset's trusted organisation key, govern the name
//! the profile is imported under, be unexpired, and not be older than the newest version this
//! handset accepted for that name ([`accepted_version`]). A refusal leaves nothing behind.
//!
//! The record (`<state-dir>/policy-versions/<name>`: `<key fingerprint> <version>`) outlives
//! the profile, so an old export of a profile deleted here cannot bring back a policy its
//! organisation replaced. It is written after every accepted policy ([`record_accepted`]):
//! by `apply` and by an import. It only ever grows for a given key; a record made under
//! another organisation key (before `policy trust --replace`) does not count.

use std::path::PathBuf;

use policy::{OrgPublicKey, Verified};

use crate::error::{Error, Result};
use crate::org_policy::trusted_key;
use crate::state_dir::{self, StateDir};

/// `<state-dir>/policy-versions/`: one file per profile name ever governed here.
fn versions_dir(dir: &StateDir) -> PathBuf {
    dir.root().join("policy-versions")
}

/// The newest policy version this handset accepted for profile `name` under `key`.
pub fn accepted_version(dir: &StateDir, name: &str, key: &OrgPublicKey) -> Result<Option<u64>> {
    crate::spec::check_name("profile name", name)?;
    let path = versions_dir(dir).join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()))(e)),
    };
    let mut words = text.split_whitespace();
    let (Some(fingerprint), Some(version), None) = (words.next(), words.next(), words.next())
    else {
        return Err(Error::Internal(format!(
            "{} is not `<key fingerprint> <version>`",
            path.display()
        )));
    };
    if fingerprint != key.fingerprint() {
        return Ok(None);
    }
    version
        .parse()
        .map(Some)
        .map_err(|_| Error::Internal(format!("{}: bad version {version:?}", path.display())))
}

/// Records that `version` of profile `name`'s policy was accepted under `key` (kept when an
/// equal or newer one is already recorded). Atomic: temp file, fsync, rename.
pub fn record_accepted(dir: &StateDir, name: &str, key: &OrgPublicKey, version: u64) -> Result<()> {
    if accepted_version(dir, name, key)?.is_some_and(|v| v >= version) {
        return Ok(());
    }
    let versions = versions_dir(dir);
    state_dir::create_private_dir(&versions)?;
    state_dir::write_atomic(
        &versions.join(name),
        format!("{} {version}\n", key.fingerprint()).as_bytes(),
    )
}

/// Checks the policy a governed profile's file carries, for an import under `name` at `now`:
/// it must verify under the trusted key, govern `name`, be unexpired and not older than the
/// newest version accepted here for `name`. Returns it verified.
pub fn check_imported(dir: &StateDir, name: &str, envelope: &[u8], now: u64) -> Result<Verified> {
    let key = trusted_key(dir)?.ok_or_else(|| {
        Error::Denied(format!(
            "profile {name:?} is governed by an organisation policy, and this handset trusts \
             no organisation key to verify it: trust the organisation's key first (`pocketvisor \
             policy trust KEY`), then import again"
        ))
    })?;
    let offered = policy::verify(envelope, &key).map_err(|e| {
        Error::Denied(format!(
            "the organisation policy the file carries does not verify under this handset's \
             organisation key ({e}); nothing was imported"
        ))
    })?;
    let p = &offered.policy;
    if p.profile != name {
        return Err(Error::Denied(format!(
            "the file's organisation policy (version {}) governs profile {:?}: a governed \
             profile keeps its name (import it without --name, or as {:?})",
            p.version, p.profile, p.profile
        )));
    }
    if let Some(expires_at) = p.expires_at.filter(|_| p.is_expired(now)) {
        return Err(Error::Denied(
            policy::PolicyError::Expired {
                version: p.version,
                expires_at,
                now,
            }
            .to_string(),
        ));
    }
    if let Some(in_force) = accepted_version(dir, name, &key)?.filter(|&v| v > p.version) {
        return Err(Error::Denied(
            policy::PolicyError::Rollback {
                offered: p.version,
                in_force,
            }
            .to_string()
                + &format!(" (this handset accepted version {in_force} for {name:?} before)"),
        ));
    }
    Ok(offered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::OrgSecretKey;

    const NOW: u64 = 1_764_850_000;

    fn signed(key: &OrgSecretKey, profile: &str, version: u64, extra: &str) -> Vec<u8> {
        let doc =
            format!("version = {version}\nissued_at = {NOW}\nprofile = \"{profile}\"\n{extra}");
        policy::sign(doc.as_bytes(), key).unwrap()
    }

    fn setup() -> (tempfile::TempDir, StateDir, OrgSecretKey) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path()).unwrap();
        let key = OrgSecretKey::generate();
        crate::org_policy::trust(&dir, &key.public(), false).unwrap();
        (tmp, dir, key)
    }

    #[test]
    fn a_policy_signed_by_the_trusted_key_for_the_name_is_accepted() {
        let (_t, dir, key) = setup();
        let v = check_imported(&dir, "work", &signed(&key, "work", 2, ""), NOW).unwrap();
        assert_eq!(v.policy.version, 2);
    }

    #[test]
    fn untrusted_tampered_renamed_and_expired_policies_are_refused() {
        let (_t, dir, key) = setup();
        let other = OrgSecretKey::generate();
        let err = check_imported(&dir, "work", &signed(&other, "work", 1, ""), NOW).unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        let mut tampered = signed(&key, "work", 1, "");
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        assert!(check_imported(&dir, "work", &tampered, NOW).is_err());
        let err = check_imported(&dir, "work2", &signed(&key, "work", 1, ""), NOW).unwrap_err();
        assert!(err.to_string().contains("keeps its name"), "{err}");
        let expiring = signed(&key, "work", 1, &format!("expires_at = {}\n", NOW + 1));
        check_imported(&dir, "work", &expiring, NOW).unwrap();
        let err = check_imported(&dir, "work", &expiring, NOW + 1).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        std::fs::remove_file(dir.org_key()).unwrap();
        let err = check_imported(&dir, "work", &signed(&key, "work", 1, ""), NOW).unwrap_err();
        assert!(
            err.to_string().contains("trusts no organisation key"),
            "{err}"
        );
    }

    #[test]
    fn an_older_version_than_one_accepted_here_is_a_rollback() {
        let (_t, dir, key) = setup();
        record_accepted(&dir, "work", &key.public(), 3).unwrap();
        // Recording an older version keeps the newer one.
        record_accepted(&dir, "work", &key.public(), 2).unwrap();
        assert_eq!(
            accepted_version(&dir, "work", &key.public()).unwrap(),
            Some(3)
        );
        let err = check_imported(&dir, "work", &signed(&key, "work", 2, ""), NOW).unwrap_err();
        assert!(err.to_string().contains("no rollback"), "{err}");
        check_imported(&dir, "work", &signed(&key, "work", 3, ""), NOW).unwrap();
        // Another profile's record and another key's record do not count.
        check_imported(&dir, "mail", &signed(&key, "mail", 1, ""), NOW).unwrap();
        let other = OrgSecretKey::generate();
        assert_eq!(
            accepted_version(&dir, "work", &other.public()).unwrap(),
            None
        );
    }
}
