//! Key leases (a policy's `storage.lease`): a managed profile whose policy asks for one has
//! its data key unwrapped ([`crate::disk_keys::keys_for_vmm`]) only while the handset holds a
//! lease its MDM signed for it, valid now. The lease is `<state-dir>/mdm/lease.json` (in the
//! owner-only `mdm/`; temp + fsync + rename), renewed by the MDM link at every contact, and checked against the
//! command key the device enrolled with at every use, so a lease changed on disk is no lease.
//! Past it (offline), [`crate::org_policy::lock_reason`] has the daemon suspend the running
//! profile (its key leaves memory with its VMM), and it does not start or resume until a
//! fresh lease arrives.
//!
//! The clock: unix time, or, when `POCKETVISOR_LEASE_CLOCK` names a file, the unix seconds
//! written in it (the tests move time with it).

use std::path::{Path, PathBuf};

use mdm::protocol::{Enrolled, Lease};

use crate::error::{Error, Result};
use crate::state_dir::{self, StateDir};

/// The variable naming the file of a clock the tests move.
pub const CLOCK_VAR: &str = "POCKETVISOR_LEASE_CLOCK";
const LEASE_FILE: &str = "lease.json";
const ENROLLMENT_FILE: &str = "enrollment.json";

/// The time leases are checked at (unix seconds).
pub fn now() -> u64 {
    if let Some(file) = std::env::var_os(CLOCK_VAR) {
        if let Some(t) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return t;
        }
    }
    policy::unix_now()
}

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

fn enrolled(mdm_dir: &Path) -> Option<Enrolled> {
    serde_json::from_slice(&std::fs::read(mdm_dir.join(ENROLLMENT_FILE)).ok()?).ok()
}

/// Until when the lease kept here is valid, if it verifies under the enrolled command key.
pub fn valid_until(dir: &StateDir) -> Option<u64> {
    let d = mdm_dir(dir);
    let e = enrolled(&d)?;
    let lease: Lease = serde_json::from_slice(&std::fs::read(d.join(LEASE_FILE)).ok()?).ok()?;
    lease
        .verify(&e.command_key, &e.device_id)
        .then_some(lease.valid_until)
}

/// Keeps `lease` if it verifies and runs later than the one kept.
pub fn store(dir: &StateDir, lease: &Lease) -> Result<()> {
    let d = mdm_dir(dir);
    let e = enrolled(&d).ok_or_else(|| Error::Internal("not enrolled".into()))?;
    if !lease.verify(&e.command_key, &e.device_id) {
        return Err(Error::Denied(
            "a lease not signed by the enrolled MDM".into(),
        ));
    }
    if valid_until(dir).is_some_and(|t| t >= lease.valid_until) {
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
