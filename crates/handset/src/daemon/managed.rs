//! What the organisation's MDM may do on this handset, and what it is told (issue 12; the
//! connection is [`crate::mdm_link`]'s). Everything here is confined to the **managed**
//! profiles (spec `managed = true`, `profile create --managed`): a command aimed at any other
//! name is refused with the same words whether that profile exists or not, and the
//! compliance report lists managed profiles only, so the MDM can neither act on nor learn of
//! a personal profile.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Handset;
use crate::error::{Error, Result};

/// The refusal of a command aimed at a profile the MDM does not manage (it names nothing).
pub const NOT_MANAGED: &str = "not a profile this MDM manages";

/// A managed profile as the compliance report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedProfile {
    /// The profile's name.
    pub name: String,
    /// Its lifecycle state (`running`, `stopped`, ...).
    pub state: String,
    /// Whether it is locked.
    pub locked: bool,
    /// The version of the organisation policy in force, if one is.
    pub policy_version: Option<u64>,
    /// SHA-256 of the guest kernel (or firmware) it boots, if readable.
    pub kernel_sha256: Option<String>,
    /// SHA-256 of its initrd, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_sha256: Option<String>,
    /// What the policy in force refuses about it now (expired, kernel not allowed, ...).
    pub violations: Vec<String>,
}

/// The compliance report (`POST /v1/device/compliance`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplianceReport {
    /// This pocketvisor's version.
    pub pocketvisor_version: String,
    /// SHA-256 of the VMM binary the daemon runs its profiles with.
    pub vmm_sha256: Option<String>,
    /// The managed profiles, by name.
    pub profiles: Vec<ManagedProfile>,
}

/// SHA-256 of files, kept while a file's size and modification time stay the same (the
/// report is built at every poll; a kernel is hashed once).
#[derive(Default)]
pub struct HashCache(std::sync::Mutex<HashMap<PathBuf, (u64, std::time::SystemTime, String)>>);

impl HashCache {
    /// The file's SHA-256, none if it cannot be read.
    pub fn sha256(&self, path: &Path) -> Option<String> {
        let meta = std::fs::metadata(path).ok()?;
        let stamp = (meta.len(), meta.modified().ok()?);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((len, time, hash)) = map.get(path) {
            if (*len, *time) == stamp {
                return Some(hash.clone());
            }
        }
        let hash = crate::org_policy::sha256_file(path).ok()?;
        map.insert(path.to_path_buf(), (stamp.0, stamp.1, hash.clone()));
        Some(hash)
    }
}

/// The profile a lock, unlock or wipe command names in its body (`{"profile": "NAME"}`); an
/// empty body means every managed profile.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Aim {
    profile: String,
}

