//! Key leases (a policy's `storage.lease`): a managed profile whose policy asks for one has
//! its data key unwrapped ([`crate::disk_keys::keys_for_vmm`]) only while the handset holds a
//! lease its MDM signed for it, valid now. The lease is `<state-dir>/mdm/lease.json` (in the
//! owner-only `mdm/`; temp + fsync + rename), renewed by the MDM link at every contact, and checked against the
//! command key the device enrolled with at every use, so a lease changed on disk is no lease.
//! Past it (offline), [`crate::org_policy::lock_reason`] has the daemon suspend the running
//! profile (its key leaves memory with its VMM), and it does not start or resume until a
//! fresh lease arrives.
//!
//! A lease is also the MDM's signed word that it reached the device at its `issued_at`: a
//! policy's offline limit runs from the later of that and the policy's own issue time
//! ([`last_contact`]), so the link asks for one at every contact while a managed profile has
//! a lease or an offline limit. Deadlines are checked on [`crate::policy_clock`].

use std::path::{Path, PathBuf};

use mdm::protocol::{Enrolled, Lease};

use crate::error::{Error, Result};
use crate::state_dir::{self, StateDir};

const LEASE_FILE: &str = "lease.json";
const ENROLLMENT_FILE: &str = "enrollment.json";

fn mdm_dir(dir: &StateDir) -> PathBuf {
    dir.root().join(super::MDM_DIR)
}

/// The lease length profile `name`'s policy asks for, if any.
pub fn required_secs(dir: &StateDir, name: &str) -> Option<u64> {
    crate::org_policy::in_force(dir, name)
        .ok()
        .flatten()
        .and_then(|v| v.policy.storage.lease_secs())
}

/// The lease to ask the MDM for at a contact, given the managed profiles: as long as the
/// longest any of their policies wants, or a one-second one (a signed time of contact) if
/// none wants a lease but one has an offline limit; none if neither.
pub fn wanted_secs(dir: &StateDir, managed: &[String]) -> Option<u64> {
    let policies: Vec<_> = managed
        .iter()
        .filter_map(|n| crate::org_policy::in_force(dir, n).ok().flatten())
        .collect();
    let lease = policies
        .iter()
        .filter_map(|v| v.policy.storage.lease_secs())
        .max();
    let offline = policies
        .iter()
        .any(|v| v.policy.offline.max_offline_secs.is_some());
    lease.or(offline.then_some(1))
}

fn enrolled(mdm_dir: &Path) -> Option<Enrolled> {
    serde_json::from_slice(&std::fs::read(mdm_dir.join(ENROLLMENT_FILE)).ok()?).ok()
}

/// The lease kept here, if it verifies under the enrolled command key.
fn kept(dir: &StateDir) -> Option<Lease> {
    let d = mdm_dir(dir);
    let e = enrolled(&d)?;
    let lease: Lease = serde_json::from_slice(&std::fs::read(d.join(LEASE_FILE)).ok()?).ok()?;
    lease.verify(&e.command_key, &e.device_id).then_some(lease)
}

/// Until when the lease kept here is valid, if it verifies under the enrolled command key.
pub fn valid_until(dir: &StateDir) -> Option<u64> {
    kept(dir).map(|l| l.valid_until)
}

/// When the MDM last reached this device, by its own signed word (the kept lease's
/// `issued_at`), if the handset holds one.
pub fn last_contact(dir: &StateDir) -> Option<u64> {
    kept(dir).map(|l| l.issued_at)
}

/// Keeps `lease` if it verifies and is newer than the one kept (a later contact; at the same
/// time, a later end).
pub fn store(dir: &StateDir, lease: &Lease) -> Result<()> {
    let d = mdm_dir(dir);
    let e = enrolled(&d).ok_or_else(|| Error::Internal("not enrolled".into()))?;
    if !lease.verify(&e.command_key, &e.device_id) {
        return Err(Error::Denied(
            "a lease not signed by the enrolled MDM".into(),
        ));
    }
    if kept(dir)
        .is_some_and(|k| (k.issued_at, k.valid_until) >= (lease.issued_at, lease.valid_until))
    {
        return Ok(());
    }
    let text = serde_json::to_vec(lease).map_err(|e| Error::Internal(format!("lease: {e}")))?;
    state_dir::write_atomic(&d.join(LEASE_FILE), &text)
}

/// Refuses profile `name`'s data key unless its policy asks for no lease or a valid one is
/// held at `now`.
pub fn check(dir: &StateDir, name: &str, now: u64) -> Result<()> {
    if required_secs(dir, name).is_none() {
        return Ok(());
    }
    match valid_until(dir) {
        Some(t) if now < t => Ok(()),
        Some(t) => Err(Error::Denied(format!(
            "profile {name:?} is locked: its key lease from the MDM ran out at {t} (unix \
             time); it unlocks when the handset reaches the MDM for a fresh one"
        ))),
        None => Err(Error::Denied(format!(
            "profile {name:?} is locked: its policy needs a key lease from the MDM and the \
             handset holds none (is it enrolled with `handset --mdm`?)"
        ))),
    }
}