impl Handset {
    /// The managed profiles' names, sorted.
    pub fn managed_profiles(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for row in self.registry.db().profiles()? {
            if self.registry.spec(&row.name).is_ok_and(|s| s.managed) {
                out.push(row.name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether profile `name` exists and is managed.
    pub fn is_managed(&self, name: &str) -> bool {
        crate::spec::check_name("", name).is_ok()
            && self.registry.row(name).is_ok()
            && self.registry.spec(name).is_ok_and(|s| s.managed)
    }

    /// The managed profiles a lock, unlock or wipe command with `body` aims at: every one
    /// for an empty body, else the one it names. Err: why it is refused.
    pub(crate) fn command_targets(&self, body: &str) -> std::result::Result<Vec<String>, String> {
        if body.trim().is_empty() {
            let all = self.managed_profiles().map_err(|e| e.to_string())?;
            if all.is_empty() {
                return Err("no managed profile on this handset".into());
            }
            return Ok(all);
        }
        let aim: Aim = serde_json::from_str(body)
            .map_err(|_| "a body must be empty or {\"profile\": NAME}".to_string())?;
        if !self.is_managed(&aim.profile) {
            return Err(NOT_MANAGED.into());
        }
        Ok(vec![aim.profile])
    }

    /// Locks managed profile `name` for the MDM; an unmanaged one is refused.
    pub(crate) async fn mdm_lock(self: &Arc<Self>, name: &str) -> Result<bool> {
        self.check_managed(name)?;
        self.lock_by_mdm(name).await
    }

    /// Unlocks managed profile `name` for the MDM; an unmanaged one is refused.
    pub(crate) async fn mdm_unlock(self: &Arc<Self>, name: &str) -> Result<bool> {
        self.check_managed(name)?;
        self.unlock_by_mdm(name).await
    }

    /// Wipes managed profile `name` for the MDM; an unmanaged one is refused. Returns whether
    /// it was crypto-erased.
    pub(crate) async fn mdm_wipe(self: &Arc<Self>, name: &str) -> Result<bool> {
        self.check_managed(name)?;
        Ok(self.wipe(name).await?.crypto_erased)
    }

    /// Applies a signed policy the MDM sent (`envelope`), if it verifies under the trusted
    /// organisation key and governs a managed profile; audited as `policy-apply` like every
    /// policy change, with `who`.
    pub(crate) async fn mdm_policy(
        &self,
        envelope: &[u8],
        who: &str,
    ) -> Result<crate::org_policy::PolicyApplied> {
        // Verified before its profile name is looked at.
        let key = crate::org_policy::trusted_key(self.dir())?.ok_or_else(|| {
            Error::Denied("the handset trusts no organisation key (handset --org-key)".into())
        })?;
        let offered = policy::verify(envelope, &key).map_err(|e| {
            let why = format!("{who}: refused: {e}");
            self.audit("-", "policy-apply", &why);
            Error::Denied(e.to_string())
        })?;
        if !self.is_managed(&offered.policy.profile) {
            self.audit(
                "-",
                "policy-apply",
                &format!("{who}: refused: {NOT_MANAGED}"),
            );
            return Err(Error::Denied(NOT_MANAGED.into()));
        }
        let now = crate::policy_clock::now();
        let applied =
            crate::org_policy::apply_audited(self.dir(), envelope, now, who, |p, a, d| {
                self.audit(p, a, d)
            })?;
        if applied.changed {
            let _ = self.push_net_filter(&applied.profile).await;
        }
        Ok(applied)
    }

    fn check_managed(&self, name: &str) -> Result<()> {
        if self.is_managed(name) {
            Ok(())
        } else {
            Err(Error::Denied(NOT_MANAGED.into()))
        }
    }

    /// Whether managed profile `name` is encrypted at rest (its wipe is a crypto-erase).
    pub(crate) fn encrypted_at_rest(&self, name: &str) -> bool {
        self.registry.spec(name).is_ok_and(|s| s.encrypt_at_rest)
    }

    /// The compliance report: the managed profiles only.
    pub fn compliance(&self, hashes: &HashCache) -> Result<ComplianceReport> {
        let now = crate::policy_clock::now();
        let mut profiles = Vec::new();
        for name in self.managed_profiles()? {
            let Ok(row) = self.registry.row(&name) else {
                continue;
            };
            let Ok(spec) = self.registry.spec(&name) else {
                continue;
            };
            let mut violations = Vec::new();
            let cfg = self.registry.vm_config(&spec, row.vsock_cid);
            let (kernel, initrd) = match &cfg {
                Ok(cfg) => (
                    hashes.sha256(cfg.firmware.as_deref().unwrap_or(&cfg.kernel)),
                    cfg.initrd.as_deref().and_then(|i| hashes.sha256(i)),
                ),
                Err(e) => {
                    violations.push(e.to_string());
                    (None, None)
                }
            };
            let policy = crate::org_policy::in_force(self.dir(), &name);
            let policy_version = match &policy {
                Ok(p) => p.as_ref().map(|v| v.policy.version),
                Err(e) => {
                    violations.push(e.to_string());
                    None
                }
            };
            if let (Ok(Some(_)), Ok(cfg)) = (&policy, &cfg) {
                if let Err(e) = crate::org_policy::check_start(self.dir(), &name, &spec, cfg, now) {
                    violations.push(e.to_string());
                }
            }
            profiles.push(ManagedProfile {
                locked: crate::lock::is_locked(self.dir(), &name),
                state: row.state,
                name,
                policy_version,
                kernel_sha256: kernel,
                initrd_sha256: initrd,
                violations,
            });
        }
        Ok(ComplianceReport {
            pocketvisor_version: env!("CARGO_PKG_VERSION").to_string(),
            vmm_sha256: hashes.sha256(&self.opts.vmm_bin),
            profiles,
        })
    }
}
